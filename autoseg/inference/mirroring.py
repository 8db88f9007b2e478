"""Test-time mirroring that pays for itself: which mirror axes are worth their passes on this dataset.

Mirroring over a set of axes ``A`` averages the probabilities of the ``2^|A|`` flips that are subsets of ``A``
(``()`` is the plain pass), so it costs ``2^|A|`` times the network time. :func:`measure_mirroring` predicts
every validation case of a cross-validation ONCE per flip of all the configuration's axes (8 sliding windows
in 3D, each case with the fold that validated it) and then forms every axis subset's probabilities by
averaging the flips it contains: every subset's Dice from one pass of 8 windows, not from 8 mirrored
predictions (27 windows). Dice is computed on the network's grid against the preprocessed reference
(``<case>_seg.npy``: what training saw), per structure (label, or region for region-based plans), averaged over
cases then structures. :func:`cheapest_axes` picks the subset with the fewest passes whose Dice is within
``tolerance`` of the best subset's (ties: higher Dice, then fewer and lower axes).
"""

from __future__ import annotations

import itertools
import logging

import numpy as np

from autoseg.evaluation.metrics import confusion

_log = logging.getLogger("autoseg")


def axis_subsets(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every subset of ``axes``, smallest first: ``(), (0,), (1,), ..., (0, 1, 2)``."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def subset_probabilities(flips: dict[tuple[int, ...], np.ndarray], subset: tuple[int, ...]) -> np.ndarray:
    """The mirrored prediction over ``subset``: the mean of the flips' probabilities (already flipped back)
    whose axes all lie in ``subset``."""
    members = [p for f, p in flips.items() if set(f) <= set(subset)]
    return np.mean(members, axis=0)


def structure_dice(probs: np.ndarray, seg: np.ndarray, structures: list[list[int]], regions: bool) -> list:
    """Dice per structure (``structures``: the labels each one joins) of ``probs`` ``(K, ...)`` against the
    label map ``seg``; None where both are empty. ``regions``: channel ``i`` is structure ``i`` (sigmoid,
    > 0.5); else the arg-max label is compared."""
    labels = None if regions else probs.argmax(0)
    out = []
    for i, joined in enumerate(structures):
        pred = probs[i] > 0.5 if regions else np.isin(labels, joined)
        tp, fp, fn, _ = confusion(np.isin(seg, joined), pred)
        out.append(None if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return out


def cheapest_axes(mean_dice: dict[tuple[int, ...], float], tolerance: float) -> tuple[int, ...]:
    """The subset with the fewest passes whose Dice is at least the best's minus ``tolerance``."""
    best = max(mean_dice.values())
    good = [s for s, d in mean_dice.items() if d >= best - tolerance]
    return min(good, key=lambda s: (len(s), -mean_dice[s], s))


def flip_probabilities(predictor, image: np.ndarray, axes: tuple[int, ...], background=None) -> dict:
    """Probabilities of ``image`` ``(C, ...)`` for each flip of ``axes`` (patch axes), flipped back: the
    whole image is flipped (the tile grid is symmetric, so this is the per-tile flip up to rounding of tile
    starts), predicted without mirroring by ``predictor`` (a :class:`Predictor`), and flipped back."""
    out = {}
    first = image.ndim - len(axes)  # image axis of patch axis 0 (a 2D network's slices are along axis 0)
    for flip in axis_subsets(axes):
        dims = tuple(a + first for a in flip)
        x = np.ascontiguousarray(np.flip(image, dims)) if dims else image
        p = predictor.predict_preprocessed(x, background=background)
        out[flip] = np.ascontiguousarray(np.flip(p, dims)) if dims else p
    return out


def mean_dice_by_subset(per_case: list[dict[tuple[int, ...], list]]) -> dict[tuple[int, ...], float | None]:
    """Per subset: the mean over structures of each structure's mean Dice over cases (None values skipped)."""
    out = {}
    for subset in per_case[0]:
        columns = zip(*(case[subset] for case in per_case))
        means = [np.mean(v) for v in ([x for x in col if x is not None] for col in columns) if v]
        out[subset] = float(np.mean(means)) if means else None
    return out


def measure_mirroring(predictors: dict, cases: dict, structures: list[list[int]], regions: bool) -> dict:
    """Mean Dice of every mirror-axis subset over the validation ``cases``.

    ``predictors``: fold -> :class:`Predictor` (without mirroring) of one configuration; ``cases``: fold ->
    list of ``(image, seg, background)`` (preprocessed image ``(C, ...)``, label map on the same grid, the
    case's background values or None). Returns ``{subset: mean Dice or None}`` over every subset of the
    configuration's axes."""
    per_case = []
    for fold, items in cases.items():
        predictor = predictors[fold]
        axes = tuple(range(predictor.config.dim))
        for image, seg, background in items:
            flips = flip_probabilities(predictor, image, axes, background)
            per_case.append(
                {s: structure_dice(subset_probabilities(flips, s), seg, structures, regions) for s in flips}
            )
    return mean_dice_by_subset(per_case)


def choose_mirroring(work, plans, config: str, case_folds: dict[str, int], tolerance: float, device) -> dict:
    """Measure every mirror-axis subset of ``config`` on its cross-validation (``case_folds``: validation case
    -> fold) and choose the cheapest within ``tolerance`` of the best Dice. Returns ``{"mirror_axes": [...],
    "tolerance", "mean_dice": {"0,1": Dice, ...}, "passes": {...}}`` ("" names the unmirrored pass)."""
    from autoseg.inference.predictor import Predictor
    from autoseg.settings import InferenceSettings

    cfg = plans.configuration(config)
    settings = InferenceSettings(mirroring=False, compile="off")
    cases, structures = validation_cases(work, plans, config, case_folds)
    predictors = {f: Predictor(work, config, [f], device, settings, plans=plans) for f in cases}
    scores = measure_mirroring(predictors, cases, structures, plans.region_based)
    usable = {s: d for s, d in scores.items() if d is not None}
    chosen = cheapest_axes(usable, tolerance) if usable else tuple(range(cfg.dim))
    name = ",".join
    _log.info("mirroring: %s chosen (Dice by axes: %s)", name(map(str, chosen)) or "none", scores)
    return {
        "mirror_axes": list(chosen),
        "tolerance": tolerance,
        "mean_dice": {name(map(str, s)): d for s, d in scores.items()},
        "passes": {name(map(str, s)): 2 ** len(s) for s in scores},
    }


def validation_cases(work, plans, config: str, case_folds: dict[str, int]) -> tuple[dict, list[list[int]]]:
    """``(cases, structures)`` for measuring ``config`` on its cross-validation: ``cases`` fold -> list of
    ``(image, seg, background)`` of its preprocessed validation cases (what training saw); ``structures`` the
    labels each structure joins (one label, or a region's labels)."""
    from autoseg.preprocessing.pipeline import load_case_properties

    data = work.preprocessed(plans.configuration(config).data_identifier)
    cases: dict = {f: [] for f in sorted(set(case_folds.values()))}
    for case, fold in sorted(case_folds.items()):
        image = np.load(data / f"{case}.npy")
        seg = np.load(data / f"{case}_seg.npy")
        cases[fold].append((image, seg, load_case_properties(data, case).background))
    if plans.region_based:
        structures = [list(v) for v in plans.regions.values()]
    else:
        structures = [[v] for v in sorted(set(plans.labels.values())) if v > 0]
    return cases, structures
