"""Shard lists: expand a user's shard spec, find the manifest, know how many samples each shard holds.

A spec is a string or a list of strings, each one of:
- a local directory: its `manifest.json` names the shards; without one, all `*.tar` in it (sorted);
- a local path, brace pattern (`data-{000000..000127}.tar`) or glob (`data-*.tar`);
- a URL webdataset's `gopen` opens, e.g. `pipe:aws s3 cp s3://bucket/data-000001.tar -` (braces
  allowed); `::` separates several specs inside one string, as in webdataset.

Local shards are checked at once: a missing file or a pattern matching nothing raises
FileNotFoundError naming it. Remote shards are checked when opened (`ShardOpenError`).

Sample counts come from the manifest beside the shards (`manifest.json`, written by
make_shards; for remote shards pass `manifest=` as a path or URL). Shards it does not list (for
example packed with the plain `tar` command) are counted by reading their tar headers (local) or
by streaming them once (remote, slow); `index_shards` writes a manifest for such shards. A
sample is a run of consecutive tar members with the same key, WebDataset's convention
(`base_plus_ext`): the reader groups members exactly the same way, so counts and stream agree.

Reading: `tar_members` is webdataset's `gopen` + `tar_file_iterator`, except for plain local tars,
which a small ustar parser reads with a fifth of tarfile's CPU per member and hands over to
webdataset at the first header it does not handle (tests check both give the same members).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ..atomic import write_json
from .shards import MANIFEST_FORMAT, MANIFEST_NAME

_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members that are not sample files


class ShardOpenError(FileNotFoundError):
    """A shard that cannot be opened at all (missing file, failing pipe/URL); always an error."""


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


@dataclass
class ShardSet:
    """The shards of a dataset and what the manifest says about them."""

    urls: list  # in the order the spec gave them: the shard-list order of `cmscale.data.order`
    counts: list  # samples per shard
    resolution: int | None = None  # from the manifest, if any
    classes: list | None = None  # class names (label i is classes[i]), from the manifest, if any
    truncated: list | None = None  # shards found truncated while counting (counts exclude the cut)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> dict:
        """What the data order depends on, as JSON: shard names (not their directory, so a
        moved dataset matches) and sample counts, in order, with a digest of both."""
        names = [shard_name(u) for u in self.urls]
        digest = hashlib.sha256(json.dumps([names, list(self.counts)]).encode()).hexdigest()
        return {"shards": len(names), "samples": self.num_samples, "digest": digest[:16],
                "first": names[0] if names else None, "last": names[-1] if names else None}


def expand_spec(spec) -> list[str]:
    """Expand a spec (see module docstring) to a list of shard URLs/paths; check local ones exist."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_spec(s)]
    spec = os.fspath(spec)
    urls = []
    for url in expand_urls(spec):  # "::" splitting and brace expansion
        if not is_local(url):
            urls.append(url)
            continue
        path = local_path(url)
        if os.path.isdir(path):
            urls.extend(_dir_shards(path))
        elif glob.has_magic(path):
            found = sorted(glob.glob(path))
            if not found:
                raise FileNotFoundError(f"shard pattern {path!r} matched no files")
            urls.extend(found)
        else:
            urls.append(path)
    missing = [u for u in urls if is_local(u) and not os.path.isfile(local_path(u))]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(f"missing shard(s) for {spec!r}: {', '.join(missing[:5])}{more}")
    if not urls:
        raise FileNotFoundError(f"shard spec {spec!r} names no shards")
    return urls


def _dir_shards(path: str) -> list[str]:
    manifest = os.path.join(path, MANIFEST_NAME)
    if os.path.isfile(manifest):
        return [os.path.join(path, s["name"]) for s in read_manifest(manifest)["shards"]]
    found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
    if not found:
        raise FileNotFoundError(f"no {MANIFEST_NAME} and no *.tar shards in directory {path!r}")
    return found


def read_manifest(url: str) -> dict:
    """Load and check a manifest (JSON; never pickle)."""
    with gopen(url, "rb") as f:
        m = json.loads(f.read().decode("utf-8"))
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise ValueError(f"{url}: not a cmscale shard manifest (no 'shards' list)")
    for s in m["shards"]:
        if not isinstance(s.get("name"), str) or not isinstance(s.get("samples"), int):
            raise ValueError(f"{url}: manifest entry without name/samples: {s!r}")
    return m


