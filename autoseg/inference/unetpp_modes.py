"""UNet++'s two inference modes, measured on the cross-validation so that predict spends what pays.

Zhou et al. (2018) train UNet++ with a head on every nested full-resolution node ``X[0][1..L]`` and offer two
ways to answer at test time: *accurate*, the mean of the ``L`` heads, and *fast*, the network pruned at depth
``d``: only the nodes ``X[i][j]`` with ``i + j <= d`` are computed and the head of ``X[0][d]`` answers, so a
shallow ``d`` skips the deep encoder stages and most of the nested decoder. Whether a pruned network loses
Dice depends on the data, so :func:`choose_unetpp_mode` predicts every validation case of the
cross-validation (each with the fold that validated it, without mirroring) in every mode, and chooses the
cheapest mode whose mean Dice is within ``tolerance`` of the best mode's: fast at depth 1 < 2 < ... < L <
accurate (the accurate mode computes the whole network and all its heads). Dice is computed as for mirroring
(:mod:`autoseg.inference.mirroring`: on the network's grid against the preprocessed reference, per structure,
averaged over cases then structures); the seconds each mode took are recorded beside its Dice.
"""

from __future__ import annotations

import logging
import time

from autoseg.inference.mirroring import mean_dice_by_subset, structure_dice, validation_cases

_log = logging.getLogger("autoseg")


def modes(depth: int) -> list[tuple[str, int]]:
    """Every mode of a UNet++ of ``depth`` nested levels, cheapest first: ``("fast", 1) .. ("fast", depth),
    ("accurate", depth)``."""
    return [("fast", d) for d in range(1, depth + 1)] + [("accurate", depth)]


def mode_name(mode: tuple[str, int]) -> str:
    return "accurate" if mode[0] == "accurate" else f"fast@{mode[1]}"


def cheapest_mode(mean_dice: dict[tuple[str, int], float], tolerance: float) -> tuple[str, int]:
    """The first mode of :func:`modes`' order (cheapest) whose Dice is at least the best's minus ``tolerance``."""
    best = max(mean_dice.values())
    return next(m for m in mean_dice if mean_dice[m] >= best - tolerance)


def measure_modes(predictors: dict, cases: dict, structures, regions: bool) -> tuple[dict, dict]:
    """``({mode: mean Dice or None}, {mode: seconds})`` of every mode over the validation ``cases``
    (``predictors``: fold -> :class:`Predictor` without mirroring whose one network is a UNet++)."""
    per_case, seconds = [], {}
    for fold, items in cases.items():
        predictor = predictors[fold]
        (runner,) = predictor.runners
        network = runner.network
        for image, seg, background in items:
            scores = {}
            for mode in modes(network.depth):
                network.set_inference(*mode)
                start = time.perf_counter()
                probs = predictor.predict_preprocessed(image, background=background)
                seconds[mode] = seconds.get(mode, 0.0) + time.perf_counter() - start
                scores[mode] = structure_dice(probs, seg, structures, regions)
            per_case.append(scores)
        network.set_inference("accurate")
    return mean_dice_by_subset(per_case), seconds


def choose_unetpp_mode(
    work, plans, config: str, case_folds: dict[str, int], tolerance: float, device
) -> dict:
    """Measure every mode of the UNet++ ``config`` on its cross-validation (``case_folds``: validation case ->
    fold) and choose the cheapest within ``tolerance`` of the best Dice. Returns ``{"inference", "prune_depth",
    "tolerance", "mean_dice": {"fast@1": Dice, ..., "accurate": Dice}, "seconds": {...}}``."""
    from autoseg.inference.predictor import Predictor
    from autoseg.settings import InferenceSettings

    settings = InferenceSettings(mirroring=False, compile="off", unetpp_inference="accurate")
    cases, structures = validation_cases(work, plans, config, case_folds)
    predictors = {f: Predictor(work, config, [f], device, settings, plans=plans) for f in cases}
    scores, seconds = measure_modes(predictors, cases, structures, plans.region_based)
    usable = {m: d for m, d in scores.items() if d is not None}
    chosen = cheapest_mode(usable, tolerance) if usable else list(scores)[-1]  # no Dice at all: accurate
    _log.info(
        "UNet++: %s chosen (Dice by mode: %s)",
        mode_name(chosen),
        ", ".join(f"{mode_name(m)} {d:.4f}" for m, d in usable.items()),
    )
    return {
        "inference": chosen[0],
        "prune_depth": chosen[1],  # the accurate mode carries the network's depth
        "tolerance": tolerance,
        "mean_dice": {mode_name(m): d for m, d in scores.items()},
        "seconds": {mode_name(m): round(s, 3) for m, s in seconds.items()},
    }
