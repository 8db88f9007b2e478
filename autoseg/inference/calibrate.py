"""Temperature scaling (one temperature, or one per zone of distance to the predicted structure) of the
probabilities ``predict`` saves (find-best fits the temperature, see
docs/calibration.md and :mod:`autoseg.evaluation.calibration`).

The label maps are computed before, from the uncalibrated probabilities; a temperature never changes them
(it keeps the order of the classes in every voxel, and every ``p > 0.5`` decision of a region), so only the
saved probabilities (and what is derived from them, such as uncertainty) change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from autoseg.evaluation.calibration import (
    RELEVANT_BAND,
    ZONES,
    apply_temperature,
    apply_zone_temperatures,
    channel_temperatures,
    describe_zones,
    zone_temperatures,
)

__all__ = ["apply_temperature", "calibrator", "describe"]

_log = logging.getLogger("autoseg")


def calibrator(
    calibration: Mapping | None, region_based: bool, regions: Sequence[str] = ()
) -> Callable[[np.ndarray], np.ndarray] | None:
    """The function predict applies to every probability array it saves, from the inference instructions'
    ``calibration`` entry (``None`` or ``{}``: identity, returns ``None``). ``regions``: the region names in
    channel order (region-based datasets: ``temperature`` is ``{region: T}``; a :class:`ValueError` if one is
    missing). With ``zones`` (``{"band", "temperature"}``), the zone temperatures, else the one temperature."""
    if calibration and calibration.get("zones"):
        zones = calibration["zones"]
        band = int(zones.get("band", RELEVANT_BAND))
        ztemps = zone_temperatures(zones["temperature"], region_based, regions)

        def calibrate_zones(probs: np.ndarray) -> np.ndarray:
            return apply_zone_temperatures(probs, ztemps, region_based, band)

        return calibrate_zones
    if not calibration or "temperature" not in calibration:
        return None
    temps = channel_temperatures(calibration["temperature"], region_based, regions)

    def calibrate(probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, temps, region_based)

    return calibrate


def describe(calibration: Mapping | None) -> str:
    """One line for the predict log: the temperature(s), or why none is applied."""
    if calibration and calibration.get("zones"):
        zones = calibration["zones"]
        band = zones.get("band", RELEVANT_BAND)
        return f"zone temperatures ({'/'.join(ZONES)}, band {band} voxels) {describe_zones(zones['temperature'])}"
    if not calibration or "temperature" not in calibration:
        return "none"
    t = calibration["temperature"]
    if isinstance(t, Mapping):
        return "temperature " + ", ".join(f"{k} {float(v):.3g}" for k, v in t.items())
    return f"temperature {float(t):.3g}"
