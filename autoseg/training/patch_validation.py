"""The per-epoch validation of a training run: a pseudo-Dice on ``val_iters`` unaugmented patches of the fold's
validation cases (not the final validation, which predicts whole cases: :mod:`autoseg.validation`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from autoseg.planning.plans import Plans
from autoseg.training import distributed
from autoseg.training.augmentation import center_crop
from autoseg.training.dataloader import network_batch
from autoseg.training.run import TrainingRun
from autoseg.training.sampling import CaseStore, PatchSampler


def output_structures(plans: Plans) -> list[tuple[str, list[int]]]:
    """What the network's outputs stand for: regions (region-based plans) or foreground classes."""
    if plans.region_based:
        return [(name, list(values)) for name, values in plans.regions.items()]
    names = {v: n for n, v in plans.labels.items()}
    return [(names.get(c, str(c)), [c]) for c in range(1, plans.num_classes)]


def pseudo_dice_counts(logits: torch.Tensor, target: torch.Tensor, plans: Plans) -> np.ndarray:
    """Per output structure (tp, fp, fn) summed over the batch: argmax for classes, sigmoid > 0.5 for
    regions; ignore-label voxels are left out."""
    tgt = target[:, 0].long()
    valid = (
        tgt != plans.ignore_label
        if plans.ignore_label is not None
        else torch.ones_like(tgt, dtype=torch.bool)
    )
    rows = []
    for i, (_, values) in enumerate(output_structures(plans)):
        truth = torch.isin(tgt, torch.tensor(values, device=tgt.device)) & valid
        if plans.region_based:
            pred = (logits[:, i] > 0) & valid
        else:
            pred = (logits.argmax(1) == values[0]) & valid
        rows.append([(pred & truth).sum().item(), (pred & ~truth).sum().item(), (~pred & truth).sum().item()])
    return np.array(rows, dtype=np.float64)


def cut_epoch_val_iters(val_iters: int, done: int, total: int) -> int:
    """Validation batches of an epoch the time budget cut after ``done`` of ``total`` iterations: the same
    share of ``val_iters``, at least one (none stays none), so a cut epoch's validation costs no more of the
    clock than its training did relative to a whole epoch (50 full-size batches of a CPU run once took as
    long as the 30-minute budget itself)."""
    if val_iters <= 0:
        return 0
    return max(1, math.ceil(val_iters * done / max(total, 1)))


def validate_patches(
    run: TrainingRun,
    model: torch.nn.Module,
    val_store: CaseStore | None,
    epoch: int,
    iterations: int | None = None,
) -> tuple[float | None, dict[str, float]]:
    """``(loss, pseudo-Dice per output structure)`` of ``model`` on ``iterations`` (default ``val_iters``)
    batches of unaugmented patches (foreground-oversampled like training); ``(None, {})`` without validation
    cases or iterations. Under DDP each rank scores its share and the counts are summed."""
    settings, config, w = run.settings, run.config, run.world
    iterations = settings.val_iters if iterations is None else iterations
    if val_store is None or iterations <= 0:
        return None, {}
    # a fresh generator per epoch: validation never disturbs the training random state
    rng = np.random.default_rng([settings.seed, 999, w.rank, epoch])
    batch_size = distributed.rank_batch_size(config.batch_size, w)
    sampler = PatchSampler(
        val_store, config.patch_size, batch_size, config.dim, settings.oversample_foreground, rng
    )
    model.eval()
    structures = output_structures(run.plans)
    counts = np.zeros((len(structures), 3))
    losses = []
    precision = run.precision
    with torch.no_grad():
        for _ in range(iterations):
            batch = network_batch(center_crop(sampler.next_batch(), config.patch_size), run.plans.num_classes)
            x = torch.from_numpy(batch["data"]).to(run.device)
            y = torch.from_numpy(batch["seg"]).to(run.device)
            maps = torch.from_numpy(batch["dist"]).to(run.device) if "dist" in batch else None
            with torch.autocast(run.device.type, dtype=precision.dtype, enabled=precision.autocast):
                out = model(x)
                losses.append(float(run.loss_fn(out, y, maps)))
            counts += pseudo_dice_counts(out.float(), y, run.plans)
    counts = distributed.sum_over_ranks(counts, w)
    val_loss = distributed.mean_over_ranks(float(np.mean(losses)), w)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denom = 2 * tp + fp + fn
    dice = {
        name: (float(2 * tp[i] / denom[i]) if denom[i] > 0 else float("nan"))
        for i, (name, _) in enumerate(structures)
    }
    return val_loss, dice
