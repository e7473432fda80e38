"""Quality benchmark: the consistency-models paper's table at small scale, on CPU.

    python benchmarks/quality/run.py --out benchmarks/quality/results [--preset full|smoke]
        [--work /tmp/cmscale-quality] [--set key=value ...] [--fresh]

On scikit-learn's digits (``data.shards=embedded:sklearn:digits``, 8 px, the quickstart's
``tiny16`` UNet at ``image_size=8``) it trains, with the real trainer
(``cmscale.training_loop.training_loop``, in this process, one thread):

1. an EDM teacher (``loss.mode=edm``), exported with ``cmscale export`` (``cmscale.export``);
2. CD from that export (``loss.mode=cd``, ``loss.teacher=<export>``, Heun, N = 18, mu = 0.95),
   the student starting from the teacher's weights (``loss.init_from_teacher=true``, as the
   reference's ``scripts/cm_train.py`` and the CD recipes do), with the l2 metric, and with
   pseudo-Huber in place of LPIPS (see "LPIPS" below);
3. CT (``loss.mode=ct``, l2) with the reference's adaptive N / target-EMA curriculum at
   s0 = 2, s1 = 20, mu0 = 0.9 (see "CT curriculum" below);
4. iCT (``loss.mode=ict``, pseudo-Huber, lognormal pairs, N doubling 10 -> 1280);
5. ECT (``loss.mode=ect``, ``loss.teacher=<export>``): the student starts as the same teacher
   and is tuned with ECT's mapping function, its gap halving (q = 2, k = 8, b = 1) over
   ``ect_stages`` = 8 stages as in the authors' 200k-step CIFAR-10 run, metric ||a - b||
   (pseudo-Huber, c = 0), weighting 1 / (t - r);
6. two diagnostics, reported apart from the paper's table: CT with the reference's
   LSUN/ImageNet curriculum unchanged (s1 = 150, mu0 = 0.95), and CD (l2) whose student starts
   from random weights (``loss.init_from_teacher=false``, the trainer's default).

All runs: batch 64, fp32, no dropout, no flips (``data.random_flip=false``: mirrored digits are
not digits). CT and iCT, whose N doubles during the run, and ECT, whose gap shrinks during the
run: Adam lr 5e-4 with betas (0.9, 0.99) and evaluation EMA 0.995 (the quickstart's); the EDM
teacher and CD: Adam lr 1e-3, betas (0.9, 0.999), evaluation EMA 0.999. 3000
steps per consistency model and 6000 for the teacher (preset ``full``).

CT curriculum: the reference's mu(k) = exp(s0 ln mu0 / N'(k)) depends on N only, not on the
run length K, so over K = 3000 steps the LSUN/ImageNet setting (s1 150, mu0 0.95) puts the
target EMA at 0.998 after 300 steps and 0.9993 at the end, a horizon of half the run; the
network then stays a near-constant grey image (the ``ct_ref`` diagnostic). The headline CT
uses s1 = 20 and the paper's CIFAR-10 mu0 = 0.9 (final mu 0.9895), the short-run setting that
``benchmarks/toy_gmm.py`` already uses.

Every network is evaluated from its evaluation EMA with the offline digits Frechet distance
(``DigitsExtractor`` features, ``cmscale.metrics.fid``) against statistics of the real digits
at the same resolution, made by ``tools/ref_stats.py``'s code from the same shards the trainer
reads. Settings per cell: ``num_eval`` generated images, several sampling seeds (image i of
seed s uses noise stream (s, i), ``cmscale.sampling.PerImageNoise``), and the training seeds
of the preset; a cell reports mean +- sample std over all (training seed, sampling seed) pairs.

Samplers (NFE = network evaluations per image):
- consistency models: one step ``f(80 z, 80)`` (NFE 1) and the multistep sampler with one
  mid noise level (NFE 2), in two readings:
  * "searched mid" (the headline, used by the main checks): the reference's own procedure for
    its published two-step numbers (openai/consistency_models ``scripts/ternary_search.py``):
    ternary search of the FD over p in ``ts = 0, p, 39`` on a 40-point Karras grid, run on a
    sampling seed of its own (``search_seed`` = 1000) so that the evaluation seeds don't pick it;
  * "published ts": each family's published setting transferred unchanged, converted to a
    sigma (``cmscale.sampling.ts_to_sigmas``): CD ``ts=0,22,39/40`` (ImageNet 64 CD, sigma
    1.38), CT ``ts=0,62,150/151`` (LSUN Cat CT, 5.25), iCT and ECT sigma 0.821 (CIFAR-10; the
    quickstart's ``ts=0,788,1280/1281``). The checks are reported for this reading too.
  A fixed sweep over the mid level (``mid_sigma_sweep``, one seed) is a further diagnostic.
- the EDM teacher: the EDM Heun sampler ``edm_sample(net, z, steps)`` at steps 1, 2, 3, 5, 10,
  18 (NFE = 2 steps - 1 = 1, 3, 5, 9, 19, 35), and, for the even NFE the Heun sampler cannot do,
  the Euler (DDIM) sampler on a Karras grid of steps + 1 levels whose last level is replaced by
  0 (NFE = steps = 2, 4). With one step both are ``D(80 z, 80)``.

Checks (the paper's ordering; PASS/FAIL printed and stored):
- ``teacher_many_steps_best``: the teacher at 35 NFE has a lower FD than every consistency
  model at NFE 1 and 2;
- ``cd_2_beats_1`` (each CD variant) and ``ct_2_beats_1``: two steps lower FD than one (searched
  mid level; ``*_published_ts``: the transferred published setting);
- ``cd_beats_ct_nfe1`` / ``cd_beats_ct_nfe2``: CD (l2) below CT (l2) at equal NFE (same metric);
- ``ect_2_beats_1``; ``ect_beats_ict_nfe1`` / ``ect_beats_ict_nfe2``: ECT (from the teacher) below
  iCT at equal NFE and equal training steps (same metric family, optimiser and EMA);
- ``cd1_beats_teacher_1_2``: one-step CD (l2) below the teacher's best at NFE 1 and 2 by a wide
  margin, defined as less than half of it;
- ``toy_*``: the Gaussian-mixture map error shrinks with training, and CD's is below CT's.
Comparisons use the cell means; the JSON also stores each difference in units of the pooled std.

LPIPS: the reference's LPIPS needs torchvision's ImageNet VGG16 weights (``vgg16-397923af.pth``),
which cannot be downloaded here; the script looks in the torch hub cache and ``$LPIPS_VGG16``.
If found and ``--lpips`` is given, a ``cd_lpips`` run is added (expensive: LPIPS resizes 8 px
images to 224). Otherwise CD-LPIPS is reported as not run, with the reason. CD is always also
run with pseudo-Huber, the metric iCT introduced to replace LPIPS, labelled as that substitute
("CD (pseudo-Huber, LPIPS substitute)"). A randomly initialised VGG is not used: its distances
are not perceptual, and at 224 px it costs ~14 s per 8 images (forward + backward, one thread).

Also: the 2-D Gaussian-mixture check (``cmscale.toy``, as ``benchmarks/toy_gmm.py``): error of
the learned one-step map against the exact PF-ODE map for CD (exact teacher) and CT, after
increasing numbers of training steps.

Outputs in ``--out``: ``results.json`` (everything: settings, per-seed values, checks, timings),
``table.md``, ``fd_vs_nfe.png`` (FD against NFE per method; matplotlib if installed, else PIL),
``grids/<method>.png`` (64 samples per sampler, side by side). Run directories (checkpoints)
go to ``--work``; re-running reuses finished runs there (``--fresh`` retrains).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for p in (ROOT, os.path.join(ROOT, "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cmscale.runs import load_network  # noqa: E402
from cmscale.sampler import Sampler  # noqa: E402
from cmscale.sampling import PerImageNoise, ts_to_sigmas  # noqa: E402

# ----------------------------------------------------------------------------- settings

# The trainer's defaults plus the explicit overrides below (the quickstart's network and data,
# but not its file: the benchmark must not change when the quickstart recipe does).
BASE_CONFIG = None

PRESETS = {
    # About 45-60 min on one CPU thread (see README "Benchmarks").
    "full": dict(
        resolution=8, batch=64, lr=5e-4, beta2=0.99, ema=0.995,
        teacher_cd_lr=1e-3, teacher_cd_beta2=0.999, teacher_cd_ema=0.999,
        teacher_steps=6000, cd_steps=3000, ct_steps=3000, ict_steps=3000, ect_steps=3000,
        ect_stages=8,
        train_seeds=[0], sample_seeds=[0, 1, 2], num_eval=2000, eval_batch=500,
        heun_steps=[1, 2, 3, 5, 10, 18], euler_steps=[2, 4],
        ct_s1=20, ct_mu0=0.9,
        mid_sweep=[0.2, 0.4, 0.821, 1.38, 2.5, 5.0, 10.0], search_seed=1000, search_grid=40,
        toy_steps=[250, 500, 1000, 2000],
        toy_methods=["cd", "ct", "scd", "sct", "scd_uw", "sct_uw"],
        toy_eval_n=2000,
        methods=["edm", "cd_l2", "cd_ph", "ct", "ict", "ect", "sct", "scd", "ct_ref",
                 "cd_l2_rinit", "scd_uw"],
    ),
    # A couple of minutes: every stage runs, the numbers mean little.
    "smoke": dict(
        resolution=8, batch=32, lr=5e-4, beta2=0.99, ema=0.99,
        teacher_cd_lr=1e-3, teacher_cd_beta2=0.999, teacher_cd_ema=0.99,
        teacher_steps=150, cd_steps=60, ct_steps=100, ict_steps=100, ect_steps=100,
        ect_stages=8,
        train_seeds=[0], sample_seeds=[0, 1, 2], num_eval=300, eval_batch=300,
        heun_steps=[1, 2, 3, 10], euler_steps=[2],
        ct_s1=20, ct_mu0=0.9,
        mid_sweep=[0.821, 2.5], search_seed=1000, search_grid=40,
        toy_steps=[100, 200], toy_methods=["cd", "ct", "scd", "sct"], toy_eval_n=2000,
        methods=["edm", "cd_l2", "cd_ph", "ct", "ict", "ect", "sct", "scd", "ct_ref",
                 "cd_l2_rinit"],
    ),
}

# The reference's published two-step settings (openai/consistency_models README and
# scripts/launch.sh), as (ts, steps) of a Karras grid.
TWO_STEP = {
    "cd": dict(ts=[0, 22, 39], steps=40, source="ImageNet 64 CD, ts=0,22,39 / 40"),
    "ct": dict(ts=[0, 62, 150], steps=151, source="LSUN Cat CT, ts=0,62,150 / 151"),
    "ict": dict(ts=[0, 788, 1280], steps=1281, source="iCT CIFAR-10, sigma 0.821 "
                "(ts=0,788,1280 / 1281)"),
    "ect": dict(ts=[0, 788, 1280], steps=1281, source="ECT CIFAR-10, sigma 0.821 "
                "(ts=0,788,1280 / 1281)"),
    # sCM's two steps are TrigFlow times: pi/2, then t_mid = 1.1 (Lu & Song 2025)
    "scm": dict(times=[math.pi / 2, 1.1], source="sCM, TrigFlow t = pi/2 then 1.1"),
}


def _cd_overrides(metric: str, from_teacher: bool = True) -> list:
    """CD as the paper distils CIFAR-10: Heun teacher steps, N = 18, target EMA 0.95. (Its
    ImageNet 64 / LSUN setting, N = 40, chains more links from the boundary to sigma_max than a
    3000-step run settles: one-step FD 45.9 against 22.1 with N = 18, same teacher and budget.)"""
    ov = ["loss.mode=cd", f"loss.metric={metric}", "loss.num_scales=18", "loss.target_ema=0.95",
          "loss.solver=heun"]
    return ov + ["loss.init_from_teacher=true"] if from_teacher else ov


# label, loss overrides, two-step family
METHODS = {
    "edm": dict(label="EDM teacher", mode="edm", overrides=["loss.mode=edm"]),
    # CD students start from the teacher's weights (loss.init_from_teacher, as the reference's
    # scripts/cm_train.py does and the CD recipes do).
    "cd_l2": dict(label="CD (l2)", mode="cd", family="cd", overrides=_cd_overrides("l2")),
    # Diagnostic: the same CD from random weights (loss.init_from_teacher=false, the trainer's
    # default), which makes the published two-step ts lose to one step here.
    "cd_l2_rinit": dict(label="CD (l2), student from random weights", mode="cd", family="cd",
                        diagnostic=True, overrides=_cd_overrides("l2", from_teacher=False)),
    "cd_lpips": dict(label="CD (LPIPS)", mode="cd", family="cd", overrides=_cd_overrides("lpips")),
    "cd_ph": dict(label="CD (pseudo-Huber, LPIPS substitute)", mode="cd", family="cd",
                  overrides=_cd_overrides("pseudo_huber")),
    # CT's curriculum (s0, s1, mu0) comes from the settings ({ct_s1}, {ct_mu0}): see PRESETS.
    "ct": dict(label="CT (l2)", mode="ct", family="ct",
               overrides=["loss.mode=ct", "loss.metric=l2", "loss.start_scales=2",
                          "loss.end_scales={ct_s1}", "loss.start_ema={ct_mu0}"]),
    # Diagnostic: the reference's LSUN/ImageNet curriculum unchanged (s1 150, mu0 0.95).
    "ct_ref": dict(label="CT (l2), reference curriculum s1=150 mu0=0.95", mode="ct",
                   family="ct", diagnostic=True,
                   overrides=["loss.mode=ct", "loss.metric=l2", "loss.start_scales=2",
                              "loss.end_scales=150", "loss.start_ema=0.95"]),
    "ict": dict(label="iCT (pseudo-Huber)", mode="ict", family="ict",
                overrides=["loss.mode=ict", "loss.metric=pseudo_huber", "loss.ict_s0=10",
                           "loss.ict_s1=1280"]),
    # ECT from the same teacher export as CD; the stage length spreads ect_stages over the run.
    "ect": dict(label="ECT (from the teacher)", mode="ect", family="ect",
                overrides=["loss.mode=ect", "loss.metric=pseudo_huber", "loss.huber_c=0",
                           "loss.ect_q=2", "loss.ect_k=8", "loss.ect_b=1",
                           "loss.ect_weighting=inverse_gap",
                           "loss.ect_stage_steps={ect_stage_steps}"]),
    # Continuous time on TrigFlow with the paper's stabilisers (the tangent warm-up over the
    # first quarter of the run, see train_overrides). sCT and sCD train with CT's budget and
    # optimizer (see optim_of); sCD distils the same EDM teacher and starts from its weights.
    "sct": dict(label="sCT", mode="sct", family="scm", overrides=["loss.mode=sct"]),
    "scd": dict(label="sCD", mode="scd", family="scm",
                overrides=["loss.mode=scd", "loss.init_from_teacher=true"]),
    # Diagnostics: the same without the learned weighting w(t) (uniform weighting)
    "sct_uw": dict(label="sCT, uniform weighting", mode="sct", family="scm", diagnostic=True,
                   overrides=["loss.mode=sct", "loss.adaptive_weight=false"]),
    "scd_uw": dict(label="sCD, uniform weighting", mode="scd", family="scm", diagnostic=True,
                   overrides=["loss.mode=scd", "loss.init_from_teacher=true",
                              "loss.adaptive_weight=false"]),
}
DISTILLED = ("cd", "scd", "ect")  # modes that learn from (or start as) the EDM teacher


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_set(preset: dict, items) -> dict:
    """``--set key=value`` over the preset (values parsed as YAML: lists, numbers)."""
    import yaml

    out = copy.deepcopy(preset)
    for item in items or ():
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: write key=value")
        k, v = item.split("=", 1)
        if k not in out:
            raise SystemExit(f"--set {k!r}: unknown setting; known: {sorted(out)}")
        out[k] = yaml.safe_load(v)
    return out


# ----------------------------------------------------------------------------- LPIPS


def find_vgg16() -> str | None:
    """Real ImageNet VGG16 weights for LPIPS, if this machine has them."""
    from cmscale.losses import VGG16_WEIGHTS

    cands = [os.environ.get("LPIPS_VGG16", ""),
             os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_WEIGHTS)]
    return next((c for c in cands if c and os.path.isfile(c)), None)


# ----------------------------------------------------------------------------- training


def optim_of(s: dict, method: str) -> tuple[float, float, float]:
    """(lr, beta2, evaluation EMA rate) of a method: CT and iCT (whose N doubles during the run)
    use ``lr``/``beta2``/``ema``, as do sCT, sCD and ECT; the EDM teacher and CD use the
    ``teacher_cd_*`` settings. (sCD with CD's lr 1e-3, beta2 0.999, EMA 0.999 reached FD 185
    at one step against 59 with these, same budget.)"""
    if METHODS[method]["mode"] in ("edm", "cd"):
        return (float(s["teacher_cd_lr"]), float(s["teacher_cd_beta2"]),
                float(s["teacher_cd_ema"]))
    return float(s["lr"]), float(s["beta2"]), float(s["ema"])


def train_overrides(s: dict, method: str, seed: int, teacher: str | None, vgg: str | None):
    steps = s[{"edm": "teacher_steps", "ct": "ct_steps", "ict": "ict_steps",
               "ect": "ect_steps", "sct": "ct_steps"}.get(METHODS[method]["mode"], "cd_steps")]
    lr, beta2, ema = optim_of(s, method)
    res = int(s["resolution"])
    ov = [
        "data.shards=embedded:sklearn:digits", f"data.resolution={res}",
        "data.num_workers=0",        # one process: the benchmark's one thread does the decoding
        "data.random_flip=false",    # mirrored digits are not digits (the reference stats aren't)
        "net.preset=tiny16", f"net.overrides.image_size={res}",
        f"net.overrides.attention_resolutions=[{max(1, res // 2)}]",
        "optim.name=adam", f"optim.lr={lr}", f"optim.betas=[0.9,{beta2}]",
        f"train.total_steps={steps}", f"train.global_batch={s['batch']}", f"train.seed={seed}",
        "train.precision=fp32", f"ema.rates=[{ema}]",
        "checkpoint.every_images=0", "checkpoint.keep_last=1",
        f"log.every_steps={max(1, steps // 10)}", "log.progress_bar=false", "log.tensorboard=false",
        f"sample.ema={ema_name_of(ema)}", "sample.num_grid=16", "sample.ts=[0,20,39]",
        "sample.steps=40",
    ]
    fields = dict(s, ect_stage_steps=ect_stage_steps(s))
    ov += [o.format(**fields) for o in METHODS[method]["overrides"]]
    if METHODS[method]["mode"] in DISTILLED:
        ov.append(f"loss.teacher={teacher}")
    if METHODS[method]["mode"] in ("sct", "scd"):
        ov.append(f"loss.tangent_warmup={max(1, steps // 4)}")
    if method == "cd_lpips":
        ov.append(f"loss.lpips_weights={vgg}")
    return ov, steps


def ect_stage_steps(s: dict) -> int:
    """ECT's stage length: ``ect_stages`` stages over the run (the authors' CIFAR-10 run has 8:
    25k of 200k steps)."""
    return max(1, math.ceil(int(s["ect_steps"]) / int(s["ect_stages"])))


def run_dir_for(work: str, method: str, seed: int, overrides: list) -> str:
    h = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:10]
    return os.path.join(work, f"{method}-seed{seed}-{h}")


def train(work: str, s: dict, method: str, seed: int, teacher=None, vgg=None, fresh=False) -> dict:
    """Train (or reuse a finished run) with the product's training loop; return its record."""
    from cmscale.config import load_config
    from cmscale.training_loop import training_loop

    overrides, steps = train_overrides(s, method, seed, teacher, vgg)
    run_dir = run_dir_for(work, method, seed, overrides)
    record_path = os.path.join(run_dir, "benchmark-train.json")
    if fresh and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            rec = json.load(f)
        rec["run_dir"] = run_dir  # where it is now (work directories can be moved)
        log(f"train {method} seed {seed}: reusing {run_dir} ({rec['seconds']:.0f} s when trained)")
        return rec
    cfg = load_config(BASE_CONFIG, overrides)
    log(f"train {method} seed {seed}: {steps} steps -> {run_dir}")
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    t0 = time.time()
    try:
        code = training_loop(cfg, run_dir)
    finally:
        for sig, h in saved.items():  # the loop leaves stop signals ignored when it returns
            signal.signal(sig, h)
    secs = time.time() - t0
    if code != 0:
        raise RuntimeError(f"training {method} seed {seed} exited with code {code}")
    losses = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            losses.append({"step": r["step"], "loss": r["loss"], "N": r.get("N")})
    rec = {"method": method, "seed": seed, "run_dir": run_dir, "steps": steps,
           "overrides": overrides, "seconds": secs, "loss_curve": losses}
    with open(record_path, "w") as f:
        json.dump(rec, f, indent=1)
    log(f"train {method} seed {seed}: done in {secs:.0f} s, final loss {losses[-1]['loss']:.4g}")
    return rec


