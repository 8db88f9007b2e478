"""Region-based training (nnU-Net's list-of-values labels, sigmoid outputs) and the ignore label."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg import api
from autoseg.api import train_and_validate
from autoseg.layout import WorkDir
from autoseg.networks.losses import DiceCELoss, RegionDiceBCELoss
from autoseg.planning.plans import Plans
from autoseg.settings import InferenceSettings, TrainSettings
from tests.conftest import real_dataset, shrink_network

TINY = TrainSettings(epochs=1, iters_per_epoch=2, val_iters=1, seed=5, loader_workers=0)
NO_TTA = InferenceSettings(mirroring=False)


def _variant(src: Path, dst: Path, labels: dict, **extra) -> Path:
    """The dataset ``src`` with another dataset.json (images and labels symlinked, never copied)."""
    for sub in ("imagesTr", "labelsTr"):
        (dst / sub).mkdir(parents=True)
        for f in (src / sub).iterdir():
            os.symlink(f.resolve(), dst / sub / f.name)
    spec = json.loads((src / "dataset.json").read_text())
    spec.pop("brats_regions", None)
    (dst / "dataset.json").write_text(json.dumps({**spec, "labels": labels, **extra}))
    return dst


def test_region_loss_is_minus_one_when_perfect_and_ignores_ignored_voxels():
    target = torch.zeros(1, 1, 4, 6, 6, dtype=torch.long)
    target[..., 1:3, 1:5, 1:5] = 1
    target[..., 2, 2:4, 2:4] = 2
    regions = [[1, 2], [2]]
    truth = torch.stack([torch.isin(target[:, 0], torch.tensor(r)) for r in regions], 1).float()
    perfect = (truth * 2 - 1) * 40
    assert RegionDiceBCELoss(regions)(perfect, target).item() == pytest.approx(-1.0, abs=1e-4)
    # voxels of the ignore label (3) do not change either loss, whatever is predicted there
    target[..., 0, 0, :] = 3
    noisy = perfect.clone()
    noisy[..., 0, 0, :] = torch.randn_like(noisy[..., 0, 0, :]) * 50
    rl = RegionDiceBCELoss(regions, ignore_label=3)
    assert rl(noisy, target).item() == pytest.approx(rl(perfect, target).item(), abs=1e-6)
    logits = torch.randn(1, 3, 4, 6, 6)
    changed = logits.clone()
    changed[..., 0, 0, :] += 100
    dl = DiceCELoss(ignore_label=3)
    assert dl(changed, target).item() == pytest.approx(dl(logits, target).item(), abs=1e-5)


def test_region_based_phantom_trains_predicts_and_scores_regions(phantom_dataset, tmp_path):
    # organ region = organ + lesion (the lesion lies inside the organ), lesion region = lesion
    ds = _variant(
        phantom_dataset,
        tmp_path / "ds",
        {"background": 0, "organ": [1, 2], "lesion": [2]},
        regions_class_order=[1, 2],
    )
    work = WorkDir(tmp_path / "work")
    plans = api.plan(ds, work.root, workers=1)
    assert plans.region_based and plans.num_outputs == 2 and plans.training_regions == [[1, 2], [2]]
    shrink_network(work)
    fold = train_and_validate(work, "3d_fullres", 0, TINY, torch.device("cpu"), inference=NO_TTA)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"organ", "lesion"} and summary["mean_dice_labels"] == ["organ", "lesion"]
    for f in (fold / "validation").glob("*.nii.gz"):
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(f))))) <= {0, 1, 2}


def test_ignore_label_is_never_predicted_and_left_out_of_metrics(phantom_dataset, tmp_path):
    # the phantom's lesion voxels (value 2) become "ignore"
    ds = _variant(phantom_dataset, tmp_path / "ds", {"background": 0, "organ": 1, "ignore": 2})
    work = WorkDir(tmp_path / "work")
    plans = api.plan(ds, work.root, workers=1)
    assert plans.ignore_label == 2 and plans.num_outputs == 2
    shrink_network(work)
    fold = train_and_validate(work, "3d_fullres", 0, TINY, torch.device("cpu"), inference=NO_TTA)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"organ"}
    for f in (fold / "validation").glob("*.nii.gz"):
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(f))))) <= {0, 1}


@pytest.mark.slow  # 87 s on the CI machine; the region-based phantom test covers the same path in CI
@pytest.mark.realdata
def test_brats_region_based_plan_and_short_training(tmp_path):
    """Dataset001 with BraTS regions (whole tumour, tumour core, enhancing) as sigmoid outputs."""
    src = real_dataset("Dataset001_BraTS2015DeepMedic")
    labels = {"background": 0, "whole_tumor": [1, 2, 3, 4], "tumor_core": [1, 3, 4], "enhancing_tumor": [4]}
    ds = _variant(src, tmp_path / "ds", labels, regions_class_order=[2, 1, 4])
    work = WorkDir(tmp_path / "work")
    plans = api.plan(ds, work.root, workers=2, configurations=("3d_fullres",))
    assert plans.region_based and plans.num_outputs == 3
    # a small patch keeps this CPU test short; the plan itself is tested elsewhere
    plans = shrink_network(work)
    cfg = plans.configurations["3d_fullres"]
    small = replace(cfg, patch_size=[64, 128, 128], batch_size=2)
    replace(plans, configurations={**plans.configurations, "3d_fullres": small}).save(work.plans)
    # step 1.0: 12 tiles per 155x240x240 case instead of 63
    fold = train_and_validate(
        work,
        "3d_fullres",
        0,
        TINY,
        torch.device("cpu"),
        inference=InferenceSettings(step_size=1.0, mirroring=False),
    )
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"whole_tumor", "tumor_core", "enhancing_tumor"}
    assert Plans.load(work.plans).regions_class_order == [2, 1, 4]
