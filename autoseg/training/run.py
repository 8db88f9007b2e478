"""What a training run is made of before its first epoch: the fold's cases and folder, the network, optimizer,
loss and mixed precision, and the batch loader's description. Built once per run by :func:`build_run`.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from autoseg.atomic import remove_stale_temporaries, temp_target
from autoseg.errors import AutosegError, PlansError
from autoseg.fingerprint import Fingerprint
from autoseg.inference.predictor import topology_key
from autoseg.jsonio import read_json, write_json
from autoseg.layout import WorkDir
from autoseg.loss_spec import DEFAULT_LOSS, LossSpecError, check_for_plans, parse_loss
from autoseg.networks import build_network
from autoseg.networks.heads import set_output_bias
from autoseg.networks.losses import CompositeLoss, DeepSupervisionLoss
from autoseg.planning.plans import Configuration, Plans
from autoseg.preprocessing.distance_maps import ensure_distance_maps, map_channels
from autoseg.settings import RECIPE_KEYS, SettingError, TrainSettings
from autoseg.training import distributed
from autoseg.training.augmentation import augmentation_patch_size
from autoseg.training.class_weights import class_weights, output_prior
from autoseg.training.dataloader import LoaderSpec, default_workers
from autoseg.training.splits import fold_cases, load_or_create_splits, repeated_split_note

_log = logging.getLogger("autoseg")


@dataclass
class Precision:
    """Mixed precision: autocast on CUDA (bfloat16 where supported, else float16 with a gradient scaler)."""

    autocast: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler

    @classmethod
    def for_device(cls, device: torch.device) -> Precision:
        amp = device.type == "cuda"
        dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        return cls(amp, dtype, torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16))


@dataclass
class TrainingRun:
    """Everything fixed for the length of one run of one fold (what changes per epoch is a
    :class:`autoseg.training.state.RunState`)."""

    work: WorkDir
    config_name: str
    fold: int | str
    settings: TrainSettings
    device: torch.device
    world: distributed.World
    plans: Plans
    config: Configuration
    data_dir: Path
    train_ids: list[str]
    val_ids: list[str]
    previous_dir: Path | None
    """The previous stage's predictions (a cascade's extra input), else None."""
    network: torch.nn.Module
    """The network whose weights are trained and saved (the model that runs the batches may wrap it)."""
    optimizer: torch.optim.Optimizer
    loss_fn: DeepSupervisionLoss
    precision: Precision
    topology: dict
    """What a checkpoint of this run must match (:func:`autoseg.inference.predictor.topology_key`)."""
    distance_maps: bool = False
    """The loss has a boundary term: batches carry the cases' stored signed distance maps."""

    @property
    def folder(self) -> Path:
        return self.work.fold_dir(self.config_name, self.fold)

    @property
    def latest(self) -> Path:
        return self.folder / WorkDir.CHECKPOINT_LATEST

    @property
    def final(self) -> Path:
        return self.folder / WorkDir.CHECKPOINT_FINAL

    @property
    def fold_index(self) -> int:
        """The fold as a number for seeding batches (``all`` is 5)."""
        return 5 if str(self.fold) == "all" else int(self.fold)


def build_run(
    work: WorkDir,
    config_name: str,
    fold: int | str,
    settings: TrainSettings,
    device: torch.device,
    resume: bool,
    overwrite: bool = False,
) -> TrainingRun:
    """Check plans, data and the fold folder, prepare the folder (rank 0), then seed torch and build the
    network, optimizer and loss of ``config_name`` on ``fold``. ``overwrite``: delete the fold's earlier
    run, once plans, data and splits have been checked."""
    w = distributed.world()
    plans = Plans.load(work.plans)
    config = plans.configuration(config_name)
    data_dir = work.preprocessed(config.data_identifier)
    train_ids, val_ids = _fold_cases(work, data_dir, fold, settings)
    previous_dir = previous_stage_dir(work, config, train_ids + val_ids)
    out_dir = work.fold_dir(config_name, fold)
    loss_fn = make_loss(plans, config.batch_dice, settings.loss, work)  # checked before the folder is touched
    if overwrite and not resume:  # every check above passed: only now is the earlier run deleted
        shutil.rmtree(out_dir, ignore_errors=True)
    record = {"train": settings.to_json(), "config": config_name, "fold": str(fold), "processes": w.size}
    _prepare_folder(out_dir, val_ids, resume, w, record)
    distance_maps = uses_distance_maps(settings.loss)
    if distance_maps:
        prepare_distance_maps(plans, data_dir, w)
    configure_torch(settings, device)
    network = build_network(config.network, plans.input_channels(config_name), plans.num_outputs).to(device)
    network.deep_supervision = settings.deep_supervision
    if settings.output_prior:  # resumed runs load their weights over it (one killed early starts anew)
        _set_prior(network, plans, work, w.is_main)
    optimizer = make_optimizer(settings, network.parameters())
    return TrainingRun(
        work=work,
        config_name=config_name,
        fold=fold,
        settings=settings,
        device=device,
        world=w,
        plans=plans,
        config=config,
        data_dir=data_dir,
        train_ids=train_ids,
        val_ids=val_ids,
        previous_dir=previous_dir,
        network=network,
        optimizer=optimizer,
        loss_fn=loss_fn,
        precision=Precision.for_device(device),
        topology=topology_key(plans, config_name),
        distance_maps=distance_maps,
    )


