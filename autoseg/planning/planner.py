"""Planner: fingerprint + dataset spec + settings -> Plans. Orchestration only; the rules live in
``spacing``, ``topology`` and ``memory``. Every decision is recorded with its reason for ``--explain``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from autoseg.errors import AutosegError
from autoseg.fingerprint import Fingerprint
from autoseg.io.dataset import DatasetSpec
from autoseg.io.volume import CANONICAL_ORIENTATION
from autoseg.planning import memory, speed, topology
from autoseg.planning.budget import BudgetRequest, Rung, plan_budget
from autoseg.planning.plans import ChannelNormalization, Configuration, NetworkTopology, Plans
from autoseg.planning.spacing import target_spacing, transpose_coarse_first

MIN_BATCH = 2
MAX_DATASET_FRACTION_PER_BATCH = 0.05
MASK_NORMALIZATION_CROP_FRACTION = 0.75  # z-score inside the nonzero mask if the crop keeps less than this


def plan_normalization(spec: DatasetSpec, fp: Fingerprint, reasons: list[str]) -> list[ChannelNormalization]:
    """CT channels: clip to the foreground 0.5/99.5 percentiles then z-score with the foreground mean/std.
    Other channels: z-score per image, inside the nonzero mask when cropping removed a quarter or more."""
    kept = float(np.median([c.crop_fraction_kept for c in fp.cases]))
    use_mask = kept < MASK_NORMALIZATION_CROP_FRACTION
    out = []
    for c, name in enumerate(spec.channel_names):
        st = fp.intensity[c]
        if name.strip().upper() == "CT":
            out.append(
                ChannelNormalization(
                    "ct", False, st.percentile_00_5, st.percentile_99_5, st.mean, max(st.std, 1e-8)
                )
            )
            reasons.append(
                f"channel {c} '{name}': CT -> clip to [{st.percentile_00_5:.1f}, {st.percentile_99_5:.1f}] "
                f"(foreground 0.5/99.5 percentiles), z-score with foreground mean {st.mean:.1f}, std {st.std:.1f}"
            )
        else:
            out.append(ChannelNormalization("zscore", use_mask))
            where = (
                f"inside the nonzero mask (crop keeps {kept:.0%} < {MASK_NORMALIZATION_CROP_FRACTION:.0%})"
                if use_mask
                else f"over the whole cropped image (crop keeps {kept:.0%})"
            )
            reasons.append(f"channel {c} '{name}': per-image z-score {where}")
    return out


def plan_configuration(
    name: str,
    dim: int,
    spacing: list[float],
    median_shape: list[float],
    dataset_voxels: float,
    in_channels: int,
    num_classes: int,
    budget_bytes: int,
    architecture: str,
    data_identifier: str,
    reasons: list[str],
    region_based: bool = False,
    base_features: int = topology.BASE_FEATURES,
    coverage: float = 1.0,
) -> Configuration:
    """Patch, topology and batch for one configuration under ``budget_bytes`` (see module docstrings).
    ``dataset_voxels`` (cases × median image voxels) caps the batch at 5 % of the dataset per step. Memory and
    FLOPs are measured on the registered network of ``architecture`` (``memory``, ``speed``), trained with the
    loss of ``region_based`` plans or not; ``base_features`` and ``coverage``: see :func:`_fit_patch`.
    """
    start, patch = _start_patch(name, spacing, median_shape, dim, reasons)

    def step_bytes(net: NetworkTopology, patch_size: list[int], batch_size: int) -> int:
        return memory.estimate_step_bytes(
            net, patch_size, batch_size, in_channels, num_classes, region_based=region_based
        )

    net, patch = _fit_patch(
        patch, spacing, median_shape, dim, architecture, budget_bytes, step_bytes, base_features, coverage
    )
    fit, cap, batch = _batch_size(net, patch, dataset_voxels, budget_bytes, step_bytes)
    est = step_bytes(net, patch, batch)
    flops = speed.step_flops(net, patch, in_channels, num_classes, region_based)
    cost = memory.network_cost(net, in_channels, num_classes, region_based)
    reasons.append(
        f"{name}: spacing {_fmt(spacing)} mm, median shape {_fmt(median_shape, 0)}; patch starts at "
        f"{_fmt(start, 0)} ({'256^3' if dim == 3 else '2048^2'} voxels, isotropic in mm, clipped to the median shape) and ends at "
        f"{_fmt(patch, 0)} (divisible by total stride {_fmt(topology.total_stride(net.strides), 0)}); "
        f"{len(net.strides)} stages; batch {batch} (memory allows {fit}, 5% of the dataset's voxels allows {cap}, "
        f"at least {MIN_BATCH}); estimated {est / 1024**3:.2f} GB of {budget_bytes / 1024**3:.1f} GB; "
        f"{architecture} measured on the meta device: {cost.parameters / 1e6:.2f} M parameters, "
        f"{cost.saved_bytes(patch) / 1024**3:.3g} GB of activations saved per sample (float32), "
        f"{flops * batch / 1e12:.3g} TFLOP per step of {batch}"
    )
    return Configuration(
        name=name,
        dim=dim,
        data_identifier=data_identifier,
        spacing=[float(s) for s in spacing] if dim == 3 else [],
        median_shape=[int(round(m)) for m in median_shape],
        patch_size=[int(p) for p in patch],
        batch_size=int(batch),
        network=net,
        estimated_memory_gb=round(est / 1024**3, 3),
        estimated_step_seconds={
            device: round(speed.estimate_step_seconds(flops, batch, device), 3) for device in ("gpu", "cpu")
        },
        batch_dice=dim == 2,  # as nnU-Net v2: batch Dice for 2D, per-sample Dice for 3D
    )


StepBytes = Callable[[NetworkTopology, list[int], int], int]
"""Estimated bytes of one training step: (network, patch, batch) -> bytes."""


def _start_patch(
    name: str, spacing: list[float], median_shape: list[float], dim: int, reasons: list[str]
) -> tuple[list[int], list[int]]:
    """(initial patch, that patch grown until the network has at least two stages)."""
    patch = topology.initial_patch_size(spacing, median_shape, dim)
    start = list(patch)
    patch = topology.ensure_poolable(patch, spacing)
    if patch != start:
        reasons.append(
            f"{name}: median shape {_fmt(median_shape, 0)} is too small to pool; patch grown to {_fmt(patch, 0)} "
            "(images are zero-padded to it) so the network has at least two stages"
        )
    return start, patch


def _fit_patch(
    patch: list[int],
    spacing: list[float],
    median_shape: list[float],
    dim: int,
    architecture: str,
    budget_bytes: int,
    step_bytes: StepBytes,
    base_features: int = topology.BASE_FEATURES,
    coverage: float = 1.0,
) -> tuple[NetworkTopology, list[int]]:
    """(network, patch): shrink the patch one total stride at a time, along the axis largest relative to the
    median shape, until a step of :data:`MIN_BATCH` fits ``budget_bytes`` and the patch holds at most
    ``coverage`` of the median image (or nothing is left to shrink). The network's first stage has
    ``base_features`` (the time-budget planner's levers, :mod:`autoseg.planning.budget`)."""
    max_voxels = coverage * math.prod(median_shape) if coverage < 1 else math.inf
    while True:
        strides, kernels = topology.pooling_and_kernels(patch, spacing)
        patch_r = topology.round_up_to_stride(patch, strides)
        feats = topology.features_per_stage(len(strides), dim, base_features)
        net = NetworkTopology(
            architecture=architecture,
            dim=dim,
            strides=strides,
            kernel_sizes=kernels,
            features_per_stage=feats,
        )
        if step_bytes(net, patch_r, MIN_BATCH) <= budget_bytes and math.prod(patch_r) <= max_voxels:
            break
        ratios = [p / m for p, m in zip(patch_r, median_shape)]
        axis = int(np.argmax(ratios))
        ts = topology.total_stride(strides)
        shrunk = patch_r[axis] - ts[axis]
        if shrunk < 4:  # nothing left to shrink sensibly; accept the smallest patch
            break
        patch = list(patch_r)
        patch[axis] = shrunk
    return net, patch_r


def _batch_size(
    net: NetworkTopology, patch: list[int], dataset_voxels: float, budget_bytes: int, step_bytes: StepBytes
) -> tuple[int, int, int]:
    """(batch memory allows, batch 5 % of the dataset allows, chosen batch of at least :data:`MIN_BATCH`)."""
    per_sample = step_bytes(net, patch, 2) - step_bytes(net, patch, 1)
    fixed = step_bytes(net, patch, 1) - per_sample
    fit = max(MIN_BATCH, int((budget_bytes - fixed) // max(per_sample, 1)))
    cap = int(MAX_DATASET_FRACTION_PER_BATCH * dataset_voxels // math.prod(patch))
    return fit, cap, max(MIN_BATCH, min(fit, cap))


LOWRES_MIN_COVERAGE = 0.25  # plan 3d_lowres when the fullres patch covers less than this of the median image
LOWRES_SPACING_STEP = 1.05
LOWRES_MAX_VOXEL_FRACTION = 0.5  # drop lowres unless it has at most half the voxels of fullres


def plan_lowres(
    spacing: list[float],
    median_shape: list[float],
    fullres: Configuration,
    common: dict,
    reasons: list[str],
    suffix: str = "",
) -> dict[str, Configuration]:
    """``3d_lowres`` and ``3d_cascade_fullres`` (each name followed by ``suffix``, see
    :func:`configuration_suffix`) when the fullres patch sees too little of an image.

    The spacing is raised by 5 % per step (only on axes finer than half the coarsest spacing, so anisotropic
    data first becomes less anisotropic; all axes once none is) until the patch planned at that spacing covers
    at least a quarter of the median image. The pair is dropped if lowres would keep more than half of
    fullres's voxels (too little gained for a second network).
    """
    lowres, cascade_name = f"3d_lowres{suffix}", f"3d_cascade_fullres{suffix}"
    coverage = math.prod(fullres.patch_size) / math.prod(median_shape)
    if coverage >= LOWRES_MIN_COVERAGE:
        reasons.append(
            f"no {lowres}: the fullres patch covers {coverage:.0%} of the median image "
            f"(>= {LOWRES_MIN_COVERAGE:.0%})"
        )
        return {}
    sp = list(spacing)
    quiet: list[str] = []  # candidate configurations' reasons are not reported
    for _ in range(200):
        coarse = max(sp)
        grow = [a for a in range(3) if sp[a] < coarse / 2] or [0, 1, 2]
        sp = [v * LOWRES_SPACING_STEP if a in grow else v for a, v in enumerate(sp)]
        shape = [m * s0 / s1 for m, s0, s1 in zip(median_shape, spacing, sp)]
        lowres_common = {
            **common,
            "data_identifier": "lowres",
            "dataset_voxels": common["dataset_voxels"] * math.prod(shape) / math.prod(median_shape),
        }
        cfg = plan_configuration(lowres, 3, sp, shape, **{**lowres_common, "reasons": quiet})
        if math.prod(cfg.patch_size) / math.prod(shape) >= LOWRES_MIN_COVERAGE:
            break
    kept = math.prod(shape) / math.prod(median_shape)
    if kept > LOWRES_MAX_VOXEL_FRACTION:
        reasons.append(
            f"no {lowres}: the fullres patch covers {coverage:.0%} of the median image, but a lowres stage "
            f"covering {LOWRES_MIN_COVERAGE:.0%} would keep {kept:.0%} of the voxels (> {LOWRES_MAX_VOXEL_FRACTION:.0%})"
        )
        return {}
    plan_configuration(lowres, 3, sp, shape, **lowres_common)  # again, to record its reason
    cascade = Configuration(**{**fullres.__dict__, "name": cascade_name, "previous_stage": lowres})
    reasons.append(
        f"{lowres} at {_fmt(sp)} mm ({kept:.0%} of the fullres voxels) because the fullres patch covers only "
        f"{coverage:.0%} of the median image; {cascade_name} refines its prediction at full resolution"
    )
    return {lowres: cfg, cascade_name: cascade}


def make_plans(
    spec: DatasetSpec,
    fp: Fingerprint,
    gpu_memory_gb: float = 8.0,
    architecture: str | Sequence[str] = "unet",
    budget: BudgetRequest | None = None,
) -> Plans:
    """Derive plans for ``2d``, ``3d_fullres`` and, where useful, ``3d_lowres`` + ``3d_cascade_fullres``; with
    a time ``budget``, also ``3d_budget`` (:mod:`autoseg.planning.budget`).

    ``architecture`` is a registered network name, or several: each is planned and sized on its own (its own
    memory estimate gives its patch and batch), under the names of :func:`configuration_suffix`.
    Configurations at the same spacing share one preprocessed data folder (:func:`share_data`)."""
    archs = list(dict.fromkeys([architecture] if isinstance(architecture, str) else architecture))
    reasons: list[str] = []
    transpose, spacing_t, median_t = _geometry(fp, reasons)
    norms = plan_normalization(spec, fp, reasons)
    common = dict(
        dataset_voxels=len(fp.cases) * math.prod(median_t),
        in_channels=spec.num_channels,
        num_classes=len(spec.regions) if spec.region_based else spec.num_classes,  # network outputs
        budget_bytes=int(gpu_memory_gb * 1024**3),
        data_identifier="fullres",
        reasons=reasons,
        region_based=spec.region_based,
    )
    configurations: dict[str, Configuration] = {}
    for arch in archs:
        suffix = configuration_suffix(arch, archs)
        if len(archs) > 1:
            named = (
                f"named like 3d_fullres{suffix}" if suffix else "under the plain names (2d, 3d_fullres, ...)"
            )
            reasons.append(f"{arch}: planned and sized on its own, its configurations {named}")
        arch_common = {**common, "architecture": arch}
        configurations.update(_plan_architecture(suffix, spacing_t, median_t, spec, fp, arch_common, budget))
    return Plans(
        dataset_name=spec.name,
        dataset_hash=fp.dataset_hash,
        channel_names=list(spec.channel_names),
        labels=dict(spec.labels),
        regions={k: list(v) for k, v in spec.regions.items()},
        file_ending=spec.file_ending,
        transpose_forward=transpose,
        normalization=norms,
        configurations=share_data(configurations, reasons),
        gpu_memory_gb=float(gpu_memory_gb),
        reasons=reasons,
        orientation=CANONICAL_ORIENTATION,
        regions_class_order=list(spec.regions_class_order),
        ignore_label=spec.ignore_label,
    )


def _geometry(fp: Fingerprint, reasons: list[str]) -> tuple[list[int], list[float], list[float]]:
    """(axis transpose, target spacing and median shape in the transposed axis order), with their reasons."""
    spacing, why = target_spacing(fp.spacings, fp.shapes_after_crop)
    reasons.append(
        f"volumes are reoriented to {CANONICAL_ORIENTATION} (lossless permute/flip) so that every case presents its "
        "anatomy along the same array axes; outputs are turned back to each input's orientation"
    )
    reasons.append(f"target spacing {_fmt(spacing)} mm (array order z,y,x): {why}")
    transpose = transpose_coarse_first(spacing)
    if transpose != [0, 1, 2]:
        reasons.append(
            f"axes transposed by {transpose} so the coarsest axis comes first (2D slices along it)"
        )
    resampled = fp.shapes_after_crop * fp.spacings / np.asarray(spacing)[None]
    median = np.median(resampled, axis=0)
    return transpose, [spacing[a] for a in transpose], [float(median[a]) for a in transpose]


PLAIN_NAMES = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres", "3d_budget")
"""The configuration names of one architecture; with several, a suffix tells them apart."""


def configuration_suffix(architecture: str, architectures: Sequence[str]) -> str:
    """What follows the plain names (:data:`PLAIN_NAMES`) for ``architecture`` planned among
    ``architectures``: nothing for a single architecture (whatever it is, as before several could be planned)
    and for ``unet`` among several (existing WORK folders and commands keep working); ``_<architecture>``
    otherwise, e.g. ``3d_fullres_attention_unet``."""
    if len(set(architectures)) <= 1 or architecture == "unet":
        return ""
    return f"_{architecture}"


def _plan_architecture(
    suffix: str,
    spacing: list[float],
    median_shape: list[float],
    spec: DatasetSpec,
    fp: Fingerprint,
    common: dict,
    budget: BudgetRequest | None,
) -> dict[str, Configuration]:
    """Every configuration of one architecture (``common["architecture"]``), named with ``suffix``. An
    architecture that cannot be built for the planned topologies (e.g. too few stages for its design) is
    refused in one line naming it, why, and the registered architectures that can be planned here."""
    try:
        cfg3d = plan_configuration(f"3d_fullres{suffix}", 3, spacing, median_shape, **common)
        lowres = plan_lowres(spacing, median_shape, cfg3d, common, common["reasons"], suffix)
        cfg2d = _plan_2d(spacing, median_shape, common, f"2d{suffix}")
    except (AutosegError, ValueError, RuntimeError) as exc:
        raise AutosegError(_unplannable(common["architecture"], exc, spacing, median_shape, common)) from None
    if budget is not None:
        name = f"3d_budget{suffix}"
        quiet: list[str] = []
        cfg = _plan_budget(budget, spacing, median_shape, spec, fp, {**common, "reasons": quiet})
        common["reasons"].extend(r.replace("3d_budget:", f"{name}:", 1) for r in quiet)
        lowres = {**lowres, name: replace(cfg, name=name)}
    return {cfg2d.name: cfg2d, cfg3d.name: cfg3d, **lowres}


def plannable(spacing: list[float], median_shape: list[float], common: dict) -> list[str]:
    """The registered architectures whose 3D and 2D configurations can be planned for this geometry."""
    out = []
    for arch in memory.ARCHITECTURES:
        trial = {**common, "architecture": arch, "reasons": []}
        try:
            plan_configuration("3d_fullres", 3, spacing, median_shape, **trial)
            _plan_2d(spacing, median_shape, trial)
        except (AutosegError, ValueError, RuntimeError):
            continue
        out.append(arch)
    return out


def _unplannable(arch: str, exc: Exception, spacing, median_shape, common: dict) -> str:
    can = [a for a in plannable(spacing, median_shape, common) if a != arch]
    reason = str(exc).rstrip(".") or type(exc).__name__
    return f"--architecture {arch}: cannot be planned for this dataset ({reason}); " + (
        f"these can: {', '.join(can)}" if can else "no registered architecture can"
    )


def share_data(configurations: dict[str, Configuration], reasons: list[str]) -> dict[str, Configuration]:
    """One preprocessed data folder per spacing: a configuration whose data identifier is already taken by
    another one at a different spacing (a lowres or budget stage planned for another architecture) gets its
    own, ``<identifier>_<architecture>``; configurations at the same spacing keep the shared one, so their
    data is preprocessed once."""
    spacing_of: dict[str, list[float]] = {}
    out = {}
    for name, c in configurations.items():
        data_id = c.data_identifier
        if data_id in spacing_of and spacing_of[data_id] != c.spacing:
            data_id = f"{c.data_identifier}_{c.network.architecture}"
            reasons.append(
                f"{name}: spacing {_fmt(c.spacing)} mm differs from that of the other "
                f"'{c.data_identifier}' configurations; its data is preprocessed into '{data_id}'"
            )
        spacing_of.setdefault(data_id, c.spacing)
        out[name] = replace(c, data_identifier=data_id)
    return out


def _plan_2d(
    spacing: list[float], median_shape: list[float], common: dict, name: str = "2d"
) -> Configuration:
    """``2d``: planned on the in-plane axes; its data is the same preprocessed volume, so it keeps the full
    3-axis spacing and median shape (for export)."""
    cfg2d = plan_configuration(name, 2, spacing[1:], median_shape[1:], **common)
    return Configuration(
        **{
            **cfg2d.__dict__,
            "spacing": [float(s) for s in spacing],
            "median_shape": [int(round(m)) for m in median_shape],
        }
    )


def _plan_budget(
    request: BudgetRequest,
    spacing: list[float],
    median_shape: list[float],
    spec: DatasetSpec,
    fp: Fingerprint,
    common: dict,
) -> Configuration:
    """The ``3d_budget`` configuration; its data folder is ``fullres`` where it keeps that spacing."""
    quiet: list[str] = []  # the rungs tried are summarised in one reason by plan_budget

    def plan_rung(rung: Rung, sp: list[float], shape: list[float]) -> Configuration:
        scaled = common["dataset_voxels"] * math.prod(shape) / math.prod(median_shape)
        return plan_configuration(
            "3d_budget",
            3,
            sp,
            shape,
            **{
                **common,
                "dataset_voxels": scaled,
                "data_identifier": "fullres" if sp == spacing else "budget",
                "reasons": quiet,
            },
            base_features=rung.width,
            coverage=rung.coverage,
        )

    # region-based plans predict and are scored on the regions: their thickness, not their labels', bounds it
    names = list(spec.regions) if spec.region_based else list(spec.foreground_labels)
    thickness = fp.structure_thickness(names)
    return plan_budget(request, spacing, median_shape, thickness, plan_rung, common["reasons"])


def _fmt(v, digits: int = 3) -> str:
    if digits == 0:
        return "×".join(str(int(round(x))) for x in v)
    return "×".join(f"{x:.{digits}g}" for x in v)
