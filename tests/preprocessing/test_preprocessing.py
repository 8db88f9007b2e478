"""Crop, normalize, resample and the per-case pipeline, including the geometry round trip to export."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.inference.export import probabilities_to_segmentation, write_segmentation
from autoseg.io.dataset import discover_cases, load_dataset_json, load_label
from autoseg.io.volume import orientation_code, read_channels
from autoseg.layout import WorkDir
from autoseg.planning.plans import ChannelNormalization, Plans
from autoseg.preprocessing.crop import bbox_of, crop_to_nonzero, uncrop
from autoseg.preprocessing.normalize import normalize_channel
from autoseg.preprocessing.pipeline import load_case_properties, preprocess_image
from autoseg.preprocessing.resample import new_shape, resample_image, resample_label
from tests.conftest import real_dataset


def test_crop_and_uncrop_round_trip():
    img = np.zeros((1, 6, 7, 8), np.float32)
    img[0, 1:5, 1:5, 3:8] = 5
    img[0, 3, 3, 5] = 0  # an enclosed hole stays inside the mask
    lab = (img[0] > 0).astype(np.uint8)
    c_img, c_lab, mask, bbox = crop_to_nonzero(img, lab)
    assert bbox == ((1, 5), (1, 5), (3, 8))
    assert c_img.shape == (1, 4, 4, 5) and mask.all()
    np.testing.assert_array_equal(uncrop(c_lab, bbox, (6, 7, 8)), lab)
    assert bbox_of(np.zeros((3, 3, 3), bool)) == ((0, 3), (0, 3), (0, 3))


def test_normalization_schemes():
    x = np.array([[[0.0, 1.0, 2.0, 3.0]]], np.float32)
    z = normalize_channel(x, ChannelNormalization("zscore"))
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1, rel=1e-5)
    ct = normalize_channel(
        np.array([[[-2000.0, 0.0, 50.0, 3000.0]]]),
        ChannelNormalization("ct", False, -100.0, 200.0, 50.0, 10.0),
    )
    np.testing.assert_allclose(ct.ravel(), [-15.0, -5.0, 0.0, 15.0])
    mask = np.array([[[False, True, True, False]]])
    m = normalize_channel(
        np.array([[[9.0, 1.0, 3.0, 9.0]]]), ChannelNormalization("zscore", use_mask=True), mask
    )
    np.testing.assert_allclose(m.ravel(), [0.0, -1.0, 1.0, 0.0])


def test_new_shape_keeps_the_physical_extent():
    assert new_shape((20, 100, 100), (3.0, 0.5, 0.5), (3.0, 1.0, 1.0)) == (20, 50, 50)
    assert new_shape((7, 9, 11), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (7, 9, 11)


def test_resampled_labels_never_gain_labels():
    rng = np.random.default_rng(0)
    lab = np.zeros((12, 40, 40), np.uint8)
    lab[3:9, 10:30, 10:30] = 1
    lab[5:7, 15:20, 15:20] = 3  # label 2 absent on purpose
    lab[rng.random(lab.shape) > 0.995] = 4
    for target in [(1.0, 0.7, 0.7), (5.0, 1.3, 1.3), (2.0, 0.25, 0.25)]:
        out = resample_label(lab, (3.0, 1.0, 1.0), target)
        assert set(np.unique(out)) <= {0, 1, 3, 4}
        assert out.shape == new_shape(lab.shape, (3.0, 1.0, 1.0), target)
    # a 2-voxel-thick sheet survives a 1.5x downsampling (it covers more than half of some output voxels)
    thin = np.zeros((10, 40, 40), np.uint8)
    thin[:, 20:22, 5:35] = 1
    assert (resample_label(thin, (1.0, 1.0, 1.0), (1.0, 1.5, 1.5)) == 1).any()


def test_image_resampling_is_smooth_and_preserves_constants():
    img = np.full((1, 8, 16, 16), 7.0, np.float32)
    out = resample_image(img, (4.0, 1.0, 1.0), (2.0, 0.5, 0.5))
    assert out.shape == (1, 16, 32, 32)
    np.testing.assert_allclose(out, 7.0, rtol=1e-5)


def _round_trip_dice(work: WorkDir, dataset, out_dir=None) -> list[float]:
    """Preprocess each case's label as a one-hot 'prediction', export it back, compare with the original.

    With ``out_dir``, each export is also written and read back with SimpleITK, whose geometry must be the
    source image's."""
    plans = Plans.load(work.plans)
    config = plans.configuration("3d_fullres")
    spec = load_dataset_json(dataset)
    out = []
    for case in discover_cases(dataset, spec):
        image, geom, source = read_channels(case.images, plans.orientation)
        label, _ = load_label(case.label, set(spec.labels.values()), plans.orientation)
        _, lab_pp, props = preprocess_image(image, geom, source, plans, config, label, case.case_id)
        label, _ = load_label(case.label, set(spec.labels.values()))  # as stored, to compare with the export
        probs = np.stack([(lab_pp == k).astype(np.float32) for k in range(plans.num_classes)])
        seg = probabilities_to_segmentation(probs, props, plans)
        assert seg.shape == source.shape
        if out_dir is not None:
            written = sitk.ReadImage(str(write_segmentation(seg, props, out_dir / f"{case.case_id}.nii.gz")))
            original = sitk.ReadImage(str(case.images[0]))
            assert written.GetSize() == original.GetSize()
            np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), rtol=1e-6)
            np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(written), seg)
        for k in spec.foreground_labels.values():
            a, b = seg == k, label == k
            if b.any():
                out.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return out


