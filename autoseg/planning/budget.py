"""The time-budget rule: the ``3d_budget`` configuration, sized so that a training run of a given number of
minutes on a given device buys enough optimisation steps.

nnU-Net's plans assume days of GPU time. Given ``minutes`` on a device instead, the planner walks a ladder of
ever cheaper configurations and keeps the first whose training step (measured on the device, see
:mod:`autoseg.planning.device`) is short enough for :data:`MIN_STEPS` steps within the budget:

1. the standard network (:data:`WIDTHS` [0] = 32 base features) at the median spacing;
2. 16 base features, at the median spacing and then ever coarser spacings (:data:`SPACING_FACTORS`), as far as
   the thinnest structure allows (:func:`coarsest_factor`: it keeps :data:`VOXELS_ACROSS` voxels across), then
   at the coarsest of them with a patch of at most 1/2, then 1/4 of the image (:data:`COVERAGES`);
3. the same with 8 base features, down to a patch of 1/8 of the image.

The order puts what costs least accuracy per second saved first. Halving the width quarters the FLOPs of
every convolution; on datasets of a few cases the narrower network loses little (``docs/planning.md``,
experiments). Coarser spacing costs boundary accuracy once the image is resampled back, so it stops where the
thinnest structure would keep fewer than two voxels across. A smaller patch comes after both within a width:
nnU-Net's own patches hold a fifth of a BraTS image, but a network given few steps learns faster where it sees
more of the image at once.

Every patch, topology and batch of a rung is planned as the other configurations are
(:func:`autoseg.planning.planner.plan_configuration`, memory budget included). Coarse axes of anisotropic data
are left as they are until the fine ones have caught up with them (the spacing becomes more isotropic first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from autoseg.errors import AutosegError
from autoseg.planning.plans import BudgetPlan, Configuration

MIN_STEPS = 400
"""Optimisation steps a budget must buy (batch 2); see ``docs/planning.md`` for the experiments behind it."""
VOXELS_ACROSS = 2.0
"""The thinnest structure keeps at least this many voxels across at the planned spacing."""
SPACING_FACTORS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
"""The finest axis's spacing is multiplied by these (coarse axes join in once the fine ones reach them)."""
WIDTHS = (32, 16, 8)
"""Base features (of the first stage; doubling per stage, capped as in the standard plans)."""
COVERAGES = (0.5, 0.25, 0.125)
"""The most of the median image a patch may hold, tried at the coarsest spacing of each width (the last only at
the narrowest width)."""
OVERHEAD = 0.1
"""Share of the budget kept for what is not a training step: validation patches, logging, checkpoints."""
TARGET_EPOCHS = 25
"""Epochs (of iterations_per_epoch steps) the budget is split into: the pseudo-Dice and the checkpoint are
written this often, so an interrupted run loses at most a 25th of its budget."""
MAX_ITERS_PER_EPOCH = 250
MIN_ITERS_PER_EPOCH = 10
VALIDATION_SHARE = 0.1
"""Validation batches per epoch, as a share of its training iterations (each costs about a third of a step)."""


@dataclass(frozen=True)
class StepTime:
    seconds: float
    how: str
    """``measured`` (timed on this device now), ``cached`` (timed earlier on this machine), ``estimated``
    (from the FLOPs and the device's measured rate: far from fitting, not worth timing) or ``assumed`` (the
    stated default throughput of a device that is not here)."""


StepTimer = Callable[[Configuration, float], StepTime]
"""Seconds of one training step of a configuration on the device; the second argument is the most a step may
take (a timer may skip measuring a configuration that is clearly slower)."""


@dataclass(frozen=True)
class BudgetRequest:
    """What ``autoseg plan --time-budget MIN --device D`` asks for."""

    minutes: float
    device: str
    timer: StepTimer
    min_steps: int = MIN_STEPS
    """Optimisation steps the budget must buy (``plan --min-steps``; default :data:`MIN_STEPS`)."""

    @property
    def seconds_per_step(self) -> float:
        """The longest training step that still buys ``min_steps`` steps within the budget."""
        return self.minutes * 60 * (1 - OVERHEAD) / self.min_steps


@dataclass(frozen=True)
class Rung:
    factor: float
    width: int
    coverage: float

    def describe(self) -> str:
        cover = "" if self.coverage == 1 else f", patch at most {self.coverage:g} of the image"
        return f"{self.width} base features at {self.factor:g}x the finest spacing{cover}"


