"""3d_lowres + 3d_cascade_fullres end to end on phantoms, planned by giving the planner a tiny GPU budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg import api
from autoseg.api import train_and_validate
from autoseg.errors import AutosegError
from autoseg.layout import WorkDir
from autoseg.settings import InferenceSettings, TrainSettings
from tests.conftest import shrink_network

TINY = TrainSettings(epochs=1, iters_per_epoch=2, val_iters=1, seed=3, loader_workers=0)
NO_TTA = InferenceSettings(mirroring=False)


@pytest.mark.slow  # 31-107 s on the 2-core development machine; kept out of CI (scripts/test.sh -m slow)
def test_lowres_and_cascade_train_and_predict(phantom_dataset, tmp_path):
    work = WorkDir(tmp_path / "work")
    # 1.1 GB leaves a 10x24x24 fullres patch: 5 % of the median phantom, so a lowres stage is planned
    plans = api.plan(phantom_dataset, work.root, gpu_memory_gb=1.1, workers=1)
    assert {"3d_lowres", "3d_cascade_fullres"} <= set(plans.configurations)
    low, cas = plans.configurations["3d_lowres"], plans.configurations["3d_cascade_fullres"]
    assert low.data_identifier == "lowres" and all(a > b for a, b in zip(low.spacing[1:], cas.spacing[1:]))
    assert cas.previous_stage == "3d_lowres" and plans.input_channels("3d_cascade_fullres") == 2 + 2
    assert any(p.suffix == ".npy" for p in work.preprocessed("lowres").iterdir())
    shrink_network(work)
    cpu = torch.device("cpu")

    with pytest.raises(AutosegError, match="train every fold of 3d_lowres first"):
        train_and_validate(work, "3d_cascade_fullres", 0, TINY, cpu, inference=NO_TTA)

    for fold in range(5):
        train_and_validate(work, "3d_lowres", fold, TINY, cpu, inference=NO_TTA)
    splits = json.loads(work.splits.read_text())
    every_case = sorted(c for f in splits for c in f["val"])
    next_stage = sorted(p.stem for p in work.next_stage("3d_lowres").glob("*.npy"))
    assert next_stage == every_case
    for case in every_case:
        prev = np.load(work.next_stage("3d_lowres") / f"{case}.npy")
        seg = np.load(work.preprocessed("fullres") / f"{case}_seg.npy")
        assert prev.shape == seg.shape and prev.dtype == np.uint8  # on the fullres grid

    fold_dir = train_and_validate(work, "3d_cascade_fullres", 0, TINY, cpu, inference=NO_TTA)
    assert (fold_dir / "validation" / "summary.json").is_file()

    preds = tmp_path / "preds"
    api.predict(
        work.root,
        phantom_dataset / "imagesTr",
        preds,
        config="3d_cascade_fullres",
        folds=[0],
        settings=InferenceSettings(mirroring=False),
        device="cpu",
    )
    for image in sorted((phantom_dataset / "imagesTr").glob("*_0000.nii.gz")):
        src, out = sitk.ReadImage(str(image)), sitk.ReadImage(str(preds / image.name.replace("_0000", "")))
        assert out.GetSize() == src.GetSize() and out.GetDirection() == src.GetDirection()
