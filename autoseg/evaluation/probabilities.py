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
            pooled[name].merge(s)
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


HELD_OUT_GROUPS = 5
"""Cases are split into at most this many groups (case ``i`` in group ``i % 5``: leave one case out up to five
cases) for the held-out choice of :func:`fit_calibration`."""


def fit_calibration(
    items: Sequence[Item], spec: DatasetSpec, max_voxels: int = FIT_VOXELS, seed: int = 0
) -> dict:
    """Fit the calibration on cross-validation probabilities (find-best) and measure ECE before and after.

    Two calibrations are fitted on one sample: one temperature (per region for a region-based output), and a
    temperature per zone of distance to the predicted structure (:func:`zone_map`). With the identity they are
    the candidates. Which one is kept is decided on **held-out** cases: the cases are split into
    :data:`HELD_OUT_GROUPS` groups, each group's cases are calibrated by the candidates fitted on the other
    groups, and :func:`choose_calibration` keeps the lowest mean held-out ECE over the structures among the
    candidates that raise no structure's held-out ECE (with one case, in-sample). The kept candidate's
    parameters are then fitted on every case. Per case, up to ``max_voxels / cases`` voxels are drawn by
    :func:`_fit_samples` (a fixed seed: the same WORK gives the same fit).

    Returns the inference instructions' ``calibration`` entry: ``temperature`` (the one-temperature fit; 1 when
    the identity is kept), ``zones`` (``{"band", "temperature"}``, only when they are kept: predict then applies
    them), ``kept``, ``chosen_on`` ("held-out cases" or "the fitted cases"), ``ece_before``, ``ece_after`` (the
    kept candidate's, in-sample), ``ece_held_out`` (its held-out ECE; None with one case), ``candidates`` (each
    one's parameters, in-sample and held-out ECE), ``voxels``, ``method``."""
    rng = np.random.default_rng(seed)
    per_case = max(1, max_voxels // max(1, len(items)))
    structures = structures_of(spec)
    case_samples: list[dict[str, tuple]] = []
    before = {name: CalibrationStats() for name in structures}
    for item in items:
        reference, probs = load_item(item, spec)
        for name, s in case_statistics(probs, reference, structures, spec.ignore_label).items():
            before[name].merge(s)
        case_samples.append(_fit_samples(probs, reference, spec, per_case, rng))
    ece_before = {n: s.ece() for n, s in before.items()}

    groups = [i % min(HELD_OUT_GROUPS, len(items)) for i in range(len(items))]
    fits = _fit_candidates(case_samples, spec)
    per_case = [{"in": fits} for _ in items]  # what each case is scored under: the fit on every case, and
    if len(set(groups)) > 1:  # the fit on the other groups' cases
        for g in set(groups):
            held_fits = _fit_candidates([cs for cs, h in zip(case_samples, groups) if h != g], spec)
            for i in (i for i, h in enumerate(groups) if h == g):
                per_case[i]["held"] = held_fits
    scores = _pooled_ece(items, per_case, spec)
    in_sample = {"identity": ece_before} | scores["in"]
    held = ({"identity": ece_before} | scores["held"]) if "held" in scores else None
    kept = choose_calibration(ece_before, held if held is not None else in_sample)
    voxels = int(sum(y.size for cs in case_samples for _, y, _, _ in cs.values()))
    return _calibration_entry(kept, fits, ece_before, in_sample, held, voxels, spec)


def _pooled_ece(
    items: Sequence[Item], fit_sets: Sequence[dict[str, dict]], spec: DatasetSpec
) -> dict[str, dict[str, dict[str, float | None]]]:
    """ECE per structure, relevant voxels pooled over the cases, of each candidate of each fit set:
    ``fit_sets[i]`` (``{set name: candidates' fits}``) is what case ``i`` is scored under, each case read once.
    ``{set name: {candidate: {structure: ECE}}}``."""
    structures = structures_of(spec)
    stats: dict[str, dict[str, dict[str, CalibrationStats]]] = {}
    for item, sets in zip(items, fit_sets):
        reference, probs = load_item(item, spec)
        for set_name, fits in sets.items():
            for c, per in _score_case(reference, probs, fits, spec, structures).items():
                for name, st in per.items():
                    pooled = stats.setdefault(set_name, {}).setdefault(c, {})
                    pooled.setdefault(name, CalibrationStats()).merge(st)
    return {
        k: {c: {n: st.ece() for n, st in per.items()} for c, per in by_c.items()} for k, by_c in stats.items()
    }


def _calibration_entry(
    kept: str,
    fits: dict,
    ece_before: dict,
    in_sample: dict,
    held: dict | None,
    voxels: int,
    spec: DatasetSpec,
) -> dict:
    """The instructions' ``calibration`` entry (:func:`fit_calibration`)."""
    regions = list(spec.regions)
    identity = dict.fromkeys(regions, 1.0) if spec.region_based else 1.0
    # with zones kept, "temperature" still holds the one-temperature fit: what an autoseg without zones applies
    out: dict = {"temperature": identity if kept == "identity" else fits["temperature"]}
    if kept == "zones":
        out["zones"] = {"band": RELEVANT_BAND, "temperature": fits["zones"]}
    params = {"identity": None, **fits}
    out.update(
        kept=kept,
        chosen_on="held-out cases"
        if held is not None
        else "the fitted cases (one case: nothing to hold out)",
        ece_before=ece_before,
        ece_after=in_sample[kept],
        ece_held_out=held[kept] if held is not None else None,
        candidates={
            c: {
                "parameters": params[c],
                "ece_after": in_sample[c],
                "ece_held_out": held[c] if held is not None else None,
                "mean_ece_held_out": _mean_ece(held[c]) if held is not None else None,
            }
            for c in in_sample
        },
        voxels=voxels,
        method=(
            f"kept: {kept}. Candidates: the identity, one temperature, and one temperature per zone of distance "
            f"to the predicted structure ({', '.join(ZONES)}; band {RELEVANT_BAND} voxels); each temperature "
            "minimises the NLL of every voxel (of its zone) of the cross-validation probabilities, estimated from "
            "a stratified, weighted sample (zones, and foreground-relevant voxels: reference or predicted "
            f"foreground dilated by {RELEVANT_BAND} voxels). Kept: the lowest mean held-out ECE over the "
            "structures among the candidates that raise no structure's held-out ECE (the identity always "
            f"qualifies); held out: up to {HELD_OUT_GROUPS} groups of cases, each calibrated by the fit on the "
            f"others. ECE: {N_BINS} equal-width bins on the foreground-relevant voxels"
        ),
    )
    return out


def _score_case(reference, probs, fits: dict, spec: DatasetSpec, structures) -> dict[str, dict]:
    """One case's :class:`CalibrationStats` per structure under each candidate of ``fits``."""
    regions = list(spec.regions)
    return {
        c: case_statistics(
            _apply_candidate(c, params, probs, spec.region_based, regions),
            reference,
            structures,
            spec.ignore_label,
        )
        for c, params in fits.items()
    }


def _apply_candidate(candidate: str, params, probs, region_based: bool, regions) -> np.ndarray:
    if candidate == "temperature":
        return apply_temperature_array(probs, params, region_based, regions)
    return apply_zone_array(probs, params, region_based, regions)


def _fit_candidates(case_samples: Sequence[dict[str, tuple]], spec: DatasetSpec) -> dict:
    """``{"temperature": T or {region: T}, "zones": {zone: T} or {region: {zone: T}}}`` fitted on the pooled
    samples of :func:`_fit_samples` (a zone without samples takes the one temperature)."""
    single, zoned = {}, {}
    for key in case_samples[0] if case_samples else ():
        p, y, w, z = (np.concatenate([cs[key][i] for cs in case_samples], axis=-1) for i in range(4))
        single[key] = fit_temperature(p, y, sigmoid=spec.region_based, weights=w)
        zoned[key] = {
            zone: (
                fit_temperature(p[..., z == k], y[z == k], spec.region_based, w[z == k])
                if np.any(z == k)
                else single[key]
            )
            for k, zone in enumerate(ZONES)
        }
    if spec.region_based:
        return {"temperature": single, "zones": zoned}
    return {"temperature": single.get("", 1.0), "zones": zoned.get("", dict.fromkeys(ZONES, 1.0))}


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
