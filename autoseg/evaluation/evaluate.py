"""Score predicted label maps against reference label maps: per case, per label and region, then summarised.

``evaluate_case`` and ``summarize`` are pure; ``evaluate_folders`` is the I/O edge that the CLI calls. It pairs
``<case><file_ending>`` files of a prediction folder with the same names in a reference folder, checks their
geometry, scores the cases in parallel threads and writes ``summary.json``, a CSV, ``report.png`` (box plots)
and, on request, one overlay PNG per case, all atomically. Plotting lives in :mod:`autoseg.evaluation.report`,
imported only when a figure is asked for.

Every foreground label of ``dataset.json`` is evaluated as ``label_map == value`` and every region as
``label_map in values``; background (0) is never scored. Metrics and their empty-mask rules are those of
:mod:`autoseg.evaluation.metrics`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.errors import AutosegError
from autoseg.evaluation.metrics import (
    DEFAULT_TOLERANCE_MM,
    METRIC_KEYS,
    METRIC_UNITS,
    MetricValue,
    binary_metrics,
    check_tolerance,
)
from autoseg.evaluation.probabilities import calibration_summary, check_probability_files
from autoseg.io.dataset import DatasetSpec, load_label
from autoseg.io.dicom_seg import (
    DICOM_SEG_ENDING,
    is_dicom_seg_name,
    load_label_any,
    match_orientation,
    segment_values,
)
from autoseg.io.volume import read_volume
from autoseg.jsonio import write_text

SCHEMA_VERSION = 3
"""2: metric keys without unit suffixes (``hd95``, ``assd``; units in ``units``), new metrics and ``tolerance_mm``.
3: ``nsd`` is the area-weighted surface Dice (DeepMind's), the former boundary-voxel count is ``nsd_voxel``;
``missing_distance`` and, per distance metric, ``n_worst``."""

CSV_COLUMNS = ("case", "label", *METRIC_KEYS)
SUMMARIZED_METRICS = tuple(k for k in METRIC_KEYS if k not in ("tp", "fp", "fn", "tn"))
"""The float metrics that get a mean and median; the integer counts are reported per case only."""

EMPTY_RULES = (
    "A metric is null where it is not defined; means and medians leave it out and count it in n_excluded. "
    "Both masks empty: dice, iou, voe, precision, recall, rvd, hd, hd95, assd, nsd and nsd_voxel are null. "
    "Reference empty only: dice 0, iou 0, voe 1, precision 0, nsd 0, nsd_voxel 0; recall, rvd, hd, hd95, "
    "assd null. "
    "Prediction empty only: dice 0, iou 0, voe 1, recall 0, rvd -1, nsd 0, nsd_voxel 0; precision, hd, hd95, "
    "assd null. "
    "specificity is null only where the reference has no background voxel (1 when both masks are empty)."
)

MISSING_DISTANCE_MODES = ("skip", "worst")
"""What a distance (hd, hd95, assd) is where a structure is in only one of the two maps: ``"skip"`` not defined
(``None``, left out of the means and counted in ``n_excluded``), ``"worst"`` the image diagonal in mm."""
DISTANCE_METRICS = ("hd", "hd95", "assd")

WORST_RULE = (
    "missing_distance 'worst': where a structure is in only one of the two maps, hd, hd95 and assd are not "
    "null but the image diagonal in mm, sqrt(sum((shape * spacing)^2)), and count in the means (n_worst)."
)

REPORT_PNG = "report.png"
"""Name of the box-plot figure written beside ``summary.json``."""

# Same tolerances as the dataset's image/label check (autoseg.io.dataset.check_case_geometry).
_SPACING_RTOL, _SPACING_ATOL = 1e-3, 1e-4
_ORIGIN_ATOL_MM, _DIRECTION_ATOL = 1e-2, 1e-3
_MAX_CASES_NAMED = 5

CaseMetrics = dict[str, dict[str, MetricValue]]
"""Metrics of one case: ``{label or region name: binary_metrics(...)}``."""


def structures(
    labels: Mapping[str, int], regions: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[int, ...]]:
    """The structures to score: ``{name: label values}``, foreground labels by value, then regions.

    Background (value 0) is skipped. A region named like a label with exactly that label's value (BraTS
    "enhancing_tumor" = [4]) is the same structure and is scored once; a region named like a label but with
    other values raises ``ValueError``, since the two could not be told apart in the results.
    """
    result = {
        name: (value,) for name, value in sorted(labels.items(), key=lambda item: item[1]) if value != 0
    }
    for name, values in (regions or {}).items():
        values = tuple(int(v) for v in values)
        if name in labels:
            if values != (labels[name],):
                raise ValueError(
                    f"region '{name}' {list(values)} has the name of label '{name}' (value {labels[name]})"
                )
            continue
        result[name] = values
    return result


def evaluate_case(
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    labels: Mapping[str, int],
    regions: Mapping[str, Sequence[int]] | None = None,
    ignore_label: int | None = None,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    missing_distance: str = "skip",
) -> CaseMetrics:
    """Metrics of each foreground label and each region of one case.

    ``reference`` and ``prediction`` are integer label maps of the same shape; ``spacing_mm`` is in the same
    axis order. ``labels`` maps names to values (the value 0, background, is skipped); ``regions`` maps names to
    the label values they unite. Returns ``{name: binary_metrics(...)}`` in the order of :func:`structures`,
    with NSD at ``tolerance_mm``. A structure absent from both maps gets the "both empty" metrics (see the
    metrics module). Voxels where the reference holds ``ignore_label`` are left out: they count as background
    in both maps. With ``missing_distance="worst"`` the distances of a structure in only one map are the
    image diagonal (:func:`image_diagonal_mm`) instead of ``None``. Raises ``ValueError`` on mismatched
    shapes, a negative tolerance, an unknown ``missing_distance`` or a region that clashes with a label (see
    :func:`structures`).
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(
            f"reference shape {reference.shape} differs from prediction shape {prediction.shape}"
        )
    check_tolerance(tolerance_mm)
    _check_missing_distance(missing_distance)
    if ignore_label is not None:
        ignored = reference == ignore_label
        if ignored.any():
            reference = np.where(ignored, 0, reference)
            prediction = np.where(ignored, 0, prediction)
    named = structures(labels, regions)
    # One pass over each map finds every label's bounding box; each structure is then scored on the box of
    # its voxels in either map, instead of building whole-image masks per structure (most of the time on
    # large images with many small labels).
    max_value = max((v for values in named.values() for v in values), default=0)
    ref_boxes = _label_boxes(reference, max_value)
    pred_boxes = _label_boxes(prediction, max_value)
    result: CaseMetrics = {}
    for name, values in named.items():
        box = _joint_box([boxes[v] for boxes in (ref_boxes, pred_boxes) for v in values if v in boxes])
        ref_crop, pred_crop = reference[box], prediction[box]
        if len(values) == 1:
            ref_mask, pred_mask = ref_crop == values[0], pred_crop == values[0]
        else:
            ref_mask, pred_mask = np.isin(ref_crop, values), np.isin(pred_crop, values)
        result[name] = binary_metrics(
            ref_mask, pred_mask, spacing_mm, tolerance_mm, image_voxels=int(reference.size)
        )
    if missing_distance == "worst":
        _set_worst_distances(result, image_diagonal_mm(reference.shape, spacing_mm))
    return result


