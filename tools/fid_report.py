"""Kept for older commands: ``python tools/fid_report.py ARGS`` is ``cmscale fid-report ARGS``
(cmscale/fid_report.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from cmscale.fid_report import main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
