"""Helpers shared by the tests (not tests themselves; pytest does not collect this package).

- ``launch``: start ``dist_worker.py`` as several ranks (torchrun, mpiexec, or the environment
  torchrun/srun would give), ``clean_env`` for subprocesses, ``free_port``; one agent of a
  two-"node" torchrun job (``torchrun_node_cmd``) and ``signal_tree`` to lose such a node.
- ``dist_worker``: one rank of a multi-process scenario (run as a script).
- ``fake_trainer``: a stand-in for ``python -m cmscale.train`` for the launcher tests.
- ``nan_train``: ``python -m cmscale.train`` with injected NaN losses.
- ``data``: tiny real shards whose pixels encode the sample index.
- ``training``: the tiny training run the end-to-end training tests share.

Only the standard library is imported here: ``fake_trainer`` runs without torch.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository root
FIXTURES = REPO / "tests" / "fixtures"
