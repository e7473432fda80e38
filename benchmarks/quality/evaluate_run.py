"""The quality benchmark's evaluation of any run directory: one step and two steps over the
fixed mid-level sweep, on the same digits Frechet distance.

    python benchmarks/quality/evaluate_run.py RUN_DIR [RUN_DIR ...] [--ema NAME]
        [--preset full] [--num 2000] [--seeds 0,1]

For runs trained with the benchmark's data and network (8 px digits, ``tiny16``) but other
settings or budgets than its table, e.g. a longer sCT run or another tangent normalisation:

    python -m cmscale.train --run-dir /tmp/sct_6k <the sct row's overrides> \\
        train.total_steps=6000 loss.tangent_warmup=1500
    python benchmarks/quality/evaluate_run.py /tmp/sct_6k

(the row's overrides are in ``benchmarks/quality/results/results.json``, ``training``). Each
figure is the mean over ``--seeds`` sampling seeds (image i of seed s uses noise stream (s, i),
as in the table); the one-step sampler is ``f(80 z, 80)``, the two-step one re-noises to each
mid sigma of the preset's ``mid_sweep``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run as Q  # noqa: E402  (benchmarks/quality/run.py: settings, evaluator, samplers)

from cmscale.runs import load_network  # noqa: E402
from cmscale.sampler import Sampler  # noqa: E402


def evaluate(ev: "Q.Evaluator", net, res: int, num: int, seeds: list[int],
             mids: list[float]) -> dict:
    """{"nfe1": FD, "mids": {mid: FD}}: means over the sampling seeds."""
    def fd(sampler):
        return statistics.mean(ev.fd_of(Q.make_generate(net, res, s, sampler), num)
                               for s in seeds)

    return {"nfe1": fd(Sampler("onestep")),
            "mids": {m: fd(Sampler("sigmas", sigmas=(80.0, float(m)))) for m in mids}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or exported network files)")
    p.add_argument("--ema", default="", help="which weights of a run directory (default: the "
                   "preset's evaluation EMA of CT, iCT, ECT, sCT and sCD, e.g. ema_0_995)")
    p.add_argument("--preset", default="full", choices=sorted(Q.PRESETS))
    p.add_argument("--num", type=int, default=0, help="images per figure (0: the preset's)")
    p.add_argument("--seeds", default="", help="sampling seeds (default: the preset's)")
    a = p.parse_args(argv)
    s = dict(Q.PRESETS[a.preset])
    num = a.num or int(s["num_eval"])
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else list(s["sample_seeds"])
    mids = [float(m) for m in s["mid_sweep"]]
    ema = a.ema or Q.ema_name_of(float(s["ema"]))
    ev = Q.Evaluator(s)
    print(f"{num} images x seeds {seeds}; FD at 1 step, then 2 steps at mid sigma "
          + ", ".join(f"{m:g}" for m in mids))
    for path in a.runs:
        net, _ = load_network(path, ema if os.path.isdir(path) else "")
        r = evaluate(ev, net.eval(), int(s["resolution"]), num, seeds, mids)
        best = min(r["mids"], key=r["mids"].get)
        print(f"{path}: NFE 1 {r['nfe1']:.2f} | NFE 2 " + ", ".join(
            f"{m:g}: {v:.2f}" for m, v in r["mids"].items())
              + f" | best 2-step {r['mids'][best]:.2f} at {best:g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