def image_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    """The diagonal of the image's extent, ``sqrt(sum((shape * spacing)^2))`` in mm: more than any distance
    between two of its voxels, so the worst a surface distance can be (``--missing-distance worst``)."""
    return float(np.sqrt(np.sum((np.asarray(shape, float) * np.asarray(spacing_mm, float)) ** 2)))


def _set_worst_distances(result: CaseMetrics, diagonal_mm: float) -> None:
    """Give the distances of each structure that is in only one of the two maps the value ``diagonal_mm``."""
    for metrics in result.values():
        if _one_mask_empty(metrics):
            metrics.update(dict.fromkeys(DISTANCE_METRICS, diagonal_mm))


def _one_mask_empty(metrics: Mapping[str, MetricValue]) -> bool:
    return (metrics["tp"] + metrics["fn"] == 0) != (metrics["tp"] + metrics["fp"] == 0)


def _check_missing_distance(missing_distance: str) -> None:
    if missing_distance not in MISSING_DISTANCE_MODES:
        raise ValueError(f"missing_distance must be 'skip' or 'worst', got {missing_distance!r}")


def _label_boxes(label_map: np.ndarray, max_value: int) -> dict[int, tuple[slice, ...]]:
    """``{value: bounding box}`` of the values 1..``max_value`` present in ``label_map``.

    Non-integer maps are truncated for the search only, which can only widen a box: every voxel equal to
    an integer value still lies in that value's box.
    """
    if max_value < 1:
        return {}
    if not np.issubdtype(label_map.dtype, np.integer):
        label_map = label_map.astype(np.int64)
    found = ndimage.find_objects(label_map, max_label=max_value)
    return {value: box for value, box in enumerate(found, start=1) if box is not None}