def export_teacher(run_dir: str, ema: str) -> str:
    from cmscale import export

    out = os.path.join(run_dir, f"teacher-{ema}.safetensors")
    if not os.path.isfile(out + ".json"):
        code = export.main([run_dir, "--ema", ema, "--out", out])
        if code != 0:
            raise RuntimeError(f"export failed with code {code}")
    return out


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    def __init__(self, s: dict):
        from cmscale.data.embedded import ensure_embedded_shards
        from cmscale.metrics import features as F
        from cmscale.metrics import fid as M
        import ref_stats  # tools/ref_stats.py

        self.M, self.s = M, s
        self.extractor = F.DigitsExtractor()
        self.res = int(s["resolution"])
        shards = ensure_embedded_shards("sklearn:digits", resolution=self.res)
        # Reference statistics: tools/ref_stats.py's code over the shards the trainer reads.
        self.ref = ref_stats.compute(shards, self.extractor, batch_size=500, limit=None,
                                     workers=0, max_kept=0)
        self.real, _ = F.digits_images(self.res)  # the same pixels, uint8 (N, 3, R, R)

    def fd_of(self, generate, num: int) -> float:
        stats = self.M.compute_stats_from_generator(generate, num, self.extractor,
                                                    batch_size=int(self.s["eval_batch"]),
                                                    max_kept=0)
        return float(self.M.fid_from_stats(stats, self.ref).fid)

    def real_floor(self, seed: int, num: int) -> float:
        """FD of ``num`` real images drawn with replacement: the floor at this sample size."""
        rng = np.random.default_rng(seed)
        pick = torch.from_numpy(rng.integers(0, len(self.real), num))
        imgs = torch.from_numpy(self.real)
        return self.fd_of(lambda idx: imgs[pick[idx]], num)


