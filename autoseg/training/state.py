"""What changes from epoch to epoch of a run (epochs done and planned, the pseudo-Dice average, the time used),
and how it goes into and comes out of checkpoints: a resumed run continues exactly where the last
``checkpoint_latest.pt`` left it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from autoseg.checkpoint_io import check_compatible, load_checkpoint
from autoseg.training.budget import TimeBudget
from autoseg.training.run import TrainingRun
from autoseg.training.schedule import Plateau

EMA_DECAY = 0.9


@dataclass
class RunState:
    epoch: int
    """Epochs finished."""
    planned: int
    """Epochs the run will have (with a time budget: re-estimated after every epoch)."""
    budget: TimeBudget
    """The run's training time so far, and its limit."""
    start_epoch: int = 0
    """The epoch this process started from (0, or the resumed checkpoint's)."""
    best_ema: float = -1.0
    ema: float | None = None
    """Exponential moving average of the validation pseudo-Dice (None until one is finite)."""
    plateau: Plateau = field(default_factory=Plateau)
    """A plateau schedule's bookkeeping (:class:`autoseg.training.schedule.Plateau`); unused by the others."""

    def update_ema(self, mean_dice: float | None) -> None:
        if mean_dice is not None and math.isfinite(mean_dice):
            self.ema = mean_dice if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * mean_dice

    def improved(self) -> bool:
        """Whether the average is the best so far (then it becomes the best)."""
        if self.ema is not None and self.ema > self.best_ema:
            self.best_ema = self.ema
            return True
        return False


def restore_or_start(run: TrainingRun, resume: bool) -> RunState:
    """A fresh state, or (``resume`` with a ``checkpoint_latest.pt``) the checkpoint's: weights, optimizer,
    scaler and torch random state are loaded into the run, the rest is returned."""
    settings = run.settings
    state = RunState(
        epoch=0, planned=settings.epochs, budget=TimeBudget.from_minutes(settings.time_budget_minutes)
    )
    if not (resume and run.latest.exists()):
        return state
    ckpt = load_checkpoint(run.latest, map_location=run.device)
    check_compatible(ckpt, run.latest, run.config_name, run.topology)
    run.network.load_state_dict(ckpt["network"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and run.precision.scaler.is_enabled():
        run.precision.scaler.load_state_dict(ckpt["scaler"])
    if isinstance(ckpt.get("rng"), dict) and "torch" in ckpt["rng"]:
        torch.set_rng_state(ckpt["rng"]["torch"])
    state.epoch = state.start_epoch = int(ckpt["epoch"])
    state.best_ema = float(ckpt.get("best_ema", -1.0))
    state.ema = ckpt.get("ema")
    state.plateau = Plateau.from_json(ckpt.get("plateau"))
    state.budget.used_s = float(ckpt.get("elapsed_seconds", 0.0))
    if state.budget.limited and "planned_epochs" in ckpt:
        state.planned = min(settings.epochs, max(state.epoch, int(ckpt["planned_epochs"])))
    return state


def checkpoint_contents(run: TrainingRun, state: RunState, resumable: bool = True) -> dict:
    """Checkpoint contents; ``checkpoint_best`` and ``checkpoint_final`` (for prediction) leave out the
    optimizer and scaler, which only ``checkpoint_latest`` needs to resume, and are half the size."""
    scaler = run.precision.scaler
    training = (
        {
            "optimizer": run.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        }
        if resumable
        else {}
    )
    return {
        "network": run.network.state_dict(),
        **training,
        "epoch": state.epoch,
        "config": run.config_name,
        "topology": json.dumps(run.topology),
        "rng": {"torch": torch.get_rng_state()},
        "best_ema": state.best_ema,
        "ema": state.ema,
        "elapsed_seconds": state.budget.used_s,
        "planned_epochs": state.planned,
        "plateau": state.plateau.to_json(),
    }