def uses_distance_maps(loss: str) -> bool:
    """The loss expression has a boundary term, which reads the cases' stored signed distance maps."""
    return any(t.name == "boundary" for t in parse_loss(loss).terms)


def prepare_distance_maps(plans: Plans, data_dir: Path, w: distributed.World) -> None:
    """Make the signed distance maps of every case of ``data_dir`` that has none current (rank 0; the other
    ranks wait), so this run, later runs and the other folds read them
    (:mod:`autoseg.preprocessing.distance_maps`)."""
    if w.is_main:
        case_ids = sorted(p.stem for p in data_dir.glob("*.json"))
        ensure_distance_maps(data_dir, case_ids, map_channels(plans), plans.ignore_label)
    distributed.from_main(0, w)  # a barrier: every rank reads the maps only once rank 0 has made them


def _fold_cases(
    work: WorkDir, data_dir: Path, fold: int | str, settings: TrainSettings
) -> tuple[list[str], list[str]]:
    """The fold's training and validation cases (``all``: every case, no validation and no split needed, so a
    one-case dataset trains too)."""
    case_ids = sorted(p.stem for p in data_dir.glob("*.json"))
    if not case_ids:
        raise PlansError(f"{data_dir}: no preprocessed cases (run 'autoseg plan' first)")
    if str(fold) == "all":
        return list(case_ids), []
    splits = load_or_create_splits(work.splits, case_ids, settings.num_folds, settings.seed)
    repeated = repeated_split_note(splits, fold)
    if repeated and distributed.world().is_main:
        _log.warning("%s", repeated)
    return fold_cases(splits, fold, case_ids)


def _prepare_folder(
    out_dir: Path, val_ids: list[str], resume: bool, w: distributed.World, record: dict
) -> None:
    """Refuse to start over an earlier run unless resuming; on rank 0 create the folder, delete what killed
    runs left half-written and write the run's settings (``record``) to ``settings.json``."""
    latest = out_dir / WorkDir.CHECKPOINT_LATEST
    if latest.exists() and not resume:
        raise AutosegError(
            f"{latest}: this fold already has a run; use --resume to continue it, or --overwrite to start again"
        )
    if resume and latest.exists():
        check_same_recipe(out_dir / WorkDir.FOLD_SETTINGS, record["train"])
    if w.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out_dir, val_ids)
        write_json(out_dir / WorkDir.FOLD_SETTINGS, record)


def _set_prior(network: torch.nn.Module, plans: Plans, work: WorkDir, report: bool) -> None:
    """Output biases at the fingerprint's log class frequencies (``output_prior``); says so, or why not."""
    if not work.fingerprint.is_file():
        if report:
            _log.info("output prior: not set (no fingerprint.json in %s)", work.root)
        return
    prior = output_prior(Fingerprint.from_json(read_json(work.fingerprint)), plans)
    layers = set_output_bias(network, prior)
    if report:
        _log.info(
            "output prior: %s",
            f"{layers} output layer(s) start at biases {', '.join(f'{b:.2f}' for b in prior)}"
            if layers
            else "not set (the network declares no output layer)",
        )


