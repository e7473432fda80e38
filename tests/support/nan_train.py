"""``python -m tests.support.nan_train ARGS`` is ``python -m cmscale.train ARGS`` with a fault: the
first micro-batch loss of every step listed in ``CMSCALE_TEST_NAN_AT`` (comma-separated
step numbers) is NaN."""

import os
import sys

from cmscale import train
from cmscale.training_loop import Trainer

NAN_AT = {int(s) for s in os.environ.get("CMSCALE_TEST_NAN_AT", "").split(",") if s}
_train_step = Trainer.train_step


def train_step(self, batches):
    if self.step not in NAN_AT:
        return _train_step(self, batches)
    loss, calls = self.method.loss, []

    def nan_first(*args, **kwargs):
        calls.append(None)
        out = loss(*args, **kwargs)
        return out * float("nan") if len(calls) == 1 else out

    self.method.loss = nan_first
    try:
        return _train_step(self, batches)
    finally:
        del self.method.loss


Trainer.train_step = train_step

if __name__ == "__main__":
    sys.exit(train.main())
