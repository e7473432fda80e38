"""The test suite's layout and its shared fixtures.

Tests live in three folders, by what they start:

- ``tests/unit/``: pure functions and in-process code (networks, losses, schedules, configs,
  checkpoints in one process, the data loader with simulated ranks and real DataLoader
  workers, FID, the toy). Fast; a failure points at one module.
- ``tests/multiprocess/``: several ranks on this machine, started by torchrun, mpiexec, or by
  hand with the environment torchrun or ``srun`` gives (``tests/support/launch.py``), and the
  training runs they compare (dist, data across ranks, training, DeepSpeed, 2-rank
  checkpoints, periodic FID, faults: two nodes, a lost node, data faults). Every test here gets the ``dist`` marker (below), so
  ``-m "not dist"`` leaves them out.
- ``tests/e2e/``: commands and scripts end to end as a user runs them: the launch scripts
  (``tests/e2e/test_launch.py``; on a real SLURM ``test_slurm.py``, marked ``slurm``), the
  ``cmscale sample`` / ``cmscale edit`` CLIs, ``cmscale fid-report`` and the quality benchmark.

Helpers are not tests: they live in the package ``tests/support/`` (``REPO``, ``FIXTURES``, rank
launching, the index-image shards, the shared tiny training run), which test modules import;
no test module imports another. Data files the tests compare against are in ``tests/fixtures/``.
"""
import os

import pytest

from tests.support import REPO

# Triton decides at import whether it interprets kernels (CPU) or compiles them, and some test
# modules import it indirectly at collection (diffusers does): set the interpreter before any.
os.environ.setdefault("TRITON_INTERPRET", "1")

MULTIPROCESS = REPO / "tests" / "multiprocess"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects, so that `-m "not dist"` sees the marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.resolve().is_relative_to(MULTIPROCESS):
            item.add_marker(pytest.mark.dist)