def _joint_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    """The smallest box holding all ``boxes``; an empty box (no voxel) when there are none."""
    if not boxes:
        return (slice(0, 0),)
    return tuple(
        slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes))
        for axis in range(len(boxes[0]))
    )


def summarize(per_case: Mapping[str, CaseMetrics], dice_labels: Sequence[str] | None = None) -> dict:
    """Mean and median of each float metric per label (or region) over the cases where it is defined.

    ``per_case`` maps case ids to :func:`evaluate_case` results. Returns::

        {"mean": {label: {"n_cases": int,
                          metric: {"mean": float | None, "median": float | None,
                                   "n_excluded": int, "excluded_reason": str | None}, ...}},
         "mean_dice": float | None}

    ``n_excluded`` counts the cases whose value is ``None`` and ``excluded_reason`` says which empty-mask rule
    applied in which cases; a metric defined in no case has mean and median ``None``. The distance metrics
    (hd, hd95, assd) also have ``n_worst``: the cases in the mean where the structure is in only one map, which
    have a value only with ``missing_distance="worst"`` (the image diagonal). ``mean_dice`` is the mean over
    ``dice_labels`` (default: every name in ``per_case``) of their mean Dice, leaving out names whose mean
    Dice is ``None``; it is ``None`` if none is left.
    """
    names: list[str] = []
    for case_metrics in per_case.values():
        names.extend(name for name in case_metrics if name not in names)
    mean: dict[str, dict] = {}
    for name in names:
        cases = {case: metrics[name] for case, metrics in per_case.items() if name in metrics}
        mean[name] = {"n_cases": len(cases), **{m: _metric_summary(m, cases) for m in SUMMARIZED_METRICS}}
    dice_means = [
        mean[name]["dice"]["mean"]
        for name in (names if dice_labels is None else dice_labels)
        if name in mean and mean[name]["dice"]["mean"] is not None
    ]
    return {"mean": mean, "mean_dice": float(np.mean(dice_means)) if dice_means else None}


def _metric_summary(metric: str, cases: Mapping[str, Mapping[str, MetricValue]]) -> dict:
    """Mean, median and exclusions of one metric of one structure over ``cases``."""
    values = [m[metric] for m in cases.values() if m[metric] is not None]
    excluded = {case: m for case, m in cases.items() if m[metric] is None}
    entry = {
        "mean": float(np.mean(values)) if values else None,
        "median": float(np.median(values)) if values else None,
        "n_excluded": len(excluded),
        "excluded_reason": _excluded_reason(metric, excluded),
    }
    if metric in DISTANCE_METRICS:
        entry["n_worst"] = sum(m[metric] is not None and _one_mask_empty(m) for m in cases.values())
    return entry