def test_phantom_geometry_round_trip(planned_phantom, phantom_dataset):
    dice = _round_trip_dice(planned_phantom, phantom_dataset)
    assert min(dice) > 0.9, dice
    props = load_case_properties(planned_phantom.preprocessed("fullres"), "phantom_001")
    assert props.source_geometry.direction[0] == -1.0  # the flipped phantom case keeps its direction
    assert props.geometry.direction[0] == 1.0  # ... and is flipped to LPS for training


@pytest.mark.realdata
def test_spinal_cord_preprocess_and_round_trip(tmp_path):
    """Dataset003 (RAS and PSR cases): plan + preprocess; labels survive preprocess -> export."""
    from autoseg import api

    dataset = real_dataset("Dataset003_SpinalCordTiny")
    work = WorkDir(tmp_path / "work")
    plans = api.plan(dataset, work.root, workers=2, configurations=("3d_fullres",))
    assert set(plans.configurations) == {"2d", "3d_fullres"}
    data = work.preprocessed("fullres")
    for case in discover_cases(dataset):
        img = np.load(data / f"{case.case_id}.npy", mmap_mode="r")
        seg = np.load(data / f"{case.case_id}_seg.npy")
        assert img.dtype == np.float32 and img.shape[1:] == seg.shape
        assert set(np.unique(seg)) == {0, 1}
    dice = _round_trip_dice(work, dataset, out_dir=tmp_path / "exported")
    assert min(dice) > 0.85, dice
    # the PSR case is trained in LPS and written back in PSR
    props = load_case_properties(work.preprocessed("fullres"), "sct_errsm30_t2w")
    assert orientation_code(props.source_geometry) == "PSR" and orientation_code(props.geometry) == "LPS"


def test_torch_resampler_preprocesses_like_scipy(planned_phantom, phantom_dataset, tmp_path):
    """``plan --resample-device cpu``: the phantom cases at 2.5x1.25x1.25 mm are resampled to 3x1x1 with torch;
    the arrays match the scipy run's to float32 rounding and the labels exactly."""
    from autoseg import api

    work = WorkDir(tmp_path / "work")
    api.plan(phantom_dataset, work.root, workers=1, resample_device="cpu", configurations=("3d_fullres",))
    for npy in sorted(planned_phantom.preprocessed("fullres").glob("*.npy")):
        a, b = np.load(npy), np.load(work.preprocessed("fullres") / npy.name)
        assert a.shape == b.shape
        if npy.name.endswith("_seg.npy"):
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, atol=1e-4)
