"""Saved probability files (``<case>.npz``, key ``probabilities``, ``(K, *label file shape)``) against reference
label maps: checking them, their calibration metrics (``evaluate --probabilities``) and the temperature fit of
find-best. The metrics and the fit themselves are :mod:`autoseg.evaluation.calibration`.

``K`` is one channel per class (background first) for a softmax dataset, one per region in ``dataset.json``
order for a region-based one: what ``predict --save-probabilities`` and the final validation of a fold write.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.evaluation.calibration import (
    N_BINS,
    RELEVANT_BAND,
    ZONES,
    CalibrationStats,
    apply_temperature,
    apply_zone_temperatures,
    case_statistics,
    channel_temperatures,
    fit_temperature,
    predicted_foreground,
    relevant_voxels,
    sample_indices,
    structure_channels,
    zone_map,
    zone_temperatures,
)
from autoseg.io.dataset import DatasetSpec
from autoseg.io.dicom_seg import load_label_any, segment_values
from autoseg.io.volume import read_header

PROBABILITIES_KEY = "probabilities"
FIT_VOXELS = 200_000
"""Voxels sampled (over all cases together) for a temperature fit: enough for a scalar, fast to fit."""

Item = tuple[str, Path, Sequence[Path]]
"""``(case, reference label file, probability files)``: several files are averaged (an ensemble)."""


def expected_channels(spec: DatasetSpec) -> int:
    """Channels a probability file of ``spec``'s dataset holds: regions, or classes with background."""
    return len(spec.regions) if spec.region_based else spec.num_classes


