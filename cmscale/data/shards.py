"""make_shards: turn an image source into WebDataset tar shards plus a JSON manifest.

Output in OUT_DIR: `data-000000.tar`, `data-000001.tar`, ... (`shard_size` samples each, the last
one shorter) and `manifest.json`. Sample k (0-based, in the written order) has the key
`f"{k:08d}"` and the members `<key>.<png|jpg|webp>` (RGB, resolution x resolution) and, when the
source has classes, `<key>.cls` (the class index as ASCII). The manifest names the shards with
their sample counts, the resolution, the class names, and what was converted or skipped.

Tars are written with the standard library (member order and format as webdataset's TarWriter:
ustar, members sorted by name within a sample), so the tool does not import torch.

Processing: the source's items are shuffled with `seed` (so shards are never class-sorted; the
loader's shuffle is local, see `cmscale.data.order`), each is decoded, fixed under the bad-input
policy (`cmscale.data.images`; default "convert"), cropped as the reference does
(`center_crop_arr`) and encoded, in `workers` processes; results keep the input order, so the
output is the same for any number of workers (tar member times are fixed: byte-identical).

Crash safety: a shard is written to `<name>.tmp-<pid>`, flushed, fsynced and renamed, so a killed
run never leaves a truncated shard under a final name; the manifest is written last the same
way, so its presence means the run finished. Leftover temporary files are removed by the next run.
"""
from __future__ import annotations

import glob
import io
import multiprocessing
import os
import signal
import tarfile
import time
from contextlib import nullcontext

import numpy as np
from tqdm import tqdm

from ..atomic import write_json
from .images import BadInput, BadInputError, check_policy, encode_image, prepare_image
from .sources import Source, open_source

SHARD_PATTERN = "data-{:06d}.tar"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cmscale.shards/1"

# Per-process state of pool workers (set by _init).
_SRC: Source | None = None
_CFG: dict = {}


def _init(source: Source, cfg: dict):
    global _SRC, _CFG
    _SRC, _CFG = source, cfg


def _init_worker(source: Source, cfg: dict):
    # A forked worker inherits the parent's handlers; a caller that ignores SIGTERM (a training
    # loop that ran in this process) would make Pool.terminate() wait for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init(source, cfg)


def _process(ref) -> tuple:
    """One item -> ("ok", encoded bytes, label, converted kinds) or ("skip", kind, detail)."""
    try:
        try:
            img, label = _SRC.load(ref)
        except Exception as e:
            raise BadInput("unreadable", f"{type(e).__name__}: {e}") from None
        converted = []
        arr = prepare_image(img, _CFG["resolution"], _CFG["policy"], converted)
        return "ok", encode_image(arr, _CFG["format"], _CFG["quality"]), label, converted
    except BadInput as e:
        if _CFG["policy"] == "raise":
            raise BadInputError(f"{e.kind} in {_SRC.name} item {ref!r}: {e.detail}") from None
        return "skip", e.kind, f"{ref!r}: {e.detail}"


