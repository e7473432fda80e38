"""Faults a multi-node job meets, on one machine: two torchrun agents as two nodes, one of them
lost (killed or frozen) while the other is inside a collective, and a run directory that cannot
be used. Storage faults in one process: tests/unit/test_storage_faults.py."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from cmscale import checkpoint
from tests.support import REPO
from tests.support import launch as _launch
from tests.support.data import write_index_shards
from tests.support.training import TINY, final_state, losses_of

TIMEOUT_S = 15  # train.dist_timeout_s of these runs


def _env(cache):
    return _launch.clean_env(CMSCALE_CACHE=str(cache))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train_args(run_dir, *extra):
    return ["-m", "cmscale.train", "--run-dir", str(run_dir), *TINY, *extra]


def start_nodes(run_dir, cache, *extra, nnodes=2):
    """``nnodes`` torchrun agents of one job (1 rank each), as on ``nnodes`` machines."""
    port = _launch.free_port()
    return [subprocess.Popen(_launch.torchrun_node_cmd(n, port, _train_args(run_dir, *extra),
                                                       nnodes=nnodes),
                             env=_env(cache), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for n in range(nnodes)]


def run_one_node(run_dir, cache, *extra, nproc=2):
    """``torchrun --standalone``: one node, ``nproc`` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *_train_args(run_dir, *extra)]
    return subprocess.run(cmd, env=_env(cache), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)


def _finish(procs, timeout=300):
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            _launch.signal_tree(p.pid, signal.SIGKILL)