def load_shard_set(spec, manifest: str | None = None) -> ShardSet:
    """Expand `spec` and attach sample counts, resolution and classes (see module docstring)."""
    urls = expand_spec(spec)
    manifests = {}  # directory -> manifest dict (or None)
    if manifest is not None:
        m = read_manifest(os.fspath(manifest))
        for u in urls:
            manifests[_dirname(u)] = m
    counts, used, truncated = [], [], []
    for u in urls:
        d = _dirname(u)
        if d not in manifests:
            path = os.path.join(local_path(d), MANIFEST_NAME)
            manifests[d] = read_manifest(path) if is_local(u) and os.path.isfile(path) else None
        m = manifests[d]
        listed = {s["name"]: s["samples"] for s in m["shards"]} if m else {}
        name = shard_name(u)
        if name in listed:
            counts.append(listed[name])
            used.append(m)
        else:
            if not is_local(u):
                warnings.warn(f"no manifest entry for remote shard {u}: streaming it once to count samples")
            n, complete = count_samples(u)
            counts.append(n)
            if not complete:
                truncated.append(u)
    resolution = _agree([m.get("resolution") for m in used], "resolution")
    classes = _agree([m.get("classes") for m in used], "classes")
    return ShardSet(urls=urls, counts=counts, resolution=resolution, classes=classes, truncated=truncated)


def index_shards(spec, out: str | None = None, *, resolution: int | None = None,
                 classes: list | None = None) -> dict:
    """Write a manifest for existing shards (e.g. packed by `tar`), so no rank has to count them.

    The manifest goes to `out` (default: manifest.json beside the first shard) and names the
    shards relative to it; all shards must sit in that directory.
    """
    urls = expand_spec(spec)
    out = out or os.path.join(os.path.dirname(local_path(urls[0])), MANIFEST_NAME)
    shards, truncated = [], []
    for u in urls:
        if os.path.dirname(os.path.abspath(local_path(u))) != os.path.dirname(os.path.abspath(out)):
            raise ValueError(f"{u} is not in the manifest's directory {os.path.dirname(out)!r}")
        n, intact = count_samples(u)
        shards.append({"name": os.path.basename(u), "samples": n})
        if not intact:
            truncated.append(os.path.basename(u))
    manifest = {"format": MANIFEST_FORMAT, "source": "index_shards", "resolution": resolution,
                "classes": classes, "num_samples": sum(s["samples"] for s in shards),
                "shards": shards, "truncated": truncated}
    write_json(out, manifest)
    return manifest


def shard_name(url: str) -> str:
    """The file name a manifest lists a shard under: the last `*.tar*` word of a pipe/URL, else the basename.

    `pipe:aws s3 cp s3://bucket/data-000001.tar -` -> `data-000001.tar`.
    """
    if not is_local(url):
        words = [w for w in re.split(r"[\s'\"]+", url) if ".tar" in w]
        if words:
            return words[-1].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(local_path(url))


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _agree(values, what):
    values = [v for v in values if v is not None]
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"the shards' manifests disagree on {what}: {sorted(map(str, set(map(str, values))))}")
    return values[0] if values else None


def is_sample_member(name: str | None) -> bool:
    """Whether a regular tar member belongs to a sample (webdataset's tar_file_iterator rules)."""
    if not name or _is_meta(name):
        return False
    return base_plus_ext(name)[0] is not None


def count_samples(url: str) -> tuple[int, bool]:
    """(number of complete samples, whether the tar is intact), grouping members as the reader does.

    Local tars are counted from their headers only. A truncated tar counts the samples before
    the cut (not the one being cut, unless the cut member starts a new sample); the reader,
    planned with this count, stops at the same place and never meets the cut.
    """
    if not is_local(url):
        n = 0
        try:
            for _ in tar_samples(url):
                n += 1
        except Exception as e:
            if n == 0:
                raise ShardOpenError(f"cannot read shard {url}: {e}") from e
            return n, False
        return n, True
    path = local_path(url)
    size = os.path.getsize(path)
    keys, intact, drop_last = [], True, False
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                if m.offset_data + m.size > size:
                    # Data cut off: the sample in progress is complete only if m starts another.
                    intact, drop_last = False, bool(keys) and _key(m.name) == keys[-1]
                    break
                key = _key(m.name)
                if key is not None and (not keys or keys[-1] != key):
                    keys.append(key)
    except (tarfile.TarError, EOFError, OSError):
        intact, drop_last = False, bool(keys)  # a broken header: the sample in progress may miss members
    return len(keys) - int(drop_last), intact


