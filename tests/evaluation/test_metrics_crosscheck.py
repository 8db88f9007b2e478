"""Our metrics against MedPy's (an independent implementation, installed for tests only) on real label maps.

The predictions are made from real expert labels the way segmentations typically fail: shifted by a voxel or
two and eroded or dilated at the boundary, on an isotropic MRI grid (spinal cord, 1 mm), a CT grid with 5 mm
slices (spleen, 5 x 0.79 x 0.79 mm) and a 7.5 x 0.5 x 0.5 mm MRI grid, where two different real labels
(grey matter against the whole cord) stand in for a poor prediction.

What must agree, and why:
* dice, iou, precision, recall, specificity and rvd (MedPy's ``ravd`` is signed too): same formulas, exactly.
* hd, assd and the directed mean distances (MedPy's ``asd``): both use the face-connected boundary voxels and
  the Euclidean distance in mm to the nearest boundary voxel of the other mask (MedPy through the EDT, we
  through a k-d tree), so they agree to rounding.
* hd95 differs by definition: MedPy takes the 95th percentile of both directions pooled, we the larger of the
  two directed 95th percentiles (as DeepMind's surface-distance). MedPy's value must equal the pooled
  percentile of our distances, and lie between our two directed percentiles (so never above our hd95).
* nsd_voxel has no MedPy counterpart; it is checked against the EDT of each surface, read at the other's
  boundary. The area-weighted nsd is checked against DeepMind's surface-distance in tests/evaluation/test_nsd.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from autoseg.evaluation.metrics import binary_metrics, surface_distances
from autoseg.io.volume import read_volume
from tests.conftest import real_dataset

medpy = pytest.importorskip(
    "medpy.metric.binary", reason="medpy is not installed (test-only extra: pip install -e '.[dev]')"
)

pytestmark = pytest.mark.realdata
ROUNDING_MM = 1e-9


def _mask(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    volume = read_volume(path, dtype=None)
    return np.rint(volume.array) > 0, volume.spacing_mm


def _pairs() -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """``(name, reference, prediction, spacing_mm)`` from the real labels."""
    pairs = []
    labels_dir = real_dataset("Dataset003_SpinalCordTiny") / "labelsTr"
    ball = ndimage.generate_binary_structure(3, 1)
    # the three distinct label maps (the other ivado cases share ivado_unf01_t1w's); sct_errsm30_t2w is PSR
    for case in ("ivado_unf01_t1w", "sct_errsm30_t1w", "sct_errsm30_t2w"):
        path = labels_dir / f"{case}.nii.gz"
        reference, spacing = _mask(path)
        shifted_eroded = np.roll(ndimage.binary_erosion(reference, ball), 1, axis=2)
        pairs.append((f"{path.name} eroded+shifted", reference, shifted_eroded, spacing))
        pairs.append((f"{path.name} dilated", reference, ndimage.binary_dilation(reference, ball), spacing))
    spleen, spacing = _mask(real_dataset("fixtures") / "msd_spleen2_crop" / "label_spleen.nii.gz")
    opened = ndimage.binary_opening(spleen, ndimage.iterate_structure(ball, 3))
    pairs.append(("spleen opened+shifted", spleen, np.roll(opened, (1, 3, -2), axis=(0, 1, 2)), spacing))
    cord_dir = real_dataset("fixtures") / "sct_t2star_anisotropic"
    grey_matter, spacing = _mask(cord_dir / "label_graymatter_manual.nii.gz")
    cord, _ = _mask(cord_dir / "label_spinalcord.nii.gz")
    pairs.append(("t2star grey matter vs cord", grey_matter, cord, spacing))
    return pairs


@pytest.fixture(scope="module")
def pairs():
    return _pairs()


def test_overlap_and_volume_metrics_equal_medpy(pairs):
    for name, reference, prediction, spacing in pairs:
        ours = binary_metrics(reference, prediction, spacing)
        assert ours["dice"] == pytest.approx(medpy.dc(prediction, reference), rel=1e-12), name
        assert ours["iou"] == pytest.approx(medpy.jc(prediction, reference), rel=1e-12), name
        assert ours["precision"] == pytest.approx(medpy.precision(prediction, reference), rel=1e-12), name
        assert ours["recall"] == pytest.approx(medpy.recall(prediction, reference), rel=1e-12), name
        assert ours["specificity"] == pytest.approx(medpy.specificity(prediction, reference), rel=1e-12), name
        assert ours["rvd"] == pytest.approx(medpy.ravd(prediction, reference), rel=1e-12), name


def test_surface_distances_equal_medpy_and_hd95_differs_only_by_pooling(pairs):
    for name, reference, prediction, spacing in pairs:
        ours = binary_metrics(reference, prediction, spacing)
        ref_to_pred, pred_to_ref = surface_distances(reference, prediction, spacing)
        hd = medpy.hd(prediction, reference, voxelspacing=spacing)
        assd = medpy.assd(prediction, reference, voxelspacing=spacing)
        asd_pred = medpy.asd(prediction, reference, voxelspacing=spacing)  # directed: prediction to reference
        asd_ref = medpy.asd(reference, prediction, voxelspacing=spacing)
        assert ours["hd"] == pytest.approx(hd, abs=ROUNDING_MM), name
        assert ours["assd"] == pytest.approx(assd, abs=ROUNDING_MM), name
        assert pred_to_ref.mean() == pytest.approx(asd_pred, abs=ROUNDING_MM), name
        assert ref_to_pred.mean() == pytest.approx(asd_ref, abs=ROUNDING_MM), name

        theirs = medpy.hd95(prediction, reference, voxelspacing=spacing)
        pooled = np.percentile(np.concatenate([pred_to_ref, ref_to_pred]), 95)
        assert theirs == pytest.approx(pooled, abs=ROUNDING_MM), name
        directed = sorted([np.percentile(ref_to_pred, 95), np.percentile(pred_to_ref, 95)])
        assert directed[0] - ROUNDING_MM <= theirs <= directed[1] + ROUNDING_MM, name
        assert ours["hd95"] == pytest.approx(directed[1], abs=ROUNDING_MM), name
        assert ours["hd95"] > 0 and ours["hd"] >= ours["hd95"], name


@pytest.mark.parametrize("tolerance_mm", [1.0, 2.0])
def test_nsd_voxel_equals_the_edt_count_on_real_masks(pairs, tolerance_mm):
    structure = ndimage.generate_binary_structure(3, 1)
    for name, reference, prediction, spacing in pairs:
        ref_surface = reference ^ ndimage.binary_erosion(reference, structure, border_value=0)
        pred_surface = prediction ^ ndimage.binary_erosion(prediction, structure, border_value=0)
        to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
        to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
        within = np.count_nonzero(to_ref <= tolerance_mm) + np.count_nonzero(to_pred <= tolerance_mm)
        expected = within / (to_ref.size + to_pred.size)
        ours = binary_metrics(reference, prediction, spacing, tolerance_mm=tolerance_mm)["nsd_voxel"]
        assert ours == pytest.approx(expected, abs=1e-12), name
        assert 0 < ours <= 1, name