def make_generate(net, res: int, seed: int, sampler: Sampler):
    """generate(indices) for one sampler; a pure function of the image indices."""
    shape = (3, res, res)

    @torch.no_grad()
    def generate(idx):
        return sampler.run(net, PerImageNoise(seed, [int(i) for i in idx], shape))

    return generate


def sampler_row(spec: Sampler, name: str, key: str, **extra) -> dict:
    """A sampler of the table: its specification (``str``), NFE, label and cell key."""
    return dict(spec=str(spec), nfe=spec.nfe, name=name, key=key, **extra)


def samplers_for(method: str, s: dict, searched: dict | None = None) -> list:
    """The samplers of one network. ``searched``: the ternary-searched two-step setting."""
    if METHODS[method]["mode"] == "edm":
        out = [sampler_row(Sampler("edm", steps=k), f"Heun {k} steps", f"heun{2 * k - 1}")
               for k in s["heun_steps"]]
        out += [sampler_row(Sampler("euler", steps=k), f"Euler {k} steps", f"euler{k}")
                for k in s["euler_steps"]]
        return out
    fam = TWO_STEP[METHODS[method]["family"]]
    if "times" in fam:  # TrigFlow: one step at pi/2, the published two at pi/2 and t_mid
        out = [sampler_row(Sampler("trig", times=(math.pi / 2,)), "1 step (t = pi/2)", "cm1")]
        if searched is not None:
            mid = searched["mid_sigma"]
            out.append(sampler_row(Sampler("sigmas", sigmas=(80.0, mid)),
                                   f"2 steps, searched mid {mid:.3g}", "cm2", mid_sigma=mid))
        t_mid = fam["times"][1]
        out.append(sampler_row(Sampler("trig", times=tuple(fam["times"])),
                               f"2 steps, published t_mid {t_mid:.3g}", "cm2pub",
                               mid_sigma=0.5 * math.tan(t_mid), source=fam["source"]))
        return out
    levels, _ = ts_to_sigmas(fam["ts"], fam["steps"])
    out = [sampler_row(Sampler("onestep"), "1 step", "cm1")]
    if searched is not None:
        mid = searched["mid_sigma"]
        out.append(sampler_row(Sampler("sigmas", sigmas=(80.0, mid)),
                               f"2 steps, searched mid {mid:.3g}", "cm2", mid_sigma=mid))
    mid = float(levels[1])
    out.append(sampler_row(Sampler("sigmas", sigmas=(80.0, mid)),
                           f"2 steps, published ts (mid {mid:.3g})", "cm2pub", mid_sigma=mid,
                           source=fam["source"]))
    return out


