"""benchmarks/quality/run.py end to end at toy sizes: every stage runs and writes its outputs.

The default test trains each method for a handful of steps (the numbers mean nothing) and
checks that the table, JSON, plot and grids are written and every value is finite. The real
smoke preset (a couple of minutes) is marked slow.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

ROOT = REPO
SCRIPT = ROOT / "benchmarks" / "quality" / "run.py"

METHODS = ["edm", "cd_l2", "cd_ph", "ct", "ict", "ect", "sct", "scd", "ct_ref", "cd_l2_rinit"]
TINY = ["teacher_steps=20", "cd_steps=4", "ct_steps=6", "ict_steps=6", "ect_steps=6", "batch=16",
        "num_eval=64", "eval_batch=64", "sample_seeds=[0,1]", "heun_steps=[1,2]",
        "euler_steps=[2]", "mid_sweep=[0.821]", "search_grid=10", "toy_steps=[20,40]",
        "toy_eval_n=300"]


def _run(tmp_path, preset, sets, timeout):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPT), "--preset", preset, "--out", str(out), "--work", str(work)]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), LPIPS_VGG16="",
               TORCH_HOME=str(tmp_path / "torch"))  # no real VGG16 -> CD-LPIPS not run
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def _check_outputs(out: Path, stdout: str, methods):
    res = json.loads((out / "results.json").read_text())
    assert res["methods"] == methods
    keys = {row["key"] for row in res["table"]}
    for m in methods:
        if m == "edm":
            assert {"edm|heun1", "edm|heun3", "edm|euler2"} <= keys
        else:
            assert {f"{m}|cm1", f"{m}|cm2"} <= keys
    for row in res["table"]:
        fd = row["fd"]
        assert fd["n"] == len(res["settings"]["sample_seeds"]) * len(res["settings"]["train_seeds"])
        assert all(math.isfinite(v) and v >= 0 for v in fd["values"]), row
        assert math.isfinite(fd["mean"]) and math.isfinite(fd["std"])
    assert math.isfinite(res["real_floor"]["mean"])
    # every ordering check is evaluated and printed; tiny runs decide nothing about the paper,
    # but each verdict must be the one its own figures give
    names = [c["name"] for c in res["checks"]]
    for n in ("teacher_many_steps_best", "ct_2_beats_1", "cd_beats_ct_nfe1", "cd_beats_ct_nfe2",
              "cd1_beats_teacher_1_2", "cd_2_beats_1[cd_l2]", "toy_cd_map_err_shrinks",
              "ect_2_beats_1", "ect_beats_ict_nfe1", "ect_beats_ict_nfe2",
              "ect_beats_ict_nfe2_published_ts",
              "sct_2_beats_1", "scd_2_beats_1", "scd_beats_cd_cm1", "scd_beats_cd_cm2pub",
              "toy_scd_beats_sct"):
        assert n in names
    for c in res["checks"]:
        assert c["status"] == _verdict(c, res), c
        assert f"{c['status']:4s}  {c['name']}" in stdout
    assert "cd_lpips" in res["not_run"]  # no VGG16 weights here (LPIPS_VGG16 emptied)
    table = (out / "table.md").read_text()
    assert "| EDM teacher |" in table and "CD (pseudo-Huber, LPIPS substitute)" in table
    assert "| ECT (from the teacher) | 2 steps, published ts (mid 0.821) | 2 |" in table
    # ECT is tuned from the teacher's export, like CD, through the stages of its run
    ect = res["training"]["ect|seed0"]
    assert any(o.startswith("loss.teacher=") and o.endswith(".safetensors")
               for o in ect["overrides"])
    assert "loss.ect_stage_steps=1" in ect["overrides"]  # ect_stages 8 over 6 steps
    assert "CD (LPIPS) | not run" in table
    from PIL import Image

    with Image.open(out / "fd_vs_nfe.png") as im:
        assert im.width > 300 and im.height > 200
    for m in methods:
        with Image.open(out / "grids" / f"{m}.png") as im:
            assert im.width > 100
    assert len(res["toy"]["rows"]) == 8 and all(math.isfinite(r["map_err"])
                                                for r in res["toy"]["rows"])
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 1_000_000


def _verdict(check, res):
    """The status a check's own recorded figures give (recomputed here, not read)."""
    if "a_fd" in check:
        return "PASS" if check["a_fd"] < check["factor"] * check["b_fd"] else "FAIL"
    by = {}
    for r in res["toy"]["rows"]:
        by.setdefault(r["method"], {})[r["steps"]] = r["map_err"]
    name = check["name"]
    if "_beats_" in name:  # toy_<a>_beats_<b>: a's map error below b's at the longest run
        a, b = name[len("toy_"):].split("_beats_")
        k = max(set(by[a]) & set(by[b]))
        return "PASS" if by[a][k] < by[b][k] else "FAIL"
    m = name[len("toy_"):-len("_map_err_shrinks")]
    steps = sorted(by[m])
    return "PASS" if by[m][steps[-1]] < by[m][steps[0]] else "FAIL"


