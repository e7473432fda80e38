"""The SLURM launcher against a real SLURM: signal forwarding and requeue.

Needs a running cluster with 2 free CPUs, e.g. this machine's:

    bash tools/local_slurm.sh up && export SLURM_CONF=/tmp/cmscale-slurm/slurm.conf
    python -m pytest -m slurm tests/test_slurm.py

Skipped when ``sinfo`` does not answer. Without SLURM_CONF the test looks for the
configuration tools/local_slurm.sh writes ($CMSCALE_SLURM_DIR/slurm.conf).

The trainer is tests/_fake_trainer.py (via CMSCALE_TRAIN_MODULE): the real one comes in
the end-to-end test. What is checked is the launcher's part: launch/quickstart.sh ->
launch/common.sh -> `srun -n2` -> launch/task.sh -> trainer.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slurm


def _slurm_env() -> dict[str, str]:
    env = dict(os.environ)
    if "SLURM_CONF" not in env:
        conf = Path(env.get("CMSCALE_SLURM_DIR", "/tmp/cmscale-slurm")) / "slurm.conf"
        if conf.exists():
            env["SLURM_CONF"] = str(conf)
    # Variables of an enclosing job (pytest run inside an allocation) would leak into ours.
    return {k: v for k, v in env.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
            or k == "SLURM_CONF"}


def _sinfo_cpus(env) -> int | None:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%C"], capture_output=True, text=True,
                             env=env, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    # "allocated/idle/other/total"
    return int(out.stdout.split()[0].split("/")[-1])


@pytest.fixture
def slurm_env() -> dict[str, str]:
    """Environment for SLURM clients; skips the test when no cluster can run 2 tasks."""
    env = _slurm_env()
    cpus = _sinfo_cpus(env)
    if cpus is None:
        pytest.skip("no SLURM answers sinfo (bash tools/local_slurm.sh up; export SLURM_CONF=...)")
    if cpus < 2:
        pytest.skip(f"the cluster has {cpus} CPU(s); the tests run 2 tasks")
    return env


def _submit_fake(tmp_path: Path, env: dict[str, str], overrides=(), **extra_env):
    """sbatch launch/quickstart.sh with the fake trainer; returns (job id, run dir, log)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = tmp_path / "fake.yaml"
    config.write_text("{}\n")
    log = tmp_path / "job.out"
    env.update(CMSCALE_ROOT=str(ROOT), CMSCALE_TRAIN_MODULE="tests._fake_trainer",
               CMSCALE_CONFIG=str(config), CMSCALE_PYTHON=sys.executable, RUN_DIR=str(run_dir),
               FAKE_TRAINER_WAIT_S="60", **extra_env)
    submit = subprocess.run(
        ["sbatch", "--parsable", "--time=5", f"--output={log}", "--nodes=1", "--ntasks-per-node=2",
         "--cpus-per-task=1", str(ROOT / "launch" / "quickstart.sh"), *overrides],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
    )
    assert submit.returncode == 0, submit.stderr
    return submit.stdout.strip().split(";")[0], run_dir, log