def coarsest_factor(spacing: list[float], thickness_mm: dict[str, float]) -> tuple[float, str]:
    """The largest of :data:`SPACING_FACTORS` at which the finest axis keeps :data:`VOXELS_ACROSS` voxels
    across the thinnest structure (1 when even the median spacing does not), and why."""
    present = {k: v for k, v in thickness_mm.items() if v > 0}
    if not present:
        return 1.0, "no structure thickness in the fingerprint: the median spacing is kept"
    name, thinnest = min(present.items(), key=lambda kv: kv[1])
    limit = thinnest / VOXELS_ACROSS
    allowed = [f for f in SPACING_FACTORS if min(spacing) * f <= limit + 1e-9] or [1.0]
    return max(allowed), (
        f"the thinnest structure, '{name}', is {thinnest:.3g} mm thick (volume-weighted median over its "
        f"components and the cases): at {VOXELS_ACROSS:g} voxels across the spacing may reach {limit:.3g} mm"
    )


def ladder(max_factor: float) -> list[Rung]:
    """The configurations tried, cheapest last (see the module docstring)."""
    factors = [f for f in SPACING_FACTORS if f <= max_factor]
    rungs = [Rung(1.0, WIDTHS[0], 1.0)]
    for width in WIDTHS[1:]:
        coverages = COVERAGES if width == WIDTHS[-1] else COVERAGES[:-1]
        rungs += [Rung(f, width, 1.0) for f in factors] + [Rung(factors[-1], width, c) for c in coverages]
    return rungs


def coarser_spacing(spacing: list[float], factor: float) -> list[float]:
    """Each axis at least ``factor`` times the finest spacing (coarse axes unchanged until reached)."""
    floor = min(spacing) * factor
    return [max(s, floor) for s in spacing]


PlanRung = Callable[[Rung, list[float], list[float]], Configuration]
"""Plans one rung: (rung, spacing, median shape at that spacing) -> configuration."""


def plan_budget(
    request: BudgetRequest,
    spacing: list[float],
    median_shape: list[float],
    thickness_mm: dict[str, float],
    plan_rung: PlanRung,
    reasons: list[str],
) -> Configuration:
    """The first rung of :func:`ladder` whose step fits ``request``'s budget, as the ``3d_budget``
    configuration with its :class:`BudgetPlan`; :class:`AutosegError` with the smallest budget that would do
    when none fits."""
    max_factor, why = coarsest_factor(spacing, thickness_mm)
    allowed = request.seconds_per_step
    tried = []
    for rung in ladder(max_factor):
        sp = coarser_spacing(spacing, rung.factor)
        shape = [m * s0 / s1 for m, s0, s1 in zip(median_shape, spacing, sp)]
        config = plan_rung(rung, sp, shape)
        step = request.timer(config, allowed)
        tried.append(f"{rung.describe()}: {step.seconds:.3g} s ({step.how})")
        if step.seconds <= allowed:
            reasons.append(_reason(request, rung, config, step, why, tried))
            return _with_budget(config, request, step)
    if step.how == "estimated":  # the smallest budget that would do is named from a timed step
        step = request.timer(config, math.inf)
    need = math.ceil(step.seconds * request.min_steps / (1 - OVERHEAD) / 60)
    raise AutosegError(
        f"--time-budget {request.minutes:g}: too short for any sensible network on {request.device}: the "
        f"cheapest plan ({rung.describe()}, patch {'x'.join(map(str, config.patch_size))}) takes "
        f"{step.seconds:.3g} s per training step, and {request.min_steps} steps need at least {need} minutes"
    )


def _with_budget(config: Configuration, request: BudgetRequest, step: StepTime) -> Configuration:
    steps = int(request.minutes * 60 * (1 - OVERHEAD) / step.seconds)
    iters = min(MAX_ITERS_PER_EPOCH, max(MIN_ITERS_PER_EPOCH, steps // TARGET_EPOCHS))
    budget = BudgetPlan(
        minutes=float(request.minutes),
        device=request.device,
        seconds_per_step=round(step.seconds, 4),
        timing=step.how,
        planned_steps=steps,
        iters_per_epoch=iters,
        val_iters=max(1, round(iters * VALIDATION_SHARE)),
    )
    return Configuration(**{**config.__dict__, "budget": budget})


def _reason(request, rung, config, step, why, tried) -> str:
    return (
        f"3d_budget: {request.minutes:g} min on {request.device}, so a training step may take at most "
        f"{request.seconds_per_step:.3g} s ({request.min_steps} steps in {1 - OVERHEAD:.0%} of the budget); {why}; "
        f"tried in order: {'; '.join(tried)}. Chosen: {rung.describe()}, spacing "
        f"{'x'.join(f'{s:.3g}' for s in config.spacing)} mm, patch {'x'.join(map(str, config.patch_size))}, "
        f"batch {config.batch_size}: about {int(request.minutes * 60 * (1 - OVERHEAD) / step.seconds)} steps"
    )