def ternary_search_mid(ev, net, s: dict) -> dict:
    """The reference's way to pick the two-step setting (scripts/ternary_search.py): ternary
    search of the FD over the middle index p of ``ts = 0, p, G-1`` on a Karras grid of G
    points, here on a sampling seed of its own (``search_seed``) so that the evaluation seeds
    do not choose it."""
    from cmscale import schedules

    G, seed, num = int(s["search_grid"]), int(s["search_seed"]), int(s["num_eval"])
    cache: dict = {}

    def fd_at(p: int) -> float:
        if p not in cache:
            sig = float(schedules.karras_sigma_at(p, G))
            cache[p] = ev.fd_of(make_generate(net, s["resolution"], seed,
                                              Sampler("sigmas", sigmas=(80.0, sig))), num)
        return cache[p]

    left, right = 1, G - 2
    while right - left >= 3:
        m1, m2 = left + (right - left) // 3, right - (right - left) // 3
        if fd_at(m1) < fd_at(m2):
            right = m2
        else:
            left = m1
    best = min(range(left, right + 1), key=fd_at)
    return {"index": best, "grid": G, "mid_sigma": float(schedules.karras_sigma_at(best, G)),
            "search_seed": seed, "num": num,
            "evaluated": {str(p): {"mid_sigma": float(schedules.karras_sigma_at(p, G)), "fd": v}
                          for p, v in sorted(cache.items())}}


def ema_name_of(rate: float) -> str:
    from cmscale.ema import ema_name

    return ema_name(float(rate))


def summary(values: list) -> dict:
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "n": len(v), "values": v}


# ----------------------------------------------------------------------------- toy


def toy_check(s: dict) -> dict:
    """CD, sCD (exact teacher), CT and sCT on the 2-D ring: one-step map error vs the exact
    PF-ODE map."""
    from cmscale.toy import GaussianMixture, evaluate_toy, train_toy

    gm = GaussianMixture.ring()
    rows = []
    for method in s["toy_methods"]:
        for steps in s["toy_steps"]:
            t0 = time.time()
            # benchmarks/toy_gmm.py's settings: CT curriculum s1 = 20, mu0 = 0.9 for short runs;
            # "<m>_uw": sCT/sCD without the learned weighting
            base, uniform = method.removesuffix("_uw"), method.endswith("_uw")
            net, _ = train_toy(base, gm, steps=steps, seed=0, ct_s1=20, ct_mu0=0.9,
                               adaptive_weight=not uniform)
            r = evaluate_toy(net.eval(), gm, n=int(s.get("toy_eval_n", 2000)))
            rows.append({"method": method, "steps": steps, **r, "seconds": time.time() - t0})
            log(f"toy {method} {steps:5d} steps: map_err {r['map_err']:.4f} "
                f"(1-step mode dist {r['mode_dist_1']:.4f}, data {r['mode_dist_data']:.4f})")
    return {"rows": rows, "settings": "cmscale.toy.train_toy/evaluate_toy on GaussianMixture.ring()"
            " (8 modes, std 0.05, radius 0.6), MLP, batch 512, Adam 1e-3, CD N=18 mu=0.95 exact "
            "Heun teacher, CT s0=2 s1=20 mu0=0.9; map_err = mean |f(80 z, 80) - Phi(80 z)| over "
            f"{s.get('toy_eval_n', 2000)} draws, Phi = exact PF-ODE map (512-step Heun)"}


