"""autoseg's Python API: one function per stage. The CLI is a thin layer over these.

>>> from autoseg import api
>>> api.plan("Dataset003_SpinalCordTiny", "work")                      # doctest: +SKIP
>>> api.train("work", "3d_fullres", 0, epochs=5, iters_per_epoch=20)    # doctest: +SKIP
>>> api.predict("work", "imagesTs", "predictions", folds=[0])           # doctest: +SKIP
>>> api.evaluate("labelsTs", "predictions", "dataset.json")             # doctest: +SKIP
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg.errors import AutosegError, PlansError
from autoseg.fingerprint import Fingerprint, compute_fingerprint
from autoseg.io.dataset import check_training_labels, discover_cases, discover_inputs, load_dataset_json
from autoseg.jsonio import DiskFullError, read_json, write_json
from autoseg.layout import MAX_FOLDS, WorkDir, fold_names, fold_range
from autoseg.loss_spec import LossSpecError, check_for_plans, parse_loss
from autoseg.planning.budget import MIN_STEPS, BudgetRequest
from autoseg.planning.device import DeviceTimer, device_available
from autoseg.planning.device import default_cache as default_step_cache
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import Plans, carry_over
from autoseg.preprocessing.pipeline import preprocess_dataset
from autoseg.settings import MAX_WORKERS, InferenceSettings, SettingError, inference_settings, load_settings
from autoseg.settings import TrainSettings as TrainSettings  # re-exported: the CLI's option defaults
from autoseg.undo import Undo

if TYPE_CHECKING:
    import torch

Progress = Callable[[str, int, int], None]  # (stage description, done, total)
DEFAULT_WORKERS = 2
"""Worker processes of plan, evaluate and find-best unless told otherwise."""
DEFAULT_TOLERANCE_MM = 1.0
DEFAULT_MIRROR_TOLERANCE = 0.001
"""find-best records the cheapest test-time mirroring whose mean Dice is within this of the best (0.1 points)."""
"""Tolerance of evaluate's normalised surface Dice."""
_log = logging.getLogger("autoseg")


