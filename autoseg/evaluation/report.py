"""Figures of an evaluation: ``report.png`` (box plots of the per-case metrics) and one overlay PNG per case.

Drawn with matplotlib's object-oriented API (``matplotlib.figure.Figure`` on the Agg canvas), never pyplot: no
global figure state and no backend to select. Figures are drawn by the calling thread only (matplotlib is not
thread-safe); :func:`overlay_view` is plain numpy and may run in worker threads. Every PNG is written
atomically: a temporary file beside the target, then ``os.replace``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from autoseg.jsonio import temp_path_for

REPORT_METRICS = ("dice", "iou", "nsd", "hd95", "assd", "precision", "recall", "rvd")
"""The panels of ``report.png``, in order."""

_TITLES = {
    "dice": "Dice",
    "iou": "IoU",
    "nsd": "NSD",
    "precision": "precision",
    "recall": "recall (sensitivity)",
    "specificity": "specificity",
    "voe": "volume overlap error",
    "rvd": "relative volume difference (signed)",
    "hd": "Hausdorff distance (mm)",
    "hd95": "HD95 (mm)",
    "assd": "ASSD (mm)",
    "reference_volume_ml": "reference volume (mL)",
    "predicted_volume_ml": "predicted volume (mL)",
}
_UNIT_INTERVAL = {"dice", "iou", "nsd", "precision", "recall", "specificity", "voe"}
# tab10 without grey, which would vanish on a greyscale image
_COLOURS = (
    "tab:red",
    "tab:green",
    "tab:blue",
    "tab:orange",
    "tab:purple",
    "tab:cyan",
    "tab:pink",
    "tab:olive",
)


def plot_report(summary: Mapping, path: str | os.PathLike, metrics: Sequence[str] = REPORT_METRICS) -> Path:
    """Box plots of the per-case metrics of an evaluation summary, written to ``path`` (PNG) atomically.

    ``summary`` is what :func:`autoseg.evaluation.evaluate.evaluate_folders` returns (``per_case`` rows with
    ``case``, ``label`` and the metric keys; ``tolerance_mm`` for the NSD title). One panel per metric, one
    box per label or region over the cases where the metric is defined (``None`` is left out; each tick says
    how many cases remain), every case drawn as a dot on its box. A metric defined in no case leaves its
    panel empty with a note. Returns ``path``.
    """
    rows = summary["per_case"]
    names = list(dict.fromkeys(row["label"] for row in rows))
    n_cases = len({row["case"] for row in rows})
    ncols = 2
    calibration = summary.get("calibration")
    panels = len(metrics) + (1 if calibration else 0)
    nrows = max(1, math.ceil(panels / ncols))
    panel_width = max(5.0, 0.7 * len(names) + 1.5)
    fig = Figure(figsize=(ncols * panel_width, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    positions = np.arange(1, len(names) + 1)
    for ax, metric in zip(axes, metrics):
        values = [
            [row[metric] for row in rows if row["label"] == n and row[metric] is not None] for n in names
        ]
        drawn = [(p, v) for p, v in zip(positions, values) if v]
        if drawn:
            ax.boxplot([v for _, v in drawn], positions=[p for p, _ in drawn], widths=0.6, showfliers=False)
            for p, v in drawn:
                # spread evenly, not at random: the same summary always gives the same picture
                offsets = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(1)
                ax.scatter(p + offsets, v, s=12, color="tab:blue", alpha=0.7, zorder=3)
        else:
            ax.text(0.5, 0.5, "not defined in any case", transform=ax.transAxes, ha="center", color="gray")
        rotate = len(names) > 5
        ax.set_xticks(
            positions,
            [f"{n}\n(n={len(v)})" for n, v in zip(names, values)],
            rotation=30 if rotate else 0,
            ha="right" if rotate else "center",
            fontsize="small",
        )
        _finish_panel(ax, metric, len(names), summary.get("tolerance_mm"))
    if calibration:
        plot_reliability(axes[len(metrics)], calibration)
    for ax in axes[panels:]:
        ax.set_visible(False)
    mean_dice = summary.get("mean_dice")
    fig.suptitle(
        f"{n_cases} case(s), per label and region (n: cases where the metric is defined)"
        + ("" if mean_dice is None else f"; mean Dice {mean_dice:.4f}")
    )
    return _save(fig, Path(path), dpi=80)


def _finish_panel(ax, metric: str, n_names: int, tolerance_mm: float | None) -> None:
    """Limits, title and grid of one metric's panel of :func:`plot_report`."""
    ax.set_xlim(0.5, n_names + 0.5)
    title = _TITLES.get(metric, metric)
    if metric == "nsd" and tolerance_mm is not None:
        title += f" at {tolerance_mm:g} mm"
    ax.set_title(title)
    if metric in _UNIT_INTERVAL:
        ax.set_ylim(-0.03, 1.03)
    elif metric == "rvd":
        ax.axhline(0.0, color="gray", lw=0.8)
    ax.grid(axis="y", alpha=0.3)


