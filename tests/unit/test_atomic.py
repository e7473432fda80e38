"""cmscale.atomic: a failed write leaves the old file and no temporary file behind."""
import json
import os

import pytest

from cmscale import atomic


def test_write_replaces_whole_and_keeps_the_extension(tmp_path):
    p = tmp_path / "a.json"
    atomic.write_json(p, {"x": 1})
    atomic.write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    with atomic.atomic_path(tmp_path / "img.png") as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "wb").write(b"png")
    assert (tmp_path / "img.png").read_bytes() == b"png"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "img.png"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "b.txt"
    atomic.write_text(p, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(p) as tmp:
            open(tmp, "w").write("half of the new")
            raise RuntimeError("disk full")
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["b.txt"]