def _under(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def plan(
    dataset_dir: str | Path,
    workdir: str | Path,
    gpu_memory_gb: float | None = None,
    device: str | None = None,
    resample_device: str | None = None,
    workers: int = DEFAULT_WORKERS,
    configurations: tuple[str, ...] | None = None,
    clean: bool = False,
    progress: Progress | None = None,
    architecture: str | tuple[str, ...] = "unet",
    fix_nonfinite: bool = False,
    time_budget: float | None = None,
    step_cache: str | Path | None = None,
    min_steps: int | None = None,
) -> Plans:
    """Validate the dataset, fingerprint it, write plans and preprocess every case into ``workdir``.

    With ``time_budget`` (minutes of training), also ``3d_budget``, sized for it on ``device`` (default: the
    best here) to buy ``min_steps`` steps (default ``budget.MIN_STEPS``), timed there, cached in ``step_cache``.
    Nothing is written inside ``dataset_dir``. The fingerprint is reused when the dataset has not changed (same
    files, sizes, mtimes) unless ``clean``; preprocessing resumes where it stopped. ``architecture`` (a name of
    :func:`architectures`; several: a tuple or ``"unet,unetpp"``, a configuration per resolution and
    architecture, :func:`autoseg.planning.planner.configuration_suffix`) is what each is sized for. NaN/Inf
    intensities are an error naming the file, unless ``fix_nonfinite`` (then the finite min/max, warned)."""
    dataset_dir, work = Path(dataset_dir), WorkDir(Path(workdir))
    architecture = parse_architectures(architecture)
    timing = _budget_options(time_budget, device, step_cache, min_steps)
    if timing is not None and device == "cuda" and not timing.present:
        device = None  # planned for a GPU that is not here: its memory budget is the default one
    _check_plan_options(gpu_memory_gb, device, resample_device, workers)
    if _under(work.root, dataset_dir):
        raise AutosegError(f"{work.root}: WORK must not be inside the dataset folder {dataset_dir}")
    if work.root.exists() and not work.root.is_dir():
        raise AutosegError(f"{work.root}: WORK exists and is not a folder")
    for managed in (work.root / "preprocessed", work.gt_segmentations):  # plan replaces these folders
        if _under(dataset_dir, managed):
            raise AutosegError(
                f"{dataset_dir}: the dataset must not be inside {managed}, which plan rewrites"
            )
    spec = load_dataset_json(dataset_dir / "dataset.json")
    check_training_labels(spec, dataset_dir / "dataset.json")
    cases = discover_cases(dataset_dir, spec)
    budget, why = memory_budget(gpu_memory_gb, device)
    _check_same_dataset(work, spec, dataset_dir)
    # a refusal from here on (found while reading every case, or while writing) leaves WORK as it was found
    undo = Undo(work.root, scope=_PLAN_WRITES)
    try:
        plans = _plan_into(
            dataset_dir, work, spec, cases, budget, why, undo, workers, configurations, clean, progress,
            architecture, fix_nonfinite, resample_device, timing,
        )  # fmt: skip
    except (AutosegError, OSError) as exc:
        undo.rollback()
        _raise_plan_failure(exc, work)
    except BaseException:
        undo.commit()  # an interruption: what is done stays, and the next run resumes it
        raise
    undo.commit()
    return plans


def _raise_plan_failure(exc: AutosegError | OSError, work: WorkDir):
    """Re-raise a refusal of :func:`plan` once its writes are rolled back: a full disk says how much space
    preprocessing needs and how much is free, another OSError is one line naming its file."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        exc = DiskFullError(str(exc), exc.filename)
    if isinstance(exc, DiskFullError):  # said once everything this run wrote is gone again
        free = shutil.disk_usage(_existing(work.root)).free
        need = getattr(exc, "need_bytes", None)
        raise DiskFullError(
            f"{exc.path or work.root}: no space left on the disk (ENOSPC) while planning; nothing was kept"
            + (f"; preprocessing needs about {need / 1e9:.2f} GB" if need else "")
            + f", {free / 1e9:.2f} GB are free",
            exc.path,
        ) from None
    if isinstance(exc, OSError):
        raise AutosegError(f"{exc.filename or work.root}: {exc.strerror or exc}") from None
    raise exc


# what plan writes directly under WORK (a refused plan removes nothing else there)
_PLAN_WRITES = ("fingerprint.json", "plans.json", "dataset.json", "gt_segmentations", "preprocessed")


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _previous_plans(work: WorkDir) -> Plans | None:
    """WORK's plans before this re-plan (None on a first plan)."""
    return Plans.load(work.plans) if work.plans.is_file() else None


def _warn_orphans(work: WorkDir, old: Plans | None, new: Plans) -> None:
    """Warn about trained folds that the new plans leave behind: a configuration dropped, or planned anew
    differently (its folds were trained for the previous plan). They stay on disk untouched."""
    for name, cfg in old.configurations.items() if old else ():
        folds = work.trained_folds(name)
        if not folds:
            continue
        where = f"{work.root / 'results' / name} ({len(folds)} trained fold(s))"
        if name not in new.configurations:
            _log.warning(
                "%s: not in the new plans; %s stays on disk, unused (plan with the same --time-budget, "
                "architectures or 'autoseg variant' again to use it)", name, where,
            )  # fmt: skip
        elif new.configurations[name] != cfg:
            _log.warning(
                "%s: planned differently now; %s was trained for the previous plan: train those folds again "
                "(or move the folder aside) before predicting with it", name, where,
            )  # fmt: skip


def _plan_into(
    dataset_dir, work, spec, cases, budget, why, undo, workers, configurations, clean, progress, architecture,
    fix_nonfinite, resample_device, timing,
) -> Plans:  # fmt: skip
    """The writing part of :func:`plan`; every file it replaces is first kept by ``undo``."""
    fp = None if clean else _cached_fingerprint(work, cases, spec)
    fresh_fingerprint = fp is None
    if fp is None:
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress:
                progress("fingerprint", done[0], len(cases))

        fp = compute_fingerprint(cases, spec, workers=workers, progress=tick, fix_nonfinite=fix_nonfinite)
    request = timing.request(spec) if timing is not None else None
    plans = make_plans(spec, fp, gpu_memory_gb=budget, architecture=architecture, budget=request)
    plans.reasons.insert(0, f"memory budget {budget:.3g} GB: {why}")
    old = _previous_plans(work)
    plans, kept = carry_over(old, plans, budget_requested=request is not None)
    for line in kept:
        _log.info("%s", line)
    _warn_orphans(work, old, plans)
    wanted = configurations or tuple(plans.configurations)
    try:
        work.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutosegError(f"{work.root}: cannot create the WORK folder ({exc.strerror or exc})") from None
    if fresh_fingerprint:
        undo.keep(work.fingerprint)
        write_json(work.fingerprint, fp.to_json())
    if clean or (old is not None and old.to_json() != plans.to_json()):
        # stale preprocessed data must not be mixed with new plans (set aside; deleted once planning is done)
        undo.move_aside(work.root / "preprocessed")
    check_disk_space(work, fp, plans, wanted)
    for path in (work.plans, work.dataset_json):
        undo.keep(path)
    plans.save(work.plans)
    write_json(work.dataset_json, {**spec.to_json(), "source": str(dataset_dir.resolve())})
    try:
        _copy_labels(cases, work.gt_segmentations, undo)
        for data_id in sorted({plans.configuration(c).data_identifier for c in wanted}):
            config = next(c for c in plans.configurations.values() if c.data_identifier == data_id)
            preprocess_dataset(
                cases,
                spec,
                plans,
                config,
                work.preprocessed(data_id),
                workers=workers,
                progress=_counter(progress, f"preprocess {data_id}", len(cases)),
                resample_device=resample_device,
                fix_nonfinite=fix_nonfinite,
            )
    except DiskFullError as exc:
        exc.need_bytes = preprocessed_bytes(fp, plans, wanted)
        raise
    return plans


@dataclass(frozen=True)
class _BudgetTiming:
    """``plan --time-budget``'s options, checked: the budget, the device it is for, where step times are
    cached, and whether that device is on this machine (else its steps are assumed, not timed)."""

    minutes: float
    device: str
    cache: Path
    present: bool
    min_steps: int = MIN_STEPS

    def request(self, spec) -> BudgetRequest:
        outputs = len(spec.regions) if spec.region_based else spec.num_classes
        timer = DeviceTimer(self.device, spec.num_channels, outputs, spec.region_based, self.cache)
        return BudgetRequest(self.minutes, self.device, timer, self.min_steps)


def _budget_options(minutes, device, cache, min_steps=None) -> _BudgetTiming | None:
    if minutes is None:
        for option, value in (("--step-cache", cache), ("--min-steps", min_steps)):
            if value is not None:
                raise AutosegError(f"{option} is only used with --time-budget")
        return None
    if min_steps is not None and (
        isinstance(min_steps, bool) or not isinstance(min_steps, int) or not 10 <= min_steps <= 1_000_000
    ):
        raise AutosegError(f"--min-steps {min_steps!r}: must be a whole number of steps from 10 to 1000000")
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes <= 1e6:
        raise AutosegError(f"--time-budget {minutes!r}: must be a number of minutes in (0, 1e6]")
    if device in (None, "auto"):
        device = next(d for d in ("cuda", "mps", "cpu") if device_available(d))
    if device not in ("cpu", "cuda", "mps"):
        raise AutosegError(f"--device {device}: use cpu, cuda, mps or auto")
    cache = Path(cache) if cache is not None else default_step_cache()
    steps = MIN_STEPS if min_steps is None else min_steps
    return _BudgetTiming(float(minutes), device, cache, device_available(device), steps)


def _cached_fingerprint(work: WorkDir, cases, spec) -> Fingerprint | None:
    """WORK's fingerprint when it is of this schema and this dataset (same files, sizes, mtimes), else None."""
    from autoseg.fingerprint import FINGERPRINT_SCHEMA_VERSION, dataset_hash

    if not work.fingerprint.is_file():
        return None
    try:
        raw = read_json(work.fingerprint)
        # an older schema lacks fields that a newer planner may use: recompute rather than guess them
        if raw.get("schema_version") == FINGERPRINT_SCHEMA_VERSION:
            cached = Fingerprint.from_json(raw)
            if cached.dataset_hash == dataset_hash(cases, spec):
                return cached
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return None


PLAN_COLUMNS = ("config", "spacing mm", "patch", "batch", "stages", "memory GB", "step s GPU/CPU")


def plan_rows(plans: Plans) -> list[tuple[str, ...]]:
    """One row per configuration of ``plans`` under :data:`PLAN_COLUMNS`, as ``autoseg plan`` shows them."""
    rows = []
    for name, c in plans.configurations.items():
        step = c.estimated_step_seconds
        rows.append((
            name,
            "×".join(f"{s:.3g}" for s in c.spacing),
            "×".join(map(str, c.patch_size)),
            str(c.batch_size),
            str(c.network.n_stages),
            f"{c.estimated_memory_gb:.2f}",
            f"{step.get('gpu', float('nan')):.3f}/{step.get('cpu', float('nan')):.1f}",
        ))  # fmt: skip
    return rows


def check_workers(workers: int, option: str = "--workers") -> int:
    """A count of worker processes, 1 to :data:`MAX_WORKERS`; else an error naming ``option``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise AutosegError(f"{option} {workers}: must be a whole number from 1 to {MAX_WORKERS}")
    return workers


def _check_plan_options(gpu_memory_gb, device, resample_device, workers) -> None:
    """plan's options, all of them before anything is read or written."""
    check_workers(workers)
    if gpu_memory_gb is not None:
        if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)):
            raise AutosegError(f"--gpu-memory {gpu_memory_gb!r}: must be a number of GB")
        if not math.isfinite(gpu_memory_gb) or not 1.0 < gpu_memory_gb <= MAX_GPU_MEMORY_GB:
            raise AutosegError(
                f"--gpu-memory {gpu_memory_gb:g}: must be more than 1 and at most {MAX_GPU_MEMORY_GB:g} GB"
            )
    if device is not None:
        memory_budget(gpu_memory_gb, device)  # refuses an unknown device, or cuda where there is none
    if resample_device is not None:
        from autoseg.inference.predictor import resolve_device

        if resample_device not in ("cpu", "cuda") and not str(resample_device).startswith("cuda:"):
            raise AutosegError(f"--resample-device {resample_device!r}: use cpu or cuda (or cuda:N)")
        try:
            resolve_device(resample_device)
        except AutosegError as exc:
            raise AutosegError(str(exc).replace("--device", "--resample-device", 1)) from None