def plot_reliability(ax, calibration: Mapping) -> None:
    """Reliability diagram of an evaluation summary's ``calibration``: per structure, the observed frequency
    against the mean predicted probability of each non-empty bin (foreground-relevant voxels, pooled over
    cases), the diagonal for perfect calibration; the legend gives each structure's ECE."""
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
    for i, (name, bins) in enumerate(calibration.get("reliability", {}).items()):
        points = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"]) if c is not None]
        if not points:
            continue
        ece = calibration.get("mean", {}).get(name, {}).get("ece")
        label = name + ("" if ece is None else f" (ECE {ece:.3f})")
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", ms=3, color=_COLOURS[i % len(_COLOURS)], label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"reliability ({calibration.get('n_bins', 15)} bins, foreground-relevant voxels)")
    ax.legend(fontsize="small", loc="upper left")
    ax.grid(alpha=0.3)


@dataclass(frozen=True)
class OverlayView:
    """One slice of a case, ready to draw: 2D arrays of shape ``(rows, columns)`` = array axes 1 and 2.

    ``spacing_mm`` is the pixel size along those two axes; ``slice_index`` of ``n_slices`` is the position
    along array axis 0. ``image`` is ``None`` when no image was given (the reference is drawn instead).
    """

    case: str
    slice_index: int
    n_slices: int
    reference: np.ndarray
    prediction: np.ndarray
    image: np.ndarray | None
    spacing_mm: tuple[float, float]


def overlay_view(
    case: str,
    reference: np.ndarray,
    prediction: np.ndarray,
    spacing_mm: Sequence[float],
    image: np.ndarray | None = None,
    ignore_label: int | None = None,
) -> OverlayView:
    """The slice along array axis 0 (axial for the usual ``(z, y, x)`` order) with the most reference foreground.

    ``reference``, ``prediction`` (label maps) and ``image`` (optional) are 3D arrays of the same shape and
    ``spacing_mm`` is in their axis order. Foreground is any value other than 0 and ``ignore_label``. Ties go to
    the lowest index; with an empty reference the slice with the most predicted foreground is taken, with both
    empty the middle slice. Raises ``ValueError`` for arrays that are not 3D or differ in shape.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.ndim != 3 or prediction.shape != reference.shape:
        raise ValueError(
            f"overlays need 3D label maps of one shape, got {reference.shape} and {prediction.shape}"
        )
    if image is not None and np.shape(image) != reference.shape:
        raise ValueError(f"image shape {np.shape(image)} differs from label map shape {reference.shape}")
    index = reference.shape[0] // 2
    for label_map in (reference, prediction):
        foreground = label_map != 0
        if ignore_label is not None:
            foreground &= label_map != ignore_label
        per_slice = np.count_nonzero(foreground, axis=(1, 2))
        if per_slice.any():
            index = int(np.argmax(per_slice))
            break
    return OverlayView(
        case=case,
        slice_index=index,
        n_slices=int(reference.shape[0]),
        reference=np.array(reference[index]),
        prediction=np.array(prediction[index]),
        image=None if image is None else np.array(image[index], dtype=np.float32),
        spacing_mm=(float(spacing_mm[1]), float(spacing_mm[2])),
    )


def plot_overlay(view: OverlayView, labels: Mapping[str, int], path: str | os.PathLike) -> Path:
    """Draw reference (solid) and predicted (dashed) contours of each label of ``labels`` on ``view``'s slice.

    ``labels`` maps names to values (0 is skipped); each label present in the slice gets its own colour and a
    legend entry. The background is the image, windowed to its 0.5-99.5 percentiles, or else the reference
    label map in grey. Pixels are drawn with their physical aspect ratio. Writes ``path`` (PNG) atomically and
    returns it.
    """
    rows, columns = view.reference.shape
    aspect = view.spacing_mm[0] / view.spacing_mm[1]
    width_in = 7.0
    height_in = min(12.0, max(3.0, width_in * rows * aspect / columns + 0.8))
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    ax = fig.subplots()
    if view.image is not None:
        low, high = np.percentile(view.image, [0.5, 99.5])
        ax.imshow(view.image, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect)
    else:
        ax.imshow(view.reference, cmap="gray", vmin=0, vmax=max(1, int(view.reference.max())), aspect=aspect)
    # contours of the padded mask close around objects that touch the slice edge
    ys, xs = np.arange(-1, rows + 1), np.arange(-1, columns + 1)
    handles = []
    foreground = [(n, v) for n, v in sorted(labels.items(), key=lambda item: item[1]) if v != 0]
    for i, (name, value) in enumerate(foreground):
        colour = _COLOURS[i % len(_COLOURS)]
        present = False
        for label_map, style in ((view.reference, "solid"), (view.prediction, "dashed")):
            mask = label_map == value
            if mask.any():
                present = True
                padded = np.pad(mask, 1).astype(np.float32)
                ax.contour(xs, ys, padded, levels=[0.5], colors=[colour], linestyles=style, linewidths=1.3)
        if present:
            handles.append(Line2D([], [], color=colour, label=name))
    handles += [
        Line2D([], [], color="black", linestyle="solid", label="reference"),
        Line2D([], [], color="black", linestyle="dashed", label="prediction"),
    ]
    ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.8)
    ax.set_xlim(-0.5, columns - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.set_axis_off()
    background = "" if view.image is not None else " (reference labels in grey)"
    ax.set_title(f"{view.case}: axis-0 slice {view.slice_index} (of 0-{view.n_slices - 1}){background}")
    return _save(fig, Path(path), dpi=100)


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    tmp = temp_path_for(path, ".png")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