def evaluate_folders(
    reference_dir: str | os.PathLike,
    prediction_dir: str | os.PathLike,
    spec: DatasetSpec,
    output_json: str | os.PathLike | None = None,
    output_csv: str | os.PathLike | None = None,
    workers: int = 2,
    *,
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    report_png: bool = True,
    overlays_dir: str | os.PathLike | None = None,
    images_dir: str | os.PathLike | None = None,
    missing: str = "skip",
    missing_distance: str = "skip",
    probabilities_dir: str | os.PathLike | None = None,
) -> dict:
    """Evaluate every prediction ``<case><spec.file_ending>`` in ``prediction_dir`` against ``reference_dir``.

    A reference without a prediction is, by ``missing``: ``"skip"`` left out (only predicted cases are
    scored: a fold's validation against every training label), ``"error"`` an error naming it, ``"empty"``
    scored as an empty prediction (every structure missed). Each pair must have the same shape, spacing
    (relative tolerance 1e-3), origin (0.01 mm) and direction (1e-3); label maps must hold whole numbers
    declared in ``spec.labels`` (float storage is fine). Labels and ``spec.regions`` are scored per case with
    :func:`evaluate_case` (NSD at ``tolerance_mm``, distances in mm from the reference's spacing, a structure
    in only one map given distances by ``missing_distance``), ``workers`` cases at a time in threads.

    Returns the summary (layout: :func:`_summary`), written to ``output_json`` if given; ``output_csv`` (if
    given) gets one row per case and name (:data:`CSV_COLUMNS`, the JSON's keys; empty where undefined). With ``output_json`` and ``report_png``, ``report.png`` beside it shows the
    per-case metrics as box plots (:func:`autoseg.evaluation.report.plot_report`). ``overlays_dir`` (if given)
    gets ``<case>.png`` per case: the axial slice (array axis 0) with the most reference foreground, reference
    and predicted contours per label drawn over the image ``<case>_0000<ending>`` of ``images_dir`` (nnU-Net's
    imagesTr naming; without ``images_dir``, over the reference label map). ``images_dir`` is only read for
    overlays. Every file is written atomically. ``probabilities_dir`` (if given) holds ``<case>.npz``
    probabilities of every scored case, checked before anything is scored; the summary then gains
    ``calibration`` (ECE, Brier score, NLL per structure and the reliability bins,
    :func:`autoseg.evaluation.probabilities.calibration_summary`), drawn in ``report.png``.

    Raises :class:`AutosegError` with one line naming the file or folder for missing folders, no predictions,
    a prediction without reference, mismatched geometry, undeclared label values, a region that clashes with
    a label, or a missing or misshapen overlay image; ``ValueError`` for ``workers < 1``, a negative
    ``tolerance_mm`` or an unknown ``missing`` or ``missing_distance``.
    """
    _check_options(spec, workers, missing, missing_distance)
    tolerance_mm = check_tolerance(tolerance_mm)
    pairs, n_references = _pair_files(Path(reference_dir), Path(prediction_dir), spec.file_ending, missing)
    calibration_items = _calibration_items(probabilities_dir, pairs, spec)
    images = _check_overlay_targets(pairs, overlays_dir, images_dir)
    score = partial(_evaluate_pair, spec=spec, tolerance_mm=tolerance_mm, missing_distance=missing_distance)
    results = _map_cases(partial(score, overlays=overlays_dir is not None, images=images), pairs, workers)
    per_case = {case: metrics for (case, _, _), (metrics, _) in zip(pairs, results)}
    summary = _summary(per_case, spec, tolerance_mm, missing_distance)
    summary["n_references"] = None if missing == "skip" else n_references
    summary["missing_as_empty"] = [case for case, _, prediction in pairs if prediction is None]
    if calibration_items is not None:
        summary["calibration"] = calibration_summary(calibration_items, spec, workers)
    _write_outputs(summary, output_json, output_csv, report_png)
    if overlays_dir is not None:
        _write_overlays([view for _, view in results], spec.foreground_labels, Path(overlays_dir))
    return summary


def _write_overlays(views: Sequence, labels: Mapping[str, int], overlays_dir: Path) -> None:
    """One ``<case>.png`` per overlay view, drawn in this thread (matplotlib is not thread-safe)."""
    from autoseg.evaluation.report import plot_overlay

    for view in views:
        plot_overlay(view, labels, overlays_dir / f"{view.case}.png")


def _check_options(spec: DatasetSpec, workers: int, missing: str, missing_distance: str) -> None:
    try:
        structures(spec.foreground_labels, spec.regions)  # background and the ignore label are never scored
    except ValueError as exc:
        raise AutosegError(f"dataset.json: {exc}") from None
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if missing not in ("skip", "error", "empty"):
        raise ValueError(f"missing must be 'skip', 'error' or 'empty', got {missing!r}")
    _check_missing_distance(missing_distance)