MAX_GPU_MEMORY_GB = 4096.0
"""The largest --gpu-memory plan accepts (far above any accelerator; a typo's 1e9 would plan absurd patches)."""


def preprocessed_bytes(fp: Fingerprint, plans: Plans, configurations) -> int:
    """Disk space the preprocessed data of ``configurations`` will take: per case and data folder, the
    cropped image resampled to the configuration's spacing (float32 per channel, a uint8 label map) plus 10 %
    for foreground locations and properties."""
    spacings = fp.spacings
    shapes = fp.shapes_after_crop
    channels = len(plans.channel_names)
    total = 0
    seen = set()
    for name in configurations:
        cfg = plans.configuration(name)
        if cfg.data_identifier in seen:
            continue
        seen.add(cfg.data_identifier)
        target = [cfg.spacing[plans.transpose_forward.index(a)] for a in range(3)]
        for spacing, shape in zip(spacings, shapes):
            voxels = 1.0
            for n, s, t in zip(shape, spacing, target):
                voxels *= max(1.0, n * s / t)
            total += int(voxels * (4 * channels + 1) * 1.1)
    return total


def check_disk_space(work: WorkDir, fp: Fingerprint, plans: Plans, configurations) -> None:
    """Refuse to start preprocessing that cannot finish: WORK must be writable and hold the estimate."""
    if not os.access(work.root, os.W_OK):
        raise AutosegError(f"{work.root}: not writable")
    need = preprocessed_bytes(fp, plans, configurations)
    existing = sum(f.stat().st_size for f in (work.root / "preprocessed").rglob("*") if f.is_file())
    free = shutil.disk_usage(work.root).free
    if need - existing > free:
        raise AutosegError(
            f"{work.root}: preprocessing needs about {need / 1e9:.1f} GB, only {free / 1e9:.1f} GB free on its disk"
        )


DEFAULT_GPU_MEMORY_GB = 8.0


def memory_budget(gpu_memory_gb: float | None, device: str | None) -> tuple[float, str]:
    """The GPU memory budget to plan for, and why: an explicit value wins; ``device="cuda"`` (or ``auto`` on a
    machine with CUDA) reads the GPU's memory and keeps 10 % headroom; otherwise nnU-Net's 8 GB."""
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 1.0:
            raise AutosegError(f"--gpu-memory {gpu_memory_gb:g}: a training step needs more than 1 GB")
        return float(gpu_memory_gb), "given with --gpu-memory"
    if device in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            total = props.total_memory / 1024**3
            return round(0.9 * total, 1), f"90 % of the {total:.0f} GB of {props.name}"
        if device == "cuda":
            raise AutosegError("--device cuda: no CUDA GPU is visible to torch on this machine")
    if device not in (None, "auto", "cpu", "cuda"):
        raise AutosegError(f"--device {device}: use cpu, cuda or auto")
    return DEFAULT_GPU_MEMORY_GB, "nnU-Net's default of 8 GB (a training step that fits a common GPU)"


def _counter(progress: Progress | None, stage: str, total: int) -> Callable[[str], None]:
    """A per-case callback that reports ``(stage, done, total)`` to ``progress``."""
    done = [0]

    def step(_case: str) -> None:
        done[0] += 1
        if progress:
            progress(stage, done[0], total)

    return step


def _check_same_dataset(work: WorkDir, spec, dataset_dir: Path) -> None:
    if not work.dataset_json.is_file():
        return
    try:
        prev = read_json(work.dataset_json)
    except ValueError:
        return
    if (
        prev.get("labels") != spec.to_json()["labels"]
        or prev.get("channel_names") != spec.to_json()["channel_names"]
    ):
        raise AutosegError(
            f"{work.root}: this WORK folder holds another dataset ({prev.get('source', '?')}); use a new --workdir"
        )


def _copy_labels(cases, dest: Path, undo: Undo | None = None) -> None:
    """Copy each case's label file (an ``.mhd``/``.nhdr`` header after its data files) into ``dest``; every
    file it replaces is first kept by ``undo``."""
    from autoseg.io.volume import copy_volume, header_data_files

    dest.mkdir(parents=True, exist_ok=True)
    for case in cases:
        files = [*header_data_files(case.label), case.label]
        if all(
            (dest / f.name).is_file() and (dest / f.name).stat().st_size == f.stat().st_size for f in files
        ):
            continue
        if undo is not None:
            for f in files:
                undo.keep(dest / f.name)
        copy_volume(case.label, dest / case.label.name)


def train(
    workdir: str | Path,
    config: str,
    fold: int | str,
    *,
    device: str = "auto",
    resume: bool = False,
    config_file: str | Path | None = None,
    on_iteration=None,
    on_epoch=None,
    overwrite: bool = False,
    **overrides,
) -> Path:
    """Train one fold (``0 .. num_folds-1`` or ``all``); ``overrides`` are :class:`TrainSettings` / inference fields.
    ``overwrite`` deletes the fold's earlier run first (else an earlier run needs ``resume``), once every
    option, setting and input has been checked: a refused run leaves the earlier one as it was."""
    from autoseg.inference.predictor import resolve_device

    work = WorkDir(Path(workdir))
    defaults = plan_defaults(work, config)
    train_settings, infer_settings = load_settings(config_file, train_defaults=defaults, **overrides)
    check_fold(fold, train_settings.num_folds)
    if overwrite and resume:
        raise AutosegError("--overwrite and --resume exclude each other")
    dev = resolve_device(device)
    return train_and_validate(
        work,
        config,
        fold,
        train_settings,
        dev,
        resume=resume,
        overwrite=overwrite,
        inference=infer_settings,
        on_iteration=on_iteration,
        on_epoch=on_epoch,
    )


