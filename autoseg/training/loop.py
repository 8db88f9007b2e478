"""The training loop for one fold: build the run, restore or start its state, run the epochs, finish.

Per epoch: ``iters_per_epoch`` augmented batches (made by :mod:`autoseg.training.dataloader` in worker
processes, each batch a pure function of seed, fold, rank, epoch and iteration, so a resumed run continues
exactly), then ``val_iters`` unaugmented batches from the validation cases for a pseudo-Dice
(:mod:`autoseg.training.patch_validation`), a line in ``log.jsonl``, ``progress.png`` and an atomic
``checkpoint_latest.pt``. With a time budget (:class:`autoseg.training.budget.TimeBudget`) the poly schedule
runs on the clock (the fraction of the budget used when an epoch starts), the number of epochs is re-estimated
from the mean epoch time so far, and the epoch during which the budget runs out is cut there (its patch
validation cut to the same share of ``val_iters``). After the last
epoch: ``checkpoint_final.pt``. Predicting and scoring the fold's validation cases is the next stage,
:func:`autoseg.validation.validate_fold`, which the API runs after this one.

Under DDP (``torchrun``) every rank trains on its share of each batch; rank 0 alone writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.checkpoint_io import save_checkpoint
from autoseg.errors import AutosegError
from autoseg.jsonio import write_text
from autoseg.layout import WorkDir
from autoseg.settings import TrainSettings
from autoseg.training import distributed
from autoseg.training.augmentation import axis_augmentation_note
from autoseg.training.dataloader import BatchLoader
from autoseg.training.patch_validation import cut_epoch_val_iters, output_structures, validate_patches
from autoseg.training.progress import plot_progress, read_log
from autoseg.training.run import (
    TrainingRun,
    batch_model,
    build_run,
    configure_torch,
    loader_spec,
    loader_workers,
    make_loss,
)
from autoseg.training.sampling import CaseStore
from autoseg.training.schedule import poly_lr, scheduled_lr, set_lr
from autoseg.training.state import EMA_DECAY, RunState, checkpoint_contents, restore_or_start

__all__ = [
    "EMA_DECAY",
    "Callbacks",
    "EpochReport",
    "TrainedFold",
    "configure_torch",
    "make_loss",
    "output_structures",
    "train_fold",
]

_log = logging.getLogger("autoseg")


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float | None
    pseudo_dice: dict[str, float]
    ema_dice: float | None
    lr: float
    seconds: float
    train_seconds: float = 0.0
    """Time of the training iterations alone (without validation and checkpointing)."""
    data_wait_seconds: float = 0.0
    """Part of ``train_seconds`` the training loop spent waiting for the next batch."""
    elapsed_seconds: float = 0.0
    """Training time of the run (all earlier epochs, their logging and checkpoints) when this epoch started."""
    iterations: int = 0
    """Training iterations run in this epoch (fewer than ``iters_per_epoch`` where the time budget ran out):
    ``train_seconds / iterations`` is the measured time of a step (``autoseg compare``)."""
    peak_memory_gb: float | None = None
    """Peak memory of the epoch's training, by ``peak_memory_of``: ``cuda`` the most tensor memory allocated on
    the GPU during the epoch (``torch.cuda.max_memory_allocated``); ``cpu_rss`` the process's largest resident
    set so far (``getrusage``: the whole process, batch workers not included); None elsewhere (MPS)."""
    peak_memory_of: str = ""


@dataclass(frozen=True)
class Callbacks:
    """Called on rank 0 only: ``on_iteration(done, total, loss)`` after each training iteration,
    ``on_epoch(report)`` after each epoch's log line and checkpoints."""

    on_iteration: Callable[[int, int, float], None] | None = None
    on_epoch: Callable[[EpochReport], None] | None = None


@dataclass(frozen=True)
class TrainedFold:
    """What training leaves for the stages after it."""

    folder: Path
    val_ids: list[str]
    """The fold's validation cases (none for fold ``all``)."""
    trained: bool
    """False when a finished run was resumed with nothing left to do (checkpoints and log left as they were)."""
    writer: bool
    """This process writes results (rank 0 of a DDP run, or the only process)."""


