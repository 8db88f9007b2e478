"""The training loop for one fold: a composition of data loading, loss, schedule, checkpoints and logging.

Per epoch: ``iters_per_epoch`` augmented batches (made by :mod:`autoseg.training.dataloader` in worker
processes, each batch a pure function of seed, fold, rank, epoch and iteration, so a resumed run continues
exactly), then ``val_iters`` unaugmented batches from the validation cases for a pseudo-Dice, a line in
``log.jsonl``, ``progress.png`` and an atomic ``checkpoint_latest.pt``. With a time budget the poly schedule
runs on the clock (the fraction of the budget used when an epoch starts), the number of epochs is
re-estimated from the mean epoch time so far, and the epoch during which the budget runs out is cut there. After the last epoch: ``checkpoint_final.pt``, then the fold's validation cases are predicted with
the full sliding-window predictor and scored into ``validation/summary.json``.

Under DDP (``torchrun``) every rank trains on its share of each batch; rank 0 alone writes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.atomic import remove_stale_temporaries, temp_target
from autoseg.checkpoint_io import check_compatible, load_checkpoint, save_checkpoint
from autoseg.errors import AutosegError, PlansError
from autoseg.evaluation.evaluate import evaluate_folders
from autoseg.inference.cascade import append_previous_stage, next_stage_segmentation
from autoseg.inference.export import (
    probabilities_to_original,
    probabilities_to_segmentation,
    write_segmentation,
)
from autoseg.inference.predictor import Predictor, topology_key
from autoseg.io.dataset import load_dataset_json
from autoseg.jsonio import save_npy, save_npz, write_json, write_text
from autoseg.layout import WorkDir
from autoseg.networks import build_network
from autoseg.planning.plans import Plans
from autoseg.preprocessing.pipeline import load_case_properties
from autoseg.settings import InferenceSettings, TrainSettings
from autoseg.training import distributed
from autoseg.training.augmentation import augmentation_patch_size, center_crop
from autoseg.training.dataloader import BatchLoader, LoaderSpec, default_workers, network_batch
from autoseg.training.losses import DeepSupervisionLoss, DiceCELoss, RegionDiceBCELoss
from autoseg.training.progress import plot_progress, read_log
from autoseg.training.sampling import CaseStore, PatchSampler
from autoseg.training.schedule import budget_epochs, poly_lr, set_lr
from autoseg.training.splits import fold_cases, load_or_create_splits

EMA_DECAY = 0.9
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


def output_structures(plans: Plans) -> list[tuple[str, list[int]]]:
    """What the network's outputs stand for: regions (region-based plans) or foreground classes."""
    if plans.region_based:
        return [(name, list(values)) for name, values in plans.regions.items()]
    names = {v: n for n, v in plans.labels.items()}
    return [(names.get(c, str(c)), [c]) for c in range(1, plans.num_classes)]


def _pseudo_dice(logits: torch.Tensor, target: torch.Tensor, plans: Plans) -> np.ndarray:
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


def make_loss(plans: Plans, batch_dice: bool) -> DeepSupervisionLoss:
    if plans.region_based:
        inner = RegionDiceBCELoss(
            plans.training_regions, batch_dice=batch_dice, ignore_label=plans.ignore_label
        )
    else:
        inner = DiceCELoss(batch_dice=batch_dice, ignore_label=plans.ignore_label)
    return DeepSupervisionLoss(inner)