def make_variant(workdir: str | Path, source: str, name: str, **recipe) -> Plans:
    """Add configuration ``name`` to WORK's plans: ``source`` (its data, network, patch, batch and any time
    budget) trained with ``recipe`` (training settings of :data:`autoseg.settings.VARIANT_KEYS`, e.g.
    ``loss="tversky(alpha=0.3,beta=0.7)"``; ``None`` values are ignored) over what ``source`` trains with. Train,
    predict, find-best and compare then take ``name`` like any configuration; its data is ``source``'s. Refused
    in one line (:class:`AutosegError`) before the plans change: an unknown ``source``, a ``name`` that exists,
    an empty recipe, or a setting out of range. Returns the new plans (saved atomically)."""
    from autoseg.planning.plans import PLANS_SCHEMA_VERSION
    from autoseg.settings import recipe_settings

    work = WorkDir(Path(workdir))
    plans = Plans.load(work.plans)
    src = plans.configuration(source)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    if not recipe:
        raise AutosegError(
            f"variant {name}: no training setting given (e.g. --loss, --optimizer, --schedule)"
        )
    if name in plans.configurations:
        raise AutosegError(
            f"variant {name}: a configuration of that name exists in {work.plans}; choose another"
        )
    merged = recipe_settings({**src.recipe, **recipe}, base=replace(TrainSettings(), **_arch_recipe(src)))
    variant = replace(src, name=name, recipe={k: getattr(merged, k) for k in {**src.recipe, **recipe}})
    try:
        variant.validate()
    except PlansError as exc:
        raise AutosegError(f"variant {name}: {exc}") from None
    new = replace(
        plans, configurations={**plans.configurations, name: variant}, schema_version=PLANS_SCHEMA_VERSION
    )
    new.save(work.plans)
    return new


def _arch_recipe(cfg) -> dict:
    from autoseg.networks.registry import default_recipe

    return default_recipe(cfg.network.architecture)


def plan_defaults(work: WorkDir, config: str) -> TrainSettings | None:
    """The training defaults a configuration's plan sets (a settings file or option still wins): its
    architecture's recipe (:data:`autoseg.networks.registry.RECIPES`: AdamW, warmup and cosine decay for the
    transformers) and, for a time-budget configuration, its budget, iterations per epoch and validation
    iterations; None where the plan sets none (or the plans cannot be read: training then says why)."""
    from autoseg.networks.registry import default_recipe

    try:
        cfg = Plans.load(work.plans).configuration(config)
    except AutosegError:
        return None
    recipe = {**default_recipe(cfg.network.architecture), **cfg.recipe}
    if cfg.budget is None and not recipe:
        return None
    settings = replace(TrainSettings(), **recipe)
    if cfg.budget is None:
        return settings
    return replace(
        settings,
        time_budget_minutes=cfg.budget.minutes,
        iters_per_epoch=cfg.budget.iters_per_epoch,
        val_iters=cfg.budget.val_iters,
    )


def train_and_validate(
    work: WorkDir,
    config: str,
    fold: int | str,
    settings: TrainSettings,
    device: torch.device,
    *,
    resume: bool = False,
    overwrite: bool = False,
    inference: InferenceSettings = InferenceSettings(),
    on_iteration=None,
    on_epoch=None,
) -> Path:
    """The stages of ``autoseg train`` on a WORK folder: train the fold
    (:func:`autoseg.training.loop.train_fold`), then predict and score its validation cases
    (:func:`autoseg.validation.validate_fold`: on rank 0, when the fold has validation cases and was trained
    now or has no validation yet). Returns the fold folder."""
    from autoseg import validation
    from autoseg.training.loop import train_fold

    plans = Plans.load(work.plans)
    validation.check_settings(plans, config, inference)
    check_loss_for_plans(settings, plans)
    done = validation.is_validated(work, config, fold)
    hooks = dict(on_iteration=on_iteration, on_epoch=on_epoch)
    fold_run = train_fold(
        work, config, fold, settings, device, resume, overwrite=overwrite, validated=done, **hooks
    )
    if fold_run.trained and fold_run.writer and fold_run.val_ids:
        validation.validate_fold(work, plans, config, fold, fold_run.val_ids, device, inference)
    return fold_run.folder


def check_loss_for_plans(settings: TrainSettings, plans: Plans) -> None:
    """The settings' loss must suit the plans' outputs (region-based or softmax classes, number of class
    weights); refused in one line naming the setting, before the run touches anything."""
    try:
        check_for_plans(parse_loss(settings.loss), plans.region_based, plans.num_classes)
    except LossSpecError as exc:
        raise SettingError("loss", settings.loss, str(exc)) from None


def check_fold(fold: int | str, num_folds: int = MAX_FOLDS, *, all_folds: bool = False) -> str:
    """``fold`` as text when it names a fold (``0 .. num_folds-1`` or ``all``; with ``all_folds`` also
    ``all-folds``), else an error that names the real range."""
    allowed = [*fold_names(num_folds), "all", *(["all-folds"] if all_folds else [])]
    if isinstance(fold, bool) or str(fold) not in allowed:
        others = ", 'all-folds' or 'all'" if all_folds else " or 'all'"
        raise AutosegError(f"fold must be {fold_range(num_folds)}{others}, got '{fold}'")
    return str(fold)


def folds_to_train(fold: int | str, config_file: str | Path | None = None, **overrides) -> list[str]:
    """The folds ``autoseg train WORK CONFIG FOLD`` trains: ``fold`` checked against the settings'
    ``num_folds``; ``all-folds`` is each of ``0 .. num_folds-1`` in turn."""
    num_folds = load_settings(config_file, **overrides)[0].num_folds
    text = check_fold(fold, num_folds, all_folds=True)
    return fold_names(num_folds) if text == "all-folds" else [text]


def join_torchrun(device: str = "auto") -> str:
    """Join the process group of a ``torchrun`` launch (NCCL on CUDA, gloo otherwise); on CUDA each rank takes
    GPU ``rank % device count``. Returns the device this rank trains on."""
    import torch

    from autoseg.inference.predictor import resolve_device
    from autoseg.training import distributed

    dev = resolve_device(device)
    distributed.init(dev.type)
    if dev.type == "cuda":
        index = distributed.world().rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return f"cuda:{index}"
    return dev.type