def train_fold(
    work: WorkDir,
    config_name: str,
    fold: int | str,
    settings: TrainSettings,
    device: torch.device,
    resume: bool = False,
    on_iteration: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    overwrite: bool = False,
    validated: bool = False,
) -> TrainedFold:
    """Train ``config_name`` on ``fold`` (0..4 or ``all``) up to ``checkpoint_final.pt``.

    ``resume`` continues ``checkpoint_latest.pt`` (or extends a finished run); ``overwrite`` deletes the
    fold's earlier run once plans, data and splits have been checked. ``validated``: the fold's final
    validation exists, so a resumed run with nothing left to train returns at once (else it writes
    ``checkpoint_final.pt`` again for the validation that follows). See :class:`Callbacks` for the hooks.
    """
    run = build_run(work, config_name, fold, settings, device, resume, overwrite)
    state = restore_or_start(run, resume)
    if resume and run.final.exists() and state.epoch >= state.planned and (validated or not run.val_ids):
        return TrainedFold(run.folder, run.val_ids, trained=False, writer=run.world.is_main)
    if run.world.is_main:
        _truncate_log(run.folder / WorkDir.LOG, state.epoch)
    model = batch_model(run)
    spec, workers = loader_spec(run), loader_workers(settings, run.world)
    val_store = _validation_store(run)
    _log_start(run, state, workers)
    callbacks = Callbacks(on_iteration, on_epoch)
    with BatchLoader(spec, workers) as loader:
        while state.epoch < state.planned:
            _run_epoch(run, state, model, loader, val_store, callbacks)
    return _finish(run, state)


def _validation_store(run: TrainingRun) -> CaseStore | None:
    """The validation cases, built once: their memory maps (and previous-stage and distance maps) are reused
    every epoch; None without validation cases."""
    if not run.val_ids:
        return None
    return CaseStore(run.data_dir, run.val_ids, run.previous_dir, run.distance_maps)


def _log_start(run: TrainingRun, state: RunState, workers: int) -> None:
    if not run.world.is_main:
        return
    settings, w = run.settings, run.world
    _log.info(
        "%s fold %s: %d training / %d validation cases; epochs %d-%d of %d x %d iterations%s; batch %d, "
        "patch %s; %s, %d augmentation worker(s)%s",
        run.config_name,
        run.fold,
        len(run.train_ids),
        len(run.val_ids),
        state.epoch + 1,
        state.planned,
        settings.epochs,
        settings.iters_per_epoch,
        f" within {settings.time_budget_minutes:g} min" if state.budget.limited else "",
        run.config.batch_size,
        "x".join(map(str, run.config.patch_size)),
        run.device,
        workers,
        f", {w.size} processes" if w.distributed else "",
    )
    note = axis_augmentation_note(run.config.patch_size, run.config.spacing, settings.augmentation)
    if note:
        _log.info("%s", note)


@dataclass
class _Iterations:
    losses: list[float]
    data_wait_seconds: float
    out_of_time: bool
    """The time budget ran out before the epoch's last iteration."""
    val_iters: int
    """Patch-validation batches of the epoch: ``val_iters``, or its share for an epoch cut by the budget."""


def _run_epoch(
    run: TrainingRun,
    state: RunState,
    model: torch.nn.Module,
    loader: BatchLoader,
    val_store: CaseStore | None,
    callbacks: Callbacks,
) -> None:
    """One epoch: training iterations, pseudo-Dice, the state's bookkeeping, then (rank 0) log line,
    checkpoints and ``on_epoch``."""
    t0 = time.perf_counter()
    lr = _learning_rate(run.settings, state)
    set_lr(run.optimizer, lr)
    model.train()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    t_train = time.perf_counter()
    done = _train_iterations(run, state, model, loader, t0, callbacks.on_iteration)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    train_seconds = time.perf_counter() - t_train
    peak_gb, peak_of = peak_memory_gb(run.device)

    val_loss, dice = validate_patches(run, model, val_store, state.epoch, done.val_iters)
    train_loss = distributed.mean_over_ranks(float(np.mean(done.losses)), run.world)
    _refuse_non_finite(run, train_loss, state.epoch)
    state.update_ema(float(np.nanmean(list(dice.values()))) if dice else None)
    _step_plateau(run.settings, state)
    state.epoch += 1
    seconds = time.perf_counter() - t0
    started_at = state.budget.used_s
    state.budget.add(seconds)  # this epoch's logging and checkpoints are added below
    if state.budget.limited:
        _replan(run, state, seconds, done)
    report = EpochReport(
        epoch=state.epoch,
        epochs=state.planned,
        train_loss=train_loss,
        val_loss=val_loss,
        pseudo_dice=dice,
        ema_dice=state.ema,
        lr=lr,
        seconds=seconds,
        train_seconds=train_seconds,
        data_wait_seconds=done.data_wait_seconds,
        elapsed_seconds=started_at,
        iterations=len(done.losses),
        peak_memory_gb=peak_gb,
        peak_memory_of=peak_of,
    )
    t_save = time.perf_counter()
    if run.world.is_main:
        _save_epoch(run, state, report, callbacks.on_epoch)
    state.budget.add(time.perf_counter() - t_save)