# ----------------------------------------------------------------------------- checks


def run_checks(cells: dict, methods: list) -> list:
    """The paper's ordering on the cell means. ``cells[(method, nfe_label)]`` -> summary."""

    def get(method, key):
        return cells.get(f"{method}|{key}")

    checks = []

    def add(name, desc, a, b, factor=1.0, a_label="", b_label=""):
        if a is None or b is None:
            checks.append(dict(name=name, description=desc, status="SKIP",
                               detail="a cell was not evaluated"))
            return
        ok = a["mean"] < factor * b["mean"]
        pooled = math.sqrt((a["std"] ** 2 + b["std"] ** 2) / 2) or float("nan")
        checks.append(dict(name=name, description=desc, status="PASS" if ok else "FAIL",
                           a=a_label, a_fd=a["mean"], a_std=a["std"], b=b_label, b_fd=b["mean"],
                           b_std=b["std"], factor=factor,
                           margin_in_std=(factor * b["mean"] - a["mean"]) / pooled,
                           detail=f"{a_label} {a['mean']:.3f} +- {a['std']:.3f} vs "
                                  f"{'%.2g x ' % factor if factor != 1 else ''}{b_label} "
                                  f"{b['mean']:.3f} +- {b['std']:.3f}"))

    cms = [m for m in methods if METHODS[m]["mode"] != "edm"]
    teacher_best = get("edm", "heun35")
    if teacher_best is None:  # smaller presets: the largest Heun NFE evaluated
        heun = sorted((k for k in cells if k.startswith("edm|heun")),
                      key=lambda k: int(k.split("heun")[1]))
        teacher_best = cells[heun[-1]] if heun else None
        t_label = f"EDM teacher Heun NFE {heun[-1].split('heun')[1]}" if heun else "teacher"
    else:
        t_label = "EDM teacher Heun NFE 35"
    worst_cm = None
    best_cm_label = ""
    for m in cms:
        for key, what in (("cm1", "NFE 1"), ("cm2", "NFE 2"), ("cm2pub", "NFE 2, published ts")):
            c = get(m, key)
            if c is not None and (worst_cm is None or c["mean"] < worst_cm["mean"]):
                worst_cm, best_cm_label = c, f"best CM cell ({METHODS[m]['label']} {what})"
    add("teacher_many_steps_best", "the teacher at many steps beats every consistency model "
        "at NFE 1 and 2", teacher_best, worst_cm, a_label=t_label, b_label=best_cm_label)
    # Two steps: the searched mid level (the reference's procedure) and, as a second reading,
    # the published ts of the method's family transferred unchanged.
    for key, tag, what in (("cm2", "", "searched mid"), ("cm2pub", "_published_ts",
                                                           "published ts")):
        for m in cms:
            if METHODS[m]["mode"] in ("sct", "scd"):
                add(f"{m}_2_beats_1{tag}", f"{METHODS[m]['label']}: 2 steps ({what}) beat "
                    "1 step", get(m, key), get(m, "cm1"), a_label=f"NFE 2 ({what})",
                    b_label="NFE 1")
        for m in cms:
            if METHODS[m]["mode"] == "cd":
                add(f"cd_2_beats_1{tag}[{m}]", f"{METHODS[m]['label']}: 2 steps ({what}) beat "
                    "1 step", get(m, key), get(m, "cm1"), a_label=f"NFE 2 ({what})",
                    b_label="NFE 1")
        for m in cms:
            if METHODS[m]["mode"] == "ct":
                name = f"ct_2_beats_1{tag}" + (f"[{m}]" if m != "ct" else "")
                add(name, f"{METHODS[m]['label']}: 2 steps ({what}) beat 1 step", get(m, key),
                    get(m, "cm1"), a_label=f"NFE 2 ({what})", b_label="NFE 1")
        for m in cms:
            if METHODS[m]["mode"] == "ect":
                add(f"ect_2_beats_1{tag}", f"{METHODS[m]['label']}: 2 steps ({what}) beat 1 "
                    "step", get(m, key), get(m, "cm1"), a_label=f"NFE 2 ({what})",
                    b_label="NFE 1")
    add("cd_beats_ct_nfe1", "CD beats CT at NFE 1 (both l2)", get("cd_l2", "cm1"),
        get("ct", "cm1"), a_label="CD (l2)", b_label="CT (l2)")
    for key, tag, what in (("cm2", "", "searched mid"), ("cm2pub", "_published_ts",
                                                           "published ts")):
        add(f"cd_beats_ct_nfe2{tag}", f"CD beats CT at NFE 2 (both l2; {what})",
            get("cd_l2", key), get("ct", key), a_label="CD (l2)", b_label="CT (l2)")
    if "ect" in methods and "ict" in methods:
        add("ect_beats_ict_nfe1", "ECT (from the teacher) beats iCT at NFE 1 and equal "
            "training steps", get("ect", "cm1"), get("ict", "cm1"), a_label="ECT",
            b_label="iCT")
        for key, tag, what in (("cm2", "", "searched mid"), ("cm2pub", "_published_ts",
                                                               "published ts")):
            add(f"ect_beats_ict_nfe2{tag}", f"ECT (from the teacher) beats iCT at NFE 2 and "
                f"equal training steps ({what})", get("ect", key), get("ict", key),
                a_label="ECT", b_label="iCT")
    # sCD at least as good as CD (the paper's claim), at NFE 1 and 2
    for key, what in (("cm1", "NFE 1"), ("cm2", "NFE 2, searched mid"),
                      ("cm2pub", "NFE 2, published")):
        add(f"scd_beats_cd_{key}", f"sCD beats CD (l2) at {what}", get("scd", key),
            get("cd_l2", key), a_label="sCD", b_label="CD (l2)")
    t1, t2 = get("edm", "heun1"), get("edm", "euler2")
    tmin = None
    if t1 is not None and t2 is not None:
        tmin = t1 if t1["mean"] <= t2["mean"] else t2
    add("cd1_beats_teacher_1_2", "one-step CD beats the teacher at NFE 1 and 2 by a wide "
        "margin (FD below half of the teacher's best at NFE <= 2)", get("cd_l2", "cm1"), tmin,
        factor=0.5, a_label="CD (l2) NFE 1", b_label="teacher best of NFE 1 (Heun=Euler) "
        "and NFE 2 (Euler)")
    return checks


TOY_LABELS = {"cd": "CD", "ct": "CT", "ict": "iCT", "scd": "sCD", "sct": "sCT",
              "scd_uw": "sCD (uniform weighting)", "sct_uw": "sCT (uniform weighting)"}


def toy_checks(toy: dict) -> list:
    """The Gaussian-mixture figures: the map error shrinks with training; CD below CT, sCD
    below sCT."""
    out = []
    by = {}
    for r in toy["rows"]:
        by.setdefault(r["method"], []).append((r["steps"], r["map_err"]))
    for m, pts in by.items():
        pts.sort()
        ok = pts[-1][1] < pts[0][1]
        out.append(dict(name=f"toy_{m}_map_err_shrinks", status="PASS" if ok else "FAIL",
                        description=f"GMM toy, {TOY_LABELS[m]}: one-step map error shrinks with "
                                    "training",
                        detail=" -> ".join(f"{e:.3f} ({k} steps)" for k, e in pts)))
    for a, b in (("cd", "ct"), ("scd", "sct"), ("scd_uw", "sct_uw")):
        if a in by and b in by:
            da, db = dict(by[a]), dict(by[b])
            k = max(set(da) & set(db))
            A, B = TOY_LABELS[a], TOY_LABELS[b]
            out.append(dict(name=f"toy_{a}_beats_{b}", status="PASS" if da[k] < db[k] else "FAIL",
                            description=f"GMM toy: {A}'s map error below {B}'s at equal training",
                            detail=f"{A} {da[k]:.4f} vs {B} {db[k]:.4f} at {k} steps"))
    return out