def predict(
    workdir: str | Path,
    inputs: str | Path | list[str | Path],
    output_dir: str | Path,
    *,
    settings: InferenceSettings | None = None,
    configs: list[str] | None = None,
    folds: list[int | str] | None = None,
    device: str = "auto",
    continue_: bool = False,
    overwrite: bool = False,
    save_probabilities: bool = False,
    postprocessing: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    config: str | None = None,
    output_formats: list[str] | None = None,
    channels: dict[int, str] | None = None,
) -> list[Path]:
    """Predict a folder, one file or a list of files into ``output_dir``. ``settings``: step, mirroring,
    compile, ... (:class:`autoseg.settings.InferenceSettings`; None: its defaults).

    Without ``configs``, find-best's choice (``WORK/inference_instructions.json``: configurations, folds,
    postprocessing), else ``3d_fullres``; several are ensembled. The chosen postprocessing is applied when the
    configurations are the ones it was decided for (and ``postprocessing``). Folds default to every trained
    fold. What was chosen is logged (logger ``autoseg``). ``output_formats``: any of "nifti", "dicom-seg",
    "rtstruct" (DICOM series inputs, :mod:`autoseg.io.dicom`; ``channels`` matches series, ``{0: "T1"}``)."""
    from autoseg.inference.predictor import Predictor, predict_cases, remove_stale_outputs
    from autoseg.selection import load_instructions

    settings = _inference(settings)
    dev = _backend_device(device, settings)  # every option is checked before anything is read or written
    folds = _check_folds(folds)
    work = WorkDir(Path(workdir))
    plans = Plans.load(work.plans)
    instructions = load_instructions(work) if work.inference_instructions.is_file() else None
    configs = _predict_configs(plans, configs, config, instructions)
    settings = _found_unetpp(_found_mirroring(settings, configs, instructions), configs, instructions)
    input_list = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    # DICOM series in, or DICOM-SEG / RT-STRUCT out: autoseg.inference.dicom_export
    dicom_job = _dicom_job(
        work, plans, configs, input_list, output_dir, output_formats, channels, continue_, overwrite
    )
    cases = None if dicom_job is not None else discover_inputs(input_list, len(plans.channel_names))
    fold_lists = {c: _folds_to_use(work, plans, c, folds, settings) for c in configs}  # after input errors
    cases, targets, also = _predict_targets(
        work, dicom_job, cases, input_list, output_dir, continue_, overwrite, save_probabilities, settings
    )
    post = _postprocessor(work, configs, instructions) if postprocessing else None
    calibrate = _calibration(work, plans, configs, instructions, settings, save_probabilities)
    predictors = [Predictor(work, c, fold_lists[c], dev, settings, plans=plans) for c in configs]
    pp_text = instructions.postprocessing.to_json() if post is not None else "none"
    _log.info("predicting %d case(s) with %s; postprocessing: %s", len(cases), " + ".join(configs), pp_text)
    if not cases:
        return []
    # only now: every check has passed and the models are loaded
    remove_stale_outputs(dicom_job.paths() if dicom_job is not None else targets, also)
    write, spacings = (dicom_job.write if dicom_job is not None else None), _training_spacings(work)
    return predict_cases(
        predictors, cases, targets, post, save_probabilities, progress, spacings, write, calibrate
    )


def _backend_device(device: str, settings: InferenceSettings):
    """The torch device named ``device``, checked to run the settings' backend (its packages installed)."""
    from autoseg.inference.backends import check_backend
    from autoseg.inference.predictor import resolve_device

    dev = resolve_device(device)
    check_backend(settings.backend, dev)
    return dev


def _inference(settings: InferenceSettings | None) -> InferenceSettings:
    if settings is None:
        return InferenceSettings()
    if not isinstance(settings, InferenceSettings):
        raise AutosegError(f"settings: must be InferenceSettings, got {type(settings).__name__}")
    return settings


def _found_mirroring(settings: InferenceSettings, configs, instructions) -> InferenceSettings:
    """``settings`` with the mirror axes find-best chose for ``configs`` (when it measured them, they are
    the configurations it chose, mirroring is on and ``mirror_axes_from_find_best``); no axes: no mirroring."""
    found = instructions.mirror_axes if instructions is not None else None
    if found is None or not settings.mirroring or not settings.mirror_axes_from_find_best:
        return settings
    if list(configs) != list(instructions.configs):
        return settings
    _log.info("mirroring over axes %s, as find-best chose", ",".join(map(str, found)) or "none")
    if not found:
        return replace(settings, mirroring=False)
    return replace(settings, mirror_axes=found)


def _found_unetpp(settings: InferenceSettings, configs, instructions) -> InferenceSettings:
    """``settings`` with the UNet++ mode find-best chose (inference instructions' ``unetpp``) when the mode is
    "auto" and ``configs`` are the ones it chose; a ``--prune-depth`` given alone keeps its depth."""
    found = instructions.unetpp if instructions is not None else None
    if found is None or settings.unetpp_inference != "auto" or list(configs) != list(instructions.configs):
        return settings
    depth = settings.unetpp_prune_depth or int(found["prune_depth"])
    _log.info(
        "UNet++ %s inference%s, as find-best chose",
        found["inference"],
        f" pruned at depth {depth}" if found["inference"] == "fast" else "",
    )
    return replace(settings, unetpp_inference=str(found["inference"]), unetpp_prune_depth=depth)


def _predict_configs(plans: Plans, configs, config, instructions) -> list[str]:
    """The configurations to predict with: ``configs`` (or ``config``), else find-best's, else 3d_fullres;
    each checked against the plans."""
    configs = list(configs or ([config] if config else []))
    if not configs:
        configs = list(instructions.configs) if instructions is not None else ["3d_fullres"]
    _check_configs(configs)
    for c in configs:
        plans.configuration(c)
    return configs


def _predict_targets(
    work, dicom_job, cases, input_list, output_dir, continue_, overwrite, save_probabilities, settings
):
    """The cases to predict, their output files (the DICOM job's, or those of the plain image inputs'
    ``cases``) and the names of the other files written beside them (uncertainty maps and table). The output
    folder must not lie in WORK's own files."""
    from autoseg.inference.predictor import output_targets
    from autoseg.inference.uncertainty import check_map_targets

    if work.owns(Path(output_dir)):
        raise AutosegError(f"{output_dir}: lies in the WORK folder's own files; choose another output folder")
    if dicom_job is not None:
        cases, targets = dicom_job.cases, dicom_job.targets
    else:
        input_dirs = sorted({Path(p) for p in input_list if Path(p).is_dir()})
        cases, targets = output_targets(
            cases, Path(output_dir), input_dirs, continue_, overwrite, save_probabilities
        )
    also = []
    if settings.save_uncertainty:
        also = check_map_targets([c.case_id for c in cases], targets, continue_, overwrite)
    return cases, targets, also


def _postprocessor(work: WorkDir, configs: list[str], instructions):
    """find-best's postprocessing as a function of a label map, when it was decided for ``configs``."""
    from autoseg.postprocessing import apply_postprocessing, dataset_structures

    if instructions is None or sorted(configs) != sorted(instructions.configs):
        return None
    if instructions.postprocessing.is_identity:
        return None
    structs = dataset_structures(load_dataset_json(work.dataset_json))
    pp = instructions.postprocessing

    def post(seg):
        return apply_postprocessing(seg, pp, structs)

    return post


def _calibration(
    work: WorkDir, plans: Plans, configs, instructions, settings: InferenceSettings, saving: bool
):
    """find-best's temperature scaling as a function of a probability array (None: identity), when it was
    fitted for ``configs`` and ``settings.calibration``; the choice is logged when probabilities or
    uncertainty maps are saved."""
    saving = saving or settings.save_uncertainty
    from autoseg.inference.calibrate import calibrator, describe

    fitted = instructions is not None and sorted(configs) == sorted(instructions.configs)
    calibration = instructions.calibration if fitted else {}
    if not settings.calibration:
        why = "not applied (--no-calibration)"
    elif not calibration:
        why = "none: no temperature fitted for " + " + ".join(configs) + " (run find-best); identity"
    else:
        why = describe(calibration)
    if saving:
        _log.info("probability calibration: %s", why)
    if not settings.calibration:
        return None
    try:
        return calibrator(calibration, plans.region_based, list(plans.regions))
    except (ValueError, TypeError) as exc:
        raise PlansError(f"{work.inference_instructions}: {exc}") from None


