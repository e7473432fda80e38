"""``cmscale compare --teacher T --checkpoint CM --out DIR``: what distillation bought.

    cmscale compare --teacher runs/quickstart/teacher --checkpoint runs/quickstart/cd \\
        --out runs/quickstart/compare --extractor digits

Samples an EDM teacher with the Heun sampler (and Euler for the even step counts Heun cannot
do) at several numbers of network evaluations (NFE), and a consistency model at one and two
steps, all from the same per-image noise, and measures each setting's Frechet distance (FD)
against reference statistics (``--ref``, or for a run on an embedded dataset its own cached
statistics). Writes

- ``DIR/compare.png``: the teacher at 1, 2 and many NFE beside the consistency model at 1 and 2,
  each panel titled with its FD, above the plot of FD against NFE (log-log);
- ``DIR/compare.json``: every setting's sampler, NFE and FD.

FD values are comparable only with the same extractor and reference (the digits extractor is
an offline CNN trained on the digits, not Inception).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from .atomic import write_json
from .evaluation import make_generate
from .imageio import make_grid, plot_lines, save_png
from .metrics import features as F
from .metrics import fid as M
from .metrics.refstats import embedded_stats
from .runs import load_network
from .sampler import Sampler

EXAMPLE = ("example: cmscale compare --teacher runs/quickstart/teacher --checkpoint "
           "runs/quickstart/cd --out runs/quickstart/compare --extractor digits")

# The teacher's settings (NFE): Heun 1, 2, 3, 5, 10, 18 steps (1, 3, 5, 9, 19, 35) and Euler 2, 4.
TEACHER = ["edm=1", "euler=2", "edm=2", "euler=4", "edm=3", "edm=5", "edm=10", "edm=18"]
SHOWN_TEACHER = ["edm=1", "euler=2", "edm=18"]  # the panels: 1, 2 and many NFE
PANEL_IMAGES = 36
PANEL_SCALE = 5


def _label(who: str, s: Sampler) -> str:
    if s.kind == "onestep":
        return f"{who}, 1 step"
    if s.kind in ("ts", "sigmas"):
        return f"{who}, {s.nfe} steps"
    return f"{who}, {'Heun' if s.kind == 'edm' else 'Euler'} {s.steps}"


def _panel(images: torch.Tensor, title: str):
    """A grid of ``images`` enlarged, with ``title`` above it (PIL image)."""
    from PIL import Image, ImageDraw, ImageFont

    grid = make_grid(images).permute(1, 2, 0).numpy()
    g = Image.fromarray(np.ascontiguousarray(grid))
    g = g.resize((g.width * PANEL_SCALE, g.height * PANEL_SCALE), Image.NEAREST)
    out = Image.new("RGB", (g.width, g.height + 36), "white")
    out.paste(g, (0, 36))
    d = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for k, line in enumerate(title.split("\n")):
        d.text((4, 2 + 16 * k), line, fill="black", font=font)
    return out


def compare(teacher: str, student: str, out: str, extractor_name: str = "digits",
            ref: str | None = None, num: int = 1000, seed: int = 0, batch_size: int = 250,
            device: str = "cpu") -> dict:
    """FD of the teacher and the consistency model under their samplers; writes the picture."""
    from PIL import Image

    t_net, t_info = load_network(teacher, mode="edm")
    s_net, s_info = load_network(student)
    if s_info["mode"] == "edm":
        raise ValueError(f"{student} is an EDM denoiser, not a consistency model")
    extractor = F.build_extractor(extractor_name, device=device)
    if ref:
        ref_stats = M.load_stats(ref)
    else:
        cfg = s_info.get("config")
        if cfg is None or not cfg.data.shards.startswith("embedded:"):
            raise ValueError("--ref: reference statistics are needed (cmscale ref-stats) unless "
                             "the consistency model is a run on an embedded dataset")
        ref_stats = embedded_stats(cfg.data.shards[len("embedded:"):], cfg.data.resolution,
                                   extractor)
    M.check_compatible(extractor.settings(), ref_stats.settings)
    cfg = s_info.get("config")
    two = (Sampler("ts", ts=tuple(cfg.sample.ts), steps=cfg.sample.steps)
           if cfg is not None and len(cfg.sample.ts) == 3 else Sampler.parse("ts=0,20,39/40"))
    settings = [("EDM teacher", t_net, t_info, Sampler.parse(s)) for s in TEACHER]
    settings += [("consistency model", s_net, s_info, Sampler("onestep")),
                 ("consistency model", s_net, s_info, two)]
    rows, panels = [], {}
    for who, net, info, sampler in settings:
        t0 = time.time()
        generate = make_generate(net.to(device), info, sampler, seed, batch_size, device)
        stats = M.compute_stats_from_generator(generate, num, extractor, batch_size=batch_size,
                                               max_kept=0)
        fd = float(M.fid_from_stats(stats, ref_stats).fid)
        rows.append(dict(model=who, sampler=str(sampler), nfe=sampler.nfe, fd=fd,
                         label=_label(who, sampler), seconds=time.time() - t0))
        print(f"{rows[-1]['label']:32s} NFE {sampler.nfe:3d}  FD {fd:9.2f}")
        if who != "EDM teacher" or str(sampler) in [str(Sampler.parse(s)) for s in SHOWN_TEACHER]:
            panels[len(rows) - 1] = generate(torch.arange(PANEL_IMAGES))
    os.makedirs(out, exist_ok=True)
    teacher_rows = sorted((r for r in rows if r["model"] == "EDM teacher"),
                          key=lambda r: (r["nfe"], r["fd"]))
    series = {"EDM teacher (Heun; Euler at NFE 2, 4)": [(r["nfe"], r["fd"]) for r in teacher_rows],
              "consistency model": [(r["nfe"], r["fd"]) for r in rows
                                    if r["model"] != "EDM teacher"]}
    plot_path = os.path.join(out, "fd_vs_nfe.png")
    plot_lines(series, plot_path, "Frechet distance vs network evaluations per image (NFE)",
               "NFE", "FD", log=True)
    tiles = [_panel(panels[i], f"{rows[i]['label']} (NFE {rows[i]['nfe']})\n"
                               f"FD {rows[i]['fd']:.1f}") for i in sorted(panels)]
    plot = Image.open(plot_path).convert("RGB")
    width = max(sum(t.width for t in tiles) + 8 * (len(tiles) - 1), plot.width)
    canvas = Image.new("RGB", (width, tiles[0].height + 8 + plot.height), "white")
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.width + 8
    canvas.paste(plot, ((width - plot.width) // 2, tiles[0].height + 8))
    save_png(np.asarray(canvas), os.path.join(out, "compare.png"))
    result = dict(teacher=t_info["path"], checkpoint=s_info["path"], num=num, seed=seed,
                  extractor=extractor.settings(), rows=rows)
    write_json(os.path.join(out, "compare.json"), result, default=str)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cmscale compare", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the EDM teacher (run, export or folder)")
    p.add_argument("--checkpoint", required=True, help="the consistency model (run, export ...)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--extractor", default="digits", choices=["inception", "digits"])
    p.add_argument("--ref", default=None, help="reference statistics .npz (cmscale ref-stats)")
    p.add_argument("--num", type=int, default=1000, help="images per FD")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        r = compare(a.teacher, a.checkpoint, a.out, a.extractor, a.ref, a.num, a.seed,
                    a.batch_size, a.device)
    except (ValueError, FileNotFoundError, F.InceptionWeightsNotFound) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(f"{os.path.join(a.out, 'compare.png')} ({len(r['rows'])} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
