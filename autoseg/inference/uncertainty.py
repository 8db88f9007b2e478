"""Uncertainty maps of ``predict --save-uncertainty``: entropy of the ensemble mean and the members' disagreement.

The members of an ensemble are its folds × mirror flips (× configurations). Their mean probabilities ``p̄`` are
what predict saves and segments; besides it the sliding window keeps ONE per-voxel scalar, the mean over
members of each member's own entropy ``E_m[H(p_m)]`` (:func:`member_entropy`), so memory is flat in the number
of classes and of members (no member's probabilities are kept). From these two (BALD decomposition):

- ``entropy`` = ``H(p̄)``: the total predictive uncertainty (high where the model is unsure, whether or not the
  members agree);
- ``mutual_information`` = ``H(p̄) − E_m[H(p_m)]`` ≥ 0: the part due to the members disagreeing (zero when every
  member says the same, whatever it says; high where confident members contradict each other).

Units: a softmax plan's entropies are divided by ``log K`` (K classes), so 0 = certain, 1 = uniform over every
class. A region-based (sigmoid) plan is R independent yes/no questions: the map is the mean over regions of
each region's binary entropy in bits (``/ log 2``), 0..1 again. Mutual information is in the same units, so
``entropy = mutual_information + E_m[H(p_m)]``; with K classes, two certain members voting for two different
classes give ``log 2 / log K`` (1 for two classes or one region).

:func:`finish_probabilities` is the one place where an ensemble's mean probabilities become the final ones
(what is saved, segmented and measured here): a calibration step belongs there, before the entropy.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.special import xlogy

from autoseg.errors import DatasetError

ENTROPY = "entropy"
DISAGREEMENT = "mutual_information"
TABLE_NAME = "uncertainty.csv"
MAP_SUFFIX = "_uncertainty.npz"
COLUMNS = (
    "case",
    "structure",
    "volume_ml",
    "entropy_inside",
    "entropy_boundary",
    "mutual_information_inside",
    "mutual_information_boundary",
)


def _scale(num_outputs: int, region_based: bool) -> float:
    """What divides a summed entropy (in nats) to give 0..1."""
    return num_outputs * math.log(2) if region_based else math.log(num_outputs)


def member_entropy(probs: torch.Tensor, region_based: bool) -> torch.Tensor:
    """Normalised entropy of each member's probabilities ``(B, K, ...)`` → ``(B, ...)`` (module units)."""
    h = -torch.special.xlogy(probs, probs).sum(1)
    if region_based:
        q = 1 - probs
        h -= torch.special.xlogy(q, q).sum(1)
    return h / _scale(probs.shape[1], region_based)


def entropy_map(probs: np.ndarray, region_based: bool) -> np.ndarray:
    """Normalised entropy of probabilities ``(K, ...)`` → float32 ``(...)`` in 0..1, one channel at a time (a
    running sum: memory of two single-channel volumes whatever K)."""
    h = np.zeros(probs.shape[1:], dtype=np.float32)
    for k in range(probs.shape[0]):
        p = np.asarray(probs[k], dtype=np.float32)
        h -= xlogy(p, p)
        if region_based:
            h -= xlogy(1 - p, 1 - p)
    h /= _scale(probs.shape[0], region_based)
    return np.clip(h, 0, 1, out=h)


def uncertainty_maps(
    probs: np.ndarray,
    mean_member_entropy: np.ndarray | None,
    region_based: bool,
    members_mean: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``{"entropy": H(probs)}`` and, given the members' mean entropy, ``"mutual_information"``: the entropy
    of the members' own mean (``members_mean``; None: ``probs`` itself) minus it, clipped to 0..1 (the linear
    resampling between grids can leave float-rounding negatives)."""
    total = entropy_map(probs, region_based)
    maps = {ENTROPY: total}
    if mean_member_entropy is not None:
        own = (
            total
            if members_mean is None or members_mean is probs
            else entropy_map(members_mean, region_based)
        )
        maps[DISAGREEMENT] = np.clip(own - mean_member_entropy, 0, 1)
    return maps


def finish_probabilities(
    probs: np.ndarray,
    mean_member_entropy: np.ndarray | None,
    region_based: bool,
    uncertainty: bool,
    calibrate: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """The one place where an ensemble's mean probabilities (a whole volume or a slab of one, any grid)
    become the probabilities that are saved, and, with ``uncertainty``, their maps. ``calibrate`` (find-best's
    temperature, :func:`autoseg.inference.calibrate.calibrator`; None: identity) is applied first, and the
    entropy is that of the calibrated mean; the members' disagreement is the uncalibrated mean's entropy minus
    the members' mean entropy, both of the network's own probabilities (the members are not calibrated, and
    mixing the two would inflate it). Label maps are made from ``probs``, not from the result: a temperature
    does not reorder the classes."""
    final = probs if calibrate is None else calibrate(probs)
    if not uncertainty:
        return final, None
    return final, uncertainty_maps(final, mean_member_entropy, region_based, members_mean=probs)


def map_path(target: Path, case_id: str) -> Path:
    """``<case>_uncertainty.npz`` beside the case's label file ``target``."""
    return Path(target).with_name(case_id + MAP_SUFFIX)