class _ShardSink:
    """Writes samples into numbered shards, each under a temporary name until complete."""

    def __init__(self, out_dir: str, shard_size: int):
        self.out_dir, self.shard_size = out_dir, shard_size
        self.shards: list[dict] = []
        self._file = self._writer = self._tmp = None
        self._n = 0

    def write(self, sample: dict):
        if self._writer is None:
            name = SHARD_PATTERN.format(len(self.shards))
            self._tmp = os.path.join(self.out_dir, f"{name}.tmp-{os.getpid()}")
            self._file = open(self._tmp, "wb")
            self._writer = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self.shards.append({"name": name, "samples": 0})
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(sample[ext]), 0o444, 0  # fixed: reproducible bytes
            self._writer.addfile(info, io.BytesIO(sample[ext]))
        self.shards[-1]["samples"] += 1
        if self.shards[-1]["samples"] == self.shard_size:
            self.finish()

    def finish(self):
        """Close the open shard and give it its final name."""
        if self._writer is None:
            return
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, os.path.join(self.out_dir, self.shards[-1]["name"]))
        self._file = self._writer = self._tmp = None

    def abort(self):
        """Drop the open (incomplete) shard."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._file.close()
                os.remove(self._tmp)
            self.shards.pop()
            self._file = self._writer = self._tmp = None


def _prepare_out_dir(out_dir: str, overwrite: bool):
    os.makedirs(out_dir, exist_ok=True)
    for pattern in ("*.tmp-*", ".*.tmp-*"):  # shards' and atomic_path's temporary names
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
            os.remove(tmp)  # left by a killed run
    old = glob.glob(os.path.join(glob.escape(out_dir), "data-*.tar"))
    manifest = os.path.join(out_dir, MANIFEST_NAME)
    if old or os.path.exists(manifest):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds shards; pass overwrite=True (--overwrite) to replace them")
        for f in old + ([manifest] if os.path.exists(manifest) else []):
            os.remove(f)



def make_shards(source, out_dir: str, resolution: int, *, shard_size: int = 1000,
                image_format: str = "png", quality: int = 95, workers: int = 0, seed: int = 0,
                shuffle: bool = True, bad_input: str = "convert", overwrite: bool = False,
                limit: int | None = None, progress: bool = True) -> dict:
    """Write `source` (spec string or Source, see `cmscale.data.sources`) as shards in `out_dir`.

    Returns the manifest (also written to out_dir/manifest.json), which includes the summary:
    `num_samples`, `shards` [{name, samples}], `converted` and `skipped` {kind: count}.
    """
    check_policy(bad_input)
    if image_format == "jpeg":
        image_format = "jpg"
    if image_format not in ("png", "jpg", "webp"):
        raise ValueError(f"image format must be png, jpg or webp, got {image_format!r}")
    if resolution < 1 or shard_size < 1:
        raise ValueError("resolution and shard_size must be >= 1")
    src = open_source(source)
    refs = list(src.refs())
    if shuffle:
        refs = [refs[i] for i in np.random.default_rng(seed).permutation(len(refs))]
    if limit is not None:
        refs = refs[:limit]
    src.close()
    _prepare_out_dir(out_dir, overwrite)

    cfg = dict(resolution=resolution, policy=bad_input, format=image_format, quality=quality)
    skipped = dict(src.pre_skipped)
    converted: dict[str, int] = {}
    examples: dict[str, str] = {}  # kind -> one example, for the summary
    sink = _ShardSink(out_dir, shard_size)
    written = 0
    t0 = time.time()
    if workers > 1:
        pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker,
                                                  initargs=(src, cfg))
        results = pool.imap(_process, refs, chunksize=16)  # ordered: output independent of workers
    else:
        _init(src, cfg)
        pool, results = nullcontext(), map(_process, refs)
    try:
        with pool, tqdm(total=len(refs), unit="img", disable=not progress, desc="make_shards") as bar:
            for res in results:
                bar.update(1)
                if res[0] == "skip":
                    skipped[res[1]] = skipped.get(res[1], 0) + 1
                    examples.setdefault(res[1], res[2])
                    continue
                _, data, label, kinds = res
                for k in kinds:
                    converted[k] = converted.get(k, 0) + 1
                sample = {"__key__": f"{written:08d}", image_format: data}
                if label is not None:
                    sample["cls"] = str(int(label)).encode("ascii")
                sink.write(sample)
                written += 1
            if workers > 1:  # every result is in: let the workers exit on their own
                pool.close()
                pool.join()
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        src.close()
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": str(src.name),
        "resolution": int(resolution),
        "image_format": image_format,
        "classes": src.classes,
        "num_samples": sum(s["samples"] for s in sink.shards),
        "shards": sink.shards,
        "converted": dict(sorted(converted.items())),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "seed": seed if shuffle else None,
        "seconds": round(time.time() - t0, 2),
    }
    write_json(os.path.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def summary(manifest: dict, out_dir: str) -> str:
    """Human-readable summary of a make_shards run (written, converted, skipped and why, shards)."""
    shards = manifest["shards"]
    r = manifest["resolution"]
    lines = [
        f"make_shards: {manifest['source']} -> {out_dir}",
        f"  written   {manifest['num_samples']} samples, {r}x{r} {manifest['image_format']}, "
        f"in {len(shards)} shard(s)" + (f" ({shards[0]['name']} .. {shards[-1]['name']})" if shards else ""),
        f"  classes   {len(manifest['classes'])}" if manifest["classes"] else "  classes   none (unconditional)",
    ]
    for what in ("converted", "skipped"):
        d = manifest[what]
        detail = ", ".join(f"{k}: {v}" for k, v in d.items())
        lines.append(f"  {what:<9} {sum(d.values())}" + (f" ({detail})" if d else ""))
    for kind, ex in manifest.get("skipped_examples", {}).items():
        lines.append(f"    e.g. {kind}: {ex}")
    lines.append(f"  manifest  {os.path.join(out_dir, MANIFEST_NAME)} ({manifest['seconds']} s)")
    return "\n".join(lines)