def structures_of(spec: DatasetSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """:func:`structure_channels` of the dataset (its foreground labels and regions)."""
    return structure_channels(spec.foreground_labels, spec.regions, spec.region_based)


def npz_shape(path: Path) -> tuple[int, ...]:
    """Shape of ``probabilities`` in the ``.npz`` file ``path``, read from its header only; an
    :class:`AutosegError` naming the file if it is not a readable ``.npz`` with that array."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{PROBABILITIES_KEY}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            reader = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = reader(fh)
    except KeyError:
        raise AutosegError(f"{path}: holds no '{PROBABILITIES_KEY}' array") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise AutosegError(f"{path}: not a readable .npz of probabilities ({exc})") from None
    if dtype.kind != "f":
        raise AutosegError(f"{path}: probabilities of type {dtype}, expected floating point")
    return tuple(int(s) for s in shape)


def check_probability_files(
    folder: Path, cases: Sequence[tuple[str, Path]], spec: DatasetSpec
) -> dict[str, Path]:
    """``{case: folder/<case>.npz}`` for every ``(case, reference file)``, each checked before any is read in
    full: it exists, and its header's shape is ``(K, *reference shape)`` with ``K`` =
    :func:`expected_channels`. An :class:`AutosegError` (one line naming the file) otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AutosegError(f"{folder}: probabilities folder not found")
    want = expected_channels(spec)
    what = f"{want} {'regions' if spec.region_based else 'classes (background first)'}"
    out = {}
    for case, reference in cases:
        path = folder / f"{case}.npz"
        if not path.is_file():
            raise AutosegError(
                f"{path}: no probabilities for case {case} (predict with --save-probabilities)"
            )
        shape = npz_shape(path)
        ref_shape = _reference_shape(reference)
        if len(shape) < 2 or shape[0] != want:
            raise AutosegError(
                f"{path}: {shape[0] if shape else 0} probability channels, the dataset has {what}"
            )
        if ref_shape is not None and shape[1:] != ref_shape:
            raise AutosegError(
                f"{path}: probabilities of shape {shape[1:]} do not fit the reference {reference} {ref_shape}"
            )
        out[case] = path
    return out


def _reference_shape(reference: Path) -> tuple[int, ...] | None:
    try:
        return tuple(read_header(reference).shape)
    except Exception:  # a DICOM-SEG reference: its shape is checked when it is read
        return None


def load_item(item: Item, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """The reference label map and the (mean) probabilities of one :data:`Item`, shapes checked."""
    case, reference_path, prob_paths = item
    reference, _ = load_label_any(reference_path, spec.allowed_values, segment_values(spec))
    total = None
    for path in prob_paths:
        try:
            with np.load(path) as z:
                probs = np.asarray(z[PROBABILITIES_KEY])
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise AutosegError(f"{path}: cannot read probabilities ({exc})") from None
        if probs.shape != (expected_channels(spec), *reference.shape):
            raise AutosegError(
                f"{path}: probabilities of shape {probs.shape} do not fit the reference {reference_path} {reference.shape}"
            )
        total = probs.astype(np.float32) if total is None else total + probs
    assert total is not None
    if len(prob_paths) > 1:
        total /= len(prob_paths)
    return reference, total


def calibration_summary(items: Sequence[Item], spec: DatasetSpec, workers: int = 1) -> dict:
    """``evaluate --probabilities``: ECE, Brier score and NLL per structure, pooled over the cases'
    foreground-relevant voxels, per case, and the reliability-diagram bins (``summary.json``'s
    ``calibration``)."""
    structures = structures_of(spec)

    def one(item: Item) -> dict[str, CalibrationStats]:
        reference, probs = load_item(item, spec)
        return case_statistics(probs, reference, structures, spec.ignore_label)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        per_case = list(pool.map(one, items))
    pooled = {name: CalibrationStats() for name in structures}
    for stats in per_case:
        for name, s in stats.items():
            _merge(pooled[name], s)
    return {
        "n_bins": N_BINS,
        "relevant_band_voxels": RELEVANT_BAND,
        "voxels": "foreground-relevant: reference or predicted structure, dilated by the band (docs/calibration.md)",
        "mean": {name: s.to_json() for name, s in pooled.items()},
        "per_case": [
            {"case": item[0], "label": name, **s.to_json()}
            for item, stats in zip(items, per_case)
            for name, s in stats.items()
        ],
        "reliability": {name: s.reliability() for name, s in pooled.items()},
    }


def _merge(into: CalibrationStats, other: CalibrationStats) -> None:
    into.count += other.count
    into.confidence += other.confidence
    into.positives += other.positives
    into.squared_error += other.squared_error
    into.log_loss += other.log_loss


def fit_calibration(
    items: Sequence[Item], spec: DatasetSpec, max_voxels: int = FIT_VOXELS, seed: int = 0
) -> dict:
    """Fit the calibration on cross-validation probabilities (find-best) and measure ECE before and after.

    Two calibrations are fitted on one sample: one temperature (per region for a region-based output), and a
    temperature per zone of distance to the predicted structure (:func:`zone_map`). With the identity they are
    the candidates; :func:`choose_calibration` keeps the one with the lowest mean ECE over the structures among
    those that raise no structure's ECE. Per case, up to ``max_voxels / cases`` voxels are drawn by
    :func:`_fit_samples` (a fixed seed: the same WORK gives the same fit). ECE before and after is over all
    relevant voxels of every case (in-sample). Returns the inference instructions' ``calibration`` entry:
    ``temperature`` (the one-temperature fit; 1 when the identity is kept), ``zones`` (``{"band",
    "temperature"}``, only when they are kept: predict then applies them), ``kept``, ``ece_before``,
    ``ece_after`` (of the kept candidate), ``candidates`` (each one's parameters and ECE after), ``voxels``,
    ``method``."""
    rng = np.random.default_rng(seed)
    per_case = max(1, max_voxels // max(1, len(items)))
    structures = structures_of(spec)
    samples: dict[str, list] = {}
    before = {name: CalibrationStats() for name in structures}
    for item in items:
        reference, probs = load_item(item, spec)
        for name, s in case_statistics(probs, reference, structures, spec.ignore_label).items():
            _merge(before[name], s)
        for key, sample in _fit_samples(probs, reference, spec, per_case, rng).items():
            samples.setdefault(key, []).append(sample)
    single, zoned, voxels = {}, {}, 0
    for key, parts in samples.items():
        p, y, w, z = (np.concatenate([part[i] for part in parts], axis=-1) for i in range(4))
        sigmoid = spec.region_based
        single[key] = fit_temperature(p, y, sigmoid=sigmoid, weights=w)
        zoned[key] = {
            zone: (
                fit_temperature(p[..., z == k], y[z == k], sigmoid, w[z == k])
                if np.any(z == k)
                else single[key]
            )
            for k, zone in enumerate(ZONES)
        }
        voxels += int(y.size)
    if spec.region_based:
        temperature, zone_temps = single, zoned
    else:
        temperature, zone_temps = single.get("", 1.0), zoned.get("", dict.fromkeys(ZONES, 1.0))
    regions = list(spec.regions)
    candidates = {
        "temperature": lambda a: apply_temperature_array(a, temperature, spec.region_based, regions),
        "zones": lambda a: apply_zone_array(a, zone_temps, spec.region_based, regions),
    }
    after = {c: {name: CalibrationStats() for name in structures} for c in candidates}
    for item in items:
        reference, probs = load_item(item, spec)
        for c, calibrate in candidates.items():
            stats = case_statistics(calibrate(probs), reference, structures, spec.ignore_label)
            for name, s in stats.items():
                _merge(after[c][name], s)
    ece_before = {n: s.ece() for n, s in before.items()}
    ece = {"identity": ece_before} | {c: {n: s.ece() for n, s in st.items()} for c, st in after.items()}
    mean = {c: _mean_ece(e) for c, e in ece.items()}
    kept = choose_calibration(ece_before, ece)
    params = {"identity": None, "temperature": temperature, "zones": zone_temps}
    identity = dict.fromkeys(regions, 1.0) if spec.region_based else 1.0
    # with zones kept, "temperature" still holds the one-temperature fit: what an autoseg without zones applies
    out = {"temperature": identity if kept == "identity" else temperature}
    if kept == "zones":
        out["zones"] = {"band": RELEVANT_BAND, "temperature": zone_temps}
    out.update(
        kept=kept,
        ece_before=ece_before,
        ece_after=ece[kept],
        candidates={
            c: {"parameters": params[c], "ece_after": e, "mean_ece_after": mean[c]} for c, e in ece.items()
        },
        voxels=voxels,
        method=(
            f"kept: {kept}. Candidates: the identity, one temperature, and one temperature per zone of distance "
            f"to the predicted structure ({', '.join(ZONES)}; band {RELEVANT_BAND} voxels); each temperature "
            "minimises the NLL of every voxel (of its zone) of the cross-validation probabilities, estimated from "
            "a stratified, weighted sample (zones, and foreground-relevant voxels: reference or predicted "
            f"foreground dilated by {RELEVANT_BAND} voxels). Kept: the lowest mean ECE over the structures among "
            "the candidates that raise no structure's ECE (the identity always qualifies). ECE: "
            f"{N_BINS} equal-width bins on the foreground-relevant voxels of every case (in-sample)"
        ),
    )
    return out


def choose_calibration(ece_before: dict, ece_after: dict[str, dict]) -> str:
    """The candidate of ``ece_after`` (``{candidate: {structure: ECE}}``, in order of preference on a tie,
    ``"identity"`` first) with the lowest mean ECE among those whose ECE is no higher than ``ece_before`` on any
    structure (``None``, a structure without relevant voxels, is not compared)."""
    best, best_mean = "identity", _mean_ece(ece_before)
    for name, ece in ece_after.items():
        worse = any(
            after is not None and ece_before.get(s) is not None and after > ece_before[s] + 1e-12
            for s, after in ece.items()
        )
        m = _mean_ece(ece)
        if not worse and m is not None and (best_mean is None or m < best_mean):
            best, best_mean = name, m
    return best


def _mean_ece(ece: dict) -> float | None:
    values = [v for v in ece.values() if v is not None]
    return float(np.mean(values)) if values else None


def _fit_samples(probs, reference, spec: DatasetSpec, n: int, rng) -> dict[str, tuple]:
    """Sampled ``(probabilities, labels, weights, zones)`` of one case for :func:`fit_temperature`: key ``""``
    (softmax: ``(K, n)`` and class indices) or each region's name (sigmoid: ``(n,)`` and 0/1); ``zones`` the
    :func:`zone_map` index of each voxel.

    Stratified by zone and by foreground relevance (8 strata, an equal share of the draws each), each voxel
    weighted by its stratum's size over its draws, so the weighted NLL stands for every voxel of the case (or
    of a zone) while foreground, its band and every zone are represented (a fit on the relevant voxels alone
    leaves the far background at a foreground probability of about 0.13 on the spinal cord; see
    docs/calibration.md)."""
    valid = (
        reference != spec.ignore_label if spec.ignore_label is not None else np.ones(reference.shape, bool)
    )
    if not spec.region_based:
        fg = np.isin(reference, spec.foreground_values)
        pred = predicted_foreground(probs)
        idx, w, z = _stratified(relevant_voxels(fg, pred), zone_map(pred), valid, n, rng)
        flat = probs.reshape(probs.shape[0], -1)
        return {"": (flat[:, idx].astype(np.float32), reference.ravel()[idx].astype(np.int64), w, z)}
    out = {}
    for k, (name, values) in enumerate(spec.regions.items()):
        ref = np.isin(reference, values)
        pred = probs[k] > 0.5
        m = n // len(spec.regions) or 1
        idx, w, z = _stratified(relevant_voxels(ref, pred), zone_map(pred), valid, m, rng)
        out[name] = (probs[k].ravel()[idx].astype(np.float32), ref.ravel()[idx], w, z)
    return out


def _stratified(
    relevant: np.ndarray, zones: np.ndarray, valid: np.ndarray, n: int, rng
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices of up to ``n / 8`` valid voxels of each (zone, relevant or not) stratum, each one's
    weight (its stratum's voxel count over the stratum's draws) and its zone."""
    parts, weights, zone_of = [], [], []
    share = max(n // (2 * len(ZONES)), 1)
    for k in range(len(ZONES)):
        in_zone = (zones == k) & valid
        for mask in (in_zone & relevant, in_zone & ~relevant):
            idx = sample_indices(mask, share, rng)
            if idx.size:
                parts.append(idx)
                weights.append(np.full(idx.size, int(mask.sum()) / idx.size))
                zone_of.append(np.full(idx.size, k, dtype=np.int8))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int8)
    return np.concatenate(parts), np.concatenate(weights), np.concatenate(zone_of)


def apply_temperature_array(
    probs: np.ndarray, temperature, region_based: bool, regions: Sequence[str] = ()
) -> np.ndarray:
    """``probs`` ``(K, ...)`` with ``temperature`` applied: a number (softmax), or ``{region: T}`` /
    a number for every channel (sigmoid); what predict applies (:func:`apply_temperature`). float32."""
    temps = channel_temperatures(temperature, region_based, regions)
    return apply_temperature(probs, temps, region_based).astype(np.float32, copy=False)


def apply_zone_array(
    probs: np.ndarray, temperatures, region_based: bool, regions: Sequence[str] = ()
) -> np.ndarray:
    """``probs`` ``(K, ...)`` with zone ``temperatures`` applied: ``{zone: T}`` (softmax) or ``{region: {zone:
    T}}`` (sigmoid); what predict applies (:func:`apply_zone_temperatures`). float32."""
    temps = zone_temperatures(temperatures, region_based, regions)
    return apply_zone_temperatures(probs, temps, region_based).astype(np.float32, copy=False)