def check_map_targets(
    case_ids: Sequence[str], targets: Sequence[Path], continue_: bool, overwrite: bool
) -> list[str]:
    """Refuse (before anything is written) an existing uncertainty map of a case about to be predicted, unless
    ``continue_`` (such a case has no label file yet: its map is rewritten) or ``overwrite``; a map path that is
    a folder or another output of this run. Returns the names of the files these add (maps and the table),
    whose temporaries a killed run may have left."""
    others = {Path(t).resolve() for t in targets}
    existing = []
    for case_id, target in zip(case_ids, targets):
        path = map_path(target, case_id)
        if path.is_dir():
            raise DatasetError(f"{path}: is a folder where predict writes an output file; move it away")
        if path.resolve() in others:
            raise DatasetError(
                f"{path}: the uncertainty map of case '{case_id}' would replace another output"
            )
        if os.path.lexists(path):
            existing.append(path)
    if existing and not (continue_ or overwrite):
        raise DatasetError(
            f"{existing[0]}: already exists ({len(existing)} uncertainty map(s)); use --continue to skip them "
            "or --overwrite"
        )
    return [map_path(t, c).name for c, t in zip(case_ids, targets)] + [TABLE_NAME]


def save_maps(path: Path, maps: Mapping[str, np.ndarray], geometry) -> Path:
    """Write the maps as float16 arrays (the image file's array order and grid) with the image's geometry
    (``spacing_mm`` in array order, ``origin_mm`` and ``direction`` as SimpleITK gives them), atomically."""
    from autoseg.jsonio import save_npz

    arrays = {name: m.astype(np.float16) for name, m in maps.items()}
    return save_npz(
        path,
        **arrays,
        spacing_mm=np.asarray(geometry.spacing_mm, dtype=np.float64),
        origin_mm=np.asarray(geometry.origin_mm, dtype=np.float64),
        direction=np.asarray(geometry.direction, dtype=np.float64),
    )


def structure_rows(
    case_id: str,
    seg: np.ndarray,
    maps: Mapping[str, np.ndarray],
    structures: Mapping[str, Sequence[int]],
    spacing_mm: Sequence[float],
) -> list[dict[str, str]]:
    """One row per structure: its predicted volume in mL, and the mean of each map inside it and on its
    boundary (the structure's voxels with a face-neighbour outside it: a one-voxel shell). Means of an empty
    structure are left blank, as is a map not written (one member: no disagreement)."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    face = ndimage.generate_binary_structure(seg.ndim, 1)
    rows = []
    for name, values in structures.items():
        mask = np.isin(seg, list(values))
        shell = mask & ~ndimage.binary_erosion(mask, structure=face)
        row = {"case": case_id, "structure": name, "volume_ml": f"{mask.sum() * voxel_ml:.6g}"}
        for key in (ENTROPY, DISAGREEMENT):
            for where, region in (("inside", mask), ("boundary", shell)):
                have = key in maps and region.any()
                row[f"{key}_{where}"] = (
                    f"{float(maps[key][region].mean(dtype=np.float64)):.6g}" if have else ""
                )
        rows.append(row)
    return rows


class UncertaintyTable:
    """``uncertainty.csv`` of an output folder, rewritten (atomically) after each case so it always matches
    the maps written. Rows of other cases already there are kept when that case's map is still beside it (a
    ``--continue`` run adds to the table); rows of the cases predicted now are replaced."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / TABLE_NAME
        self.rows: dict[str, list[dict[str, str]]] = {}
        for row in self._existing():
            if (self.path.parent / (row["case"] + MAP_SUFFIX)).is_file():
                self.rows.setdefault(row["case"], []).append(row)

    def _existing(self) -> list[dict[str, str]]:
        try:
            with open(self.path, encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                if tuple(reader.fieldnames or ()) != COLUMNS:
                    return []  # another layout (an older autoseg): rebuilt from this run's cases
                return [r for r in reader if r.get("case")]
        except (OSError, UnicodeDecodeError, csv.Error):
            return []

    def add(self, case_id: str, rows: list[dict[str, str]]) -> Path:
        from autoseg.jsonio import write_text

        self.rows[case_id] = rows
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for case in sorted(self.rows):
            writer.writerows(self.rows[case])
        return write_text(self.path, text.getvalue())