def _dicom_job(work, plans, configs, input_list, output_dir, output_formats, channels, continue_, overwrite):
    """:func:`autoseg.inference.dicom_export.plan_job` for :func:`predict` (None: plain image files)."""
    from autoseg.inference.dicom_export import plan_job
    from autoseg.io.dicom import is_dicom_input
    from autoseg.io.dicom_seg import segments_of

    segments = []
    if is_dicom_input(input_list) and work.dataset_json.is_file():  # labels name the segments
        segments = segments_of(load_dataset_json(work.dataset_json))
    return plan_job(
        input_list,
        Path(output_dir),
        output_formats,
        channel_names=list(plans.channel_names),
        channels=channels,
        segments=segments,
        model_name=f"{plans.dataset_name or 'autoseg'} {'+'.join(configs)}",
        continue_=continue_,
        overwrite=overwrite,
    )


def _folds_to_use(work: WorkDir, plans: Plans, config: str, folds, settings) -> list[int | str]:
    """The folds of ``config`` to predict with (``folds`` or every trained one), each with its checkpoint,
    and mirror axes that leave mirroring on when it is asked for: checked before anything is written."""
    cfg = plans.configuration(config)
    if settings.mirroring and not any(a < cfg.dim for a in settings.mirror_axes):
        raise AutosegError(
            f"--mirror-axes {','.join(map(str, settings.mirror_axes))}: configuration '{config}' is 2D "
            "(patch axes 0 and 1), so nothing would be mirrored; use --no-mirroring to predict without"
        )
    use = folds or work.trained_folds(config)
    if not use:
        raise PlansError(
            f"{work.root / 'results' / config}: no trained fold ({WorkDir.CHECKPOINT_FINAL}) found"
        )
    for f in use:
        ckpt = work.checkpoint(config, f)
        if not ckpt.is_file():
            raise PlansError(f"{ckpt}: not found (fold {f} of {config} is not trained; see --folds)")
    return list(use)


def _check_configs(configs: list[str] | None) -> None:
    if configs and len(set(configs)) != len(configs):
        raise AutosegError(f"--config {' '.join(configs)}: a configuration is given twice")


def _check_folds(folds: list[int | str] | None) -> list[int | str] | None:
    """``folds`` as given (``0 .. MAX_FOLDS-1`` or ``all``, each once), or an error naming ``--folds``."""
    if not folds:
        return None  # every trained fold
    out: list[int | str] = []
    for f in folds:
        text = str(f)
        if text == "all":
            out.append("all")
        elif text in fold_names() and not isinstance(f, bool):
            out.append(int(text))
        else:
            raise AutosegError(f"--folds {f}: folds are {fold_range()} or 'all'")
    if len(set(out)) != len(out):
        raise AutosegError(f"--folds {' '.join(map(str, folds))}: a fold is given twice")
    return out


def _training_spacings(work: WorkDir):
    """The training cases' spacings (``(N, 3)``, plans' orientation) from the fingerprint, if it is there."""
    if not work.fingerprint.is_file():
        return None
    try:
        return Fingerprint.from_json(read_json(work.fingerprint)).spacings
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def predict_with_model(
    model: str | Path,
    inputs: str | Path | list[str | Path],
    output_dir: str | Path,
    announce: Callable[[str], None] | None = None,
    **kwargs,
) -> list[Path]:
    """:func:`predict` with a model bundle (``autoseg export-model``), unpacked and checked in a temporary
    folder; ``announce`` gets the model card's one-line summary (:func:`model_card_summary`) once it is."""
    import tempfile

    from autoseg.bundle import import_model

    with tempfile.TemporaryDirectory(prefix="autoseg-model-") as tmp:
        work = import_model(model, Path(tmp) / "work")
        if announce is not None:
            announce(model_card_summary(work))
        try:
            return predict(work.root, inputs, output_dir, **kwargs)
        except AutosegError as exc:  # name the bundle's member, not the temporary folder
            text = str(exc).replace(f"{work.root}{os.sep}", f"{model}:")
            if text == str(exc):
                raise
            raise type(exc)(text) from None


def export_model(
    workdir: str | Path,
    output: str | Path,
    configs: list[str] | None = None,
    folds: list[int | str] | None = None,
    overwrite: bool | None = None,
    benchmark: bool = True,
) -> dict:
    """Bundle plans, dataset.json, find-best's instructions, the chosen folds' weights and the model card
    (``benchmark``: with one timed prediction) into one zip file. ``overwrite=False`` refuses an existing
    ``output`` (None: replaces it); it must lie outside WORK."""
    from autoseg.atomic import check_output_file
    from autoseg.bundle import export_model as _export

    check_output_file(output, "model bundle", overwrite)
    if WorkDir(Path(workdir)).owns(Path(output)):
        raise AutosegError(f"{output}: is part of the WORK folder {workdir}; write the bundle elsewhere")
    _check_configs(configs)
    return _export(workdir, output, configs, _check_folds(folds), benchmark=benchmark)


def import_model(bundle: str | Path, workdir: str | Path) -> WorkDir:
    """Unpack a model bundle into a new WORK folder (checked: paths, checksums, plans against weights)."""
    from autoseg.bundle import import_model as _import

    return _import(bundle, workdir)


def model_card_summary(work: WorkDir) -> str:
    """The one-line summary of the model card of a WORK imported from a bundle (checked at import), or a
    line saying the bundle has none (exported before model cards)."""
    from autoseg.model_card import read_card

    if not work.model_card.is_file():
        return "model card: none in this bundle (exported before model cards)"
    return read_card(work.model_card).summary()


def evaluate(
    reference_dir: str | Path,
    prediction_dir: str | Path,
    dataset_json: str | Path,
    output: str | Path | None = None,
    workers: int = DEFAULT_WORKERS,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    overlays: bool = False,
    images_dir: str | Path | None = None,
    missing_as_empty: bool = False,
    missing_distance: str = "skip",
    probabilities_dir: str | Path | None = None,
) -> dict:
    """Score predictions against references; writes ``summary.json``, ``per_case.csv`` and ``report.png``
    beside ``output`` (default: in the prediction folder), and with ``overlays`` an ``overlays/`` folder of
    one PNG per case (over the images of ``images_dir`` when given). ``tolerance_mm``: for the normalised
    surface Dice. A reference without a prediction is an error, or with ``missing_as_empty`` scored as an
    empty prediction; the summary's ``n_cases`` says how many cases the means are over. A structure in only
    one of the two maps has no HD/HD95/ASSD (``missing_distance="skip"``: left out of the means, counted) or
    the image diagonal in mm (``"worst"``). Output paths are
    checked before anything is read: ``output`` must be a ``.json`` file path outside the reference folder,
    and none of the files written beside it may be a folder. ``probabilities_dir``: saved ``<case>.npz``
    probabilities of the cases, whose calibration (ECE, Brier, NLL) is added (docs/calibration.md)."""
    from autoseg.atomic import check_output_file, check_output_folder
    from autoseg.evaluation.evaluate import REPORT_PNG, evaluate_folders

    _check_evaluate_options(images_dir, overlays, workers, tolerance_mm, missing_distance)
    spec = load_dataset_json(Path(dataset_json))
    out = Path(output) if output else Path(prediction_dir) / "summary.json"
    if output is not None and out.suffix.lower() != ".json":
        raise AutosegError(f"{out}: --output is the summary's path and must end in .json")
    for f in (out, out.with_name("per_case.csv"), out.with_name(REPORT_PNG)):
        check_output_file(f, "evaluation summary" if f == out else f.name)
    if overlays:
        check_output_folder(out.with_name("overlays"), "overlays folder")
    for folder, role in ((reference_dir, "reference"), (images_dir, "image")):
        if folder is None or not Path(folder).is_dir() or _under(out.parent, Path(prediction_dir)):
            continue
        if _under(out.parent, Path(folder)):
            raise AutosegError(f"{out}: lies inside the {role} folder {folder}; write the summary elsewhere")
    return evaluate_folders(
        Path(reference_dir),
        Path(prediction_dir),
        spec,
        out,
        out.with_name("per_case.csv"),
        workers=workers,
        tolerance_mm=tolerance_mm,
        overlays_dir=out.with_name("overlays") if overlays else None,
        images_dir=Path(images_dir) if images_dir is not None else None,
        missing="empty" if missing_as_empty else "error",
        missing_distance=missing_distance,
        probabilities_dir=Path(probabilities_dir) if probabilities_dir is not None else None,
    )


