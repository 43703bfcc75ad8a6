"""A diverged run ends: `train.max_nonfinite_steps` steps in a row with a NaN or infinite loss stop it with an error.

A step is non-finite when its loss is, or when its gradient norm is and the update was applied (an fp16 overflow
that the loss scaler skipped changed no weight). Such a step saves no checkpoint, so the checkpoints kept are the
last ones with finite values, and the error names the newest of them to resume from (lower the learning rate).
"""

from __future__ import annotations

import math
from pathlib import Path

from mimo.training.step import StepResult


class DivergedError(RuntimeError):
    """Training produced non-finite losses for `train.max_nonfinite_steps` steps in a row."""


class NonFiniteWatch:
    """Counts the steps in a row whose values are not finite; raises DivergedError at `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.first = limit, 0, 0

    def finite(self, step: int, result: StepResult) -> bool:
        """Record `step`'s result; whether it is finite (a checkpoint of it may be saved)."""
        if math.isfinite(result.loss) and (result.skipped or math.isfinite(result.grad_norm)):
            self.in_a_row = 0
            return True
        self.first = step if self.in_a_row == 0 else self.first
        self.in_a_row += 1
        return False

    def check(self, step: int, last_checkpoint: Path | None) -> None:
        """Raise DivergedError if the last `limit` steps up to `step` were all non-finite."""
        if self.in_a_row < self.limit:
            return
        kept = f"the newest checkpoint, of finite values, is {last_checkpoint}" if last_checkpoint else \
            "no checkpoint was saved before it"
        raise DivergedError(f"training diverged: the loss or gradient is NaN or infinite at steps {self.first}-{step} "
                            f"({self.in_a_row} in a row, train.max_nonfinite_steps={self.limit}); {kept}. Lower "
                            f"train.lr (or check the data) and --resume")
