"""The SLURM launcher against a real SLURM: signal forwarding and requeue.

Needs a running cluster with 2 free CPUs, e.g. this machine's:

    bash tools/local_slurm.sh up && export SLURM_CONF=/tmp/cmscale-slurm/slurm.conf
    python -m pytest -m slurm tests/e2e/test_slurm.py

Skipped when ``sinfo`` does not answer. Without SLURM_CONF the test looks for the
configuration tools/local_slurm.sh writes ($CMSCALE_SLURM_DIR/slurm.conf).

The first tests use tests/support/fake_trainer.py (via CMSCALE_TRAIN_MODULE) and check the
launcher's part: launch/quickstart.sh -> launch/common.sh -> `srun -n2` -> launch/task.sh
-> trainer. The end-to-end tests below run the real recipe script (launch/lsun_cat_ct.sh,
resources and model sized down on the command line) with the real trainer: preemption,
requeue and resume against an uninterrupted run, a re-submitted finished run, SLURM's own
time-limit warning (slow), and FID as a job array plus a dependent report job.
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO as ROOT

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


def _require_slurm() -> dict[str, str]:
    """Environment for SLURM clients; skips the test when no cluster can run 2 tasks."""
    env = _slurm_env()
    cpus = _sinfo_cpus(env)
    if cpus is None:
        pytest.skip("no SLURM answers sinfo (bash tools/local_slurm.sh up; export SLURM_CONF=...)")
    if cpus < 2:
        pytest.skip(f"the cluster has {cpus} CPU(s); the tests run 2 tasks")
    return env


@pytest.fixture
def slurm_env() -> dict[str, str]:
    return _require_slurm()


def _submit_fake(tmp_path: Path, env: dict[str, str], overrides=(), **extra_env):
    """sbatch launch/quickstart.sh with the fake trainer; returns (job id, run dir, log)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = tmp_path / "fake.yaml"
    config.write_text("{}\n")
    log = tmp_path / "job.out"
    env.update(CMSCALE_ROOT=str(ROOT), CMSCALE_TRAIN_MODULE="tests.support.fake_trainer",
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
        # A requeued job is held ~120 s (BeginTime); release it (_release), but not within
        # the second in which the first run ended: slurmd revokes the job's credential with
        # a 1-second timestamp, and a relaunch in that same second dies with "Job
        # credential revoked" (exit 1, no output). That is what the hold is for.
        _release(job_id, env)
        _wait(lambda: _job(job_id, env).get("JobState") == "COMPLETED", 30,
              "the second run to complete", info)
        time.sleep(3)  # a wrong second requeue would show by now
        job = _job(job_id, env)
        assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", info()
        assert job["ExitCode"] == "0:0", info()
    finally:
        _cancel(env, job_id)

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
        _cancel(env, job_id)
    assert "CMSCALE_MAX_REQUEUES=0); not requeueing" in log.read_text(), info()


def test_persistent_failure_is_not_requeued_forever(tmp_path, slurm_env):
    """A job that stops again and again without writing a newer checkpoint (here: the fake
    trainer writes none) is requeued CMSCALE_MAX_STALLED_REQUEUES times and then fails, although
    CMSCALE_MAX_REQUEUES would allow more: a persistent failure must not requeue forever."""
    env = slurm_env
    job_id, run_dir, log = _submit_fake(tmp_path, env, CMSCALE_MAX_STALLED_REQUEUES="1",
                                        CMSCALE_MAX_REQUEUES="10", FAKE_TRAINER_STAGGER_S="0.2",
                                        FAKE_TRAINER_STOP_RUNS="0,1")

    def info():
        text = log.read_text() if log.exists() else "(no log)"
        return f"job {_job(job_id, env)}\nlog:\n{text}\nrun dir: {sorted(os.listdir(run_dir))}"

    try:
        for restart in (0, 1):
            _wait(lambda: all((run_dir / f"start-r{restart}-rank{r}.json").exists()
                              for r in (0, 1)), 40, f"both tasks of run {restart} to start", info)
            subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, env=env,
                           timeout=15)
            if restart == 0:
                _wait(lambda: (_job(job_id, env).get("JobState") == "PENDING"
                               and _job(job_id, env).get("Restarts") == "1"),
                      20, "the first requeue", info)
                _release(job_id, env)
        _wait(lambda: _job(job_id, env).get("JobState") in ("FAILED", "COMPLETED"),
              20, "the job to end", info)
        time.sleep(3)  # a wrong second requeue would show by now
        job = _job(job_id, env)
        assert job["JobState"] == "FAILED" and job["Restarts"] == "1", info()
        assert job["ExitCode"] == "75:0", info()
    finally:
        _cancel(env, job_id)
    text = log.read_text()
    assert text.count("requeueing job") == 1, info()
    assert "2 times in a row (CMSCALE_MAX_STALLED_REQUEUES=1)" in text, info()


