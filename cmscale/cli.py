"""The ``cmscale`` command: ``cmscale train|export ...`` (``cmscale CMD --help``)."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("cmscale.train", "train or resume a run from a YAML recipe"),
    "export": ("cmscale.export", "write one network of a run as a single weights file"),
    "sample": ("cmscale.sample", "generate images (PNGs, grid, evaluator .npz), any world size"),
    "edit": ("cmscale.editing", "zero-shot editing: inpaint, colorize, superres, stroke, ..."),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: cmscale COMMAND [args]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:8s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
