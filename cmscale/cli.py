"""The ``cmscale`` command: ``cmscale COMMAND ...`` (``cmscale COMMAND --help``, each with an
example). The same thing has the same flag everywhere: ``--out`` (what is written),
``--checkpoint`` (a run, checkpoint, weights file or diffusers folder), ``--ema`` (which
network of a run), ``--num`` (how many images)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("cmscale.train", "train or resume a run from a YAML recipe"),
    "sample": ("cmscale.sample", "generate images (PNGs, grid, evaluator .npz), any world size"),
    "edit": ("cmscale.editing", "zero-shot editing: inpaint, colorize, superres, stroke, ..."),
    "export": ("cmscale.export", "one network of a run as a weights file or diffusers folder"),
    "convert": ("cmscale.convert", "a reference .pt or diffusers folder -> weights file or folder"),
    "make-shards": ("cmscale.make_shards", "images (folder, lmdb, .npz, embedded) -> tar shards"),
    "ref-stats": ("cmscale.ref_stats", "reference statistics for FID from images or shards"),
    "fid-report": ("cmscale.fid_report", "FID of checkpoints x EMAs x samplers: CSV, table, plot"),
    "compare": ("cmscale.compare", "an EDM teacher at 1..35 NFE beside its consistency model"),
}


def out_path(parser: argparse.ArgumentParser, positional: str | None, flag: str | None) -> str:
    """The output named by ``--out`` or by the older positional form; both only if equal."""
    if positional and flag and positional != flag:
        parser.error(f"two outputs: {positional} and --out {flag}")
    if not (positional or flag):
        parser.error("--out is required")
    return positional or flag


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: cmscale COMMAND [args]   (cmscale COMMAND --help)\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:12s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