def _check_overlay_targets(
    pairs: Sequence[tuple[str, Path, Path | None]],
    overlays_dir: str | os.PathLike | None,
    images_dir: str | os.PathLike | None,
) -> Path | None:
    """Refuse a folder where an overlay PNG goes, or a missing image folder; the image folder to read (if any)."""
    if overlays_dir is None:
        return None
    for case, _, _ in pairs:
        png = Path(overlays_dir) / f"{case}.png"
        if png.is_dir():
            raise AutosegError(f"{png}: is a folder where evaluate writes the case's overlay; move it away")
    images = None if images_dir is None else Path(images_dir)
    if images is not None and not images.is_dir():
        raise AutosegError(f"{images}: image folder not found")
    return images


def _evaluate_pair(
    pair: tuple[str, Path, Path | None],
    *,
    spec: DatasetSpec,
    tolerance_mm: float,
    missing_distance: str,
    overlays: bool,
    images: Path | None,
):
    """``(metrics, overlay view or None)`` of one case; a missing prediction is scored as empty."""
    case, reference_path, prediction_path = pair
    if prediction_path is None:
        reference, ref_geom = load_label_any(reference_path, spec.allowed_values, segment_values(spec))
        prediction, spacing_mm = np.zeros_like(reference), ref_geom.spacing_mm
    else:
        reference, prediction, spacing_mm = _load_pair(
            reference_path, prediction_path, spec.allowed_values, segment_values(spec)
        )
    metrics = evaluate_case(
        reference,
        prediction,
        spacing_mm,
        spec.foreground_labels,
        spec.regions,
        spec.ignore_label,
        tolerance_mm,
        missing_distance,
    )
    if not overlays:
        return metrics, None
    from autoseg.evaluation.report import overlay_view

    image = None if images is None else _load_image(images, case, spec.file_ending, reference.shape)
    # only the chosen slices travel back: figures are drawn in this thread (matplotlib is not thread-safe)
    return metrics, overlay_view(case, reference, prediction, spacing_mm, image, spec.ignore_label)


def _map_cases(score, pairs: Sequence, workers: int) -> list:
    """``score`` of each pair, ``workers`` at a time in threads, in the order of ``pairs``."""
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        return list(pool.map(score, pairs))
    finally:
        # On an error, do not read the remaining cases only to throw their results away.
        pool.shutdown(wait=True, cancel_futures=True)