def configure_torch(settings: TrainSettings, device: torch.device) -> None:
    """Seeds and algorithm choices for a run: deterministic algorithms when asked, else cuDNN autotuning."""
    torch.manual_seed(settings.seed)
    if settings.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        if device.type == "cuda":
            import os  # cuBLAS reads this when it creates its workspace: set it, never read it

            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def train_fold(
    work: WorkDir,
    config_name: str,
    fold: int | str,
    settings: TrainSettings,
    device: torch.device,
    resume: bool = False,
    inference: InferenceSettings = InferenceSettings(),
    on_iteration: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train ``config_name`` on ``fold`` (0..4 or ``all``) and validate; returns the fold folder.
    ``overwrite``: delete the fold's earlier run, once plans, data and splits have been checked.

    ``on_iteration(done, total, loss)`` and ``on_epoch(report)`` are called on rank 0 only.
    """
    w = distributed.world()
    plans = Plans.load(work.plans)
    config = plans.configuration(config_name)
    if inference.mirroring and not any(a < config.dim for a in inference.mirror_axes):
        raise AutosegError(
            f"mirror_axes {list(inference.mirror_axes)}: configuration '{config_name}' is 2D (patch axes 0 "
            "and 1), so the final validation would mirror nothing; use --no-mirroring for that"
        )
    data_dir = work.preprocessed(config.data_identifier)
    case_ids = sorted(p.stem for p in data_dir.glob("*.json"))
    if not case_ids:
        raise PlansError(f"{data_dir}: no preprocessed cases (run 'autoseg plan' first)")
    if str(fold) == "all":  # every case, no validation: needs no split (works for a one-case dataset)
        train_ids, val_ids = list(case_ids), []
    else:
        splits = load_or_create_splits(work.splits, case_ids, settings.num_folds, settings.seed)
        train_ids, val_ids = fold_cases(splits, fold, case_ids)
    out_dir = work.fold_dir(config_name, fold)
    latest, final = out_dir / WorkDir.CHECKPOINT_LATEST, out_dir / WorkDir.CHECKPOINT_FINAL
    previous_dir = _previous_stage_dir(work, config, train_ids + val_ids)
    if overwrite and not resume:  # every check above passed: only now is the earlier run deleted
        shutil.rmtree(out_dir, ignore_errors=True)
    if latest.exists() and not resume:
        raise AutosegError(
            f"{latest}: this fold already has a run; use --resume to continue it, or --overwrite to start again"
        )
    if w.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out_dir, val_ids)
        write_json(
            out_dir / WorkDir.FOLD_SETTINGS,
            {"train": settings.to_json(), "config": config_name, "fold": str(fold), "processes": w.size},
        )

    fold_index = 5 if str(fold) == "all" else int(fold)
    configure_torch(settings, device)
    k = plans.num_classes
    network = build_network(config.network, plans.input_channels(config_name), plans.num_outputs).to(device)
    network.deep_supervision = settings.deep_supervision
    optimizer = torch.optim.SGD(
        network.parameters(),
        lr=settings.initial_lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )
    loss_fn = make_loss(plans, config.batch_dice)
    amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    key = topology_key(plans, config_name)

    start_epoch, best_ema, ema, elapsed, planned = 0, -1.0, None, 0.0, settings.epochs
    if resume and latest.exists():
        ckpt = load_checkpoint(latest, map_location=device)
        check_compatible(ckpt, latest, config_name, key)
        network.load_state_dict(ckpt["network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        if isinstance(ckpt.get("rng"), dict) and "torch" in ckpt["rng"]:
            torch.set_rng_state(ckpt["rng"]["torch"])
        start_epoch = int(ckpt["epoch"])
        best_ema = float(ckpt.get("best_ema", -1.0))
        ema = ckpt.get("ema")
        elapsed = float(ckpt.get("elapsed_seconds", 0.0))
        if settings.time_budget_minutes > 0 and "planned_epochs" in ckpt:
            planned = min(settings.epochs, max(start_epoch, int(ckpt["planned_epochs"])))
    summary = out_dir / WorkDir.VALIDATION / WorkDir.SUMMARY
    if resume and final.exists() and start_epoch >= planned and (summary.exists() or not val_ids):
        return out_dir  # finished earlier, nothing to extend
    if w.is_main:
        _truncate_log(out_dir / WorkDir.LOG, start_epoch)

    # the model that runs the batches: compiled on CUDA, wrapped for DDP; `network` keeps the weights
    model: torch.nn.Module = network
    if settings.compile and device.type == "cuda":
        model = torch.compile(model)
    if w.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # the lowest-resolution head has deep-supervision weight 0
        )

    spec = LoaderSpec(
        data_dir=data_dir,
        case_ids=tuple(train_ids),
        previous_dir=previous_dir,
        extract_size=tuple(augmentation_patch_size(config.patch_size, settings.augmentation)),
        patch_size=tuple(config.patch_size),
        batch_size=distributed.rank_batch_size(config.batch_size, w),
        dim=config.dim,
        oversample_foreground=settings.oversample_foreground,
        augmentation=settings.augmentation,
        num_classes=k,
        seed=settings.seed,
        fold_index=fold_index,
        rank=w.rank,
    )
    workers = settings.loader_workers if settings.loader_workers >= 0 else default_workers()
    if w.distributed and settings.loader_workers < 0:
        workers = max(0, workers // w.size)
    # built once: its memory maps and previous-stage maps are reused every epoch
    val_store = CaseStore(data_dir, val_ids, previous_dir) if val_ids else None

    def state(epoch: int, resumable: bool = True) -> dict:
        """Checkpoint contents; ``checkpoint_best`` and ``checkpoint_final`` (for prediction) leave out the
        optimizer and scaler, which only ``checkpoint_latest`` needs to resume, and are half the size."""
        training = (
            {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            }
            if resumable
            else {}
        )
        return {
            "network": network.state_dict(),
            **training,
            "epoch": epoch,
            "config": config_name,
            "topology": json.dumps(key),
            "rng": {"torch": torch.get_rng_state()},
            "best_ema": best_ema,
            "ema": ema,
            "elapsed_seconds": elapsed,
            "planned_epochs": planned,
        }

    epoch = start_epoch
    budget_s = settings.time_budget_minutes * 60
    if w.is_main:
        _log.info(
            "%s fold %s: %d training / %d validation cases; epochs %d-%d of %d x %d iterations%s; batch %d, "
            "patch %s; %s, %d augmentation worker(s)%s",
            config_name,
            fold,
            len(train_ids),
            len(val_ids),
            start_epoch + 1,
            planned,
            settings.epochs,
            settings.iters_per_epoch,
            f" within {settings.time_budget_minutes:g} min" if budget_s else "",
            config.batch_size,
            "x".join(map(str, config.patch_size)),
            device,
            workers,
            f", {w.size} processes" if w.distributed else "",
        )
    with BatchLoader(spec, workers) as loader:
        while epoch < planned:
            t0 = time.perf_counter()
            if settings.time_budget_minutes > 0:  # the schedule runs on the clock: it ends with the budget
                lr = poly_lr(
                    settings.initial_lr, elapsed, settings.time_budget_minutes * 60, settings.poly_exponent
                )
            else:
                lr = poly_lr(settings.initial_lr, epoch, planned, settings.poly_exponent)
            set_lr(optimizer, lr)
            model.train()
            losses, wait = [], 0.0
            t_train = time.perf_counter()
            batches = loader.epoch(epoch, settings.iters_per_epoch)
            out_of_time = False
            for it in range(settings.iters_per_epoch):
                tw = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - tw
                x = torch.from_numpy(batch["data"]).to(device, non_blocking=True)
                y = torch.from_numpy(batch["seg"]).to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(network.parameters(), settings.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
                if on_iteration and w.is_main:
                    on_iteration(it + 1, settings.iters_per_epoch, losses[-1])
                if budget_s and not w.distributed and elapsed + time.perf_counter() - t0 >= budget_s:
                    out_of_time = it + 1 < settings.iters_per_epoch  # the budget is a hard limit
                    if out_of_time:
                        _log.warning(
                            "time budget used up after %d of %d iterations of epoch %d: training ends here",
                            it + 1,
                            settings.iters_per_epoch,
                            epoch + 1,
                        )
                    break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - t_train

            val_loss, dice = _validate(
                plans, model, loss_fn, val_store, config, settings, epoch, device, amp, amp_dtype, k, w
            )
            train_loss = distributed.mean_over_ranks(float(np.mean(losses)), w)
            if not np.isfinite(train_loss):  # every rank sees the same mean, so all stop together
                raise AutosegError(
                    f"{out_dir}: the training loss became {train_loss} in epoch {epoch + 1}; training stopped "
                    f"({latest.name} holds the last epoch with a finite loss, if any). Check the intensities of "
                    "the images, or lower initial_lr"
                )
            mean_dice = float(np.nanmean(list(dice.values()))) if dice else None
            if mean_dice is not None and np.isfinite(mean_dice):
                ema = mean_dice if ema is None else EMA_DECAY * ema + (1 - EMA_DECAY) * mean_dice
            epoch += 1
            seconds = time.perf_counter() - t0
            started_at = elapsed
            elapsed += seconds  # this epoch's logging and checkpoints are added below
            if budget_s:
                planned = budget_epochs(budget_s, elapsed, epoch, settings.epochs)
                planned = epoch if out_of_time else distributed.from_main(planned, w)
                if epoch == start_epoch + 1 and seconds > settings.time_budget_minutes * 60 / 4 and w.is_main:
                    _log.warning(
                        "one epoch (%d iterations) took %.0f s of the %.0f s budget: the schedule has few "
                        "steps; use fewer --iters-per-epoch for short budgets",
                        settings.iters_per_epoch,
                        seconds,
                        settings.time_budget_minutes * 60,
                    )
            report = EpochReport(
                epoch=epoch,
                epochs=planned,
                train_loss=train_loss,
                val_loss=val_loss,
                pseudo_dice=dice,
                ema_dice=ema,
                lr=lr,
                seconds=seconds,
                train_seconds=train_seconds,
                data_wait_seconds=wait,
                elapsed_seconds=started_at,
            )
            t_save = time.perf_counter()
            if w.is_main:
                _log_epoch(out_dir, report)
                if ema is not None and ema > best_ema:
                    best_ema = ema
                    save_checkpoint(out_dir / WorkDir.CHECKPOINT_BEST, state(epoch, resumable=False))
                save_checkpoint(latest, state(epoch))
                if on_epoch:
                    on_epoch(report)
            elapsed += time.perf_counter() - t_save

    if not w.is_main:
        return out_dir
    save_checkpoint(final, state(epoch, resumable=False))
    if val_ids:
        validate_fold(work, plans, config_name, fold, val_ids, device, inference)
    return out_dir


def _log_epoch(out_dir: Path, report: EpochReport) -> None:
    """Append the epoch to ``log.jsonl`` (NaN written as null: the file stays strict JSON) and redraw
    ``progress.png``."""
    record = json.loads(json.dumps(asdict(report)).replace("NaN", "null"))
    with open(out_dir / WorkDir.LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, allow_nan=False) + "\n")
    plot_progress(read_log(out_dir / WorkDir.LOG), out_dir / WorkDir.PROGRESS)


def _validate(plans, network, loss_fn, val_store, config, settings, epoch, device, amp, amp_dtype, k, w):
    """Pseudo-Dice on ``val_iters`` unaugmented patches (foreground-oversampled like training); under DDP
    each rank scores its share and the counts are summed."""
    if val_store is None or settings.val_iters <= 0:
        return None, {}
    # a fresh generator per epoch: validation never disturbs the training random state
    rng = np.random.default_rng([settings.seed, 999, w.rank, epoch])
    sampler = PatchSampler(
        val_store,
        config.patch_size,
        distributed.rank_batch_size(config.batch_size, w),
        config.dim,
        settings.oversample_foreground,
        rng,
    )
    network.eval()
    structures = output_structures(plans)
    counts = np.zeros((len(structures), 3))
    losses = []
    with torch.no_grad():
        for _ in range(settings.val_iters):
            batch = network_batch(center_crop(sampler.next_batch(), config.patch_size), k)
            x = torch.from_numpy(batch["data"]).to(device)
            y = torch.from_numpy(batch["seg"]).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                out = network(x)
                losses.append(float(loss_fn(out, y)))
            counts += _pseudo_dice(out.float(), y, plans)
    counts = distributed.sum_over_ranks(counts, w)
    val_loss = distributed.mean_over_ranks(float(np.mean(losses)), w)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    denom = 2 * tp + fp + fn
    dice = {
        name: (float(2 * tp[i] / denom[i]) if denom[i] > 0 else float("nan"))
        for i, (name, _) in enumerate(structures)
    }
    return val_loss, dice


def validate_fold(
    work: WorkDir,
    plans: Plans,
    config_name: str,
    fold: int | str,
    val_ids: list[str],
    device: torch.device,
    inference: InferenceSettings,
) -> dict:
    """Predict the fold's validation cases from their preprocessed arrays with the final checkpoint, export
    them in the original geometry to ``validation/`` and score them against ``WORK/gt_segmentations``."""
    config = plans.configuration(config_name)
    predictor = Predictor(
        work, config_name, [fold], device, inference, plans=plans, with_previous_stage=False
    )
    data_dir = work.preprocessed(config.data_identifier)
    previous_dir = _previous_stage_dir(work, config, val_ids)
    # a stage that feeds a cascade also exports its validation predictions onto the cascade's grid
    feeds = [c for c in plans.configurations.values() if c.previous_stage == config_name]
    out = work.validation(config_name, fold)
    for case_id in val_ids:
        image = np.load(data_dir / f"{case_id}.npy")
        props = load_case_properties(data_dir, case_id)
        if previous_dir is not None:
            image = append_previous_stage(image, np.load(previous_dir / f"{case_id}.npy"), plans.num_classes)
        probs = predictor.predict_preprocessed(image)
        # kept for find-best: ensembles of configurations are scored on these, in the original geometry
        save_npz(out / f"{case_id}.npz", probabilities=probabilities_to_original(probs, props, plans))
        write_segmentation(
            probabilities_to_segmentation(probs, props, plans), props, out / f"{case_id}{plans.file_ending}"
        )
        for nxt in feeds:
            target = load_case_properties(work.preprocessed(nxt.data_identifier), case_id).shape_resampled
            seg = next_stage_segmentation(probs, config.spacing, target, plans)
            save_npy(work.next_stage(config_name) / f"{case_id}.npy", seg)
    spec = load_dataset_json(work.dataset_json)
    return evaluate_folders(work.gt_segmentations, out, spec, out / WorkDir.SUMMARY, out / WorkDir.PER_CASE)


def _previous_stage_dir(work: WorkDir, config, case_ids: list[str]) -> Path | None:
    """Folder of the previous stage's predictions for a cascade configuration (None otherwise); every case
    needed must be there, or the user is told which folds of the previous stage to train first."""
    if not config.previous_stage:
        return None
    folder = work.next_stage(config.previous_stage)
    missing = [c for c in case_ids if not (folder / f"{c}.npy").is_file()]
    if missing:
        raise AutosegError(
            f"{folder}: no {config.previous_stage} prediction for {len(missing)} case(s) (e.g. {missing[0]}); "
            f"train every fold of {config.previous_stage} first: their validation predictions feed "
            f"{config.name}"
        )
    return folder


_FOLD_FILES = (
    WorkDir.CHECKPOINT_LATEST,
    WorkDir.CHECKPOINT_BEST,
    WorkDir.CHECKPOINT_FINAL,
    WorkDir.FOLD_SETTINGS,
    WorkDir.LOG,
    WorkDir.PROGRESS,
)
_VALIDATION_FILES = (WorkDir.SUMMARY, WorkDir.PER_CASE, WorkDir.REPORT)


def _remove_stale_temporaries(out_dir: Path, val_ids: list[str]) -> None:
    """Delete the temporary files (:mod:`autoseg.atomic`'s names, from autoseg's atomic writes) that a killed run
    left in the fold folder and its ``validation/``; nothing else is touched."""
    owners = {out_dir: _FOLD_FILES, out_dir / WorkDir.VALIDATION: _VALIDATION_FILES + tuple(val_ids)}
    for folder, names in owners.items():
        if not folder.is_dir():
            continue
        targets = [temp_target(f.name) for f in folder.iterdir()]
        owned = [t for t in targets if t and any(t == n or t.startswith(n + ".") for n in names)]
        remove_stale_temporaries(folder, owned)


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
