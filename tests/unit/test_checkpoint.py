"""cmscale.checkpoint in one process: layout, commit marker, resume bit for bit, resharding,
pruning. Checkpoints written by 2 ranks: tests/multiprocess/test_checkpoint_ranks.py."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zlib

import pytest
import torch

from cmscale import checkpoint as ck


def _net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _trained(seed=0, steps=2):
    net = _net(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(5, 3, generator=g)).square().mean().backward()
        opt.step()
    return net, opt


def _state(net, opt, ema, nimg=0):
    return {
        "net": ck.ModelOptimizer(net, opt),
        "ema": {"0.999": ck.FlatShard(ema, 7)},
        "train": {"nimg": nimg, "tag": "x", "history": [1.5, 2.5]},
        "sigma": torch.tensor([0.002, 80.0], dtype=torch.float64),
    }


def _save_simple(run_dir, nimg, value=1.0):
    return ck.save(run_dir, {"x": torch.full((3,), float(value))}, {"nimg": nimg})


def _load_simple(run_dir):
    state = {"x": torch.zeros(3)}
    meta = ck.load_latest(run_dir, state)
    return meta, state["x"]


def _write_partial(run_dir, nimg, monkeypatch):
    """A checkpoint whose job died after writing the data, before the marker."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the marker")

    with monkeypatch.context() as m:
        m.setattr(ck, "_write_marker", killed)
        with pytest.raises(KeyboardInterrupt):
            _save_simple(run_dir, nimg, value=99.0)
    return ck.checkpoint_path(run_dir, nimg)


# ----------------------------------------------------------------------------
# Single process


@pytest.mark.parametrize("numel", [0, 1, 5, 7, 147, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_shard_range_is_dtensor_split(numel, world):
    from torch.distributed.tensor import Shard

    covered = []
    for r in range(world):
        start, stop = ck.shard_range(numel, r, world)
        size, offset = Shard.local_shard_size_and_offset(numel, world, r)
        assert (stop - start) == size
        if size:
            assert start == offset
        covered.extend(range(start, stop))
    assert covered == list(range(numel))


def test_roundtrip_single_process_in_place(tmp_path):
    net, opt = _trained(0)
    ema = torch.arange(7.0)
    path = ck.save(tmp_path, _state(net, opt, ema, nimg=640), {"nimg": 640, "step": 2})

    assert path == tmp_path / "checkpoints" / "nimg-000000000640"
    assert sorted(os.listdir(path)) == [".metadata", "__0_0.distcp", "commit.json"]
    marker = json.loads((path / "commit.json").read_text())
    assert {k: marker[k] for k in ("nimg", "step", "world_size", "format")} == \
        {"nimg": 640, "step": 2, "world_size": 1, "format": 2}
    assert sorted(marker["files"]) == [".metadata", "__0_0.distcp"]
    assert marker["files"]["__0_0.distcp"]["size"] == (path / "__0_0.distcp").stat().st_size
    assert "time" in marker and "unix_time" in marker

    net2 = _net(1)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.5)  # fresh: no Adam moments yet
    ema2 = torch.full((9,), -1.0)  # padded buffer; only the first 7 are the shard
    state = _state(net2, opt2, ema2)
    sigma = state["sigma"]
    state["sigma"] = sigma.zero_()
    meta = ck.load_latest(tmp_path, state)

    assert meta == marker
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]  # lr 0.01 restored over 0.5
    for i in s1["state"]:
        for name in s1["state"][i]:
            assert torch.equal(s1["state"][i][name], s2["state"][i][name])
    assert torch.equal(ema2[:7], ema) and torch.all(ema2[7:] == -1)  # in place, padding kept
    assert state["train"] == {"nimg": 640, "tag": "x", "history": [1.5, 2.5]}
    assert state["sigma"] is sigma and torch.equal(sigma, torch.tensor([0.002, 80.0], dtype=torch.float64))


def test_resume_continues_bit_identically(tmp_path):
    net, opt = _trained(0, steps=2)
    ck.save(tmp_path, {"net": ck.ModelOptimizer(net, opt)}, {"nimg": 10})
    net_b = _net(5)
    opt_b = torch.optim.AdamW(net_b.parameters(), lr=1e-2)
    ck.load_latest(tmp_path, {"net": ck.ModelOptimizer(net_b, opt_b)})
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    for n, o in ((net, opt), (net_b, opt_b)):
        o.zero_grad()
        n(x).square().mean().backward()
        o.step()
    for a, b in zip(net.parameters(), net_b.parameters()):
        assert torch.equal(a, b)


def test_load_latest_without_checkpoints(tmp_path):
    state = {"x": torch.ones(2)}
    assert ck.load_latest(tmp_path / "nothing", state) is None
    assert torch.equal(state["x"], torch.ones(2))
    assert ck.list_checkpoints(tmp_path) == []