# ----------------------------------------------------------------------------
# End to end: sbatch launch/lsun_cat_ct.sh with the real trainer, sized for 2 CPUs

# The recipe's #SBATCH lines ask for 4 nodes x 8 GPUs for 24 h with the warning 10 minutes
# before the limit; command-line options win. --signal is overridden too: with a limit
# shorter than the warning time SLURM would send the warning at its first timer check.
E2E_SBATCH = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
E2E_STEPS = 120
E2E_BATCH = 8
E2E_EVERY_STEPS = 40  # periodic checkpoints at steps 40 and 80, the final one at 120
E2E_OVERRIDES = [
    "data.shards=embedded:sklearn:digits", "data.resolution=16", "data.num_workers=1",
    "data.streams=2", "net.preset=tiny16", "loss.metric=l2", "train.precision=fp32",
    f"train.total_steps={E2E_STEPS}", f"train.global_batch={E2E_BATCH}", "train.micro_batch=4",
    "ema.rates=[0.9]", f"checkpoint.every_images={E2E_EVERY_STEPS * E2E_BATCH}",
    "checkpoint.keep_last=10", "log.every_steps=1", "log.sample_every_images=0",
    "log.progress_bar=false", "log.tensorboard=false", "sample.ema=ema_0_9", "sample.num_grid=4",
]
_NOT_RUNNING = (None, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _e2e_env(env: dict[str, str], cache: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in env.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "CMSCALE_TRAIN_MODULE", "CMSCALE_CONFIG")}
    env.update(CMSCALE_ROOT=str(ROOT), CMSCALE_PYTHON=sys.executable, CMSCALE_CACHE=str(cache),
               OMP_NUM_THREADS="1", **extra)
    return env


def _sbatch(env, script: str, *options, args=()) -> str:
    out = subprocess.run(["sbatch", "--parsable", *options, str(ROOT / "launch" / script), *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _submit_recipe(env, run_dir: Path, log: Path, *options, overrides=E2E_OVERRIDES) -> str:
    return _sbatch(dict(env, RUN_DIR=str(run_dir)), "lsun_cat_ct.sh", *E2E_SBATCH, *options,
                   f"--output={log}", args=overrides)


def _jobs(job_id: str, env) -> list[dict[str, str]]:
    """One dict per job (array jobs: per array task) of `scontrol show job -o`."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, env=env, timeout=15)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.stdout.splitlines() if line]


def _cancel(env, *job_ids):
    for job_id in job_ids:
        if job_id and any(j.get("JobState") not in _NOT_RUNNING for j in _jobs(job_id, env)):
            subprocess.run(["scancel", job_id], env=env, timeout=15)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _release(job_id: str, env):
    """Start a requeued job now instead of after SLURM's ~120 s hold (see the first test for
    why not within the second its previous run ended)."""
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True,
                   env=env, timeout=15)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else f"(no {path.name})"


class E2E:
    """What the module's end-to-end scenario left behind (see the e2e fixture)."""


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """`sbatch launch/lsun_cat_ct.sh` with the real trainer on 2 tasks (120 steps of a tiny CT
    model on the embedded digits, a checkpoint every 40 steps); `scancel --batch
    --signal=USR1` (what `--signal=B:USR1@N` delivers) once it trains; the job checkpoints,
    requeues and is released at once, resumes and finishes. Meanwhile the same config runs
    uninterrupted under torchrun (2 processes), for comparison."""
    env = _require_slurm()
    tmp = tmp_path_factory.mktemp("e2e")
    e = E2E()
    e.tmp, e.cache = tmp, tmp / "cache"
    e.run, e.log, e.ref_run = tmp / "run", tmp / "job.out", tmp / "ref"
    e.env = env = _e2e_env(env, e.cache)
    e.job = _submit_recipe(env, e.run, e.log, "--time=10", "--signal=B:USR1@30")
    ref_log = tmp / "ref.out"
    ref_fh = ref_log.open("w")
    ref = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "cmscale.train", "--config", str(ROOT / "configs" / "lsun_cat_ct.yaml"),
         "--run-dir", str(e.ref_run), *E2E_OVERRIDES],
        env=dict(env, PYTHONPATH=str(ROOT)), cwd=ROOT, stdout=ref_fh,
        stderr=subprocess.STDOUT, start_new_session=True)

    def info():
        return (f"job {_jobs(e.job, env)}\nlog:\n{_text(e.log)[-6000:]}\n"
                f"metrics: {len(_metrics(e.run))} lines")

    try:
        # Once it trains (well before step 120), the warning by hand.
        _wait(lambda: len(_metrics(e.run)) >= 5, 240, "the job to train 5 steps", info)
        e.steps_before_signal = len(_metrics(e.run))
        subprocess.run(["scancel", "--batch", "--signal=USR1", e.job], check=True, env=env,
                       timeout=15)

        def requeued():
            j = _jobs(e.job, env)[0]
            return j.get("JobState") == "PENDING" and j.get("Restarts") == "1"
        _wait(requeued, 90, "the job to checkpoint and be requeued", info)
        _release(e.job, env)
        _wait(lambda: _jobs(e.job, env)[0].get("JobState") in _NOT_RUNNING, 240,
              "the second run to finish", info)
        time.sleep(3)  # a wrong second requeue would show by now
        e.job_info = _jobs(e.job, env)[0]
        e.info = info
        e.ref_rc = ref.wait(timeout=300)
        e.ref_out = ref_log.read_text()
        yield e
    finally:
        if ref.poll() is None:  # torchrun and its workers
            os.killpg(ref.pid, signal.SIGKILL)
            ref.wait()
        ref_fh.close()
        _cancel(env, e.job)


