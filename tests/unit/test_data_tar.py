"""The tar member reader: the fast path for local tars yields exactly what webdataset's tar_file_iterator yields."""
import io
import os
import subprocess
import tarfile

import pytest
from webdataset.tariterators import tar_file_iterator

from cmscale.data.shardlist import count_samples, tar_members, tar_samples


def _add(tf, name, data=b"", kind=tarfile.REGTYPE, **kw):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _write(path, fmt=tarfile.USTAR_FORMAT, mode="w", long_at=None):
    with tarfile.open(path, mode, format=fmt) as tf:
        _add(tf, "dir", kind=tarfile.DIRTYPE)
        _add(tf, "__meta__", b"skipped by webdataset")
        for i in range(6):
            name = f"dir/s{i:03d}" if i != long_at else "dir/" + "x" * 120 + f"{i:03d}"
            _add(tf, name + ".png", bytes([i]) * (300 + i * 700))
            _add(tf, name + ".cls", str(i).encode())
            if i == 2:
                _add(tf, "dir/link", kind=tarfile.SYMTYPE, linkname="s000.png")
                _add(tf, "dir/empty.txt", b"")
    return str(path)


def _reference(path):
    with open(path, "rb") as f:
        return [(m["fname"], m["data"]) for m in tar_file_iterator(f)]


def _ours(path):
    return [(m["fname"], m["data"]) for m in tar_members(path, [None])]


CASES = {
    "ustar": dict(fmt=tarfile.USTAR_FORMAT),
    "gnu_long_name_mid_file": dict(fmt=tarfile.GNU_FORMAT, long_at=3),  # fast path, then hand-over
    "pax_long_name_first": dict(fmt=tarfile.PAX_FORMAT, long_at=0),
    "gzip": dict(mode="w:gz"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_yields_what_webdataset_yields(tmp_path, case):
    path = _write(tmp_path / "a.tar", **CASES[case])
    ours = _ours(path)
    assert ours == _reference(path)
    assert len(ours) == 6 * 2 + 1  # 6 samples x 2 members + the empty file; no dir, link or meta


def test_tar_command_shards_with_long_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / ("k" * 110 + f"{i}.jpg")).write_bytes(os.urandom(1000 + i))
        (src / ("k" * 110 + f"{i}.cls")).write_text(str(i))
    subprocess.run("tar -cf ../a.tar *", shell=True, cwd=src, check=True)  # GNU format, long names
    path = str(tmp_path / "a.tar")
    assert _ours(path) == _reference(path)
    assert count_samples(path) == (3, True)


@pytest.mark.parametrize("cut_member", ["dir/s002.cls", "dir/s003.png"])
def test_truncated_tar_same_members_then_the_same_error(tmp_path, cut_member):
    path = _write(tmp_path / "a.tar")
    with tarfile.open(path) as tf:
        m = tf.getmember(cut_member)
    with open(path, "r+b") as f:
        f.truncate(m.offset_data + max(1, m.size // 2))
    with pytest.raises(tarfile.ReadError):
        for _ in tar_file_iterator(open(path, "rb")):
            pass
    got = []
    with pytest.raises(tarfile.ReadError):
        for m in tar_members(path, [None]):
            got.append((m["fname"], m["data"]))
    assert got == _reference_until_error(path)
    # Samples: the one being cut is dropped unless the cut member starts a new sample; the
    # header-only count agrees with the reader.
    keys = []
    with pytest.raises(tarfile.ReadError):
        for key, _ in tar_samples(path):
            keys.append(key)
    expected = ["dir/s000", "dir/s001"] + (["dir/s002", "dir/empty"] if cut_member == "dir/s003.png" else [])
    assert keys == expected
    assert count_samples(path) == (len(expected), False)


def _reference_until_error(path):
    out = []
    try:
        for m in tar_file_iterator(open(path, "rb")):
            out.append((m["fname"], m["data"]))
    except tarfile.ReadError:
        pass
    return out
