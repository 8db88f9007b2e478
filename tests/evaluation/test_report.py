"""Evaluation figures: the slice an overlay shows, and PNGs that are written whole and show what they should."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from autoseg.evaluation.report import REPORT_METRICS, OverlayView, overlay_view, plot_overlay, plot_report


def label_map(shape=(6, 20, 24)) -> np.ndarray:
    """Label 1 on slices 1-3, most voxels on slice 2; label 2 (smaller) on slice 4."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1, 5:10, 5:10] = 1  # 25 voxels
    labels[2, 4:14, 4:14] = 1  # 100 voxels
    labels[3, 6:9, 6:9] = 1  # 9 voxels
    labels[4, 2:8, 15:20] = 2  # 30 voxels
    return labels


def test_overlay_view_takes_the_slice_with_most_reference_foreground():
    reference = label_map()
    prediction = np.zeros_like(reference)
    prediction[5, 0:20, 0:20] = 1  # the prediction's busiest slice does not matter
    image = np.arange(reference.size, dtype=np.float32).reshape(reference.shape)
    view = overlay_view("c1", reference, prediction, (3.0, 0.5, 0.8), image)
    assert (view.slice_index, view.n_slices) == (2, 6)
    assert view.spacing_mm == (0.5, 0.8)
    np.testing.assert_array_equal(view.reference, reference[2])
    np.testing.assert_array_equal(view.prediction, prediction[2])
    np.testing.assert_array_equal(view.image, image[2])


def test_overlay_view_leaves_out_the_ignore_label_and_falls_back_when_empty():
    reference = label_map()
    reference[4, :, :] = 9  # an ignore label filling slice 4
    assert overlay_view("c", reference, reference, (1, 1, 1), ignore_label=9).slice_index == 2
    empty = np.zeros_like(reference)
    # empty reference: the prediction's busiest slice; both empty: the middle slice
    assert overlay_view("c", empty, label_map(), (1, 1, 1)).slice_index == 2
    view = overlay_view("c", empty, empty, (1, 1, 1))
    assert view.slice_index == 3 and view.image is None
    with pytest.raises(ValueError, match="3D"):
        overlay_view("c", empty[0], empty[0], (1, 1))
    with pytest.raises(ValueError, match="image shape"):
        overlay_view("c", empty, empty, (1, 1, 1), image=np.zeros((6, 20, 23)))


def _colour_fraction(png: np.ndarray, rgb: tuple[float, float, float]) -> float:
    """Fraction of pixels within 0.15 of ``rgb`` in every channel."""
    return float(np.mean(np.all(np.abs(png[..., :3] - np.array(rgb)) < 0.15, axis=-1)))


def test_overlay_png_draws_each_label_in_its_own_colour(tmp_path: Path):
    reference = label_map()
    reference[2, 15:19, 18:22] = 2  # both labels on the chosen slice
    prediction = np.roll(reference, 2, axis=2)
    view = overlay_view("case7", reference, prediction, (3.0, 1.0, 1.0), image=reference * 50.0)
    path = plot_overlay(
        view, {"background": 0, "organ": 1, "lesion": 2, "absent": 3}, tmp_path / "o" / "c.png"
    )
    assert path == tmp_path / "o" / "c.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.png"]  # no temporary left behind
    png = imread(path)
    red, green = (0.84, 0.15, 0.16), (0.17, 0.63, 0.17)  # tab:red for the first label, tab:green the second
    assert _colour_fraction(png, red) > 1e-3 and _colour_fraction(png, green) > 1e-3
    # without an image the reference labels are the background picture; a slice without labels draws fine
    plot_overlay(overlay_view("e", np.zeros_like(reference), np.zeros_like(reference), (1, 1, 1)), {}, path)
    assert imread(path).shape[2] in (3, 4)


def _row(case: str, label: str, dice: float | None, hd95: float | None) -> dict:
    row = {"case": case, "label": label}
    row.update(dict.fromkeys(REPORT_METRICS, 0.5))
    row.update(dice=dice, hd95=hd95, nsd=None)  # NSD defined nowhere: an empty panel with a note
    return row


def test_report_png_has_a_panel_per_metric_and_survives_undefined_values(tmp_path: Path):
    summary = {
        "per_case": [
            _row("a", "liver", 0.9, 2.0),
            _row("a", "tumour", None, None),
            _row("b", "liver", 0.7, 6.0),
            _row("b", "tumour", 0.4, 12.5),
        ],
        "tolerance_mm": 2.0,
        "mean_dice": 0.6,
    }
    path = plot_report(summary, tmp_path / "report.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.png"]
    height, width = imread(path).shape[:2]
    assert width > 600 and height > 1000  # two columns, four rows of panels
    many = {"per_case": [_row(c, f"label_{i}", 0.5, 1.0) for c in "abc" for i in range(12)]}
    plot_report(many, tmp_path / "many.png", metrics=("dice", "hd95", "rvd"))
    assert imread(tmp_path / "many.png").shape[1] > width  # wider panels for more labels


def test_plot_overlay_accepts_a_view_built_by_hand(tmp_path: Path):
    slice_ = np.zeros((8, 8), dtype=np.uint8)
    slice_[2:6, 2:6] = 1
    view = OverlayView("x", 0, 1, slice_, slice_, None, (1.0, 2.0))
    plot_overlay(view, {"organ": 1}, tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
