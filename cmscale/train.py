"""``python -m cmscale.train --config configs/X.yaml [--run-dir DIR] [--dry-run] [key=value ...]``.

Works as a single process and under torchrun, srun and mpiexec. Exit codes: 0 finished,
75 (``dist.EXIT_REQUEUE``) checkpointed after a stop signal (requeue me), 65 stopped on
repeated non-finite steps, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import dist
from .config import ConfigError, dump_config, load_config
from .methods import build_net
from .training_loop import training_loop


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="cmscale train", description=__doc__.split("\n")[0],
        epilog="example: cmscale train --config configs/quickstart.yaml --run-dir runs/digits "
               "train.total_steps=500", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults if omitted")
    p.add_argument("--run-dir", default=None,
                   help="run directory (default runs/<config name>); re-running resumes")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the model size, then exit")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    # First thing: a pre-timeout warning that arrives while the run is being built must set
    # the stop flag, not kill the process (default action of SIGUSR1).
    dist.install_signal_handlers()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    name = os.path.splitext(os.path.basename(args.config))[0] if args.config else "default"
    run_dir = args.run_dir or os.path.join("runs", name)
    if args.dry_run:
        net = build_net(cfg)
        print(dump_config(cfg), end="")
        n = sum(p.numel() for p in net.parameters())
        print(f"# run_dir: {run_dir}\n# parameters: {n:,} ({n * 4 / 2**20:.1f} MiB fp32)")
        return 0
    try:
        return training_loop(cfg, run_dir)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # Errors found while building (bad batch split, missing shards/teacher) are user
        # errors: say what is wrong without a traceback wall.
        if os.environ.get("CMSCALE_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
