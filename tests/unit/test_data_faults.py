"""Data faults a long multi-node run meets, in one process: a shard that vanishes mid-run, a rank
whose shards are all unreadable, a shard list that changed between a save and its resume.
With real ranks and the trainer: tests/multiprocess/test_faults.py."""
from __future__ import annotations

import os
import shutil
import signal
import types

import pytest

from cmscale import dist
from cmscale.data import build_loader
from cmscale.data.images import BadInputError
from cmscale.data.shardlist import ShardOpenError, load_shard_set
from cmscale.training_loop import Trainer
from tests.support.data import write_index_shards


@pytest.fixture
def alarm():
    """Fail instead of hanging the suite if a loader loops for ever."""
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hung")))
    signal.alarm(60)
    yield
    signal.alarm(0)


def _loader(root, **kw):
    kw.setdefault("batch_size_per_rank", 2)
    return build_loader(str(root), num_workers=0, resolution=8, bad_input="skip", **kw)


def test_a_shard_that_vanishes_mid_run_is_an_error_naming_it(tmp_path, alarm):
    root = write_index_shards(tmp_path / "d", [4, 4, 4])
    it = iter(_loader(root))
    next(it)  # shards checked and one opened
    for name in ("data-000000.tar", "data-000001.tar", "data-000002.tar"):
        os.remove(os.path.join(root, name))  # an open one stays readable (POSIX)
    with pytest.raises(ShardOpenError, match=r"cannot open shard .*data-00000\d\.tar: .*No such file"):
        for _ in range(20):
            next(it)


def test_a_rank_whose_shards_are_all_unreadable_fails_instead_of_looping(tmp_path, alarm):
    # e.g. a node whose copy or mount of the data is broken: under bad_input=skip every
    # planned sample is skipped; the loader must end with an error, not spin for ever
    # while the other ranks wait for it in their next collective.
    root = write_index_shards(tmp_path / "d", [6, 6])
    loader = _loader(root, rank=1, world_size=2)
    for name in ("data-000000.tar", "data-000001.tar"):
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(b"\xff" * size)  # same size, no tar header left
    with pytest.raises(BadInputError, match="rank 1 worker 0: none of the 6 samples"):
        next(iter(loader))


def _trainer_like(root, allow=False):
    shard_set = load_shard_set(str(root))
    return types.SimpleNamespace(
        loaders=[types.SimpleNamespace(shard_set=shard_set)],
        cfg=types.SimpleNamespace(data=types.SimpleNamespace(shards=str(root),
                                                             allow_shard_change=allow)))


def test_shard_fingerprint_follows_names_and_counts_not_the_directory(tmp_path):
    a = write_index_shards(tmp_path / "a", [4, 5])
    moved = shutil.copytree(a, tmp_path / "elsewhere")
    fewer = write_index_shards(tmp_path / "c", [4])
    other_counts = write_index_shards(tmp_path / "d", [5, 4])
    fp = load_shard_set(a).fingerprint()
    assert fp == load_shard_set(moved).fingerprint()
    assert fp["shards"] == 2 and fp["samples"] == 9 and fp["last"] == "data-000001.tar"
    assert fp["digest"] != load_shard_set(fewer).fingerprint()["digest"]
    assert fp["digest"] != load_shard_set(other_counts).fingerprint()["digest"]


def test_a_changed_shard_list_is_refused_at_resume_unless_allowed(tmp_path, capsys):
    saved = load_shard_set(write_index_shards(tmp_path / "old", [4, 5])).fingerprint()
    same = _trainer_like(tmp_path / "old")
    assert Trainer.check_shards(same, saved) is True
    assert Trainer.check_shards(same, None) is True  # a checkpoint from before fingerprints
    grown = write_index_shards(tmp_path / "new", [4, 5, 6])
    with pytest.raises(ValueError, match=r"(?s)changed since the checkpoint.*2 shards, 9 "
                       r"samples.*now 3 shards, 15 samples.*data.allow_shard_change=true"):
        Trainer.check_shards(_trainer_like(grown), saved)
    assert Trainer.check_shards(_trainer_like(grown, allow=True), saved) is False
    assert "continuing with the new list" in capsys.readouterr().out


def test_ranks_that_see_different_shard_lists_are_refused(tmp_path, monkeypatch):
    here = _trainer_like(write_index_shards(tmp_path / "a", [4, 5]))
    there = load_shard_set(write_index_shards(tmp_path / "b", [4])).fingerprint()
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: [mine, there])
    with pytest.raises(ValueError, match="ranks see different shard lists.*rank 1"):
        Trainer.check_shards(here, None)