def _summary(
    per_case: Mapping[str, CaseMetrics], spec: DatasetSpec, tolerance_mm: float, missing_distance: str
) -> dict:
    """The summary of the scored cases.

    Layout (:func:`evaluate_folders` adds the last two keys)::

        {"schema_version": 3, "empty_rules": str,
         "tolerance_mm": float,          # of NSD
         "missing_distance": "skip" | "worst",   # distances of a structure in only one map (empty_rules)
         "units": {metric: "ratio" | "mm" | "voxels" | "mL"},
         "per_case": [{"case": id, "label": name, <metrics>}, ...],   # cases sorted, labels then regions
         "mean": {name: ...},            # see summarize()
         "mean_dice": float | None,      # mean of the foreground labels' mean Dice (regions not included)
         "mean_dice_labels": [name, ...],
         "n_cases": int,                 # cases scored (the means are over these)
         "n_references": int | None,     # reference files in reference_dir (None with missing="skip")
         "missing_as_empty": [case, ...]}  # references without a prediction, scored as empty ("empty")
    """
    # the overall mean Dice is over what the network predicts: labels, or regions for region-based datasets
    labels = spec.foreground_labels
    dice_labels = (
        list(spec.regions)
        if spec.region_based
        else [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
    )
    stats = summarize(per_case, dice_labels=dice_labels)
    return {
        "schema_version": SCHEMA_VERSION,
        "empty_rules": EMPTY_RULES + (" " + WORST_RULE if missing_distance == "worst" else ""),
        "tolerance_mm": tolerance_mm,
        "missing_distance": missing_distance,
        "units": dict(METRIC_UNITS),
        "per_case": [
            {"case": case, "label": name, **metrics}
            for case, case_metrics in per_case.items()
            for name, metrics in case_metrics.items()
        ],
        "mean": stats["mean"],
        "mean_dice": stats["mean_dice"],
        "mean_dice_labels": dice_labels,
        "n_cases": len(per_case),
    }


def _write_outputs(
    summary: dict,
    output_json: str | os.PathLike | None,
    output_csv: str | os.PathLike | None,
    report_png: bool,
) -> None:
    """``summary.json``, the per-case CSV and ``report.png``, each where asked for, atomically."""
    if output_json is not None:
        write_text(Path(output_json), json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if output_csv is not None:
        write_text(Path(output_csv), _csv_text(summary["per_case"]))
    if output_json is not None and report_png:
        from autoseg.evaluation.report import plot_report

        plot_report(summary, Path(output_json).with_name(REPORT_PNG))


def _calibration_items(folder, pairs, spec: DatasetSpec) -> list | None:
    """``(case, reference, [probabilities file])`` of every pair, the files checked first (None: no folder)."""
    if folder is None:
        return None
    files = check_probability_files(Path(folder), [(case, ref) for case, ref, _ in pairs], spec)
    return [(case, ref, [files[case]]) for case, ref, _ in pairs]


def _pair_files(
    reference_dir: Path, prediction_dir: Path, ending: str, missing: str = "skip"
) -> tuple[list[tuple[str, Path, Path | None]], int]:
    """``(case, reference, prediction)`` sorted by case id, and the number of references. Every prediction
    file needs a reference; a reference without a prediction is left out, an error, or paired with ``None``
    (to score as empty) by ``missing``. A name that looks like a label file but is not a readable file (a
    folder, a broken link) is an error."""
    for folder, role in ((reference_dir, "reference"), (prediction_dir, "prediction")):
        if not folder.is_dir():
            raise AutosegError(f"{folder}: {role} folder not found")
    predictions = _label_files(prediction_dir, ending)
    predictions += _dicom_seg_only(prediction_dir, ending, {f.name[: -len(ending)] for f in predictions})
    references = _label_files(reference_dir, ending)
    references += _dicom_seg_only(reference_dir, ending, {f.name[: -len(ending)] for f in references})
    if not predictions and missing != "empty":
        raise AutosegError(
            f"{prediction_dir}: no predictions ending in '{ending}' (or '{DICOM_SEG_ENDING}') to evaluate"
        )
    pairs: list[tuple[str, Path, Path | None]] = []
    for prediction in predictions:
        case = prediction.name[: -len(DICOM_SEG_ENDING if is_dicom_seg_name(prediction) else ending)]
        reference = reference_dir / prediction.name
        if not reference.is_file():  # NIfTI and DICOM-SEG may be compared with each other
            other = reference_dir / (case + (ending if is_dicom_seg_name(prediction) else DICOM_SEG_ENDING))
            reference = other if other.is_file() else reference
        if not reference.is_file():
            raise AutosegError(f"{prediction}: no reference {reference} to compare it with")
        pairs.append((case, reference, prediction))
    predicted = {case for case, _, _ in pairs}
    unpredicted = [r for r in references if _case_of(r, ending) not in predicted]
    if unpredicted and missing == "error":
        raise AutosegError(
            f"{prediction_dir / unpredicted[0].name}: prediction missing for reference {unpredicted[0]} "
            f"({len(unpredicted)} of {len(references)} reference(s) unpredicted); predict them, or score "
            "them as empty predictions with --missing-as-empty"
        )
    if missing == "empty":
        pairs += [(_case_of(r, ending), r, None) for r in unpredicted]
    if not pairs:
        raise AutosegError(f"{reference_dir}: no references ending in '{ending}' to evaluate")
    return sorted(pairs, key=lambda p: p[0]), len(references)


def _case_of(path: Path, ending: str) -> str:
    """The case id of a label file ``<case><ending>`` or ``<case>.seg.dcm``."""
    return path.name[: -len(DICOM_SEG_ENDING if is_dicom_seg_name(path) else ending)]


def _label_files(folder: Path, ending: str) -> list[Path]:
    """The ``*<ending>`` files of ``folder`` (hidden names skipped), refusing a folder or broken link named so."""
    found = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(ending):
            continue
        if not f.is_file():
            what = "a broken symbolic link" if f.is_symlink() and not f.exists() else "not a regular file"
            raise AutosegError(f"{f}: {what}, but named like a label file")
        found.append(f)
    return found


def _dicom_seg_only(folder: Path, ending: str, cases: set[str]) -> list[Path]:
    """``<case>.seg.dcm`` files of ``folder`` for cases without a ``<case><ending>`` file."""
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file()
        and is_dicom_seg_name(f)
        and not f.name.startswith(".")
        and f.name[: -len(DICOM_SEG_ENDING)] not in cases
    )


def _load_pair(
    reference_path: Path, prediction_path: Path, allowed: set[int], labels: Mapping[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Both label maps and the spacing, after checking the prediction's geometry against the reference's.
    DICOM-SEG files (``<case>.seg.dcm``) get label values by segment name (``labels``) and are permuted into
    the other file's axis order first."""
    if is_dicom_seg_name(reference_path) or is_dicom_seg_name(prediction_path):
        reference, ref_geom = load_label_any(reference_path, allowed, labels or {})
        prediction, pred_geom = load_label_any(prediction_path, allowed, labels or {})
        prediction, pred_geom = match_orientation(prediction, pred_geom, ref_geom)
    else:
        reference, ref_geom = load_label(reference_path, allowed)
        prediction, pred_geom = load_label(prediction_path, allowed)
    if pred_geom.shape != ref_geom.shape:
        raise AutosegError(
            f"{prediction_path}: shape {pred_geom.shape} differs from reference {reference_path} {ref_geom.shape}"
        )
    if not np.allclose(pred_geom.spacing_mm, ref_geom.spacing_mm, rtol=_SPACING_RTOL, atol=_SPACING_ATOL):
        raise AutosegError(
            f"{prediction_path}: spacing {_fmt(pred_geom.spacing_mm)} mm differs from reference "
            f"{reference_path} {_fmt(ref_geom.spacing_mm)} mm"
        )
    # A flipped or shifted prediction would otherwise score as a poor segmentation instead of failing.
    if not np.allclose(pred_geom.origin_mm, ref_geom.origin_mm, atol=_ORIGIN_ATOL_MM) or not np.allclose(
        pred_geom.direction, ref_geom.direction, atol=_DIRECTION_ATOL
    ):
        raise AutosegError(
            f"{prediction_path}: origin/direction differ from reference {reference_path} "
            f"(tolerance {_ORIGIN_ATOL_MM} mm, {_DIRECTION_ATOL})"
        )
    return reference, prediction, ref_geom.spacing_mm


def _load_image(images_dir: Path, case: str, ending: str, shape: tuple[int, ...]) -> np.ndarray:
    """The first channel ``<case>_0000<ending>`` of a case, as stored (the label maps' axis order)."""
    path = images_dir / f"{case}_0000{ending}"
    if not path.is_file():
        raise AutosegError(f"{path}: no image for the overlay of case {case}")
    image = read_volume(path).array
    if image.shape != tuple(shape):
        raise AutosegError(f"{path}: shape {image.shape} differs from the label map's {tuple(shape)}")
    return image


def _excluded_reason(metric: str, excluded: Mapping[str, Mapping[str, MetricValue]]) -> str | None:
    """Which rule left each case out of ``metric``'s mean, e.g. ``not defined where both masks empty: case02``."""
    if not excluded:
        return None
    by_rule: dict[str, list[str]] = {}
    for case, m in excluded.items():
        reference_empty = m["tp"] + m["fn"] == 0
        prediction_empty = m["tp"] + m["fp"] == 0
        if metric == "specificity" and m["tn"] + m["fp"] == 0:
            rule = "reference has no background"
        elif reference_empty and prediction_empty:
            rule = "both masks empty"
        elif reference_empty:
            rule = "reference empty"
        elif prediction_empty:
            rule = "prediction empty"
        else:
            rule = "value missing"
        by_rule.setdefault(rule, []).append(case)
    parts = []
    for rule, cases in by_rule.items():
        named = ", ".join(cases[:_MAX_CASES_NAMED])
        more = f" and {len(cases) - _MAX_CASES_NAMED} more" if len(cases) > _MAX_CASES_NAMED else ""
        parts.append(f"{rule}: {named}{more}")
    return "not defined where " + "; ".join(parts)


def _csv_text(rows: Sequence[Mapping[str, object]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in CSV_COLUMNS})
    return buffer.getvalue()


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
