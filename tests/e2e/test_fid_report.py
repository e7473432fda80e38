"""tools/fid_report.py end to end: a tiny run with 3 checkpoints, digits reference statistics,
2 sampler settings -> report.csv / report.md / fid.png; a second call is all cache hits."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO

ROOT = str(REPO)


def _run(cmd, env, timeout=120):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fid_report")
    env = dict(os.environ, CMSCALE_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        env.pop(k, None)
    run = tmp / "run"
    _run([sys.executable, "-m", "cmscale.train", "--run-dir", str(run),
          "data.shards=embedded:sklearn:digits", "data.resolution=16", "net.preset=tiny16",
          "train.total_steps=6", "train.global_batch=8", "checkpoint.every_images=16",
          "checkpoint.keep_last=5", "log.progress_bar=false", "log.tensorboard=false",
          "ema.rates=[0.9]"], env)
    shards = _run([sys.executable, "-c", "from cmscale.data.embedded import ensure_embedded_shards as e; "
                   f"print(e('sklearn:digits', {str(tmp / 'cache')!r}, 16))"], env).strip().splitlines()[-1]
    ref = tmp / "ref.npz"
    _run([sys.executable, "tools/ref_stats.py", shards, str(ref), "--extractor", "digits"], env)
    return tmp, run, ref, env


def test_report_and_cache(setup):
    tmp, run, ref, env = setup
    out = tmp / "report"
    cmd = [sys.executable, "tools/fid_report.py", str(run), "--out", str(out), "--ref", str(ref),
           "--extractor", "digits", "--num", "64", "--batch-size", "32",
           "--sampler", "onestep", "--sampler", "ts=0,20,39/40"]
    first = _run(cmd, env)
    assert "computed 6, cache hits 0" in first, first
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 1 * 2
    assert sorted({int(r["nimg"]) for r in rows}) == [16, 32, 48]
    assert {r["ema"] for r in rows} == {"ema_0_9"}
    assert {r["sampler"] for r in rows} == {"onestep", "ts=0,20,39/40"}
    assert {r["nfe"] for r in rows} == {"1", "2"}
    assert all(float(r["fid"]) >= 0 for r in rows)
    md = (out / "report.md").read_text()
    assert md.count("**best**") >= 1 and md.count("| 16 |") == 2
    png = out / "fid.png"
    assert png.is_file() and png.stat().st_size > 1000
    from PIL import Image

    with Image.open(png) as im:
        assert im.width >= 400 and im.height >= 300

    second = _run(cmd, env)
    assert "computed 0, cache hits 6" in second, second
    with open(out / "report.csv") as f:
        again = list(csv.DictReader(f))
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]

    # job-array slices write only the cache; a new sampler is computed once, split over 2 shards
    cmd3 = cmd + ["--sampler", "sigmas=80,0.8"]
    s0 = _run(cmd3 + ["--shard", "0/2"], env)
    s1 = _run(cmd3 + ["--shard", "1/2"], env)
    assert "computed" in s0 and "report.csv" not in s0
    new = sum(int(s.split("fid_report: computed ")[1].split(",")[0]) for s in (s0, s1))
    assert new == 3 and len(list((out / "cache").glob("*.json"))) == 9


WRAPPER = """
import atexit, json, os, sys
from cmscale.fid_report import main
# written by the interpreter's teardown, per rank
atexit.register(lambda: open(sys.argv[1] + "." + os.environ.get("RANK", "0"), "w").close())
with open(sys.argv[2]) as f:  # fid_report's arguments (torchrun would parse "--num" itself)
    sys.exit(main(json.load(f)))
"""


def test_several_ranks_leave_without_the_interpreter_teardown(setup):
    """On 2 ranks fid_report ends both processes with its exit code once the process group is
    destroyed and the output flushed, without the interpreter's teardown (where a finished
    rank could abort in a C++ thread destructor and fail its job); on 1 rank it returns."""
    tmp, run, ref, env = setup
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER)
    args = [str(run), "--out", str(tmp / "report2"), "--ref", str(ref), "--extractor", "digits",
            "--num", "32", "--batch-size", "16", "--sampler", "onestep"]
    marker, argfile = tmp / "teardown", tmp / "args.json"
    argfile.write_text(json.dumps(args))
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(script), str(marker), str(argfile)], env, timeout=300)
    assert "fid_report: 3 rows (0 missing)" in out, out
    assert (tmp / "report2" / "report.csv").is_file()
    assert not list(tmp.glob("teardown.*"))  # neither rank ran the teardown
    out = _run([sys.executable, str(script), str(marker), str(argfile)], env)
    assert "cache hits 3" in out and (tmp / "teardown.0").is_file()
