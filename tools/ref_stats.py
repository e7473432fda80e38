"""Kept for older commands: ``python tools/ref_stats.py ARGS`` is ``cmscale ref-stats ARGS``
(cmscale/ref_stats.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from cmscale.ref_stats import compute, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
