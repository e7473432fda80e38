"""Kept for older commands: ``python tools/convert_reference_ckpt.py ARGS`` is ``cmscale convert ARGS``
(cmscale/convert.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from cmscale.convert import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