def tar_samples(url: str):
    """Samples of a shard: yields (key, {extension: bytes}), in tar order.

    Grouping is webdataset's group_by_keys rule (consecutive members sharing `base_plus_ext`'s
    key; extensions lower-cased). On a read error the sample in progress is yielded only if it
    is known to be complete (the member that failed starts another sample); then the error
    propagates. ShardOpenError if the shard cannot be opened.
    """
    reading = [None]  # name of the member whose data is being read
    key, sample = None, None
    try:
        for f in tar_members(url, reading):
            fname = f["fname"]
            if not is_sample_member(fname):
                continue
            prefix, suffix = base_plus_ext(fname)
            if prefix != key:
                if key is not None:
                    yield key, sample
                key, sample = prefix, {}
            sample.setdefault(suffix.lower(), f["data"])
    except ShardOpenError:
        raise
    except Exception:
        failed = reading[0]
        if key is not None and failed is not None and _key(failed) != key:
            yield key, sample
        raise
    if key is not None:
        yield key, sample


def tar_members(url: str, reading: list):
    """Regular, non-meta members of a shard as dict(fname=, data=), like webdataset's tar_file_iterator.

    Remote shards (and unusual local ones) are read by webdataset: `gopen` + `tar_file_iterator`.
    Plain local tars take a fast path (`_plain_members`, much less CPU per member than tarfile's
    stream mode) that yields the same members;
    at the first header it does not handle it hands over to webdataset, which skips the members
    already yielded. `reading[0]` is set to each member's name before its data is read.
    """
    def note(name):
        reading[0] = name
        return True

    yielded = 0
    if is_local(url):
        f = _open_local(url)
        try:
            for m in _plain_members(f, reading):
                yield m
                yielded += 1
            return
        except _Unsupported:
            pass
        finally:
            f.close()
        f = _open_local(url)
    else:
        try:
            f = gopen(url, "rb")
        except Exception as e:
            raise ShardOpenError(f"cannot open shard {url}: {e}") from e
    try:
        for i, m in enumerate(tar_file_iterator(f, select_files=note)):
            if i >= yielded:
                yield m
    finally:
        try:
            f.close()
        except Exception:
            pass  # a pipe closed early may report a broken-pipe status: not our concern


def _open_local(url: str):
    try:
        return open(local_path(url), "rb", buffering=1 << 20)  # gopen's open() reads 8 KiB at a time
    except OSError as e:
        raise ShardOpenError(f"cannot open shard {url}: {e}") from e


class _Unsupported(Exception):
    """A tar feature the fast path leaves to tarfile (compression, pax/GNU long names, ...)."""


_REGULAR = (b"0", b"\0", b"7")  # tarfile's REGULAR_TYPES without GNU sparse
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: size ignored
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise _Unsupported("base-256 number")
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _Unsupported("bad number field") from None


def _plain_members(f, reading):
    """Members of an uncompressed ustar/GNU tar, parsed as tarfile would; _Unsupported otherwise."""
    first = True
    while True:
        h = f.read(512)
        if first and (len(h) < 512 or h.startswith(_COMPRESSED) or h.count(0) == 512):
            raise _Unsupported("compressed, empty or broken at the start")  # tarfile decides
        first = False
        if len(h) < 512 or h.count(0) == 512:
            return  # end of archive (tarfile also ends silently at a later truncated header)
        chk = _octal(h[148:156])
        unsigned = 256 + sum(h[:148]) + sum(h[156:])
        if chk != unsigned:
            raise _Unsupported("checksum (or signed checksum)")
        kind, size = h[156:157], _octal(h[124:136])
        name = h[:100].split(b"\0", 1)[0]
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        name = name.decode("utf-8", "surrogateescape")
        if kind in _NO_DATA or (kind == b"\0" and name.endswith("/")):
            continue
        if kind not in _REGULAR:
            raise _Unsupported(f"member type {kind!r}")
        padded = size + (-size) % 512
        if _is_meta(name):
            if len(f.read(padded)) < padded:
                raise tarfile.ReadError("unexpected end of data")
            continue
        reading[0] = name
        data = f.read(size)
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data")
        yield {"fname": name, "data": data}
        if len(f.read(padded - size)) < padded - size:
            raise tarfile.ReadError("unexpected end of data")  # as tarfile, when it looks for the next header


def _is_meta(name: str) -> bool:
    # tar_file_iterator's two rules for members that are not sample files.
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(_META.match(name))


def _key(name: str):
    return base_plus_ext(name)[0] if is_sample_member(name) else None
