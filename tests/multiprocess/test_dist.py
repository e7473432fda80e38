"""cmscale.dist: host lists, launcher detection, helpers, stop flag, real 2-rank runs."""
from __future__ import annotations

import datetime
import os
import signal
import sys
import time

import pytest
import torch

from cmscale import dist
from tests.support import launch as _launch


@pytest.fixture(autouse=True)
def _fresh_dist_state():
    saved = {sig: signal.getsignal(sig) for sig in dist.STOP_SIGNALS}
    dist._reset_for_tests()
    yield
    dist._reset_for_tests()
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# ----------------------------------------------------------------------------
# Host lists


@pytest.mark.parametrize("text, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("a,b,c", ["a", "b", "c"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
    ("x[1,3-4]-ib,y", ["x1-ib", "x3-ib", "x4-ib", "y"]),
    ("node[7]", ["node7"]),
])
def test_expand_hostlist(text, hosts):
    assert dist.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-03", "node01]", "n[a-b]", "n[3-1]", "n[[1]]"])
def test_expand_hostlist_rejects_bad_syntax(text):
    with pytest.raises(ValueError):
        dist.expand_hostlist(text)


# ----------------------------------------------------------------------------
# Launcher detection (pure function of the environment)


def test_detect_single():
    assert dist.detect_launch({}) == dist.LaunchEnv("single", 0, 1, 0, None, None)


def test_detect_torchrun():
    env = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="n1", MASTER_PORT="1234")
    assert dist.detect_launch(env) == dist.LaunchEnv("torchrun", 3, 8, 1, "n1", 1234)


def test_detect_srun_task():
    env = dict(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_STEP_ID="0",
               SLURM_JOB_ID="123456", SLURM_JOB_NODELIST="gpu[07-08,11]")
    launch = dist.detect_launch(env)
    # Port below the ephemeral range, derived from the job id; address: first host.
    assert launch == dist.LaunchEnv("slurm", 5, 8, 1, "gpu07", 10000 + 123456 % 20000)


def test_detect_srun_prefers_step_values_and_master_port():
    env = dict(SLURM_PROCID="1", SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="4",
               SLURM_LOCALID="1", SLURM_STEPID="2", SLURM_JOB_ID="9",
               SLURM_JOB_NODELIST="a[1-4]", SLURM_STEP_NODELIST="a[3-4]", MASTER_PORT="2999")
    assert dist.detect_launch(env) == dist.LaunchEnv("slurm", 1, 4, 1, "a3", 2999)