def test_partial_checkpoint_is_ignored_and_previous_loaded(tmp_path, monkeypatch):
    _save_simple(tmp_path, 10, value=1.0)
    partial = _write_partial(tmp_path, 20, monkeypatch)
    assert (partial / ".metadata").exists() and not (partial / ck.MARKER).exists()
    # A torn copy too: data files truncated, no marker.
    torn = ck.checkpoint_path(tmp_path, 30)
    shutil.copytree(ck.checkpoint_path(tmp_path, 10), torn)
    (torn / ck.MARKER).unlink()
    for f in torn.iterdir():
        f.write_bytes(f.read_bytes()[:10])

    infos = ck.list_checkpoints(tmp_path)
    assert [(c.nimg, c.complete) for c in infos] == [(10, True), (20, False), (30, False)]
    with pytest.warns(UserWarning, match="incomplete checkpoint") as record:
        meta, x = _load_simple(tmp_path)
    assert len(record) == 2
    assert meta["nimg"] == 10 and torch.equal(x, torch.ones(3))


def test_save_replaces_leftover_and_skips_existing(tmp_path, monkeypatch):
    _write_partial(tmp_path, 20, monkeypatch)
    path = ck.checkpoint_path(tmp_path, 20)
    (path / "junk").write_text("from a killed job")
    with pytest.warns(UserWarning, match="replacing incomplete"):
        _save_simple(tmp_path, 20, value=2.0)
    assert not (path / "junk").exists()
    with pytest.warns(UserWarning, match="already exists"):
        _save_simple(tmp_path, 20, value=3.0)  # same progress: kept as it was
    meta, x = _load_simple(tmp_path)
    assert meta["nimg"] == 20 and torch.equal(x, torch.full((3,), 2.0))


def test_keep_last(tmp_path, monkeypatch):
    for nimg in (10, 20, 30, 40):
        _save_simple(tmp_path, nimg, value=nimg)
    old_partial = _write_partial(tmp_path, 25, monkeypatch)
    live_partial = _write_partial(tmp_path, 50, monkeypatch)  # maybe still being written

    deleted = ck.keep_last(tmp_path, 2)
    assert sorted(deleted) == sorted(ck.checkpoint_path(tmp_path, n) for n in (10, 20, 25))
    assert not old_partial.exists() and live_partial.exists()
    assert [(c.nimg, c.complete) for c in ck.list_checkpoints(tmp_path)] == \
        [(30, True), (40, True), (50, False)]
    assert ck.keep_last(tmp_path, 1) == [ck.checkpoint_path(tmp_path, 30)]
    with pytest.raises(ValueError):
        ck.keep_last(tmp_path, 0)
    with pytest.warns(UserWarning):
        assert _load_simple(tmp_path)[0]["nimg"] == 40


def test_strict_load(tmp_path):
    _save_simple(tmp_path, 1)
    with pytest.raises(Exception, match="Missing key"):
        ck.load_latest(tmp_path, {"x": torch.zeros(3), "y": torch.zeros(1)})
    y = torch.zeros(1)
    ck.load_latest(tmp_path, {"x": torch.zeros(3), "y": y}, strict=False)
    assert torch.equal(y, torch.zeros(1))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cmscale-pwned",))


class _Custom:
    pass


def _rerecord(path):
    """Make the marker's checksums match the files again (what a forger would do)."""
    marker = json.loads((path / "commit.json").read_text())
    for name in marker["files"]:
        data = (path / name).read_bytes()
        marker["files"][name] = {"size": len(data), "crc32": zlib.crc32(data)}
    (path / "commit.json").write_text(json.dumps(marker))


def test_metadata_with_code_is_refused(tmp_path):
    path = _save_simple(tmp_path, 1)
    (path / ".metadata").write_bytes(pickle.dumps(_Evil()))
    _rerecord(path)  # past the checksums, the unpickler itself must refuse
    with pytest.raises(RuntimeError, match="posix.system, which is not allowed"):
        _load_simple(tmp_path)
    assert not os.path.exists("/tmp/cmscale-pwned")


def test_values_are_loaded_weights_only(tmp_path):
    path = ck.checkpoint_path(tmp_path, 1)
    ck.save(tmp_path, {"obj": _Custom()}, {"nimg": 1})  # arbitrary objects can be saved...
    with pytest.raises(Exception, match="[Ww]eights.only"):
        ck.load(path, {"obj": None})  # ...but are never unpickled as code


def test_a_network_of_another_shape_is_a_clear_error(tmp_path):
    # e.g. a run written before a preset changed (tiny16 gained scale-shift normalisation)
    net, opt = _trained()
    ck.save(tmp_path, {"model": ck.ModelOptimizer(net, opt)}, {"nimg": 8})
    wider = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    with pytest.raises(ValueError, match="another shape.*net.preset, net.overrides or data.channels"):
        ck.load_latest(tmp_path, {"model": ck.ModelOptimizer(wider)})