def _job(job_id: str, env) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, env=env, timeout=15)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def _wait(predicate, timeout: float, what: str, info=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{info()}")


def test_signal_requeue_and_finish(tmp_path, slurm_env):
    """USR1 to the batch shell (as `--signal=B:USR1@N` sends it) is forwarded to both srun
    tasks; they exit 75; the launcher requeues the job once; the second run (restart 1)
    exits 0 and the job completes without another requeue."""
    env = slurm_env
    overrides = ["train.total_steps=7", "data.shards=/data/{000000..000003}.tar"]
    job_id, run_dir, log = _submit_fake(tmp_path, env, overrides, FAKE_TRAINER_STAGGER_S="1.0")

    def info():
        text = log.read_text() if log.exists() else "(no log)"
        return f"job {_job(job_id, env)}\nlog:\n{text}\nrun dir: {sorted(os.listdir(run_dir))}"

    try:
        _wait(lambda: all((run_dir / f"start-r0-rank{r}.json").exists() for r in (0, 1)),
              40, "both tasks of the first run to start", info)
        # The warning SLURM sends with --signal=B:USR1@N, but now (SLURM's timer checks
        # the limit only every ~30 s).
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, env=env,
                       timeout=15)

        def requeued():
            j = _job(job_id, env)
            return j.get("JobState") == "PENDING" and j.get("Restarts") == "1"
        _wait(requeued, 20, "the job to be requeued", info)
        # A requeued job is held ~120 s (BeginTime); release it, but not within the
        # second in which the first run ended: slurmd revokes the job's credential with
        # a 1-second timestamp, and a relaunch in that same second dies with "Job
        # credential revoked" (exit 1, no output). That is what the hold is for.
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                       env=env, timeout=15)
        _wait(lambda: _job(job_id, env).get("JobState") == "COMPLETED", 30,
              "the second run to complete", info)
        time.sleep(3)  # a wrong second requeue would show by now
        job = _job(job_id, env)
        assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", info()
        assert job["ExitCode"] == "0:0", info()
    finally:
        if _job(job_id, env).get("JobState") not in (None, "COMPLETED", "FAILED", "CANCELLED"):
            subprocess.run(["scancel", job_id], env=env, timeout=15)

    files = sorted(p.name for p in run_dir.iterdir())
    assert files == [
        "done-r1-rank0", "done-r1-rank1", "signal-r0-rank0", "signal-r0-rank1",
        "start-r0-rank0.json", "start-r0-rank1.json", "start-r1-rank0.json", "start-r1-rank1.json",
    ], info()  # two tasks per run, signalled once, no third run, no requeue marker left
    for rank in (0, 1):
        assert (run_dir / f"signal-r0-rank{rank}").read_text() == "SIGUSR1"
    for run in (0, 1):
        for rank in (0, 1):
            start = json.loads((run_dir / f"start-r{run}-rank{rank}.json").read_text())
            e = start["env"]
            assert e["SLURM_PROCID"] == str(rank) and e["SLURM_NTASKS"] == "2"
            assert e.get("SLURM_RESTART_COUNT", "0") == str(run)
            assert e["MASTER_PORT"] == str(10000 + int(job_id) % 20000)
            assert start["argv"][start["argv"].index("--run-dir") + 1] == str(run_dir)
            assert start["argv"][-2:] == overrides  # the braces reach the trainer unexpanded
    text = log.read_text()
    assert text.count("requeueing job") == 1, text
    assert text.count("trainer finished (exit 0)") == 1, text


def test_requeue_bound(tmp_path, slurm_env):
    """With CMSCALE_MAX_REQUEUES=0 the stopped run is not requeued: the job fails with
    the trainer's requeue code, so the user sees why it ended."""
    env = slurm_env
    job_id, run_dir, log = _submit_fake(tmp_path, env, CMSCALE_MAX_REQUEUES="0",
                                        FAKE_TRAINER_STAGGER_S="0.2")

    def info():
        text = log.read_text() if log.exists() else "(no log)"
        return f"job {_job(job_id, env)}\nlog:\n{text}"

    try:
        _wait(lambda: all((run_dir / f"start-r0-rank{r}.json").exists() for r in (0, 1)),
              40, "both tasks to start", info)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, env=env,
                       timeout=15)
        _wait(lambda: _job(job_id, env).get("JobState") in ("FAILED", "COMPLETED", "PENDING"),
              20, "the job to end", info)
        job = _job(job_id, env)
        assert job["JobState"] == "FAILED" and job["Restarts"] == "0", info()
        assert job["ExitCode"] == "75:0", info()
    finally:
        if _job(job_id, env).get("JobState") not in (None, "COMPLETED", "FAILED", "CANCELLED"):
            subprocess.run(["scancel", job_id], env=env, timeout=15)
    assert "CMSCALE_MAX_REQUEUES=0); not requeueing" in log.read_text(), info()
