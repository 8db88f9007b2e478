"""Signed distance maps stored beside the preprocessed cases (autoseg.preprocessing.distance_maps): what is
stored, how a patch is cut from it, and when it is made again."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from autoseg.distance import signed_distance
from autoseg.errors import AutosegError
from autoseg.preprocessing.distance_maps import (
    crop_maps,
    ensure_distance_maps,
    map_file,
    open_case_maps,
    write_case_maps,
)


def _two_blobs(shape=(20, 24, 22)) -> np.ndarray:
    """Label 1: a ball in one half; label 2: a box in the other half; label 3 (ignore) a slab."""
    z, y, x = np.indices(shape)
    label = np.zeros(shape, np.uint8)
    label[(z - 10) ** 2 + (y - 6) ** 2 + (x - 11) ** 2 <= 16] = 1
    label[6:14, 15:21, 4:9] = 2
    label[0:2, :, 18:] = 3
    return label


def _case(tmp_path, label, case_id="c0"):
    np.save(tmp_path / f"{case_id}_seg.npy", label)
    return tmp_path


def test_the_stored_map_is_the_signed_distance_of_the_whole_label(tmp_path):
    label = _two_blobs()
    data = _case(tmp_path, label)
    info = write_case_maps(data, "c0", [[1], [2], [1, 2]], ignore_label=3)
    maps, read = open_case_maps(data, "c0")
    assert maps.dtype == np.float16 and maps.shape == (3,) + label.shape
    for i, mask in enumerate([label == 1, label == 2, (label == 1) | (label == 2)]):
        assert np.array_equal(maps[i], signed_distance(mask).astype(np.float16))
    assert read == info and info.max_voxels == [float(m.max()) for m in maps] and min(info.max_voxels) > 10


def test_a_patch_differs_from_the_per_patch_map_only_near_its_border(tmp_path):
    label = _two_blobs()
    data = _case(tmp_path, label)
    write_case_maps(data, "c0", [[1, 2]], None)
    maps, _ = open_case_maps(data, "c0")
    start, size = [2, 0, 3], [16, 14, 16]  # holds the ball, leaves the box (y >= 15) out
    crop = crop_maps(maps, start, size, [True])[0]
    patch = label[2:18, 0:14, 3:19] > 0
    per_patch = signed_distance(patch).astype(np.float16).astype(np.float32)
    idx = np.indices(size)
    to_border = np.min([np.minimum(i, n - 1 - i) for i, n in zip(idx, size)], axis=0)
    # a ball of radius |phi| + 1 around the voxel lies in the patch: its nearest voxel across the boundary too
    interior = to_border > np.abs(crop) + 1
    assert interior.sum() > 500
    assert np.array_equal(crop[interior], per_patch[interior])
    differ = crop != per_patch
    # near the face towards the box the patch alone misses it: its distances are too large there
    assert differ[:, -1, :].sum() > 50 and (crop[differ] < per_patch[differ]).all()
    assert (np.argwhere(differ)[:, 1] >= 8).all()  # nowhere near the other faces


def test_beyond_the_image_the_distance_keeps_growing(tmp_path):
    label = np.zeros((1, 1, 6), np.uint8)
    label[0, 0, :2] = 1  # touches the image's first voxel: outside it, the distance is exact
    data = _case(tmp_path, label)
    write_case_maps(data, "c0", [[1], [2]], None)  # label 2 is absent: its map stays 0, outside too
    maps, info = open_case_maps(data, "c0")
    assert info.max_voxels == [4.0, 0.0]
    crop = crop_maps(maps, [0, 0, -3], [1, 1, 9], [m > 0 for m in info.max_voxels])
    assert crop[0, 0, 0].tolist() == [3, 2, 1, -1, 0, 1, 2, 3, 4]  # the image edge is no boundary
    assert not crop[1].any()
    # past the far end (d = 4 at the last voxel) the lower bound sqrt(d^2 + t^2); the truth is d + t here
    beyond = crop_maps(maps, [0, 0, 4], [1, 1, 4], [True, False])[0, 0, 0]
    assert beyond.tolist() == pytest.approx([3, 4, np.hypot(4, 1), np.hypot(4, 2)])
    away = crop_maps(maps, [0, 0, 8], [1, 1, 3], [True, False])[0, 0, 0]  # not touching the image at all
    assert away.tolist() == pytest.approx([5, np.hypot(4, 4), np.hypot(4, 5)])


def test_maps_are_made_once_and_again_when_stale_or_unreadable(tmp_path, caplog):
    label = _two_blobs()
    data = _case(tmp_path, label)
    _case(tmp_path, label[::-1].copy(), "c1")
    assert ensure_distance_maps(data, ["c0", "c1"], [[1], [2]], None).made == ["c0", "c1"]
    assert ensure_distance_maps(data, ["c0", "c1"], [[1], [2]], None).made == []
    earlier = (data / "c0_seg.npy").stat().st_mtime_ns - 10**9
    os.utime(map_file(data, "c0"), ns=(earlier, earlier))  # the case was preprocessed again since
    assert ensure_distance_maps(data, ["c0", "c1"], [[1], [2]], None).made == ["c0"]
    assert ensure_distance_maps(data, ["c0", "c1"], [[1]], None).made == ["c0", "c1"]  # other channels
    bad = map_file(data, "c1")
    bad.write_bytes(bad.read_bytes()[:200])  # cut short
    with pytest.raises(AutosegError) as err:
        open_case_maps(data, "c1")
    assert str(err.value).startswith(f"{bad}: unreadable distance map") and "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="autoseg"):
        assert ensure_distance_maps(data, ["c0", "c1"], [[1]], None).made == ["c1"]
    assert f"{bad}: distance map unreadable" in caplog.text
    assert np.array_equal(
        open_case_maps(data, "c1")[0][0], signed_distance(label[::-1] == 1).astype(np.float16)
    )


def test_a_label_that_cannot_be_read_is_refused_naming_it(tmp_path):
    (tmp_path / "c0_seg.npy").write_bytes(b"not a numpy file")
    with pytest.raises(AutosegError, match=f"^{tmp_path / 'c0_seg.npy'}: cannot read the label"):
        ensure_distance_maps(tmp_path, ["c0"], [[1]], None)
    assert not map_file(tmp_path, "c0").exists()


def test_a_window_over_the_image_corner_matches_the_formula_voxel_by_voxel():
    rng = np.random.default_rng(0)
    maps = (rng.random((2, 5, 6, 7)) * 8 - 3).astype(np.float16)
    for start, size in (([-2, 3, -1], [6, 6, 9]), ([1, -3, 4], [3, 12, 2]), ([-4, -4, -4], [3, 3, 3])):
        got = crop_maps(maps, start, size, [True, False])
        for q in np.ndindex(*size):
            p = np.add(start, q)
            b = np.clip(p, 0, np.array(maps.shape[1:]) - 1)
            t2 = float(((p - b) ** 2).sum())
            d = float(maps[(0, *b)])
            assert got[(0, *q)] == pytest.approx(np.sqrt(max(d, 0) ** 2 + t2) if t2 else d)
            assert got[(1, *q)] == (0 if t2 else float(maps[(1, *b)]))