def test_detect_sbatch_shell_is_single():
    # The batch shell has SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no
    # step: it is one process, not rank 0 of N (checked on a real SLURM 22.05).
    env = dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_JOB_ID="1",
               SLURM_JOB_NODELIST="vm")
    assert dist.detect_launch(env).launcher == "single"


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"])
def test_detect_mpi_wins_over_slurm(var):
    # mpirun inside an allocation: every rank inherits SLURM_PROCID=0 of the daemon's step.
    env = {var: "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}
    assert dist.detect_launch(env) == dist.LaunchEnv("mpi", None, None, None, None, None)


def test_detect_torchrun_inside_srun():
    # One srun task per node running torchrun: RANK describes the process.
    env = dict(RANK="6", WORLD_SIZE="8", LOCAL_RANK="2", MASTER_ADDR="h", MASTER_PORT="5",
               SLURM_PROCID="1", SLURM_STEP_ID="0", SLURM_NTASKS="2")
    assert dist.detect_launch(env).launcher == "torchrun"
    assert dist.detect_launch(env).rank == 6


# ----------------------------------------------------------------------------
# Single process: no process group, helpers still work


def test_init_single_process(monkeypatch):
    for key in list(os.environ):
        if key in _launch._LAUNCH_VARS or key.startswith(_launch._LAUNCH_PREFIXES):
            monkeypatch.delenv(key)
    info = dist.init()
    assert (info.launcher, info.rank, info.world_size, info.local_rank) == ("single", 0, 1, 0)
    assert info.backend is None and not dist.is_initialized()
    assert info.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert dist.init() is info  # idempotent
    dist.shutdown()


def test_init_in_sbatch_shell_warns_and_runs_alone(monkeypatch):
    for key in list(os.environ):
        if key in _launch._LAUNCH_VARS or key.startswith(_launch._LAUNCH_PREFIXES):
            monkeypatch.delenv(key)
    for key, value in dict(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_ID="7").items():
        monkeypatch.setenv(key, value)
    with pytest.warns(UserWarning, match="start the ranks with `srun`"):
        info = dist.init()
    assert (info.launcher, info.world_size) == ("single", 1) and not dist.is_initialized()


def test_helpers_without_process_group(capsys):
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.is_main()
    dist.barrier()
    x = torch.tensor([1.0, 3.0])
    mean = dist.all_reduce_mean(x)
    assert torch.equal(mean, x) and mean is not x
    assert dist.all_reduce_sum(2.5) == 2.5
    assert torch.equal(dist.broadcast(x), torch.tensor([1.0, 3.0]))
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.print0("hello")
    assert capsys.readouterr().out == "hello\n"
    assert not dist.should_stop()
    dist.request_stop()
    assert dist.should_stop() and dist.stop_requested() == 0


@pytest.mark.parametrize("sig", dist.STOP_SIGNALS)
def test_signal_only_sets_flag(sig):
    dist.install_signal_handlers()
    assert not dist.should_stop()
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # the handler runs between bytecodes of the main thread
    assert dist.stop_requested() == sig
    assert dist.should_stop()


def _square(i):
    return i * i


def test_worker_ignore_signals_keeps_loader_alive():
    # A DataLoader worker that got SIGTERM must keep serving: the main process still
    # has to finish its step and save before it stops.
    data = torch.utils.data.DataLoader(
        list(range(8)), batch_size=1, num_workers=1, worker_init_fn=dist.worker_ignore_signals,
        multiprocessing_context="fork",
    )
    it = iter(data)
    assert next(it).item() == 0
    worker = it._workers[0]
    os.kill(worker.pid, signal.SIGTERM)
    os.kill(worker.pid, signal.SIGUSR1)
    time.sleep(0.2)
    assert worker.is_alive()
    assert [b.item() for b in it] == list(range(1, 8))


# ----------------------------------------------------------------------------
# Real multi-process runs


@pytest.mark.dist
def test_signal_to_one_rank_stops_all_under_srun_env(tmp_path):
    """SIGUSR1 to rank 1 only: both ranks leave at the same step, exit EXIT_REQUEUE."""
    procs = _launch.start_ranks("signal", tmp_path, _launch.srun_env(2, _launch.free_port()))
    deadline = time.monotonic() + _launch.TIMEOUT
    pid_file = tmp_path / "pid-rank1"
    while not (pid_file.exists() and (tmp_path / "pid-rank0").exists()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            "\n".join(p.communicate()[0] for p in procs)
        time.sleep(0.05)
    os.kill(int(pid_file.read_text()), signal.SIGUSR1)
    r0, r1 = _launch.wait(procs, 2, tmp_path, expect_rc=dist.EXIT_REQUEUE)
    assert (r0["launcher"], r0["rank"], r0["world_size"]) == ("slurm", 0, 2)
    assert (r1["launcher"], r1["rank"], r1["local_rank"]) == ("slurm", 1, 1)
    assert r0["master_addr"] == "localhost"
    assert r1["local_signal"] == signal.SIGUSR1 and r0["local_signal"] is None
    assert r0["steps"] == r1["steps"]


@pytest.mark.dist
def test_mpiexec_init_and_collectives(tmp_path):
    pytest.importorskip("mpi4py")
    mpiexec = _launch.mpiexec_path()
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install mpich)")
    proc = _launch.run_command([mpiexec, "-n", "2", sys.executable, _launch.WORKER,
                                "collectives", str(tmp_path)])
    results = _launch.wait([proc], 2, tmp_path)
    for r, res in enumerate(results):
        assert (res["launcher"], res["rank"], res["world_size"], res["local_rank"]) == ("mpi", r, 2, r)
        assert res["backend"] == "gloo"
        assert res["sum"] == 3.0 and res["mean"] == [0.5, 10.0]
        assert res["bcast"] == [5] and res["obj"] == {"from": 0}
    # Rank 0 chose the rendezvous point and every rank got the same one.
    assert results[0]["master_port"] == results[1]["master_port"]
    assert results[0]["master_addr"] == results[1]["master_addr"]


def test_init_bounds_collectives_and_lets_nccl_honour_the_bound(monkeypatch):
    # What a GPU rank passes to the process group (no GPU here: CUDA and the group are
    # stand-ins): the timeout that ends a wait for a lost node, and NCCL's async error
    # handling, without which a blocked NCCL collective ignores it.
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist.tdist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "")  # restored afterwards
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    for key, value in _launch.torchrun_env(2, 29999)[1].items():
        monkeypatch.setenv(key, value)
    info = dist.init(timeout=datetime.timedelta(seconds=42))
    assert (info.rank, info.world_size) == (1, 2)
    assert seen["timeout"] == datetime.timedelta(seconds=42)
    assert seen["backend"] == "cuda:nccl,cpu:gloo"
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
