"""Kept for older commands: ``python tools/make_shards.py ARGS`` is ``cmscale make-shards ARGS``
(cmscale/make_shards.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from cmscale.make_shards import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