# Checks the committed figures fail, each stated in the README with its figures. A check that
# starts passing must leave this list (the test below fails both ways).
KNOWN_FAILURES = {
    # ECT at the iCT CIFAR-10 mid level sigma 0.821: 32.1 +- 4.7 vs 30.1 +- 3.9 at one step,
    # within a sampling std; with the searched mid level two steps do beat one (23.9)
    "ect_2_beats_1_published_ts",
    # sCT and sCD at this budget (3000 steps): two steps do not beat one (sCT 59.5 vs 46.2,
    # sCD 70.0 vs 58.0, also at t_mid 1.1 and without the learned weighting), sCD stays far
    # above CD (58.0 vs 22.2 at one step) and on the 2-D toy neither map error shrinks with
    # the learned weighting (0.23-0.42); without it both shrink and sCD beats sCT (0.080 vs
    # 0.160, checks that pass). Measured, not hidden: see the README's quality section.
    "sct_2_beats_1", "sct_2_beats_1_published_ts", "scd_2_beats_1",
    "scd_2_beats_1_published_ts", "scd_uw_2_beats_1", "scd_uw_2_beats_1_published_ts",
    "scd_beats_cd_cm1", "scd_beats_cd_cm2", "scd_beats_cd_cm2pub",
    "toy_scd_map_err_shrinks", "toy_sct_map_err_shrinks", "toy_scd_beats_sct",
}


def test_committed_results_pass_every_ordering_check():
    """The committed figures (benchmarks/quality/results) reproduce the paper's ordering: each
    check's verdict follows from its figures, and every one is PASS but the documented
    KNOWN_FAILURES."""
    res = json.loads((ROOT / "benchmarks" / "quality" / "results" / "results.json").read_text())
    assert len(res["checks"]) >= 15
    for c in res["checks"]:
        want = "FAIL" if c["name"] in KNOWN_FAILURES else "PASS"
        assert _verdict(c, res) == c["status"] == want, c
    assert KNOWN_FAILURES <= {c["name"] for c in res["checks"]}


def test_quality_benchmark_tiny(tmp_path):
    out, stdout = _run(tmp_path, "smoke", TINY, timeout=300)
    _check_outputs(out, stdout, METHODS)
    # evaluate_run.py: the same evaluation for any run directory (here the tiny sCT run)
    run_dir = next((tmp_path / "work").glob("sct-seed0-*"))
    r = subprocess.run([sys.executable, str(SCRIPT.parent / "evaluate_run.py"), str(run_dir),
                        "--preset", "smoke", "--num", "64", "--seeds", "0"],
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith(str(run_dir)))
    figures = [float(v) for v in re.findall(r"(?:NFE 1 |: )([0-9.]+)", line)]
    assert len(figures) == 1 + 2 and all(math.isfinite(v) and v >= 0 for v in figures), line
    assert "mid sigma 0.821, 2.5" in r.stdout


@pytest.mark.slow
def test_quality_benchmark_smoke_preset(tmp_path):
    out, stdout = _run(tmp_path, "smoke", [], timeout=900)
    _check_outputs(out, stdout, METHODS)