def _check_evaluate_options(images_dir, overlays: bool, workers, tolerance_mm, missing_distance) -> None:
    """:func:`evaluate`'s option checks, each refusal one line naming the option."""
    if images_dir is not None and not overlays:
        raise AutosegError("--images is only used with --overlays")
    check_workers(workers)
    if isinstance(tolerance_mm, bool) or not isinstance(tolerance_mm, (int, float)):
        raise AutosegError(f"--tolerance {tolerance_mm!r}: must be a number of mm")
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise AutosegError(f"--tolerance {tolerance_mm:g}: must be a finite number of mm, >= 0")
    if missing_distance not in ("skip", "worst"):
        raise AutosegError(f"--missing-distance {missing_distance!r}: must be 'skip' or 'worst'")


def find_best(
    workdir: str | Path,
    configs: list[str] | None = None,
    workers: int = DEFAULT_WORKERS,
    mirror_tolerance: float | None = DEFAULT_MIRROR_TOLERANCE,
) -> dict:
    """Score the cross-validation of every fully trained configuration and of their pairwise ensembles, pick
    the best, decide postprocessing, write ``WORK/inference_instructions.json`` (returned). With
    ``mirror_tolerance`` (None: not), also measure which test-time mirror axes pay for themselves."""
    from autoseg.selection import find_best as _find_best

    check_workers(workers)
    _check_configs(configs)
    work = WorkDir(Path(workdir))
    if configs:
        plans = Plans.load(work.plans)
        for c in configs:
            plans.configuration(c)
    if mirror_tolerance is not None and not 0 <= mirror_tolerance <= 1:
        raise AutosegError(f"--mirror-tolerance: {mirror_tolerance} is not a Dice difference in [0, 1]")
    return _find_best(work, configs, workers, mirror_tolerance)


def compare(workdir: str | Path, write: bool = True, folds: str | Sequence[int] | None = None):
    """Every trained configuration of ``workdir`` side by side (cost, cross-validation Dice / HD95 / NSD per
    structure, a paired Wilcoxon test of each against the best), written to ``WORK/compare/compare.{md,csv,png}``
    with ``write``. ``folds`` (``"0,1"`` or a sequence of fold numbers): compare on those folds only, e.g. when
    only fold 0 of each configuration is trained (written to ``WORK/compare/folds_0/``). Returns an
    :class:`autoseg.compare.Comparison`; see :mod:`autoseg.compare` for the rules. :class:`AutosegError` naming
    WORK when it has no plans or no trained configuration, or naming ``--folds`` when it is not a list of
    fold numbers of ``splits.json``."""
    from autoseg.compare import compare as _compare

    work = WorkDir(Path(workdir))
    if not work.plans.is_file():
        raise AutosegError(f"{work.root}: no plans.json (not a WORK folder made by 'autoseg plan')")
    return _compare(work, write=write, folds=parse_fold_list(folds) if isinstance(folds, str) else folds)


def parse_fold_list(text: str) -> list[int]:
    """``--folds 0,2``: fold numbers, comma-separated; :class:`AutosegError` naming the option otherwise."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):  # "" and " " fail too
        raise AutosegError(f"--folds {text!r}: expected fold numbers separated by commas, such as 0 or 0,1")
    return [int(p) for p in parts]


def calibration_line(calibration: dict) -> str:
    """``find-best``'s one line about the calibration it kept (:func:`autoseg.selection.calibration_line`)."""
    from autoseg.selection import calibration_line as _line

    return _line(calibration)


def compare_tables(result) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """``(title, columns, rows)`` of the tables ``autoseg compare`` prints for ``result`` (:func:`compare`)."""
    from autoseg.compare import terminal_tables

    return terminal_tables(result)


# ---- what the command line needs: option checks, the all-folds loop, summaries (cli.py only parses options)


def architectures() -> tuple[str, ...]:
    """The architectures ``plan --architecture`` accepts (each has a planner model and a registered network)."""
    from autoseg.networks import ARCHITECTURES

    return tuple(ARCHITECTURES)


