"""Temperature scaling of the probabilities ``predict`` saves (find-best fits the temperature, see
docs/calibration.md and :mod:`autoseg.evaluation.calibration`).

The label maps are computed before, from the uncalibrated probabilities; a temperature never changes them
(it keeps the order of the classes in every voxel, and every ``p > 0.5`` decision of a region), so only the
saved probabilities (and what is derived from them, such as uncertainty) change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from autoseg.evaluation.calibration import EPS

_log = logging.getLogger("autoseg")


def apply_temperature(
    probs: np.ndarray, temperature: float | Sequence[float], region_based: bool = False
) -> np.ndarray:
    """``probs`` ``(K, ...)`` after temperature scaling, in ``probs``' dtype.

    Softmax (``region_based`` False, one scalar): ``softmax(log(p) / T)`` over axis 0, i.e. ``p_k^(1/T)``
    renormalised, computed one channel at a time against the voxel's largest probability, so memory is two
    float32 volumes plus the result whatever the number of classes. Sigmoid: ``sigmoid(logit(p) / T_k)`` per
    channel, ``temperature`` a scalar or one per channel. ``T = 1`` returns ``probs`` itself.
    """
    if region_based:
        temps = (
            [float(temperature)] * probs.shape[0]
            if np.isscalar(temperature)
            else [float(t) for t in temperature]
        )
        if len(temps) != probs.shape[0]:
            raise ValueError(f"{len(temps)} temperatures for {probs.shape[0]} region channels")
    else:
        temps = [float(temperature)]
    if any(not (math.isfinite(t) and t > 0) for t in temps):
        raise ValueError(f"temperatures must be positive numbers, got {temps}")
    if all(t == 1.0 for t in temps):
        return probs
    out = np.empty_like(probs)
    if region_based:
        for k, t in enumerate(temps):
            p = np.clip(probs[k].astype(np.float32), EPS, 1 - EPS)
            out[k] = 1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / t))
        return out
    inv_t = 1.0 / temps[0]
    log_max = np.log(np.clip(probs.max(axis=0).astype(np.float32), EPS, 1.0))
    total = np.zeros(probs.shape[1:], dtype=np.float32)
    for k in range(probs.shape[0]):
        total += _scaled(probs[k], log_max, inv_t)
    for k in range(probs.shape[0]):
        out[k] = _scaled(probs[k], log_max, inv_t) / total
    return out


def _scaled(p: np.ndarray, log_max: np.ndarray, inv_t: float) -> np.ndarray:
    """``(p / p_max)^(1/T)`` in float32, in the log domain (never overflows; the largest class gives 1)."""
    z = np.log(np.clip(p.astype(np.float32), EPS, 1.0))
    z -= log_max
    z *= inv_t
    return np.exp(z, out=z)


def calibrator(
    calibration: Mapping | None, region_based: bool, regions: Sequence[str] = ()
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The function predict applies to every probability array it saves, from the inference instructions'
    ``calibration`` entry (``None`` or ``{}``: identity, returns ``None``). ``regions``: the region names in
    channel order (region-based datasets: ``temperature`` is ``{region: T}``; a :class:`ValueError` if one is
    missing)."""
    if not calibration or "temperature" not in calibration:
        return None
    t = calibration["temperature"]
    if region_based:
        missing = [r for r in regions if isinstance(t, Mapping) and r not in t]
        if missing:
            raise ValueError(f"calibration.temperature has no value for region(s) {missing}")
        temps = [float(t[r]) for r in regions] if isinstance(t, Mapping) else [float(t)] * len(regions)
    else:
        temps = float(t)

    def calibrate(probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, temps, region_based)

    return calibrate


def describe(calibration: Mapping | None) -> str:
    """One line for the predict log: the temperature(s), or why none is applied."""
    if not calibration or "temperature" not in calibration:
        return "none"
    t = calibration["temperature"]
    if isinstance(t, Mapping):
        return "temperature " + ", ".join(f"{k} {float(v):.3g}" for k, v in t.items())
    return f"temperature {float(t):.3g}"
