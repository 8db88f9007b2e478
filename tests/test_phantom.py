"""The synthetic phantom dataset: layout, determinism, nesting, contrast, geometry, refusal to clobber."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from autoseg.errors import AutosegError
from autoseg.io.dataset import check_case_geometry, discover_cases, load_dataset_json, load_label
from autoseg.io.volume import read_volume
from autoseg.phantom import (
    DEFAULT_SPACING_MM,
    FLIPPED_CASE_INDEX,
    ODD_SPACING_MM,
    TISSUE_INTENSITY,
    draw_case_params,
    make_phantom_dataset,
    phantom_case,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "Dataset001_Phantom", n_cases=10, seed=0)


def _arrays(root):
    """{case_id: (T1, T2, label)} read back from disk."""
    out = {}
    for case in discover_cases(root):
        images = [read_volume(f, dtype=None).array for f in case.images]
        label, _ = load_label(case.label, {0, 1, 2})
        out[case.case_id] = (*images, label)
    return out


def test_layout_is_a_valid_raw_dataset(dataset):
    spec = load_dataset_json(dataset)
    assert spec.channel_names == ("T1", "T2")
    assert spec.labels == {"background": 0, "organ": 1, "lesion": 2}
    assert spec.file_ending == ".nii.gz"
    assert spec.num_training == 10
    assert spec.name == "AutosegPhantom"

    cases = discover_cases(dataset, spec)
    assert [c.case_id for c in cases] == [f"phantom_{i:03d}" for i in range(10)]
    for case in cases:
        assert [f.name for f in case.images] == [f"{case.case_id}_0000.nii.gz", f"{case.case_id}_0001.nii.gz"]
        geom = check_case_geometry(case)
        assert read_volume(case.images[0], dtype=None).array.dtype == np.float32
        assert read_volume(case.label, dtype=None).array.dtype == np.uint8
        assert geom.shape == read_volume(case.label).array.shape
    # Nothing but the layout (no temporary files left behind by the atomic writes).
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    assert len(list((dataset / "imagesTr").iterdir())) == 20


def test_files_hold_what_phantom_case_renders(dataset):
    on_disk = _arrays(dataset)
    case = phantom_case(seed=0, index=4)
    t1, t2, label = on_disk["phantom_004"]
    np.testing.assert_array_equal(t1, case.images[0])
    np.testing.assert_array_equal(t2, case.images[1])
    np.testing.assert_array_equal(label, case.label)


def test_same_seed_same_arrays_other_seed_differs(tmp_path):
    a = _arrays(make_phantom_dataset(tmp_path / "a", n_cases=3, seed=7))
    b = _arrays(make_phantom_dataset(tmp_path / "b", n_cases=3, seed=7))
    c = _arrays(make_phantom_dataset(tmp_path / "c", n_cases=3, seed=8))
    assert a.keys() == b.keys() == c.keys()
    for cid in a:
        for x, y in zip(a[cid], b[cid]):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes()
        assert not all(x.shape == z.shape and np.array_equal(x, z) for x, z in zip(a[cid], c[cid]))


def test_a_case_does_not_depend_on_how_many_are_generated(dataset, tmp_path):
    small = _arrays(make_phantom_dataset(tmp_path / "small", n_cases=2, seed=0))
    big = _arrays(dataset)
    for cid in small:
        for x, y in zip(small[cid], big[cid]):
            np.testing.assert_array_equal(x, y)
    assert draw_case_params(3, 2) == draw_case_params(3, 2) != draw_case_params(3, 1)


def test_lesion_is_nested_in_organ(dataset):
    for cid, (_, _, label) in _arrays(dataset).items():
        organ, lesion = label == 1, label == 2
        # The lesion fills a hole of the organ: it lies in the hole-filled dilation of label 1 ...
        assert not np.any(lesion & ~ndimage.binary_fill_holes(ndimage.binary_dilation(organ))), cid
        # ... and never touches background: each 6-neighbour of a lesion voxel is organ or lesion.
        assert np.all(label[ndimage.binary_dilation(lesion)] > 0), cid


def test_both_labels_present_with_plausible_sizes(dataset):
    for cid, (_, _, label) in _arrays(dataset).items():
        n_organ, n_lesion = int((label == 1).sum()), int((label == 2).sum())
        # Measured for seeds 0-29: organ (with lesion) 2.4-10.2 % of the volume, lesion 433-1488 voxels.
        assert 0.015 * label.size < n_organ + n_lesion < 0.15 * label.size, cid
        assert 300 < n_lesion < 0.4 * (n_organ + n_lesion), cid
        # One connected lesion and one connected organ region.
        assert ndimage.label(label == 2)[1] == 1, cid
        assert ndimage.label(label > 0)[1] == 1, cid


def test_contrast_per_channel_follows_the_tissue_table():
    """In the noise-free ordering: T2 shows the lesion brightly; in T1 it is only a little darker than the organ."""
    for index in range(4):
        p = draw_case_params(0, index)
        case = phantom_case(0, index)
        label = case.label
        body = (label == 0) & ndimage.binary_erosion(label == 0, iterations=3)
        for ch, image in enumerate(case.images):
            norm = (image - p.offset[ch]) / p.scale[ch]
            organ, lesion = norm[label == 1].mean(), norm[label == 2].mean()
            expected_organ = TISSUE_INTENSITY["organ"][ch]
            expected_lesion = TISSUE_INTENSITY["lesion"][ch]
            # The bias field is within about ±25 % and the blur only touches the boundary.
            assert abs(organ - expected_organ) < 0.25 * expected_organ
            assert abs(lesion - expected_lesion) < 0.25 * expected_lesion
            assert np.median(norm[body]) < organ  # body and air are darker than the organ in both channels
        t1 = (case.images[0] - p.offset[0]) / p.scale[0]
        t2 = (case.images[1] - p.offset[1]) / p.scale[1]
        t2_gap = t2[label == 2].mean() - t2[label == 1].mean()
        t1_gap = t1[label == 1].mean() - t1[label == 2].mean()
        assert t2_gap > 0.3 and 0.03 < t1_gap < t2_gap / 2


def test_spacing_is_anisotropic_and_geometry_varies(dataset):
    spacings, shapes = [], []
    for case in discover_cases(dataset):
        geom = check_case_geometry(case)
        spacings.append(geom.spacing_mm)
        shapes.append(geom.shape)
        assert geom.spacing_mm[0] >= 2 * max(geom.spacing_mm[1:])
        assert geom.spacing_mm[1] == geom.spacing_mm[2]
        assert not np.allclose(geom.origin_mm, 0.0)
        flip = -1.0 if case.case_id == f"phantom_{FLIPPED_CASE_INDEX:03d}" else 1.0
        assert geom.direction == pytest.approx((flip, 0, 0, 0, 1, 0, 0, 0, 1))
    assert spacings.count(DEFAULT_SPACING_MM) == 8 and spacings.count(ODD_SPACING_MM) == 2
    z, y, x = np.array(shapes).T
    assert 20 <= z.min() and z.max() <= 28
    assert min(y.min(), x.min()) >= 56 and max(y.max(), x.max()) <= 72
    assert len(set(shapes)) > 1


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(AutosegError) as err:
        make_phantom_dataset(out, n_cases=1)
    message = str(err.value)
    assert str(out) in message and "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    make_phantom_dataset(out, n_cases=2, overwrite=True)
    # Overwriting with fewer cases leaves no stale case behind; unrelated files are kept.
    make_phantom_dataset(out, n_cases=1, overwrite=True)
    assert [c.case_id for c in discover_cases(out)] == ["phantom_000"]
    assert (out / "notes.txt").read_text() == "mine"


def test_empty_existing_folder_is_fine_and_bad_arguments_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert make_phantom_dataset(tmp_path / "empty", n_cases=1) == tmp_path / "empty"
    with pytest.raises(AutosegError):
        make_phantom_dataset(tmp_path / "none", n_cases=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AutosegError, match="not a folder"):
        make_phantom_dataset(tmp_path / "file", n_cases=1)
