"""Storage faults in one process: a checkpoint damaged on disk after its commit, a disk that
fills during a write, a run directory that cannot be used. Two ranks and a whole run:
tests/multiprocess/test_faults.py."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

from cmscale import checkpoint as ck


def _save(run_dir, nimg, value):
    return ck.save(run_dir, {"x": torch.full((1000,), float(value))}, {"nimg": nimg})


def _load(run_dir):
    state = {"x": torch.zeros(1000)}
    meta = ck.load_latest(run_dir, state)
    return (None if meta is None else meta["nimg"]), state["x"]


def _flip_bit(file, offset_from_end=100):
    data = bytearray(file.read_bytes())
    data[len(data) - offset_from_end] ^= 0x10
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    _save(tmp_path, 8, 1.0)
    newest = _save(tmp_path, 16, 2.0)
    data = newest / "__0_0.distcp"
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "flip":  # same size: only the checksum can tell
        _flip_bit(data)
    else:
        data.unlink()
    with pytest.raises(ck.DamagedCheckpoint, match="__0_0.distcp"):
        ck.load(newest, {"x": torch.zeros(1000)})
    with pytest.warns(UserWarning, match="nimg-000000000016 is damaged.*previous complete"):
        nimg, x = _load(tmp_path)
    assert nimg == 8 and torch.equal(x, torch.full((1000,), 1.0))
    # set aside: no longer complete, its marker kept beside it with the damage
    assert not (newest / ck.MARKER).exists()
    assert "__0_0.distcp" in json.loads((newest / ck.DAMAGED).read_text())["damage"][0]
    assert ck.latest_checkpoint(tmp_path, warn=False).nimg == 8
    # the resumed run writes that step again: the damaged directory is replaced
    with pytest.warns(UserWarning, match="replacing incomplete"):
        _save(tmp_path, 16, 3.0)
    nimg, x = _load(tmp_path)
    assert nimg == 16 and torch.equal(x, torch.full((1000,), 3.0))


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    _flip_bit(_save(tmp_path, 8, 1.0) / ".metadata", 10)
    with pytest.warns(UserWarning, match="damaged"), \
            pytest.raises(ck.DamagedCheckpoint, match="all 1 complete checkpoints.*damaged"):
        _load(tmp_path)
    # re-running must not quietly start over (keep_last would then delete the evidence)
    with pytest.raises(ck.DamagedCheckpoint, match="only damaged ones set aside"):
        _load(tmp_path)


def test_a_checkpoint_without_checksums_still_loads(tmp_path):
    # written before checksums were recorded (format 1): nothing to compare, loads as before
    path = _save(tmp_path, 8, 1.0)
    marker = json.loads((path / ck.MARKER).read_text())
    del marker["files"]
    marker["format"] = 1
    (path / ck.MARKER).write_text(json.dumps(marker))
    assert ck.verify(path) == []
    assert _load(tmp_path)[0] == 8


def _no_space_after(monkeypatch, nbytes):
    """Make DCP's writes fail with ENOSPC after ``nbytes`` of a file, as a full disk does."""
    real = dcp_fs._write_item

    def write_item(transforms, stream, data, *args, **kwargs):
        stream.write(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_fs, "_write_item", write_item)
    return real


def test_disk_full_during_the_write_is_a_clear_error_and_the_previous_loads(tmp_path,
                                                                           monkeypatch):
    _save(tmp_path, 8, 1.0)
    with monkeypatch.context() as m:
        _no_space_after(m, 64)
        with pytest.raises(RuntimeError, match="(?s)nimg-000000000016 could not be written.*"
                           "still .*nimg-000000000008.*is full.*No space left"):
            _save(tmp_path, 16, 2.0)
    assert not ck.checkpoint_path(tmp_path, 16).exists()  # partial files removed
    nimg, x = _load(tmp_path)
    assert nimg == 8 and torch.equal(x, torch.full((1000,), 1.0))


def test_disk_full_at_the_marker_is_a_clear_error_and_the_previous_loads(tmp_path, monkeypatch):
    _save(tmp_path, 8, 1.0)

    def full(path, meta):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "_write_marker", full)
    with pytest.raises(RuntimeError, match="could not be written.*is full"):
        _save(tmp_path, 16, 2.0)
    monkeypatch.undo()
    assert not ck.checkpoint_path(tmp_path, 16).exists()
    assert _load(tmp_path)[0] == 8


@contextlib.contextmanager
def _tmpfs(path, options):
    """A real small file system (needs root and mount rights; skips otherwise)."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_really_full_file_system(tmp_path):
    with _tmpfs(tmp_path / "small", "size=256k") as run_dir:
        _save(run_dir, 8, 1.0)  # ~4 kB
        with pytest.raises(RuntimeError, match="(?s)could not be written.*is full"):
            ck.save(run_dir, {"x": torch.zeros(200_000)}, {"nimg": 16})  # 800 kB
        assert not ck.checkpoint_path(run_dir, 16).exists()
        assert _load(run_dir)[0] == 8
        _save(run_dir, 24, 3.0)  # the space was given back
        assert _load(run_dir)[0] == 24


def test_a_read_only_run_directory_is_refused(tmp_path):
    with _tmpfs(tmp_path / "ro", "size=64k,ro") as run_dir:
        with pytest.raises(ck.RunDirError, match="is not writable.*Read-only file system"):
            ck.check_run_dir(run_dir)
        with pytest.raises(ck.RunDirError, match="cannot be created.*Read-only"):
            ck.check_run_dir(run_dir / "sub")


def test_a_run_directory_that_cannot_be_created_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ck.RunDirError, match="cannot be created"):
        ck.check_run_dir(tmp_path / "file" / "run")
    ck.check_run_dir(tmp_path / "new" / "run")  # missing parents are created
    assert os.listdir(tmp_path / "new" / "run") == []  # and the probe removed
