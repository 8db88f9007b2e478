"""One WORK, two networks, end to end on the phantom: plan U-Net and SegNet together, train two folds of each
2D configuration, find-best (which also scores their cross-architecture ensemble), compare, predict."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg import api
from autoseg.layout import WorkDir
from autoseg.settings import InferenceSettings
from tests.conftest import shrink_network

TRAIN = dict(epochs=1, iters_per_epoch=2, val_iters=1, loader_workers=0, num_folds=2, compile=False,
             mirroring=False)  # fmt: skip


@pytest.mark.slow
def test_two_architectures_in_one_work_train_ensemble_compare_and_predict(phantom_dataset, tmp_path):
    work = WorkDir(tmp_path / "work")
    plans = api.plan(phantom_dataset, work.root, workers=1, architecture="unet,segnet")
    assert {"2d", "2d_segnet", "3d_fullres", "3d_fullres_segnet"} <= set(plans.configurations)
    shrink_network(work, base=4, cap=16)
    for config in ("2d", "2d_segnet"):
        for fold in (0, 1):
            api.train(work.root, config, fold, device="cpu", **TRAIN)

    best = api.find_best(work.root, ["2d", "2d_segnet"], workers=1, mirror_tolerance=None)
    assert set(best["scores"]) == {"2d", "2d_segnet", "ensemble__2d__2d_segnet"}

    result = api.compare(work.root)
    assert [r.name for r in result.rows] == ["2d", "2d_segnet"]
    assert result.best in ("2d", "2d_segnet") and all(r.complete for r in result.rows)
    other = next(r for r in result.rows if r.name != result.best)
    assert other.n_pairs == 6 and 0 < other.p_value <= 1
    for r in result.rows:  # measured by training: 2 iterations per fold, memory of this process
        assert r.cost.seconds_per_iteration > 0 and r.cost.peak_memory_of == "cpu_rss"
        assert r.mean_dice == pytest.approx(best["scores"][r.name]["mean_dice"])
    assert sorted(p.name for p in (work.root / "compare").iterdir()) == [
        "compare.csv",
        "compare.md",
        "compare.png",
    ]

    image = phantom_dataset / "imagesTr" / "phantom_000_0000.nii.gz"
    out = tmp_path / "out"
    api.predict(work.root, [image, image.with_name("phantom_000_0001.nii.gz")], out, configs=["2d_segnet"],
                settings=InferenceSettings(mirroring=False))  # fmt: skip
    (seg,) = out.glob("*.nii.gz")
    assert (
        sitk.GetArrayFromImage(sitk.ReadImage(str(seg))).shape
        == sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape
    )
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(seg))))) <= {0, 1, 2}
