"""Long run: does a run leak memory, file descriptors or checkpoints over many steps?

    python benchmarks/bench_longrun.py [--steps 10000] [--every-steps 500] [--run-dir DIR]
                                       [--json OUT] [key=value ...]

Trains the quickstart recipe (configs/quickstart.yaml: iCT on the 8 px digits, periodic FID
every 1000 steps, keep_last 2) as ``python -m cmscale.train`` for ``--steps`` steps with a
checkpoint every ``--every-steps``, and samples the trainer every ``--interval`` seconds from
/proc: resident memory (VmRSS) and open file descriptors of the main process, and the resident
memory and number of its child processes (DataLoader workers). It prints the least-squares slope
of each against the step over the run after a warm-up (``--warmup`` of the steps: allocator and
page-cache growth of the first checkpoints and evaluations), per 1000 steps, with the first and
last values; the goal is flat. At the end it checks the run directory: it must hold only the
``keep_last`` newest checkpoints plus the best one (``best.json``), all complete, and no
leftover temporary files. Extra ``key=value`` arguments go to the trainer.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cmscale import checkpoint  # noqa: E402


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _last_step(metrics: pathlib.Path) -> int:
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, os.path.getsize(metrics) - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
        return int(json.loads(lines[-1])["step"])
    except (OSError, ValueError, IndexError, KeyError):
        return 0


def sample(pid: int, run_dir: pathlib.Path) -> dict | None:
    try:
        kids = _children(pid)
        return {
            "time": time.time(),
            "step": _last_step(run_dir / "metrics.jsonl"),
            "rss_mib": _status_kib(pid, "VmRSS") / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "children": len(kids),
            "children_rss_mib": sum(_status_kib(k, "VmRSS") for k in kids) / 1024,
        }
    except (FileNotFoundError, ProcessLookupError):
        return None


def slope_per_1k(samples: list[dict], key: str) -> float:
    steps = np.array([s["step"] for s in samples], float)
    values = np.array([s[key] for s in samples], float)
    if len(samples) < 3 or np.ptp(steps) == 0:
        return float("nan")
    return float(np.polyfit(steps, values, 1)[0] * 1000)


def check_run_dir(run_dir: pathlib.Path, keep_last: int) -> dict:
    ckpts = checkpoint.list_checkpoints(run_dir)
    best_file = run_dir / "best.json"
    best = json.loads(best_file.read_text())["nimg"] if best_file.exists() else None
    complete = [c.nimg for c in ckpts if c.complete]
    allowed = set(complete[-keep_last:]) | ({best} if best is not None else set())
    stray = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
             if ".tmp-" in p.name or p.name.startswith(".probe-")]
    return {
        "checkpoints": [c.nimg for c in ckpts],
        "incomplete": [c.nimg for c in ckpts if not c.complete],
        "best_nimg": best,
        "keep_last": keep_last,
        "only_keep_last_plus_best": set(complete) <= allowed and len(complete) == len(ckpts),
        "stray_temporaries": stray,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--every-steps", type=int, default=500, help="checkpoint interval in steps")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of steps left out of the fits")
    p.add_argument("--run-dir", default=None, help="default: a temporary directory, removed")
    p.add_argument("--json", default=None, help="write the samples and results here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    tmp = None
    if args.run_dir is None:
        tmp = tempfile.mkdtemp(prefix="cmscale-longrun-")
        run_dir = pathlib.Path(tmp) / "run"
    else:
        run_dir = pathlib.Path(args.run_dir)
    batch, keep_last = 64, 2  # configs/quickstart.yaml
    cmd = [sys.executable, "-m", "cmscale.train", "--config", str(REPO / "configs" / "quickstart.yaml"),
           "--run-dir", str(run_dir), f"train.total_steps={args.steps}",
           f"checkpoint.every_images={args.every_steps * batch}", "log.progress_bar=false",
           "log.every_steps=10",  # the step of each sample, from metrics.jsonl
           *args.overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log_path = (pathlib.Path(tmp) if tmp else run_dir.parent) / "longrun.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        samples = []
        while proc.poll() is None:
            s = sample(proc.pid, run_dir)
            if s is not None:
                samples.append(s)
            time.sleep(args.interval)
    took = time.time() - t0
    if proc.returncode != 0:
        print(f"trainer failed (exit {proc.returncode}); log: {log_path}")
        print(log_path.read_text()[-3000:])
        return 1

    # While it trains: the final save, evaluation and shutdown are not part of the trend.
    fit = [s for s in samples if args.warmup * args.steps <= s["step"] < args.steps]
    result = {"steps": args.steps, "every_steps": args.every_steps, "seconds": round(took, 1),
              "samples": len(samples), "fit_samples": len(fit)}
    print(f"{args.steps} steps in {took:.0f} s, checkpoint every {args.every_steps}; "
          f"{len(samples)} samples, {len(fit)} after the {args.warmup:.0%} warm-up")
    for key, unit in (("rss_mib", "MiB"), ("fds", "fds"), ("children", "processes"),
                      ("children_rss_mib", "MiB")):
        slope = slope_per_1k(fit, key)
        first, last = fit[0][key] if fit else float("nan"), fit[-1][key] if fit else float("nan")
        peak = max((s[key] for s in samples), default=float("nan"))
        result[key] = {"slope_per_1k_steps": slope, "first": first, "last": last, "max": peak}
        print(f"  {key:18s} slope {slope:+8.3f} {unit}/1k steps   after warm-up {first:8.1f} -> "
              f"{last:8.1f}   max {peak:8.1f}")
    result["run_dir"] = check_run_dir(run_dir, keep_last)
    rd = result["run_dir"]
    print(f"  run dir: checkpoints {rd['checkpoints']} (nimg), best {rd['best_nimg']}, "
          f"keep_last {keep_last}: only keep_last + best: {rd['only_keep_last_plus_best']}; "
          f"stray temporaries: {rd['stray_temporaries'] or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"result": result, "samples": samples}, f, indent=1)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if rd["only_keep_last_plus_best"] and not rd["stray_temporaries"] else 1


if __name__ == "__main__":
    sys.exit(main())