# ----------------------------------------------------------------------------- outputs


def cell_key(method: str, sampler: dict) -> str:
    return f"{method}|{sampler['key']}"


def write_table(res: dict, path: str) -> str:
    s = res["settings"]
    lines = [
        "# Quality benchmark: the paper's table at small scale (CPU)",
        "",
        f"Digits 8x8 (scikit-learn, {res['reference']['count']} real images), tiny16 UNet "
        f"(image_size {s['resolution']}), batch {s['batch']}; CT, iCT and ECT: Adam lr {s['lr']} "
        f"betas (0.9, {s['beta2']}), evaluation EMA {s['ema']}; EDM teacher and CD: Adam lr "
        f"{s['teacher_cd_lr']} betas (0.9, {s['teacher_cd_beta2']}), evaluation EMA "
        f"{s['teacher_cd_ema']}. Training steps: teacher {s['teacher_steps']}, CD "
        f"{s['cd_steps']}, CT {s['ct_steps']}, iCT {s['ict_steps']}, ECT {s['ect_steps']}. "
        f"FD = Frechet distance of "
        f"DigitsExtractor features (offline digits CNN; comparable only with itself), "
        f"{s['num_eval']} samples per value, mean +- std over {len(s['train_seeds'])} training "
        f"seed(s) x {len(s['sample_seeds'])} sampling seeds. Preset `{res['preset']}`.",
        "",
        "| method | sampler | NFE | FD (mean +- std) |",
        "|---|---|---:|---:|",
    ]
    rows = [r for r in res["table"] if not METHODS[r["method"]].get("diagnostic")]
    diag = [r for r in res["table"] if METHODS[r["method"]].get("diagnostic")]
    for row in rows:
        lines.append(f"| {row['label']} | {row['sampler']} | {row['nfe']} | "
                     f"{row['fd']['mean']:.3f} +- {row['fd']['std']:.3f} |")
    fl = res["real_floor"]
    lines.append(f"| real digits (resampled, floor) | - | - | "
                 f"{fl['mean']:.3f} +- {fl['std']:.3f} |")
    for m, why in res.get("not_run", {}).items():
        lines.append(f"| {METHODS[m]['label']} | not run | - | {why['short']} |")
    if diag:
        lines += ["", "## Diagnostics (same trainer and evaluation; not part of the paper's table)",
                  "", "| method | sampler | NFE | FD (mean +- std) |", "|---|---|---:|---:|"]
        for row in diag:
            lines.append(f"| {row['label']} | {row['sampler']} | {row['nfe']} | "
                         f"{row['fd']['mean']:.3f} +- {row['fd']['std']:.3f} |")
    lines += ["", "## Ordering checks (the paper's)", "", "| check | result | detail |",
              "|---|---|---|"]
    for c in res["checks"]:
        lines.append(f"| {c['name']}: {c['description']} | **{c['status']}** | {c['detail']} |")
    if res.get("mid_sigma_sweep"):
        sw = res["mid_sigma_sweep"]
        mids = sorted({r["mid_sigma"] for r in sw["rows"]})
        lines += ["", f"## Two-step FD against the mid noise level (diagnostic; training seed "
                  f"{sw['train_seed']}, sampling seed {sw['sample_seed']})", "",
                  "| method | NFE 1 | " + " | ".join(f"mid {m:g}" for m in mids) + " |",
                  "|---|" + "---:|" * (len(mids) + 1)]
        for m in sw["methods"]:
            vals = {r["mid_sigma"]: r["fd"] for r in sw["rows"] if r["method"] == m}
            lines.append(f"| {METHODS[m]['label']} | {sw['one_step'][m]:.3f} | "
                         + " | ".join(f"{vals[x]:.3f}" for x in mids) + " |")
    if res.get("toy"):
        lines += ["", "## 2-D Gaussian mixture: one-step map error vs the exact PF-ODE map", "",
                  res["toy"]["settings"], "", "| method | training steps | map_err | "
                  "1-step mode dist | 2-step mode dist | data mode dist |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in res["toy"]["rows"]:
            lines.append(f"| {r['method']} | {r['steps']} | {r['map_err']:.4f} | "
                         f"{r['mode_dist_1']:.4f} | {r['mode_dist_2']:.4f} | "
                         f"{r['mode_dist_data']:.4f} |")
    lines += ["", "## Wall time (s, one thread)", "", "| stage | seconds |", "|---|---:|"]
    for k, v in res["timings"].items():
        lines.append(f"| {k} | {v:.0f} |")
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (0, 0, 0)]


