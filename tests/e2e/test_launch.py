"""The launchers without a cluster: shellcheck, the bash helpers of launch/common.sh,
the task wrapper's exit-code mapping, launch/submit.py's recipes, sweeps and its local
(submitit) requeue path, and launch/mpi.sh under mpiexec.

The same launcher against a real SLURM is tests/e2e/test_slurm.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO as ROOT
LAUNCH = ROOT / "launch"
COMMON = LAUNCH / "common.sh"
RECIPES = ["lsun_cat_ct", "lsun_bedroom_cd", "imagenet64_cd", "imagenet64_ct", "cifar10_ict",
           "cifar10_ect", "quickstart", "imagenet64_sct", "imagenet64_scd"]


def _bash(script: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, **kw)


def _common(call: str, env=None) -> subprocess.CompletedProcess:
    """Source launch/common.sh (functions only) and run `call`."""
    return _bash(f'source "{COMMON}" && {call}', env=env)


def _load_submit():
    spec = importlib.util.spec_from_file_location("cmscale_launch_submit", LAUNCH / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no launch/__pycache__
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


def _fake_env(tmp_path: Path, **extra) -> dict[str, str]:
    config = tmp_path / "fake.yaml"
    config.write_text("{}\n")
    env = dict(os.environ)
    env.update(
        CMSCALE_TRAIN_MODULE="tests.support.fake_trainer",
        CMSCALE_CONFIG=str(config),
        CMSCALE_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


# ----------------------------------------------------------------------------
# shellcheck


def _shell_scripts() -> list[Path]:
    return sorted(LAUNCH.glob("*.sh")) + sorted((ROOT / "tools").glob("*.sh"))


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shellcheck(script):
    out = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------
# launch/common.sh helpers


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("gpu-a[8-10]", ["gpu-a8", "gpu-a9", "gpu-a10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("a[1],b[3-4],c", ["a1", "b3", "b4", "c"]),
    ("x1000[0-1]-ib", ["x10000-ib", "x10001-ib"]),
])
def test_expand_hostlist_pure_bash(nodelist, hosts):
    out = _common(f'cmscale_expand_hostlist "{nodelist}"')
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == hosts


def test_expand_hostlist_agrees_with_dist():
    dist = pytest.importorskip("cmscale.dist")
    for nodelist in ("node[01-03,07],gpu5", "r[1-2]n[1-2]", "n[08-10],m[1-3]"):
        out = _common(f'cmscale_expand_hostlist "{nodelist}"')
        assert out.stdout.split() == dist.expand_hostlist(nodelist)


def test_first_host_falls_back_without_scontrol(tmp_path):
    # An scontrol that fails, first on PATH: the pure-bash parse must answer.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (fake / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    out = _common('cmscale_first_host "gpu[017-020],cpu1"', env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gpu017"


def test_port_matches_dist_formula():
    # cmscale.dist derives 10000 + job_id % 20000 when MASTER_PORT is unset.
    text = (ROOT / "cmscale" / "dist.py").read_text()
    base = int(re.search(r"^_SLURM_PORT_BASE = (\d+)", text, re.M).group(1))
    span = int(re.search(r"^_SLURM_PORT_SPAN = (\d+)", text, re.M).group(1))
    for job in (1, 19999, 20000, 123456789):
        out = _common(f"cmscale_port {job}")
        assert int(out.stdout) == base + job % span


def test_requeue_code_matches_dist():
    text = (ROOT / "cmscale" / "dist.py").read_text()
    code = int(re.search(r"^EXIT_REQUEUE = (\d+)", text, re.M).group(1))
    out = _common('echo "$CMSCALE_DEFAULT_EXIT_REQUEUE"')
    assert int(out.stdout) == code
    assert _load_submit().EXIT_REQUEUE == code


def test_common_refuses_outside_slurm(tmp_path):
    env = {k: v for k, v in _fake_env(tmp_path).items() if not k.startswith("SLURM_")}
    out = subprocess.run(["bash", str(COMMON), "quickstart"], capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 2
    assert "not inside a SLURM job" in out.stderr


def _fake_slurm(tmp_path: Path, run_dir: Path, **extra) -> dict[str, str]:
    """common.sh "inside a job" without SLURM: an srun that runs the task here (one task)
    and an scontrol that records requeues in ``requeues.log``."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >>"{tmp_path}/requeues.log"\n')
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    env = _fake_env(tmp_path, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="77",
                    SLURM_JOB_NODELIST="localhost", RUN_DIR=str(run_dir), **extra)
    return env