def test_recipe_end_to_end_preempt_requeue_resume(e2e):
    """Two tasks train; the USR1 warning makes them checkpoint ("preempted") and exit 75;
    the launcher requeues; the second run resumes from that checkpoint and finishes with no
    step lost or repeated: every step is logged exactly once, and the losses and final
    weights (online, target, EMA) equal those of the uninterrupted torchrun run bit for bit."""
    e = e2e
    info = e.info
    job = e.job_info
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", info()
    assert job["ExitCode"] == "0:0", info()
    assert e.ref_rc == 0, e.ref_out[-4000:]
    log = e.log.read_text()
    assert "2 tasks" in log and "recipe lsun_cat_ct, job" in log, info()
    assert log.count("SIGUSR1: asking the trainer to checkpoint and stop") == 1, info()
    assert log.count("requeueing job") == 1 and log.count("trainer finished (exit 0)") == 1, info()
    stop = re.findall(r"stop signal: checkpointed at step (\d+); exit 75", log)
    assert len(stop) == 1, info()
    k = int(stop[0])
    assert 5 <= e.steps_before_signal <= k < E2E_STEPS, info()
    assert f"resumed from {k * E2E_BATCH} images (step {k}, saved by 2 ranks)" in log, info()
    assert not list(e.run.glob(".requeue-*")), "requeue marker left behind"

    # Checkpoints: periodic, the stop one, the final one; all complete, written by 2 ranks.
    ckpts = {int(p.name.split("-")[1]): p for p in (e.run / "checkpoints").glob("nimg-*")}
    expect = {s * E2E_BATCH for s in (E2E_EVERY_STEPS, 2 * E2E_EVERY_STEPS, k, E2E_STEPS)}
    assert set(ckpts) == expect, sorted(ckpts)
    for nimg, path in ckpts.items():
        commit = json.loads((path / "commit.json").read_text())
        assert commit["world_size"] == 2 and commit["nimg"] == nimg
    reason = json.loads((ckpts[k * E2E_BATCH] / "commit.json").read_text())["reason"]
    # A stop at a periodic step keeps the periodic checkpoint (same state; nothing rewritten).
    assert reason == ("periodic" if k % E2E_EVERY_STEPS == 0 else "preempted")
    assert json.loads((ckpts[E2E_STEPS * E2E_BATCH] / "commit.json").read_text())["reason"] == "final"

    # No step lost or repeated: each step once, in order, across the two runs ...
    got, ref = _metrics(e.run), _metrics(e.ref_run)
    assert [r["step"] for r in got] == list(range(1, E2E_STEPS + 1))
    assert [r["step"] for r in ref] == list(range(1, E2E_STEPS + 1))
    # ... and the same training: same losses, schedules, final weights (bitwise on CPU).
    for a, b in zip(got, ref):
        for key in ("nimg", "loss", "N", "mu", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    import torch

    from cmscale.runs import load_run

    for which in ("online", "target", "ema_0_9"):
        net_a, meta_a = load_run(str(e.run), which)
        net_b, meta_b = load_run(str(e.ref_run), which)
        assert meta_a["nimg"] == meta_b["nimg"] == E2E_STEPS * E2E_BATCH
        sa, sb = net_a.state_dict(), net_b.state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (which, name)


def test_recipe_resubmit_finished_run(e2e):
    """sbatch again with the finished run's RUN_DIR: exit 0, "run already finished", no new
    step, checkpoint or requeue."""
    e = e2e
    env = e.env
    log = e.tmp / "again.out"
    before_metrics = (e.run / "metrics.jsonl").read_bytes()
    before_ckpts = sorted(p.name for p in (e.run / "checkpoints").iterdir())
    job_id = _submit_recipe(env, e.run, log, "--time=10", "--signal=B:USR1@30")
    try:
        _wait(lambda: _jobs(job_id, env)[0].get("JobState") in _NOT_RUNNING, 180,
              "the re-submitted job to end", lambda: f"{_jobs(job_id, env)}\n{_text(log)}")
        time.sleep(2)
        job = _jobs(job_id, env)[0]
    finally:
        _cancel(env, job_id)
    text = _text(log)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0", f"{job}\n{text}"
    assert job["ExitCode"] == "0:0", text
    assert f"run already finished ({E2E_STEPS} steps); nothing to do" in text, text
    assert "trainer finished (exit 0)" in text and "requeueing" not in text, text
    assert (e.run / "metrics.jsonl").read_bytes() == before_metrics
    assert sorted(p.name for p in (e.run / "checkpoints").iterdir()) == before_ckpts


def test_fid_array_and_report_jobs(e2e):
    """FID of the run's 4 checkpoints x 2 samplers as SLURM jobs: a 2-task job array
    (launch/eval_fid.sh, each array task one slice, each on 2 srun tasks that split the
    images), then a dependent report job (launch/fid_report.sh) that finds everything in the
    cache and only assembles report.csv / report.md / fid.png."""
    e = e2e
    env = e.env
    tmp = e.tmp / "fid"
    tmp.mkdir()
    from cmscale.data.embedded import ensure_embedded_shards

    shards = ensure_embedded_shards("sklearn:digits", str(e.cache), 16)  # built by the run
    ref = tmp / "ref.npz"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "ref_stats.py"), shards, str(ref),
                          "--extractor", "digits"], capture_output=True, text=True,
                         env=dict(env, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = tmp / "report"
    samplers = ["onestep", "ts=0,62,150/151"]
    fid_args = [str(e.run), "--ref", str(ref), "--extractor", "digits", "--num", "64",
                "--batch-size", "32", "--out", str(report)]
    for s in samplers:
        fid_args += ["--sampler", s]
    res = ["--nodes=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]
    array = _sbatch(env, "eval_fid.sh", *res, "--ntasks-per-node=2", "--array=0-1",
                    f"--output={tmp}/eval-%A_%a.out", args=fid_args)
    # One task is enough to assemble (it would compute what a failed array task left out).
    rep = _sbatch(env, "fid_report.sh", *res, "--ntasks-per-node=1",
                  f"--dependency=afterany:{array}", f"--output={tmp}/report.out", args=fid_args)

    def info():
        logs = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp.glob("*.out")))
        return f"array {_jobs(array, env)}\nreport {_jobs(rep, env)}\n{logs}"

    try:
        _wait(lambda: (_jobs(rep, env) or [{}])[0].get("JobState") in _NOT_RUNNING, 300,
              "the report job to end", info)
        time.sleep(1)
        tasks, report_job = _jobs(array, env), _jobs(rep, env)[0]
    finally:
        _cancel(env, array, rep)
    assert len(tasks) == 2, info()
    for t in tasks:
        assert t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0", info()
    assert report_job["JobState"] == "COMPLETED" and report_job["ExitCode"] == "0:0", info()

    ckpts = sorted(int(p.name.split("-")[1]) for p in (e.run / "checkpoints").glob("nimg-*"))
    assert len(ckpts) >= 3
    combos = len(ckpts) * len(samplers)
    # Each array task computed its own slice, on 2 ranks; together all of them, once.
    logs = [p.read_text() for p in sorted(tmp.glob("eval-*.out"))]
    assert len(logs) == 2, info()
    computed = []
    for i, text in enumerate(logs):
        assert f"--shard {i}/2" in text and "2 task(s)" in text, text
        computed.append(int(re.search(r"fid_report: computed (\d+), cache hits 0", text).group(1)))
    assert sum(computed) == combos and all(computed), info()
    entries = [json.loads(p.read_text()) for p in (report / "cache").glob("*.json")]
    assert len(entries) == combos and {x["world_size"] for x in entries} == {2}
    # The report job: all cache hits, nothing computed again; every checkpoint x sampler row.
    text = (tmp / "report.out").read_text()
    assert f"fid_report: computed 0, cache hits {combos}" in text, text
    assert f"fid_report: {combos} rows (0 missing)" in text, text
    with open(report / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["nimg"]), r["sampler"]) for r in rows) == sorted(
        (n, s) for n in ckpts for s in samplers)
    assert all(r["ema"] == "ema_0_9" and float(r["fid"]) >= 0 for r in rows)
    md = (report / "report.md").read_text()
    assert md.count("**best**") >= 1 and all(f"| {n} |" in md for n in ckpts)
    assert (report / "fid.png").stat().st_size > 1000