def test_unusable_run_dir_is_an_error_before_training(tmp_path, cache):
    (tmp_path / "file").write_text("a file where a directory is expected")
    run = tmp_path / "file" / "run"
    r = subprocess.run([sys.executable, *_train_args(run)], env=_env(cache), cwd=REPO,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 2, r.stdout
    assert "error: the run directory" in r.stdout and "cannot be created" in r.stdout
    assert "step=" not in r.stdout and "Traceback" not in r.stdout


@pytest.mark.faults
def test_a_run_directory_not_shared_by_the_nodes_is_an_error_before_training(tmp_path, cache):
    # Each rank given a directory of its own, as node-local disks would: rank 1 does not see
    # what rank 0 writes, and both stop before training (a resume would be impossible).
    port = _launch.free_port()
    procs = []
    for rank in range(2):
        env = dict(_env(cache), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0",
                   LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *_train_args(tmp_path / f"node{rank}")],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = _finish(procs)
    assert [p.returncode for p in procs] == [2, 2], outs
    for out in outs:
        assert "ranks ['1 (" in out and "shared by all nodes" in out, out
        assert "step=" not in out


@pytest.mark.faults  # ~25-35 s (four interpreters, a c10d rendezvous) on 2 shared cores
def test_two_nodes_on_one_machine_get_node_local_ranks(tmp_path):
    # Two torchrun agents with one process each, rendezvous over c10d: global ranks 0 and 1,
    # and each "node" sees local rank 0 (its first GPU on a real cluster).
    port = _launch.free_port()
    procs = [subprocess.Popen(
        _launch.torchrun_node_cmd(n, port, [_launch.WORKER, "collectives", str(tmp_path)]),
        env=_launch.clean_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for n in range(2)]
    try:
        results = _launch.wait(procs, 2, tmp_path)
    finally:
        for p in procs:
            _launch.signal_tree(p.pid, signal.SIGKILL)
    for r, res in enumerate(results):
        assert (res["launcher"], res["rank"], res["world_size"], res["local_rank"]) == \
            ("torchrun", r, 2, 0)
        assert res["sum"] == 3.0 and res["obj"] == {"from": 0}


@pytest.mark.faults
def test_two_nodes_train_like_one_node_with_two_ranks(tmp_path, cache):
    common = ["train.total_steps=4", "checkpoint.every_images=16"]
    two_nodes = tmp_path / "nodes"
    outs = _finish(start_nodes(two_nodes, cache, *common))
    assert "resumed" not in outs[0] and "checkpoint:" in outs[0], outs[0]
    one_node = tmp_path / "node"
    r = run_one_node(one_node, cache, *common)
    assert r.returncode == 0, r.stdout
    # the same checkpoints (two ranks wrote each), the same losses, the same weights
    for run in (two_nodes, one_node):
        ckpts = checkpoint.list_checkpoints(run)
        assert [(c.nimg, c.complete, c.meta["world_size"]) for c in ckpts] == \
            [(16, True, 2), (32, True, 2)]
        assert {"__0_0.distcp", "__1_0.distcp"} <= set(ckpts[-1].meta["files"])
    assert losses_of(two_nodes) == losses_of(one_node)
    a, _ = final_state(two_nodes)
    b, _ = final_state(one_node)
    for which in a:
        for k in a[which]:
            assert torch.equal(a[which][k], b[which][k]), (which, k)


def _lose_a_node(tmp_path, cache, how):
    run = tmp_path / "run"
    procs = start_nodes(run, cache, "train.total_steps=100000", "checkpoint.every_images=8",
                        f"train.dist_timeout_s={TIMEOUT_S}")
    try:
        deadline = time.monotonic() + 300
        while checkpoint.latest_checkpoint(run, warn=False) is None:
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                _finish(procs, 10)[0]
            time.sleep(0.05)
        time.sleep(1.0)  # mid-run: a checkpoint every step, collectives all the time
        lost = _launch.signal_tree(procs[1].pid, how)  # the agent, its worker, its loader
        assert len(lost) >= 3
        t0 = time.monotonic()
        out = procs[0].communicate(timeout=TIMEOUT_S + 120)[0]
        took = time.monotonic() - t0
    finally:
        for p in procs:
            _launch.signal_tree(p.pid, signal.SIGKILL)
    return run, procs[0].returncode, out, took


@pytest.mark.parametrize("how", [
    signal.SIGKILL,  # the peer's sockets close: the survivor's collective fails at once
    pytest.param(signal.SIGSTOP, marks=pytest.mark.faults),  # frozen: only the timeout helps
], ids=["killed", "frozen"])
def test_a_lost_node_ends_the_job_and_a_rerun_resumes(tmp_path, cache, how):
    run, rc, out, took = _lose_a_node(tmp_path, cache, how)
    assert rc != 0, out
    # bounded: the surviving node's ranks do not wait forever for the lost one
    assert took < TIMEOUT_S + 60, (took, out)
    if how == signal.SIGSTOP:
        assert "Timed out" in out or "timed out" in out, out
    last = checkpoint.latest_checkpoint(run, warn=False)
    assert last is not None
    # re-running the command (here as one process: a smaller allocation, the DDP path
    # reshards) resumes from the newest complete checkpoint: at most the interval since it
    # is lost
    r = subprocess.run([sys.executable, *_train_args(run, f"train.total_steps="
                                                          f"{last.meta['step'] + 1}")],
                       env=_env(cache), cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout
    assert f"resumed from {last.nimg} images" in r.stdout
    final = json.loads((checkpoint.latest_checkpoint(run).path / "commit.json").read_text())
    assert final["step"] == last.meta["step"] + 1


# ----------------------------------------------------------------------------
# Data faults with the real trainer


@pytest.mark.faults
def test_a_shard_list_changed_since_the_save_is_refused_unless_allowed(tmp_path, cache):
    data = write_index_shards(tmp_path / "data", [40, 40], size=16)
    run = tmp_path / "run"

    def train(*extra):
        return subprocess.run([sys.executable, *_train_args(run, f"data.shards={data}",
                                                            "checkpoint.every_images=0", *extra)],
                              env=_env(cache), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)

    r = train("train.total_steps=2")
    assert r.returncode == 0, r.stdout
    write_index_shards(tmp_path / "data", [40, 40, 40], size=16)  # a shard added to the set
    r = train("train.total_steps=4")
    assert r.returncode == 2, r.stdout
    assert "changed since the checkpoint was written: it had 2 shards, 80 samples" in r.stdout
    assert "step=3" not in r.stdout
    r = train("train.total_steps=4", "data.allow_shard_change=true")
    assert r.returncode == 0, r.stdout
    assert "continuing with the new list" in r.stdout and "resumed from 16 images" in r.stdout
    meta = checkpoint.latest_checkpoint(run).meta
    assert meta["step"] == 4 and meta["data_shards"]["shards"] == 3


@pytest.mark.faults
def test_unreadable_shards_on_one_rank_end_the_job(tmp_path, cache):
    # Rank 1 reads a broken copy of the data (same names and manifest, garbage content), as a
    # node with a bad local copy or mount would: its loader fails, and rank 0, waiting in a
    # collective, ends too instead of hanging.
    good = write_index_shards(tmp_path / "good", [40, 40], size=16)
    bad = shutil.copytree(good, tmp_path / "bad")
    for name in ("data-000000.tar", "data-000001.tar"):
        (bad / name).write_bytes(b"\xff" * (bad / name).stat().st_size)
    port = _launch.free_port()
    procs = []
    for rank, data in enumerate((good, bad)):
        env = dict(_env(cache), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(
            [sys.executable, *_train_args(tmp_path / "run", f"data.shards={data}",
                                          f"train.dist_timeout_s={TIMEOUT_S}")],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    t0 = time.monotonic()
    outs = _finish(procs, timeout=TIMEOUT_S + 200)
    assert time.monotonic() - t0 < TIMEOUT_S + 200
    assert procs[0].returncode != 0 and procs[1].returncode != 0, outs
    assert "rank 1 worker 0: none of the" in outs[1], outs[1]
    assert checkpoint.latest_checkpoint(tmp_path / "run", warn=False) is None
