"""The time budget of a training run (``time_budget_minutes``): how much of it is used, whether it has run out,
and how many epochs fit into what is left.

The clock is the run's training time: the epochs already done (also those of earlier processes of a resumed
run; the checkpoint keeps it as ``elapsed_seconds``) plus the running epoch. Time between processes does not
count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from autoseg.training.schedule import budget_epochs


@dataclass
class TimeBudget:
    limit_s: float
    """Seconds of training the run may take; 0 for no budget (every ``epochs`` epoch runs)."""
    used_s: float = 0.0
    """Training time of the finished epochs, their logging and checkpoints included."""

    @classmethod
    def from_minutes(cls, minutes: float, used_s: float = 0.0) -> TimeBudget:
        return cls(limit_s=minutes * 60, used_s=used_s)

    @property
    def limited(self) -> bool:
        return self.limit_s > 0

    def used_fraction(self, epoch_started: float | None = None) -> float:
        """Part of the budget used when the running epoch started, or by now in the epoch that started at
        ``epoch_started`` (``time.perf_counter()``); 1 once it is used up. The poly learning rate schedule
        runs on it, so the rate reaches 0 with the budget."""
        used = self.used_s + (time.perf_counter() - epoch_started if epoch_started is not None else 0.0)
        return min(used, self.limit_s) / self.limit_s

    def expired(self, epoch_started: float) -> bool:
        """Whether the budget is used up by now, in the epoch that started at ``epoch_started``
        (``time.perf_counter()``); never without a budget."""
        return self.limited and self.used_s + time.perf_counter() - epoch_started >= self.limit_s

    def epochs_that_fit(self, epochs_done: int, max_epochs: int) -> int:
        """Epochs of the run in all: those done, and as many more as the rest of the budget holds at the mean
        epoch time so far (see :func:`autoseg.training.schedule.budget_epochs`)."""
        return budget_epochs(self.limit_s, self.used_s, epochs_done, max_epochs)

    def too_coarse_for(self, epoch_seconds: float) -> bool:
        """One epoch of ``epoch_seconds`` takes more than a quarter of the budget: few schedule steps."""
        return epoch_seconds > self.limit_s / 4

    def add(self, seconds: float) -> None:
        self.used_s += seconds