def plot(series: dict, floor: float, path: str) -> str:
    """FD (log) against NFE (log), one line per method, error bars = std."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        for label, pts in series.items():
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                        marker="o", capsize=3, label=label)
        ax.axhline(floor, color="grey", ls="--", label="real digits (floor)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel("FD (digits features)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return "matplotlib"
    from PIL import Image, ImageDraw, ImageFont

    W, H, left, right, top = 760, 520, 70, 20, 30
    legend_h = 16 * (len(series) + 1)
    bottom = 50 + legend_h
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[0] for v in series.values() for p in v]
    ys = [p[1] for v in series.values() for p in v] + [floor]
    ys_hi = [p[1] + p[2] for v in series.values() for p in v]
    lx0, lx1 = math.log10(min(xs)) - 0.05, math.log10(max(xs)) + 0.05
    ly0 = math.log10(max(min(ys) * 0.8, 1e-6))
    ly1 = math.log10(max(ys_hi + ys) * 1.25)
    pw, ph = W - left - right, H - top - bottom

    def tx(x):
        return left + (math.log10(x) - lx0) / (lx1 - lx0) * pw

    def ty(y):
        y = max(y, 10 ** ly0)
        return top + (1 - (math.log10(y) - ly0) / (ly1 - ly0)) * ph

    d.text((left, 10), "FD (digits features, log) vs NFE (log); bars: std over seeds",
           fill="black", font=font)
    for e in range(math.floor(ly0), math.ceil(ly1) + 1):
        for m in (1, 2, 5):
            t = m * 10 ** e
            if 10 ** ly0 <= t <= 10 ** ly1:
                d.line([(left, ty(t)), (left + pw, ty(t))], fill=(225, 225, 225))
                d.text((5, ty(t) - 6), f"{t:g}", fill="black", font=font)
    for t in sorted(set(xs)):
        d.line([(tx(t), top), (tx(t), top + ph)], fill=(235, 235, 235))
        d.text((tx(t) - 5, top + ph + 5), f"{t:g}", fill="black", font=font)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    d.text((left + pw // 2 - 10, top + ph + 22), "NFE", fill="black", font=font)
    d.line([(left, ty(floor)), (left + pw, ty(floor))], fill=(120, 120, 120), width=1)
    entries = list(series.items()) + [("real digits (floor)", None)]
    for k, (label, pts) in enumerate(entries):
        col = _COLORS[k % len(_COLORS)] if pts is not None else (120, 120, 120)
        if pts:
            xy = [(tx(x), ty(y)) for x, y, _ in pts]
            if len(xy) > 1:
                d.line(xy, fill=col, width=2)
            for (x, y, e), (px, py) in zip(pts, xy):
                d.line([(px, ty(y + e)), (px, ty(max(y - e, 1e-9)))], fill=col, width=1)
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
        ly = top + ph + 40 + 16 * k
        d.line([(left, ly + 6), (left + 20, ly + 6)], fill=col, width=3)
        d.text((left + 26, ly), label, fill="black", font=font)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return "pil"


def save_grid(panels: list, path: str, title: str = "", scale: int = 4) -> None:
    """Labelled panels of (B, 3, H, W) samples side by side (``panels``: [(label, images)])."""
    from PIL import Image, ImageDraw, ImageFont

    from cmscale.imageio import make_grid

    font = ImageFont.load_default()
    tiles = []
    for label, images in panels:
        g = make_grid(images).permute(1, 2, 0).numpy()
        im = Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST)
        tile = Image.new("RGB", (im.width, im.height + 16), "white")
        tile.paste(im, (0, 16))
        ImageDraw.Draw(tile).text((2, 2), label, fill="black", font=font)
        tiles.append(tile)
    top = 18 if title else 0
    width = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    out = Image.new("RGB", (width, max(t.height for t in tiles) + top), "white")
    if title:
        ImageDraw.Draw(out).text((2, 2), title, fill="black", font=font)
    x = 0
    for t in tiles:
        out.paste(t, (x, top))
        x += t.width + 8
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    out.save(tmp, optimize=True)
    os.replace(tmp, path)


def _git_state() -> dict:
    """The commit measured, and whether the work tree differed from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        return {"commit": head, "modified_files": sorted(l[3:] for l in dirty.splitlines())}
    except (OSError, subprocess.SubprocessError):
        return {}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "quality", "results"))
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--work", default=None, help="run directories (default /tmp/cmscale-quality/"
                   "<preset>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset setting (e.g. cd_steps=500, sample_seeds=[0,1])")
    p.add_argument("--fresh", action="store_true", help="retrain even if finished runs exist")
    p.add_argument("--no-toy", action="store_true", help="skip the Gaussian-mixture check")
    p.add_argument("--lpips", action="store_true", help="also train CD with LPIPS when real "
                   "VGG16 weights exist ($LPIPS_VGG16 or the torch hub cache); about 2 min per "
                   "batch-64 step on one CPU thread")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    s = parse_set(PRESETS[a.preset], a.set)
    out = os.path.abspath(a.out)
    work = os.path.abspath(a.work or os.path.join("/tmp", "cmscale-quality", a.preset))
    os.makedirs(os.path.join(out, "grids"), exist_ok=True)
    os.makedirs(work, exist_ok=True)
    t_all = time.time()
    timings, notes, not_run = {}, [], {}

    methods = list(s["methods"])
    vgg = find_vgg16()
    if vgg is not None and a.lpips and "cd_lpips" not in methods:
        methods.insert(methods.index("cd_l2") + 1 if "cd_l2" in methods else 1, "cd_lpips")
    if vgg is not None and not a.lpips and "cd_lpips" not in methods:
        not_run["cd_lpips"] = {
            "short": "VGG16 weights found, not requested (--lpips); substitute above",
            "reason": f"VGG16 weights at {vgg}, but CD-LPIPS was not requested: LPIPS "
                      f"resizes to 224 px, about 2 min per batch-64 step on one CPU thread "
                      f"(pass --lpips)."}
    if vgg is None:
        methods = [m for m in methods if m != "cd_lpips"]
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        not_run["cd_lpips"] = {
            "short": "no ImageNet VGG16 weights offline; pseudo-Huber substitute above",
            "reason": (f"LPIPS needs torchvision's ImageNet VGG16 weights; none on this machine "
                       f"(looked at $LPIPS_VGG16 and {hub}; the lpips package ships only its "
                       f"linear heads) and no internet. A random VGG backbone is not a perceptual "
                       f"metric, and the reference LPIPS resizes to 224 px: ~14 s per 8 images "
                       f"forward+backward on one thread, ~2 min per batch-64 step. CD with "
                       f"pseudo-Huber (iCT's replacement for LPIPS) is run instead and labelled "
                       f"as the substitute.")}
        log("CD-LPIPS not run: " + not_run["cd_lpips"]["reason"])

    # --- reference statistics and the real-data floor
    t0 = time.time()
    ev = Evaluator(s)
    ref_count = int(ev.ref.count)
    floor = summary([ev.real_floor(seed, s["num_eval"]) for seed in s["sample_seeds"]])
    timings["reference stats + real floor"] = time.time() - t0
    log(f"reference: {ref_count} real digits at {s['resolution']} px; real-data floor FD "
        f"(n={s['num_eval']}, resampled) {floor['mean']:.3f} +- {floor['std']:.3f}")

    # --- training
    runs: dict = {}
    teachers = {}
    for seed in s["train_seeds"]:
        if "edm" in methods or any(METHODS[m]["mode"] in DISTILLED for m in methods):
            rec = train(work, s, "edm", seed, fresh=a.fresh)
            runs[("edm", seed)] = rec
            teachers[seed] = export_teacher(rec["run_dir"], ema_name_of(optim_of(s, "edm")[2]))
        for m in methods:
            if m == "edm":
                continue
            runs[(m, seed)] = train(work, s, m, seed, teacher=teachers.get(seed), vgg=vgg,
                                    fresh=a.fresh)
    for (m, seed), rec in runs.items():
        key = f"train {m} (seed {seed}, {rec['steps']} steps)"
        timings[key] = rec["seconds"]

    # --- evaluation
    t0 = time.time()
    values: dict = {}
    samplers: dict = {}
    searches: dict = {}
    grids: dict = {}
    for m in methods:
        for seed in s["train_seeds"]:
            if m == "edm":
                net, _ = load_network(teachers[seed])  # the exported file, as CD reads it
                smps = samplers_for(m, s)
            else:
                net, _ = load_network(runs[(m, seed)]["run_dir"], ema_name_of(optim_of(s, m)[2]))
                found = ternary_search_mid(ev, net, s)
                searches[f"{m}|seed{seed}"] = found
                log(f"search {METHODS[m]['label']} seed {seed}: mid sigma {found['mid_sigma']:.4g} "
                    f"(ts=0,{found['index']},{found['grid'] - 1}/{found['grid']}; FD "
                    f"{found['evaluated'][str(found['index'])]['fd']:.3f} on seed "
                    f"{found['search_seed']}; {len(found['evaluated'])} settings tried)")
                smps = samplers_for(m, s, found)
            samplers.setdefault(m, smps)
            for smp in smps:
                for sseed in s["sample_seeds"]:
                    gen = make_generate(net, s["resolution"], sseed, Sampler.parse(smp["spec"]))
                    fd = ev.fd_of(gen, s["num_eval"])
                    values.setdefault(cell_key(m, smp), []).append(fd)
                    if seed == s["train_seeds"][0] and sseed == s["sample_seeds"][0]:
                        grids.setdefault(m, []).append((smp["name"], smp["nfe"],
                                                        gen(torch.arange(64))))
                c = summary(values[cell_key(m, smp)])
                log(f"eval {METHODS[m]['label']:<38s} {smp['name']:<34s} NFE {smp['nfe']:>2d}: "
                    f"FD {c['mean']:.3f} +- {c['std']:.3f}")
    timings["evaluation"] = time.time() - t0
    cells = {k: summary(v) for k, v in values.items()}

    # --- mid-sigma sweep (diagnostic)
    t0 = time.time()
    sweep = None
    cm_methods = [m for m in methods if METHODS[m]["mode"] != "edm"]
    if s["mid_sweep"] and cm_methods:
        seed, sseed = s["train_seeds"][0], s["sample_seeds"][0]
        sweep = {"train_seed": seed, "sample_seed": sseed, "methods": cm_methods, "rows": [],
                 "one_step": {}}
        for m in cm_methods:
            net, _ = load_network(runs[(m, seed)]["run_dir"], ema_name_of(optim_of(s, m)[2]))
            sweep["one_step"][m] = ev.fd_of(make_generate(net, s["resolution"], sseed,
                                                          Sampler("onestep")), s["num_eval"])
            for mid in s["mid_sweep"]:
                fd = ev.fd_of(make_generate(net, s["resolution"], sseed,
                                            Sampler("sigmas", sigmas=(80.0, float(mid)))),
                              s["num_eval"])
                sweep["rows"].append({"method": m, "mid_sigma": float(mid), "fd": fd})
            mine = [r for r in sweep["rows"] if r["method"] == m]
            log(f"sweep {METHODS[m]['label']}: 1 step {sweep['one_step'][m]:.3f}; " + ", ".join(
                f"mid {r['mid_sigma']:g}: {r['fd']:.3f}" for r in mine))
        timings["mid-sigma sweep"] = time.time() - t0

    # --- the Gaussian-mixture check
    toy = None
    if not a.no_toy and s["toy_steps"]:
        t0 = time.time()
        toy = toy_check(s)
        timings["toy GMM (CD, CT)"] = time.time() - t0

    # --- checks and outputs
    checks = run_checks(cells, methods)
    if toy:
        checks += toy_checks(toy)
    table = []
    for m in methods:
        for smp in sorted(samplers[m], key=lambda x: (x["nfe"], x["key"])):
            k = cell_key(m, smp)
            table.append({"method": m, "label": METHODS[m]["label"], "sampler": smp["name"],
                          "nfe": smp["nfe"], "key": k, "fd": cells[k]})
    for m in methods:
        panels = sorted(grids.get(m, []), key=lambda p: p[1])  # by NFE
        if METHODS[m]["mode"] == "edm" and panels:  # NFE 1, 2, 5 and the most
            top = max(n for _, n, _ in panels)
            panels = [p for p in panels if p[1] in (1, 2, 5, top)]
        save_grid([(f"{name} (NFE {nfe})", g) for name, nfe, g in panels],
                  os.path.join(out, "grids", f"{m}.png"), title=METHODS[m]["label"], scale=3)
    series = {}
    for r in table:
        if r["key"].endswith("|cm2pub"):
            continue  # the plot shows the searched two-step setting (the table has both)
        name = METHODS[r["method"]]["label"]
        if r["sampler"].startswith("Euler") or r["sampler"].startswith("Heun"):
            name += " (Euler)" if r["sampler"].startswith("Euler") else " (Heun)"
            if r["nfe"] == 1 and r["sampler"].startswith("Heun"):
                series.setdefault(METHODS[r["method"]]["label"] + " (Euler)", []).append(
                    (r["nfe"], r["fd"]["mean"], r["fd"]["std"]))
        series.setdefault(name, []).append((r["nfe"], r["fd"]["mean"], r["fd"]["std"]))
    for k in series:
        series[k].sort()
    backend = plot(series, floor["mean"], os.path.join(out, "fd_vs_nfe.png"))
    # Reused runs count with the time they took when trained, so "total" is the preset's cost;
    # "this invocation" is what this call took.
    timings["total"] = sum(timings.values())
    timings["this invocation"] = time.time() - t_all

    notes += [
        "Sample grids (grids/<method>.png): the first 64 samples of training seed "
        f"{s['train_seeds'][0]}, sampling seed {s['sample_seeds'][0]}, one labelled panel per "
        "sampler (the teacher: NFE 1, 2, 5 and its most).",
        "CD students (cd_l2, cd_ph) start from the teacher's weights (loss.init_from_teacher=true, "
        "as the reference's scripts/cm_train.py and the CD recipes do); the cd_l2_rinit "
        "diagnostic starts from random weights, the trainer's default.",
        "CT: s0=2, s1=" f"{s['ct_s1']}, mu0={s['ct_mu0']} over {s['ct_steps']} steps; the "
        "reference curriculum (s1=150, mu0=0.95) is the ct_ref diagnostic.",
        f"ECT starts from the same teacher export as CD and is tuned for {s['ect_steps']} steps "
        f"in {s['ect_stages']} stages of {ect_stage_steps(s)} (the gap t - r halves at each), "
        "metric ||a - b|| (pseudo-Huber c=0), weighting 1/(t - r), no dropout; optimiser and "
        "EMA as iCT's, so the ECT/iCT checks compare the methods at equal steps.",
        "Two steps, 'searched mid': ternary search of the FD over p in ts=0,p,"
        f"{s['search_grid'] - 1}/{s['search_grid']} on sampling seed {s['search_seed']} (the "
        "reference's scripts/ternary_search.py procedure), then evaluated on the sampling seeds "
        "above; 'published ts': the family's published setting transferred unchanged.",
        "Teacher at NFE 2 and 4: Euler (DDIM) steps on a Karras grid of steps+1 levels ending "
        "at 0; Heun: edm_sample (NFE = 2 steps - 1).",
        "data.random_flip=false: mirrored digits are not digits and the reference statistics "
        "are of unflipped images.",
    ]
    res = {
        "preset": a.preset, "settings": s, "methods": methods,
        "reference": {"count": ref_count, "extractor": ev.extractor.settings(),
                      "extractor_info": {k: v for k, v in ev.extractor.info.items()
                                         if k != "path"}},
        "real_floor": floor, "table": table, "cells": cells, "checks": checks,
        "two_step": {"searched": searches,
                     "published": {m: [x for x in samplers[m] if x.get("key") == "cm2pub"]
                                   for m in cm_methods}},
        "mid_sigma_sweep": sweep, "toy": toy, "not_run": not_run,
        "training": {f"{m}|seed{seed}": {k: v for k, v in rec.items() if k != "run_dir"}
                     for (m, seed), rec in runs.items()},
        "timings": timings, "plot_backend": backend, "notes": notes,
        "git": _git_state(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]) if argv is None
        else " ".join(argv),
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=float)
    text = write_table(res, os.path.join(out, "table.md"))
    print(text, flush=True)
    for c in checks:
        print(f"{c['status']:4s}  {c['name']}: {c['detail']}", flush=True)
    log(f"wrote {out}/results.json, table.md, fd_vs_nfe.png ({backend}), grids/; "
        f"total {timings['total']:.0f} s (this invocation {timings['this invocation']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