def peak_memory_gb(device: torch.device) -> tuple[float | None, str]:
    """(GB, what was measured) for :attr:`EpochReport.peak_memory_gb`."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1024**3, 4), "cuda"
    if device.type == "cpu":
        import sys

        try:
            import resource
        except ImportError:  # Windows
            return None, ""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
        return round(rss * (1 if sys.platform == "darwin" else 1024) / 1024**3, 4), "cpu_rss"
    return None, ""


def _step_plateau(settings: TrainSettings, state: RunState) -> None:
    """A plateau schedule: lower the rate when the validation EMA has stopped rising (every rank alike: the
    EMA is computed from the pseudo-Dice all ranks share)."""
    if settings.schedule != "plateau":
        return
    s = settings
    if state.plateau.step(state.ema, s.plateau_patience, s.plateau_factor, s.plateau_threshold):
        _log.info(
            "validation EMA has not risen by %g for %d epochs: learning rate now %.3g of the initial %g",
            s.plateau_threshold, s.plateau_patience, state.plateau.scale, s.initial_lr,
        )  # fmt: skip


def _learning_rate(settings: TrainSettings, state: RunState, epoch_started: float | None = None) -> float:
    """The schedule over the epochs, or with a time budget over the budget: it ends with the budget (set before
    every iteration, at the share of the budget used by then, when ``epoch_started`` is given)."""
    if settings.schedule != "poly" or settings.warmup_fraction > 0:
        done = (
            state.budget.used_fraction(epoch_started)
            if state.budget.limited
            else state.epoch / max(state.planned, 1)
        )
        return scheduled_lr(
            settings.initial_lr,
            done,
            settings.schedule,
            settings.poly_exponent,
            settings.warmup_fraction,
            state.plateau.scale,
        )
    if state.budget.limited:
        used = state.budget.used_fraction(epoch_started)
        return poly_lr(settings.initial_lr, used, 1.0, settings.poly_exponent)
    return poly_lr(settings.initial_lr, state.epoch, state.planned, settings.poly_exponent)


def _train_iterations(
    run: TrainingRun,
    state: RunState,
    model: torch.nn.Module,
    loader: BatchLoader,
    epoch_started: float,
    on_iteration: Callable[[int, int, float], None] | None,
) -> _Iterations:
    """The epoch's training iterations; cut when the time budget runs out (a hard limit, checked after
    every iteration; not under DDP, where ranks must stay in step)."""
    total = run.settings.iters_per_epoch
    losses, wait = [], 0.0
    batches = loader.epoch(state.epoch, total)
    for it in range(total):
        t_wait = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t_wait
        if state.budget.limited and it:  # on the clock: the rate falls within the epoch too
            set_lr(run.optimizer, _learning_rate(run.settings, state, epoch_started))
        losses.append(_train_step(run, model, batch))
        if on_iteration and run.world.is_main:
            on_iteration(it + 1, total, losses[-1])
        if not run.world.distributed and it + 1 < total and state.budget.expired(epoch_started):
            val_iters = cut_epoch_val_iters(run.settings.val_iters, it + 1, total)
            _log.warning(
                "time budget used up after %d of %d iterations of epoch %d: training ends here "
                "(its patch validation: %d of %d batches)",
                it + 1,
                total,
                state.epoch + 1,
                val_iters,
                run.settings.val_iters,
            )
            return _Iterations(losses, wait, True, val_iters)
    return _Iterations(losses, wait, False, run.settings.val_iters)


def _train_step(run: TrainingRun, model: torch.nn.Module, batch: dict[str, np.ndarray]) -> float:
    """One optimizer step on ``batch``; returns its loss."""
    device, precision, optimizer = run.device, run.precision, run.optimizer
    x = torch.from_numpy(batch["data"]).to(device, non_blocking=True)
    y = torch.from_numpy(batch["seg"]).to(device, non_blocking=True)
    maps = torch.from_numpy(batch["dist"]).to(device, non_blocking=True) if "dist" in batch else None
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.autocast):
        loss = run.loss_fn(model(x), y, maps)
    precision.scaler.scale(loss).backward()
    precision.scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(run.network.parameters(), run.settings.grad_clip)
    precision.scaler.step(optimizer)
    precision.scaler.update()
    return float(loss.detach())


def _refuse_non_finite(run: TrainingRun, train_loss: float, epoch: int) -> None:
    """Stop on a NaN/Inf training loss (every rank sees the same mean, so all stop together)."""
    if not np.isfinite(train_loss):
        raise AutosegError(
            f"{run.folder}: the training loss became {train_loss} in epoch {epoch + 1}; training stopped "
            f"({run.latest.name} holds the last epoch with a finite loss, if any). Check the intensities of "
            "the images, or lower initial_lr"
        )


def _replan(run: TrainingRun, state: RunState, epoch_seconds: float, done: _Iterations) -> None:
    """With a time budget: the epochs that still fit (rank 0's estimate on every rank); none after an epoch
    cut by the budget. Warns once when one epoch takes more than a quarter of the budget."""
    planned = state.budget.epochs_that_fit(state.epoch, run.settings.epochs)
    state.planned = state.epoch if done.out_of_time else distributed.from_main(planned, run.world)
    first = state.epoch == state.start_epoch + 1
    if first and state.budget.too_coarse_for(epoch_seconds) and run.world.is_main:
        total = run.settings.iters_per_epoch
        _log.warning(
            "one epoch (%s iterations) took %.0f s of the %.0f s budget: the schedule has few "
            "steps; use fewer --iters-per-epoch for short budgets",
            f"{len(done.losses)} of {total}" if done.out_of_time else total,
            epoch_seconds,
            state.budget.limit_s,
        )


def _save_epoch(
    run: TrainingRun, state: RunState, report: EpochReport, on_epoch: Callable[[EpochReport], None] | None
) -> None:
    """Rank 0 after each epoch: log line and plot, ``checkpoint_best.pt`` when the pseudo-Dice average
    improved, ``checkpoint_latest.pt``, then ``on_epoch``."""
    _log_epoch(run.folder, report)
    if state.improved():
        save_checkpoint(
            run.folder / WorkDir.CHECKPOINT_BEST, checkpoint_contents(run, state, resumable=False)
        )
    save_checkpoint(run.latest, checkpoint_contents(run, state))
    if on_epoch:
        on_epoch(report)


def _finish(run: TrainingRun, state: RunState) -> TrainedFold:
    """``checkpoint_final.pt`` (rank 0): the weights prediction uses."""
    if run.world.is_main:
        save_checkpoint(run.final, checkpoint_contents(run, state, resumable=False))
    return TrainedFold(run.folder, run.val_ids, trained=True, writer=run.world.is_main)


def _log_epoch(out_dir: Path, report: EpochReport) -> None:
    """Append the epoch to ``log.jsonl`` (NaN written as null: the file stays strict JSON) and redraw
    ``progress.png``."""
    record = json.loads(json.dumps(asdict(report)).replace("NaN", "null"))
    with open(out_dir / WorkDir.LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, allow_nan=False) + "\n")
    plot_progress(read_log(out_dir / WorkDir.LOG), out_dir / WorkDir.PROGRESS)


def _truncate_log(path: Path, start_epoch: int) -> None:
    """Drop log lines of epochs that will be (re)done: a kill between log and checkpoint leaves one behind."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["epoch"] <= start_epoch:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by a kill
    write_text(path, "".join(k + "\n" for k in keep))
