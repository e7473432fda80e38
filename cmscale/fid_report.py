"""``cmscale fid-report RUN... --out DIR --ref REF.npz``: FID of every checkpoint of one or more
runs, per EMA and sampler: CSV, Markdown table, plot.

    cmscale fid-report runs/a runs/b --out report --ref ref.npz --extractor digits \\
        --num 1000 --ema all --sampler onestep --sampler ts=0,20,39/40
    torchrun --nproc_per_node=4 -m cmscale.fid_report runs/a --out report --ref ref.npz \\
        --num-images 1000 ...

    # SLURM job array: each task evaluates one slice of the combinations, then one call assembles
    #SBATCH --array=0-7
    cmscale fid-report runs/a --out report --ref ref.npz --shard $SLURM_ARRAY_TASK_ID/8
    cmscale fid-report runs/a --out report --ref ref.npz          # (afterwards) assemble

Runs are given positionally or with ``--checkpoint RUN`` (repeatable).

Combinations: every complete checkpoint (``--every K``: every K-th, always with the newest;
``--limit-checkpoints N``: only the newest N of those) x EMA (``--ema NAME,...``, rates such as
``0.9999`` work too, ``all`` = every EMA of the run, default the first one; ``online`` and
``target`` are also accepted) x sampler setting (``--sampler``, repeatable):

- ``onestep``: ``clamp(f(sigma_max z, sigma_max))``;
- ``ts=0,20,39/40``: the reference's multistep ``ts`` indices into a Karras grid of 40 points;
- ``sigmas=80,0.8``: explicit noise levels;
- ``edm`` / ``edm=N``: the Heun sampler (``edm``: 40 steps, NFE 79) (runs saved in ``edm`` mode only; they get it by default).

Image i of every combination uses noise stream (``--seed``, i) and, for class-conditional nets,
a label from its own stream (the same as ``cmscale sample``), made in ``generate(indices)``, a
pure function of the indices; ``compute_stats_from_generator`` splits indices over ranks and
all-reduces the statistics, so a FID does not depend on the world size. Every network call has
the same shape (``--batch-size`` rows, padded), as in ``cmscale sample``.

Cache: ``REPORT_DIR/cache/<key>.json``, one file per combination, written atomically by the
rank 0 that computed it (so shards of a job array never write the same file). The key hashes
the checkpoint path, its nimg, the EMA, the sampler setting, --num, --seed, the extractor
settings (name, weights hash, resize, input size) and the SHA-256 of the reference file; a
combination whose key has a file is not computed again. Any call (without ``--no-compute``)
computes what is missing in its slice; a call without ``--shard`` then writes ``report.csv``,
``report.md`` (best = lowest FID, marked) and ``fid.png`` (FID vs training images, one line per
run x EMA x sampler; matplotlib if installed, else drawn with PIL).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import sys
import time

import torch

from . import checkpoint, dist
from .atomic import write_json
from .config import load_config
from .evaluation import make_generate
from .imageio import plot_lines
from .metrics import features as F
from .metrics import fid as M
from .runs import load_run, network_name
from .sampler import EDM_KINDS, Sampler

EXAMPLE = ("example: cmscale fid-report runs/digits --out runs/digits/fid --ref digits16_ref.npz "
           "--extractor digits --num 1000 --ema all --sampler onestep --sampler ts=0,20,39/40")

CACHE_VERSION = 1
CSV_FIELDS = ["run", "checkpoint", "nimg", "ema", "sampler", "nfe", "num", "seed", "fid",
              "extractor", "seconds", "key"]


# ----------------------------------------------------------------------------- combinations


def ema_names(cfg, spec: str) -> list[str]:
    """``--ema``: 'all' (every EMA of the run), '' (the first), or names/rates, comma-separated."""
    if spec == "all":
        return [network_name(str(r), cfg.ema.rates) for r in cfg.ema.rates] or ["online"]
    return [network_name(item, cfg.ema.rates)
            for item in ([s.strip() for s in spec.split(",") if s.strip()] or [""])]


def select_checkpoints(run_dir: str, every: int, limit: int | None) -> list:
    ckpts = [c for c in checkpoint.list_checkpoints(run_dir) if c.complete]
    if every > 1 and ckpts:
        chosen = [c for i, c in enumerate(ckpts) if i % every == 0]
        if chosen[-1] is not ckpts[-1]:
            chosen.append(ckpts[-1])
        ckpts = chosen
    if limit is not None and limit > 0:
        ckpts = ckpts[-limit:]
    return ckpts


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def combo_key(c: dict, num: int, seed: int, ext_settings: dict, ref_hash: str) -> str:
    ident = {"v": CACHE_VERSION, "checkpoint": c["checkpoint"], "nimg": c["nimg"], "ema": c["ema"],
             "sampler": str(c["sampler"]), "num": num, "seed": seed,
             "extractor": {k: ext_settings.get(k) for k in ("extractor", "weights", "resize",
                                                           "input_resolution", "feature_dim")},
             "ref": ref_hash}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def build_combos(args) -> list[dict]:
    """All combinations, in a fixed order (run, nimg, EMA, sampler): the same list on every rank."""
    samplers = [Sampler.parse(s) for s in (args.sampler or ["onestep"])]
    combos = []
    for run in args.runs:
        run = os.path.abspath(run)
        if not os.path.isfile(os.path.join(run, "config.yaml")):
            raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
        cfg = load_config(os.path.join(run, "config.yaml"))
        emas = ema_names(cfg, args.ema)
        run_samplers = samplers
        if cfg.loss.mode == "edm":
            run_samplers = ([s for s in samplers if s.kind in EDM_KINDS]
                            or [Sampler.parse("edm")])
        for ck in select_checkpoints(run, args.every, args.limit_checkpoints):
            for e in emas:
                for s in run_samplers:
                    combos.append({"run": run, "checkpoint": os.path.abspath(str(ck.path)),
                                   "nimg": int(ck.nimg), "ema": e, "sampler": s})
    return combos


# ----------------------------------------------------------------------------- evaluation


def read_cache(cache_dir: str, key: str):
    try:
        with open(os.path.join(cache_dir, key + ".json")) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


# ----------------------------------------------------------------------------- outputs


def _short(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def write_csv(rows: list[dict], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def write_markdown(rows: list[dict], path: str, ref: str, missing: int) -> None:
    best = min(range(len(rows)), key=lambda i: rows[i]["fid"]) if rows else None
    runs = {r["run"] for r in rows}
    lines = ["# FID report", "",
             f"Reference: `{ref}`; {rows[0]['num'] if rows else 0} images per row, extractor "
             f"`{rows[0]['extractor'] if rows else '-'}`. Best (lowest FID) row marked **best**.", ""]
    if missing:
        lines += [f"**{missing} combination(s) not computed yet** (run the shards, or without --no-compute).", ""]
    head = (["run"] if len(runs) > 1 else []) + ["checkpoint nimg", "EMA", "sampler", "NFE", "FID", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for i, r in enumerate(rows):
        mark = "**best**" if i == best else ""
        fid = f"**{r['fid']:.3f}**" if i == best else f"{r['fid']:.3f}"
        cells = ([_short(r["run"])] if len(runs) > 1 else []) + [
            str(r["nimg"]), r["ema"], f"`{r['sampler']}`", str(r["nfe"]), fid, mark]
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        b = rows[best]
        lines += ["", f"Best: FID {b['fid']:.4f} at {b['nimg']} images, {b['ema']}, {b['sampler']}"
                  f" ({_short(b['run'])})."]
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def _series(rows: list[dict]) -> dict:
    multi = len({r["run"] for r in rows}) > 1
    series: dict = {}
    for r in rows:
        label = (f"{_short(r['run'])} " if multi else "") + f"{r['ema']} {r['sampler']}"
        series.setdefault(label, []).append((r["nimg"], r["fid"]))
    return {k: sorted(v) for k, v in series.items()}


def plot(rows: list[dict], path: str) -> str:
    """fid.png; returns the backend used ('matplotlib' or 'pil')."""
    series = _series(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plot_lines(series, path, "FID vs training images", "training images (nimg)", "FID")
        return "pil"
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("training images (nimg)")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return "matplotlib"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cmscale fid-report", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--checkpoint", action="append", default=[], metavar="RUN_DIR",
                   help="a run to evaluate (repeatable; same as the positional RUN_DIRs)")
    p.add_argument("--out", required=True, help="report directory (cache, report.csv/md, fid.png)")
    p.add_argument("--ref", required=True, help="reference statistics .npz (cmscale ref-stats)")
    p.add_argument("--extractor", default="inception", choices=["inception", "digits"])
    p.add_argument("--inception", default=None, help="path of inception-2015-12-05.pt (or its directory)")
    p.add_argument("--num", "--num-images", dest="num", type=int, default=1000, help="generated images per combination")
    p.add_argument("--ema", default="", help="EMA names or rates, comma-separated, or 'all' "
                   "(default: the run's first EMA)")
    p.add_argument("--sampler", action="append", default=None,
                   help="onestep | ts=I,J,.../STEPS | sigmas=A,B | edm[=N]; repeatable (default onestep)")
    p.add_argument("--every", type=int, default=1, help="every K-th complete checkpoint (and the newest)")
    p.add_argument("--limit-checkpoints", type=int, default=None, help="only the newest N selected checkpoints")
    p.add_argument("--seed", type=int, default=0, help="noise seed: image i uses stream (seed, i)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard", default=None, help="i/n: evaluate only the i-th of n slices; no report")
    p.add_argument("--no-compute", action="store_true", help="only assemble the report from the cache")
    p.add_argument("--device", default=None, help="device (default: the rank's device)")
    a = p.parse_args(argv)
    a.runs = list(a.runs) + list(a.checkpoint)
    if not a.runs:
        p.error("name at least one run (RUN_DIR or --checkpoint RUN_DIR)")
    if a.num < 2 or a.batch_size < 1 or a.every < 1:
        p.error("--num must be >= 2, --batch-size and --every >= 1")
    a.shard_index, a.shard_count = 0, 1
    if a.shard:
        try:
            i, n = (int(x) for x in a.shard.split("/"))
        except ValueError:
            p.error(f"--shard {a.shard!r}: write i/n")
        if not (n >= 1 and 0 <= i < n):
            p.error(f"--shard {a.shard!r}: need 0 <= i < n")
        a.shard_index, a.shard_count = i, n
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    info = dist.init(timeout=datetime.timedelta(hours=2))
    device = torch.device(args.device) if args.device else info.device
    try:
        code = _main(args, device)
    except (ValueError, FileNotFoundError, M.StatsMismatchError, F.InceptionWeightsNotFound) as e:
        if os.environ.get("CMSCALE_TRACEBACK"):
            raise
        print(f"fid_report: error: {e}", file=sys.stderr)
        code = 2
    finally:
        dist.shutdown()
    if info.world_size > 1:
        # On several ranks (always separate processes: torchrun, srun, mpirun): leave without
        # the interpreter's teardown, where a rank whose work and cache writes are done
        # sometimes aborts in a C++ thread destructor of the gloo/c10d runtime ("terminate
        # called without an active exception"), which fails the job (and a SLURM array task)
        # after the fact. Output is flushed first.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(args, device) -> int:
    t_start = time.time()
    out = os.path.abspath(args.out)
    cache_dir = os.path.join(out, "cache")
    if dist.is_main():
        os.makedirs(cache_dir, exist_ok=True)
    ref = M.load_stats(args.ref)
    ref_hash = file_sha256(args.ref)
    kw = {"device": str(device)}
    if args.extractor == "inception":
        kw["path"] = args.inception
    extractor = F.build_extractor(args.extractor, **kw)
    ext_settings = extractor.settings()
    M.check_compatible(ext_settings, ref.settings)

    combos = build_combos(args)
    for c in combos:
        c["key"] = combo_key(c, args.num, args.seed, ext_settings, ref_hash)
    mine = combos[args.shard_index::args.shard_count]
    # rank 0 decides what is cached, so that every rank walks the same list (collectives)
    todo_keys = dist.broadcast_object([c["key"] for c in mine if read_cache(cache_dir, c["key"]) is None]
                                      if dist.is_main() else None)
    todo = [c for c in mine if c["key"] in set(todo_keys)]
    cached = len(mine) - len(todo)
    dist.print0(f"fid_report: {len(combos)} combinations"
                + (f", shard {args.shard_index}/{args.shard_count}: {len(mine)}" if args.shard else "")
                + f"; cache hits {cached}, to compute {0 if args.no_compute else len(todo)}", flush=True)

    computed = 0
    if not args.no_compute:
        loaded = None  # (checkpoint, ema) -> net, reused over samplers
        net = info = None
        for c in todo:
            t0 = time.time()
            if loaded != (c["checkpoint"], c["ema"]):
                net = None
                # collective: each rank restores its shard of the average, then all-gather
                net, info = load_run(c["run"], c["ema"], c["checkpoint"], device)
                loaded = (c["checkpoint"], c["ema"])
            generate = make_generate(net, info, c["sampler"], args.seed,
                                     min(args.batch_size, args.num), device)
            nfe = c["sampler"].nfe
            stats = M.compute_stats_from_generator(generate, args.num, extractor,
                                                   batch_size=args.batch_size, max_kept=0)
            res = M.fid_from_stats(stats, ref)
            secs = time.time() - t0
            if dist.is_main():
                entry = {"run": c["run"], "checkpoint": c["checkpoint"], "nimg": c["nimg"],
                         "ema": c["ema"], "sampler": str(c["sampler"]), "nfe": nfe,
                         "num": args.num, "seed": args.seed, "fid": float(res.fid),
                         "extractor": ext_settings.get("extractor"), "ref": os.path.abspath(args.ref),
                         "ref_sha256": ref_hash, "seconds": round(secs, 2), "key": c["key"],
                         "world_size": dist.get_world_size()}
                write_json(os.path.join(cache_dir, c["key"] + ".json"), entry)
            computed += 1
            dist.print0(f"  nimg {c['nimg']:>10} {c['ema']:<14} {str(c['sampler']):<18} "
                        f"FID {res.fid:9.4f}  ({secs:.1f} s)", flush=True)
    dist.print0(f"fid_report: computed {computed}, cache hits {cached}", flush=True)

    if args.shard or not dist.is_main():
        return 0
    rows, missing = [], 0
    for c in combos:
        e = read_cache(cache_dir, c["key"])
        if e is None:
            missing += 1
        else:
            rows.append(e)
    rows.sort(key=lambda r: (r["run"], r["ema"], r["sampler"], r["nimg"]))
    write_csv(rows, os.path.join(out, "report.csv"))
    write_markdown(rows, os.path.join(out, "report.md"), os.path.abspath(args.ref), missing)
    backend = plot(rows, os.path.join(out, "fid.png")) if rows else "none"
    print(f"fid_report: {len(rows)} rows ({missing} missing) -> {out}/report.csv, report.md, "
          f"fid.png ({backend}); {time.time() - t_start:.1f} s", flush=True)
    return 0 if missing == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