@pytest.mark.parametrize("progress, exit_code, requeued", [
    ("1", "75", [0, 1, 2, 3, 4]),  # checkpointed and stopped, newer checkpoint each time
    ("0", "75", [0, 1]),           # stops before any progress: at most 2 requeues in a row
    ("1", "1", []),                # fails: never requeued
], ids=["progress", "stalled", "failing"])
def test_requeue_stops_on_a_persistent_failure(tmp_path, progress, exit_code, requeued):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    done = []
    for restart in range(5):  # what SLURM would run after each requeue
        env = _fake_slurm(tmp_path, run_dir, SLURM_RESTART_COUNT=str(restart),
                          FAKE_TRAINER_EXIT=exit_code, FAKE_TRAINER_PROGRESS=progress)
        log = tmp_path / "requeues.log"
        before = log.read_text().count("requeue") if log.exists() else 0
        out = subprocess.run(["bash", str(COMMON), "quickstart"], capture_output=True,
                             text=True, env=env, timeout=60)
        if (log.read_text().count("requeue") if log.exists() else 0) > before:
            done.append(restart)
            assert out.returncode == 0, out.stderr
        else:
            assert out.returncode == int(exit_code), out.stderr
            break
    assert done == requeued
    if progress == "0":
        assert "3 times in a row (CMSCALE_MAX_STALLED_REQUEUES=2)" in out.stderr
    if exit_code == "1":
        assert "not requeueing" in out.stderr


# ----------------------------------------------------------------------------
# launch/task.sh: the requeue code becomes exit 0 plus a marker


@pytest.mark.parametrize("code, expect_rc, expect_marker", [(75, 0, True), (0, 0, False), (3, 3, False)])
def test_task_wrapper_exit_codes(tmp_path, code, expect_rc, expect_marker):
    marker = tmp_path / "requeue"
    out = subprocess.run(["bash", str(LAUNCH / "task.sh"), str(marker), "sh", "-c", f"exit {code}"],
                         env=dict(os.environ, CMSCALE_EXIT_REQUEUE="75"), timeout=30)
    assert out.returncode == expect_rc
    assert marker.exists() == expect_marker


def test_task_wrapper_survives_group_signal(tmp_path):
    """srun and mpiexec signal every process of a task: the wrapper must survive the
    signal (not die of SIGUSR1's default action) and report the child's requeue code."""
    marker = tmp_path / "requeue"
    got = tmp_path / "got"
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGUSR1, lambda s, f: (open(sys.argv[1], 'w').write('USR1'), sys.exit(75)))\n"
             "open(sys.argv[1] + '.ready', 'w').close()\n"
             "time.sleep(30)\nsys.exit(1)\n")
    proc = subprocess.Popen(["bash", str(LAUNCH / "task.sh"), str(marker), sys.executable, "-c", child,
                             str(got)], start_new_session=True)
    deadline = time.monotonic() + 20
    while not Path(str(got) + ".ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGUSR1)  # the whole task, as slurmstepd does
    assert proc.wait(timeout=20) == 0
    assert got.read_text() == "USR1"
    assert marker.exists()


# ----------------------------------------------------------------------------
# Recipe scripts


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_script(recipe):
    text = (LAUNCH / f"{recipe}.sh").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    for key in ("job-name", "nodes", "ntasks-per-node", "cpus-per-task", "time", "signal",
                "requeue", "open-mode", "output"):
        assert key in sbatch, f"{recipe}.sh lacks #SBATCH --{key}"
    assert sbatch["job-name"] == recipe
    assert re.fullmatch(r"B:USR1@\d+", sbatch["signal"])
    assert sbatch["open-mode"] == "append"
    assert "%j" in sbatch["output"]
    if recipe != "quickstart":  # one rank per GPU
        assert sbatch["gpus-per-node"] == sbatch["ntasks-per-node"]
    assert f'launch/common.sh" {recipe} "$@"' in text


def test_recipe_resources_from_sbatch_lines():
    submit = _load_submit()
    assert submit.recipes() == sorted(RECIPES)
    res = submit.recipe_resources("lsun_cat_ct")
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node) == (4, 8, 8)
    assert res.timeout_min == 24 * 60 and res.signal_delay_s == 600
    q = submit.recipe_resources("quickstart")
    assert (q.nodes, q.tasks_per_node, q.gpus_per_node, q.timeout_min) == (1, 2, 0, 30)


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("30:00", 30), ("00:30:00", 30), ("24:00:00", 1440), ("2-00:00:00", 2880),
    ("1-12", 2160), ("1-00:30", 1470), ("00:00:30", 1),
])
def test_parse_slurm_time(text, minutes):
    assert _load_submit().parse_slurm_time(text) == minutes