@pytest.mark.faults  # 1-2 min: SLURM's own timer
def test_time_limit_warning_requeues_and_resumes(tmp_path, slurm_env):
    """SLURM's own timer sends the warning: --time=1 --signal=B:USR1@30 (the time limit is in
    whole minutes and slurmctld checks limits every 30 s, so the warning comes 30-60 s after
    the start and the limit would strike about 30 s later). The trainer checkpoints, the
    launcher requeues before the limit, the job is released, and the second run resumes
    from that checkpoint. Then `scancel` (SIGTERM) stops it: it checkpoints and does not
    requeue (the run is far from its last step)."""
    env = _e2e_env(slurm_env, tmp_path / "cache")
    run, log = tmp_path / "run", tmp_path / "job.out"
    overrides = [o for o in E2E_OVERRIDES if not o.startswith(("train.total_steps=", "checkpoint."))]
    overrides += ["train.total_steps=1000000", "checkpoint.every_images=0"]
    job_id = _submit_recipe(env, run, log, "--time=1", "--signal=B:USR1@30", overrides=overrides)

    def info():
        return f"job {_jobs(job_id, env)}\nlog:\n{_text(log)[-6000:]}"

    try:
        def requeued():
            j = _jobs(job_id, env)[0]
            return j.get("JobState") == "PENDING" and j.get("Restarts") == "1"
        _wait(requeued, 150, "the time-limit warning, checkpoint and requeue", info)
        text = log.read_text()
        stop = re.findall(r"stop signal: checkpointed at step (\d+); exit 75", text)
        assert "SIGUSR1: asking the trainer" in text and len(stop) == 1, info()
        k = int(stop[0])
        commit = json.loads((run / "checkpoints" / f"nimg-{k * E2E_BATCH:012d}" / "commit.json").read_text())
        assert commit["reason"] == "preempted" and commit["world_size"] == 2
        _release(job_id, env)
        _wait(lambda: len(_metrics(run)) >= k + 3, 120, "the second run to train", info)
    finally:
        _cancel(env, job_id)
    _wait(lambda: _jobs(job_id, env)[0].get("JobState") in _NOT_RUNNING, 60,
          "the cancelled job to end", info)
    text = log.read_text()
    assert f"resumed from {k * E2E_BATCH} images (step {k}, saved by 2 ranks)" in text, info()
    assert text.count("requeueing job") == 1, info()
    assert "DUE TO TIME LIMIT" not in text, info()
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, len(steps) + 1))  # no step lost or repeated
    # scancel: SIGTERM to every process of the step (DataLoader workers too), SIGKILL 10 s
    # later (KillWait): the trainer checkpoints at its step boundary, nothing requeues.
    job = _jobs(job_id, env)[0]
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "1", info()
    last = max((run / "checkpoints").glob("nimg-*"))
    commit = json.loads((last / "commit.json").read_text())
    assert commit["reason"] == "preempted" and commit["step"] == steps[-1] > k + 2, info()
    assert "DataLoader worker" not in text, info()
