"""Training with a boundary loss: batches carry the cases' stored signed distance maps, moved, mirrored and
cropped with the labels; a run makes the maps once and the next runs reuse them (an unreadable one is made
again, naming it)."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.layout import WorkDir
from autoseg.planning.plans import Plans
from autoseg.preprocessing.distance_maps import FOLDER, ensure_distance_maps, map_channels, map_file
from autoseg.settings import AugmentationSettings, TrainSettings
from autoseg.training.dataloader import BatchMaker, LoaderSpec
from autoseg.training.loop import train_fold
from autoseg.training.sampling import CaseStore, PatchSampler

CPU = torch.device("cpu")
STRONG = AugmentationSettings(p_rotation=1.0, p_scale=1.0, scale_min=0.8, scale_max=1.4, p_mirror=1.0)


@pytest.fixture()
def work_copy(planned_phantom, tmp_path) -> WorkDir:
    dst = tmp_path / "work"
    shutil.copytree(planned_phantom.root, dst, ignore=shutil.ignore_patterns("results", FOLDER))
    return WorkDir(dst)


def _spec(work: WorkDir, maps: bool) -> LoaderSpec:
    data = work.preprocessed("fullres")
    return LoaderSpec(
        data_dir=data,
        case_ids=tuple(sorted(p.stem for p in data.glob("*.json"))),
        previous_dir=None,
        extract_size=(20, 40, 40),
        patch_size=(16, 32, 32),
        batch_size=3,
        dim=3,
        oversample_foreground=0.33,
        augmentation=STRONG,
        spacing=(1.0, 1.0, 1.0),
        num_classes=3,
        seed=5,
        fold_index=0,
        distance_maps=maps,
    )


AXES_AND_ELASTIC = replace(STRONG, p_rot90=1.0, p_transpose=1.0, p_elastic=1.0)


@pytest.mark.parametrize("augmentation", [STRONG, AXES_AND_ELASTIC], ids=["spatial", "rot90-transpose-elastic"])
def test_batches_carry_maps_that_move_with_the_labels(work_copy, augmentation):
    """Rotated, zoomed (past the extracted patch) and mirrored, and also turned by 90 degrees, transposed and
    elastically deformed: each map is <= 0 exactly on its class's voxels, positive elsewhere (large beyond the
    image); data and labels are those of a run without maps."""
    plans = Plans.load(work_copy.plans)
    spec = replace(_spec(work_copy, maps=True), augmentation=augmentation)
    ensure_distance_maps(spec.data_dir, list(spec.case_ids), map_channels(plans), plans.ignore_label)
    with_maps, without = BatchMaker(spec), BatchMaker(replace(spec, distance_maps=False))
    for it in range(4):
        batch, plain = with_maps.make(0, it), without.make(0, it)
        assert set(batch) == {"data", "seg", "dist"} and "dist" not in plain
        np.testing.assert_array_equal(batch["data"], plain["data"])
        np.testing.assert_array_equal(batch["seg"], plain["seg"])
        dist, seg = batch["dist"], batch["seg"][:, 0]
        assert dist.shape == (3, 2, 16, 32, 32) and dist.dtype == np.float32
        for c in (1, 2):
            assert np.array_equal(dist[:, c - 1] <= 0, seg == c)
        assert dist.max() > 10


def test_gathering_by_index_gives_what_carrying_the_maps_gives(work_copy, monkeypatch):
    """The index channel (every patch) and the maps as seg channels (patches of 2^24 voxels or more): the
    same augmented maps, voxel for voxel."""
    from autoseg.training import augmentation

    plans = Plans.load(work_copy.plans)
    spec = _spec(work_copy, maps=True)
    ensure_distance_maps(spec.data_dir, list(spec.case_ids), map_channels(plans), plans.ignore_label)
    maker = BatchMaker(spec)
    batch = maker.sampler.next_batch()
    results = []
    for limit in (2**24, 0):
        monkeypatch.setattr(augmentation, "INDEX_LIMIT", limit)
        np.random.seed(4)
        results.append(augmentation.augment(maker.transforms, {k: v.copy() for k, v in batch.items()}))
    np.testing.assert_array_equal(results[0]["seg"], results[1]["seg"])
    np.testing.assert_allclose(results[0]["dist"], results[1]["dist"], rtol=0, atol=1e-4)
    assert not np.array_equal(results[0]["dist"], batch["dist"][:, :, 2:18, 4:36, 4:36])  # it did move


def test_2d_patches_take_the_maps_of_their_slice(work_copy):
    data = work_copy.preprocessed("fullres")
    ids = sorted(p.stem for p in data.glob("*.json"))
    plans = Plans.load(work_copy.plans)
    ensure_distance_maps(data, ids, map_channels(plans), plans.ignore_label)
    store = CaseStore(data, ids, distance_maps=True)
    batch = PatchSampler(store, [48, 48], 4, 2, 0.5, np.random.default_rng(1)).next_batch()
    assert batch["dist"].shape == (4, 2, 48, 48)
    for c in (1, 2):
        assert np.array_equal(batch["dist"][:, c - 1] <= 0, batch["seg"][:, 0] == c)


def test_an_unreadable_map_is_refused_naming_it(work_copy):
    data = work_copy.preprocessed("fullres")
    ids = sorted(p.stem for p in data.glob("*.json"))
    plans = Plans.load(work_copy.plans)
    ensure_distance_maps(data, ids, map_channels(plans), plans.ignore_label)
    map_file(data, ids[0]).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(AutosegError, match=f"^{map_file(data, ids[0])}: unreadable distance map"):
        CaseStore(data, ids, distance_maps=True).maps(ids[0])


def test_a_boundary_run_makes_the_maps_once_and_later_runs_reuse_them(work_copy, caplog):
    settings = TrainSettings(
        epochs=1, iters_per_epoch=2, val_iters=1, seed=3, loader_workers=0, loss="dice+ce+0.01*boundary"
    )
    data = work_copy.preprocessed("fullres")
    ids = sorted(p.stem for p in data.glob("*.json"))
    train_fold(work_copy, "3d_fullres", 0, replace(settings, loss="dice+ce"), CPU)
    assert not (data / FOLDER).exists()  # no boundary term: no maps
    with caplog.at_level(logging.INFO, logger="autoseg"):
        train_fold(work_copy, "3d_fullres", 0, settings, CPU, overwrite=True)
    assert f"signed distance maps of {len(ids)} case(s) made" in caplog.text  # every fold's cases at once
    made = {c: map_file(data, c).stat().st_mtime_ns for c in ids}
    broken = map_file(data, ids[1])
    broken.write_bytes(broken.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="autoseg"):
        train_fold(work_copy, "3d_fullres", 1, settings, CPU)
    assert f"{broken}: distance map unreadable" in caplog.text
    assert "signed distance maps of 1 case(s) made" in caplog.text
    assert {c: map_file(data, c).stat().st_mtime_ns for c in ids if c != ids[1]} == {
        c: t for c, t in made.items() if c != ids[1]
    }
    assert (work_copy.fold_dir("3d_fullres", 1) / WorkDir.CHECKPOINT_FINAL).is_file()