def parse_architectures(architecture: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``plan --architecture``: one registered name or a comma list (``"unet,attention_unet"``), or a sequence
    of names; duplicates are dropped, order is kept. :class:`AutosegError` naming the first unknown or empty
    name and listing the valid ones."""
    names = architecture.split(",") if isinstance(architecture, str) else list(architecture)
    valid = architectures()
    out: list[str] = []
    for raw in names:
        name = raw.strip() if isinstance(raw, str) else raw
        if name not in valid:
            what = "an empty name" if name == "" else f"unknown architecture {name!r}"
            raise AutosegError(
                f"--architecture {architecture if isinstance(architecture, str) else ','.join(map(str, names))}: "
                f"{what}; use one of {', '.join(valid)} (or a comma list of them)"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def make_phantom(out_dir: str | Path, cases: int = 10, seed: int = 0) -> Path:
    """Write a deterministic synthetic 2-channel, 2-label 3D dataset in the raw layout."""
    from autoseg.phantom import make_phantom_dataset

    make_phantom_dataset(Path(out_dir), n_cases=cases, seed=seed)
    return Path(out_dir)


def predict_paths(
    paths: list[Path],
    *,
    model: Path | None = None,
    folds: list[str] | None = None,
    mirror_axes: str | None = None,
    output_formats: list[str] | None = None,
    channels: list[str] | None = None,
    settings: dict | None = None,
    announce: Callable[[str], None] | None = None,
    **kwargs,
) -> list[Path]:
    """``autoseg predict``: ``paths`` is WORK INPUT... OUTPUT (INPUT... OUTPUT with ``model``, a bundle, whose
    model card summary goes to ``announce``);
    ``folds``, ``mirror_axes`` ("1,2"), ``output_formats`` and ``channels`` ("0=T1") as typed on the command
    line; ``settings``: :class:`InferenceSettings` fields (None: the default). Everything is checked, in the
    order of the options, before :func:`predict` (or :func:`predict_with_model`) reads anything;
    ``kwargs`` go to it."""
    from autoseg.inference.dicom_export import check_formats
    from autoseg.io.dicom import parse_channel_rules

    need = 2 if model is not None else 3
    if len(paths) < need:
        raise AutosegError(
            "predict needs " + ("INPUT... OUTPUT with --model" if model else "WORK INPUT... OUTPUT")
        )
    fold_list = ["all" if f == "all" else _int_option("--folds", f) for f in folds] if folds else None
    axes = None
    if mirror_axes is not None:
        axes = tuple(_int_option("--mirror-axes", a) for a in mirror_axes.split(",") if a.strip())
    workdir, inputs, output = (None, paths[:-1], paths[-1]) if model else (paths[0], paths[1:-1], paths[-1])
    kwargs.update(output_formats=check_formats(output_formats), channels=parse_channel_rules(channels))
    given = {} if axes is None else {"mirror_axes_from_find_best": False}  # an explicit --mirror-axes wins
    infer = inference_settings(**{**(settings or {}), "mirror_axes": axes, **given})
    if model is not None:
        return predict_with_model(
            model, inputs, output, announce=announce, folds=fold_list, settings=infer, **kwargs
        )
    return predict(workdir, inputs, output, folds=fold_list, settings=infer, **kwargs)


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AutosegError(f"{name}: '{value}' is not a whole number") from None


class FoldRun:
    """One fold of :func:`train_folds`: ``train()`` runs it; ``finished`` is the ``checkpoint_final.pt`` of an
    earlier run that an all-folds loop skips (else None); ``show``: this process reports (the main rank)."""

    def __init__(self, fold: str, finished: Path | None, show: bool, announce: bool, start: Callable):
        self.fold, self.finished, self.show, self.announce = fold, finished, show, announce
        self._start = start
        self.fold_dir: Path | None = None

    def train(self, on_iteration=None, on_epoch=None) -> Path:
        self.fold_dir = self._start(on_iteration=on_iteration, on_epoch=on_epoch)
        return self.fold_dir

    def summary(self) -> SummaryReport | None:
        """The trained fold's validation summary, when it has one."""
        path = None if self.fold_dir is None else self.fold_dir / WorkDir.VALIDATION / WorkDir.SUMMARY
        return summary_report(path) if path is not None and path.is_file() else None


def train_folds(
    workdir: str | Path,
    config: str,
    fold: str,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    **kwargs,
):
    """``autoseg train``: the folds to train, one :class:`FoldRun` each (``fold``: a fold, ``all``, or
    ``all-folds`` for each fold of the settings' ``num_folds`` one after another, skipping finished folds unless ``resume``/``overwrite``). Under
    ``torchrun`` this process first joins the process group. ``kwargs`` go to :func:`train`."""
    settings_args = {k: v for k, v in kwargs.items() if k != "on_iteration" and k != "on_epoch"}
    folds = folds_to_train(fold, **settings_args)  # checked against the settings' num_folds first
    from functools import partial

    from autoseg.training import distributed

    if distributed.launched_by_torchrun():
        device = join_torchrun(device)
    main_rank = distributed.world().is_main
    every = fold == "all-folds"
    for f in folds:
        done = WorkDir(Path(workdir)).checkpoint(config, f)
        skip = every and not resume and not overwrite and done.is_file()
        start = partial(
            train, workdir, config, f, device=device, resume=resume, overwrite=overwrite, **kwargs
        )
        yield FoldRun(f, done if skip else None, main_rank, every, start)


class SummaryReport:
    """What the command line shows of an evaluation's ``summary.json``: per label the mean Dice, IoU, HD95
    and NSD (formatted; each followed by ``(k excl.)`` where k cases had no value and are not in the mean, and
    ``(k worst)`` where k cases were given the worst distance), a line saying how many cases were scored, the
    mean Dice."""

    columns = ("label", "Dice", "IoU", "HD95 (mm)", "NSD")

    def __init__(self, path: Path, rows: list[tuple[str, ...]], cases: str | None, mean_dice: float | None):
        self.path, self.rows, self.cases, self.mean_dice = path, rows, cases, mean_dice


def summary_report(path: str | Path) -> SummaryReport:
    """:class:`SummaryReport` of the ``summary.json`` at ``path``."""
    s = read_json(Path(path))
    rows = [
        (label, *(_mean_of(m, key) for key in ("dice", "iou", "hd95", "nsd")))
        for label, m in s.get("mean", {}).items()
    ]
    cases = None
    if "n_cases" in s:
        empty = s.get("missing_as_empty") or []
        cases = (
            f"{s['n_cases']} case(s) scored"
            + (f" of {s['n_references']} reference(s)" if s.get("n_references") is not None else "")
            + (
                f", {len(empty)} missing prediction(s) scored as empty: {', '.join(empty[:5])}"
                if empty
                else ""
            )
            + ("" if len(empty) <= 5 else f" and {len(empty) - 5} more")
        )
    return SummaryReport(Path(path), rows, cases, s.get("mean_dice"))


def _mean_of(metrics: dict, key: str) -> str:
    entry = metrics.get(key, {})
    v = entry.get("mean") if isinstance(entry, dict) else entry
    text = "n/a" if v is None else f"{v:.4f}"
    if isinstance(entry, dict) and entry.get("n_excluded"):
        text += f" ({entry['n_excluded']} excl.)"
    if isinstance(entry, dict) and entry.get("n_worst"):
        text += f" ({entry['n_worst']} worst)"
    return text


def evaluate_report(reference_dir, prediction_dir, dataset_json, output=None, **kwargs) -> SummaryReport:
    """``autoseg evaluate``: :func:`evaluate`, then the :class:`SummaryReport` of the summary it wrote."""
    evaluate(reference_dir, prediction_dir, dataset_json, output, **kwargs)
    return summary_report(output or Path(prediction_dir) / WorkDir.SUMMARY)


def export_network(
    workdir: str | Path, config: str, fold: str, output: str | Path, fmt: str, overwrite: bool | None = None
) -> Path:
    """Export one fold's network (patch in, logits out) as ``fmt`` ("torchscript" or "onnx"); the fold, the
    format and the output path are checked first (``overwrite=False``: an existing file is refused)."""
    from autoseg.atomic import check_output_file
    from autoseg.inference.deploy import FORMATS
    from autoseg.inference.deploy import export_network as _export

    check_fold(fold)
    if fmt not in FORMATS:
        raise AutosegError(f"--format: unknown export format '{fmt}' (use one of {', '.join(FORMATS)})")
    check_output_file(output, "exported network", overwrite)
    if WorkDir(Path(workdir)).owns(Path(output)):
        raise AutosegError(f"{output}: is part of the WORK folder {workdir}; write the network elsewhere")
    return _export(workdir, config, fold, output, fmt)