# ----------------------------------------------------------------------------
# launch/submit.py


def test_submit_help():
    out = subprocess.run([sys.executable, str(LAUNCH / "submit.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--recipe" in out.stdout and "--sweep" in out.stdout
    assert "lsun_cat_ct" in out.stdout


def test_submit_sweep_dry_run(tmp_path):
    out = subprocess.run(
        [sys.executable, str(LAUNCH / "submit.py"), "--recipe", "cifar10_ict", "--dry-run",
         "--cluster", "slurm",  # planned as for SLURM whether or not sbatch is installed here
         "--run-dir", str(tmp_path / "sweep"), "--nodes", "2", "--gpus-per-node", "4",
         "--sweep", "optim.lr=1e-4,2e-4",
         "--sweep", "data.shards=/d/{000000..000009}.tar,/e/x.tar",
         "train.total_steps=10"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    jobs = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(jobs) == 4
    assert [j["overrides"] for j in jobs] == [
        ["train.total_steps=10", "optim.lr=1e-4", "data.shards=/d/{000000..000009}.tar"],
        ["train.total_steps=10", "optim.lr=1e-4", "data.shards=/e/x.tar"],
        ["train.total_steps=10", "optim.lr=2e-4", "data.shards=/d/{000000..000009}.tar"],
        ["train.total_steps=10", "optim.lr=2e-4", "data.shards=/e/x.tar"],
    ]
    run_dirs = [j["run_dir"] for j in jobs]
    assert len(set(run_dirs)) == 4
    assert all(Path(d).parent == tmp_path / "sweep" for d in run_dirs)
    assert Path(run_dirs[0]).name.startswith("000-lr=1e-4,shards=")
    for j in jobs:
        assert (j["nodes"], j["gpus_per_node"], j["tasks_per_node"]) == (2, 4, 4)
        argv = j["argv"]
        assert argv[1:3] == ["-m", "cmscale.train"]
        assert argv[argv.index("--config") + 1] == str(ROOT / "configs" / "cifar10_ict.yaml")
        assert argv[argv.index("--run-dir") + 1] == j["run_dir"]
        assert argv[-len(j["overrides"]):] == j["overrides"]


def test_submit_rejects_bad_input():
    for args in (["--recipe", "nope", "--dry-run"], ["--recipe", "quickstart", "--dry-run", "notkv"],
                 ["--recipe", "quickstart", "--dry-run", "--sweep", "novalues"]):
        out = subprocess.run([sys.executable, str(LAUNCH / "submit.py"), *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0


@pytest.mark.dist
def test_submit_local_requeues_on_timeout(tmp_path):
    """submitit's local executor: USR2 before the time limit -> the trainer saves and exits
    75 -> TrainJob.checkpoint() -> requeue with the same run dir -> the second run ends."""
    pytest.importorskip("submitit")
    run_dir = tmp_path / "run"
    env = _fake_env(tmp_path, FAKE_TRAINER_WAIT_S="30")
    out = subprocess.run(
        [sys.executable, str(LAUNCH / "submit.py"), "--recipe", "quickstart", "--cluster", "local",
         "--tasks-per-node", "2", "--timeout-min", "0.2", "--signal-delay-s", "8",
         "--run-dir", str(run_dir), "train.total_steps=3"],
        capture_output=True, text=True, timeout=80, env=env, cwd=tmp_path,
    )
    logs = "\n".join(p.read_text() for p in sorted((run_dir / "submitit").glob("*_log.*")))
    assert out.returncode == 0, out.stdout + out.stderr + logs
    names = sorted(p.name for p in run_dir.iterdir() if p.name != "submitit")
    assert names == [
        "done-r1-rank0", "done-r1-rank1", "signal-r0-rank0", "signal-r0-rank1",
        "start-r0-rank0.json", "start-r0-rank1.json", "start-r1-rank0.json", "start-r1-rank1.json",
    ], logs
    assert (run_dir / "signal-r0-rank1").read_text() == "SIGUSR2"
    start = json.loads((run_dir / "start-r1-rank1.json").read_text())
    assert start["env"]["RANK"] == "1" and start["env"]["WORLD_SIZE"] == "2"
    assert start["argv"][start["argv"].index("--run-dir") + 1] == str(run_dir)
    assert start["argv"][-1] == "train.total_steps=3"


# ----------------------------------------------------------------------------
# launch/mpi.sh


def _mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


@pytest.mark.dist
@pytest.mark.skipif(_mpiexec() is None, reason="no mpiexec (pip install mpich)")
def test_mpi_launcher_stop_and_resume(tmp_path):
    """Two MPI ranks; USR1 to the launcher reaches both, which exit 75 (the launcher
    reports 75: rerun to resume); the same command again finishes (exit 0)."""
    run_dir = tmp_path / "run"
    env = _fake_env(tmp_path, NPROC="2", RUN_DIR=str(run_dir), CMSCALE_MPIEXEC_BIN=_mpiexec(),
                    FAKE_TRAINER_WAIT_S="30")
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = subprocess.Popen(["bash", str(LAUNCH / "mpi.sh"), "quickstart", "a.b=1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and not all(
            (run_dir / f"start-r0-rank{r}.json").exists() for r in (0, 1)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=40)
    assert proc.returncode == 75, log
    assert (run_dir / "signal-r0-rank0").read_text() == "SIGUSR1"
    assert (run_dir / "signal-r0-rank1").read_text() == "SIGUSR1"
    assert json.loads((run_dir / "start-r0-rank1.json").read_text())["env"]["PMI_SIZE"] == "2"

    again = subprocess.run(["bash", str(LAUNCH / "mpi.sh"), "quickstart", "a.b=1"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (run_dir / "done-r1-rank0").exists() and (run_dir / "done-r1-rank1").exists()
    assert not list(run_dir.glob(".requeue-*"))


# ----------------------------------------------------------------------------
# launch/eval_fid.sh and launch/fid_report.sh (the FID jobs; on SLURM: tests/e2e/test_slurm.py)


def _fid_script(tmp_path: Path, script: str, *args, **env_extra) -> subprocess.CompletedProcess:
    """Run a FID job script outside SLURM with a stand-in python that prints its argv."""
    fake = tmp_path / "fakepython"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CMSCALE_PYTHON=str(fake), **env_extra)
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=30)


def _fid_argv(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stderr
    argv = out.stdout.splitlines()
    assert argv[:3] == ["-m", "cmscale.cli", "fid-report"]
    return argv[3:]


def test_eval_fid_arguments(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    # defaults: --out RUN/fid, --ref from CMSCALE_FID_REF; options and values pass through
    argv = _fid_argv(_fid_script(tmp_path, "eval_fid.sh", "--num", "64", str(run),
                                 "--sampler", "ts=0,62,150/151", CMSCALE_FID_REF="r.npz"))
    assert argv == ["--num", "64", str(run), "--sampler", "ts=0,62,150/151",
                    "--out", f"{run}/fid", "--ref", "r.npz"]
    argv = _fid_argv(_fid_script(tmp_path, "eval_fid.sh", str(run), "--ref=a.npz", "--out", "o"))
    assert argv == [str(run), "--ref=a.npz", "--out", "o"]
    # array task -> its slice of the combinations: (ID - MIN) / STEP of COUNT
    for task, lo, step, count, shard in (("3", "0", "1", "8", "3/8"), ("8", "1", "1", "8", "7/8"),
                                         ("4", "0", "2", "4", "2/4")):
        argv = _fid_argv(_fid_script(tmp_path, "eval_fid.sh", str(run), "--ref", "a.npz",
                                     SLURM_ARRAY_TASK_ID=task, SLURM_ARRAY_TASK_MIN=lo,
                                     SLURM_ARRAY_TASK_STEP=step, SLURM_ARRAY_TASK_COUNT=count))
        assert argv[-2:] == ["--shard", shard]
    # the report job: never a shard; CMSCALE_FID_NO_COMPUTE=1 only assembles
    argv = _fid_argv(_fid_script(tmp_path, "fid_report.sh", str(run), "--ref", "a.npz",
                                 CMSCALE_ROOT=str(ROOT), CMSCALE_FID_NO_COMPUTE="1"))
    assert argv == [str(run), "--ref", "a.npz", "--out", f"{run}/fid", "--no-compute"]


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "usage:"),
    (["nope"], {}, "nope: not a run directory"),
    (["RUN"], {}, "no reference statistics"),
    (["RUN", "--ref", "a.npz"], dict(SLURM_ARRAY_TASK_ID="9", SLURM_ARRAY_TASK_MIN="0",
                                     SLURM_ARRAY_TASK_STEP="1", SLURM_ARRAY_TASK_COUNT="2"),
     "not in a plain range"),
])
def test_eval_fid_bad_input(tmp_path, args, env, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    args = [str(run) if a == "RUN" else a for a in args]
    out = _fid_script(tmp_path, "eval_fid.sh", *args, **env)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_fid_report_refuses_to_be_an_array(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    out = _fid_script(tmp_path, "fid_report.sh", str(run), "--ref", "a.npz", CMSCALE_ROOT=str(ROOT),
                      SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="2")
    assert out.returncode == 2 and "not an array" in out.stderr