def make_loss(
    plans: Plans, batch_dice: bool, loss: str = DEFAULT_LOSS, work: WorkDir | None = None
) -> DeepSupervisionLoss:
    """The loss expression ``loss`` on every deep-supervision output: one sigmoid per region for a
    region-based plan, else softmax classes. Class weights ``auto`` come from ``work``'s fingerprint."""
    expr = parse_loss(loss)
    try:
        check_for_plans(expr, plans.region_based, plans.num_classes)
    except LossSpecError as exc:
        raise SettingError("loss", loss, str(exc)) from None
    weights = None
    if any(dict(t.params).get("weights") == "auto" for t in expr.terms):
        if work is None or not work.fingerprint.is_file():
            raise AutosegError(
                f"loss {loss}: weights=auto needs the fingerprint.json that 'autoseg plan' writes"
            )
        weights = class_weights(Fingerprint.from_json(read_json(work.fingerprint)), plans)
    inner = CompositeLoss(
        expr,
        regions=plans.training_regions if plans.region_based else None,
        batch_dice=batch_dice,
        ignore_label=plans.ignore_label,
        class_weights=weights,
    )
    return DeepSupervisionLoss(inner)


def make_optimizer(settings: TrainSettings, params) -> torch.optim.Optimizer:
    """SGD (``momentum``, ``nesterov``), Adam or AdamW at ``initial_lr`` with ``weight_decay`` (decoupled
    for AdamW, an L2 term for the others)."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.initial_lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.initial_lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        params,
        lr=settings.initial_lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov,
        weight_decay=settings.weight_decay,
    )


def check_same_recipe(settings_file: Path, train: dict) -> None:
    """A resumed run keeps its recipe (loss, optimizer, schedule, warmup): refuse, in one line, settings that
    change what the run's ``settings.json`` recorded (a run from before these settings had the defaults)."""
    if not settings_file.is_file():
        return
    recorded = read_json(settings_file).get("train", {})
    defaults = TrainSettings().to_json()
    for key in RECIPE_KEYS:
        before = recorded.get(key, defaults[key])
        if before != train[key]:
            raise AutosegError(
                f"{settings_file}: the run was trained with {key} = {before!r}, now {train[key]!r}; --resume "
                "needs the same recipe (use --overwrite to start again with the new one)"
            )


def configure_torch(settings: TrainSettings, device: torch.device) -> None:
    """Seeds and algorithm choices for a run: deterministic algorithms when asked, else cuDNN autotuning."""
    torch.manual_seed(settings.seed)
    if settings.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        if device.type == "cuda":
            # cuBLAS reads this when it creates its workspace: set it, never read it
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def previous_stage_dir(work: WorkDir, config: Configuration, case_ids: list[str]) -> Path | None:
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


def loader_spec(run: TrainingRun) -> LoaderSpec:
    """What the batch loader's workers need to make this rank's training batches."""
    settings, config = run.settings, run.config
    return LoaderSpec(
        data_dir=run.data_dir,
        case_ids=tuple(run.train_ids),
        previous_dir=run.previous_dir,
        extract_size=tuple(augmentation_patch_size(config.patch_size, settings.augmentation)),
        patch_size=tuple(config.patch_size),
        batch_size=distributed.rank_batch_size(config.batch_size, run.world),
        dim=config.dim,
        oversample_foreground=settings.oversample_foreground,
        augmentation=settings.augmentation,
        spacing=tuple(config.spacing),
        num_classes=run.plans.num_classes,
        seed=settings.seed,
        fold_index=run.fold_index,
        rank=run.world.rank,
        distance_maps=run.distance_maps,
    )


def loader_workers(settings: TrainSettings, w: distributed.World) -> int:
    """Augmentation processes of this rank: as set, or by default the machine's share of this rank."""
    workers = settings.loader_workers if settings.loader_workers >= 0 else default_workers()
    if w.distributed and settings.loader_workers < 0:
        workers = max(0, workers // w.size)
    return workers


def batch_model(run: TrainingRun) -> torch.nn.Module:
    """The model that runs the batches: the network, compiled on CUDA and wrapped for DDP (the network itself
    keeps the weights that are saved)."""
    model: torch.nn.Module = run.network
    if run.settings.compile and run.device.type == "cuda":
        model = torch.compile(model)
    if run.world.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=True,  # the lowest-resolution head has deep-supervision weight 0
        )
    return model


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
