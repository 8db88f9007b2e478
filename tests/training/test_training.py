"""Training parts (splits, losses, schedule, sampling) and the loop: tiny runs on phantoms, resume, refusal."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg.api import train_and_validate
from autoseg.checkpoint_io import load_checkpoint
from autoseg.errors import AutosegError
from autoseg.layout import WorkDir
from autoseg.networks.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from autoseg.settings import InferenceSettings, TrainSettings
from autoseg.training.sampling import CaseStore, PatchSampler
from autoseg.training.schedule import poly_lr
from autoseg.training.splits import fold_cases, make_splits, repeated_split_note


def test_splits_are_seeded_and_cover_every_case_once():
    ids = [f"c{i:02d}" for i in range(12)]
    a, b = make_splits(ids, 5, seed=1), make_splits(list(reversed(ids)), 5, seed=1)
    assert a == b
    vals = [c for fold in a for c in fold["val"]]
    assert sorted(vals) == ids
    assert all(set(f["train"]).isdisjoint(f["val"]) for f in a)
    assert [len(f["val"]) for f in a] == [3, 3, 2, 2, 2]
    assert fold_cases(a, "all", ids) == (ids, [])


def test_fewer_cases_than_folds_still_gives_five_folds():
    splits = make_splits(["a", "b", "c"], 5)
    assert len(splits) == 5 and all(len(f["val"]) == 1 and len(f["train"]) == 2 for f in splits)


def test_a_fold_that_repeats_an_earlier_split_is_named():
    """Four cases, five folds: fold 4 validates on fold 0's case, and the line says so; every other fold,
    fold 'all', and any fold of a dataset with enough cases gets no line."""
    splits = make_splits(["a", "b", "c", "d"], 5)
    notes = [repeated_split_note(splits, k) for k in range(5)]
    assert notes[:4] == [None] * 4
    assert notes[4] == (
        f"fold 4 validates on the same case(s) as fold 0 ({splits[0]['val'][0]}): splits.json has 5 folds "
        "for 4 validation cases, so this fold trains fold 0's split again; find-best and compare score each "
        "case from fold 0"
    )
    assert repeated_split_note(splits, "all") is None
    many = make_splits([f"c{i}" for i in range(7)], 5)
    assert [repeated_split_note(many, k) for k in range(5)] == [None] * 5
    two = make_splits(["a", "b"], 5)  # folds 2 and 4 repeat fold 0, fold 3 repeats fold 1
    assert [(n or "")[:46] for n in (repeated_split_note(two, k) for k in range(5))] == [
        "", "", "fold 2 validates on the same case(s) as fold 0", "fold 3 validates on the same case(s) as fold 1",
        "fold 4 validates on the same case(s) as fold 0",
    ]  # fmt: skip


def test_training_a_repeated_fold_warns_once_naming_the_earlier_fold(tmp_path, caplog):
    """What ``autoseg train`` shows: the warning comes from the fold's case lookup, for fold 4 only."""
    from autoseg.training.run import _fold_cases

    data = tmp_path / "preprocessed"
    data.mkdir()
    for case in "abcd":
        (data / f"{case}.json").write_text("{}")
    work = WorkDir(tmp_path)
    with caplog.at_level("WARNING", logger="autoseg"):
        for fold in ("0", "3", "all"):
            _fold_cases(work, data, fold, TrainSettings())
        assert caplog.records == []
        train, val = _fold_cases(work, data, "4", TrainSettings())
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith(
        f"fold 4 validates on the same case(s) as fold 0 ({val[0]})"
    )
    assert (train, val) == _fold_cases(work, data, "0", TrainSettings())


def test_deep_supervision_weights():
    assert deep_supervision_weights(4) == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert deep_supervision_weights(1) == [1.0]


def test_dice_ce_loss_of_a_perfect_prediction_is_minus_one():
    target = torch.zeros(2, 1, 4, 8, 8, dtype=torch.long)
    target[:, :, 1:3, 2:6, 2:6] = 1
    target[:, :, 1:2, 3:5, 3:5] = 2
    logits = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 50
    loss = DiceCELoss()(logits, target)
    assert loss.item() == pytest.approx(-1.0, abs=1e-4)
    worst = DiceCELoss()(-logits, target)
    assert worst.item() > 10
    ds = DeepSupervisionLoss(DiceCELoss(batch_dice=True))
    outs = [logits, logits[:, :, ::2, ::2, ::2], logits[:, :, ::4, ::4, ::4]]
    assert ds(outs, target).item() < -0.9


def test_poly_lr():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0


def test_foreground_oversampling(planned_phantom):
    data = planned_phantom.preprocessed("fullres")
    ids = sorted(p.stem for p in data.glob("*.json"))
    sampler = PatchSampler(CaseStore(data, ids), [16, 32, 32], 6, 3, 1.0, np.random.default_rng(0))
    batch = sampler.next_batch()
    assert batch["data"].shape == (6, 2, 16, 32, 32) and batch["seg"].shape == (6, 1, 16, 32, 32)
    assert all((batch["seg"][b] > 0).any() for b in range(6))  # every patch centred on foreground
    # a patch larger than the image is padded with 0 / background
    big = PatchSampler(CaseStore(data, ids), [40, 128, 128], 2, 3, 0.0, np.random.default_rng(0)).next_batch()
    assert big["data"].shape == (2, 2, 40, 128, 128) and (big["data"][:, :, 0] == 0).all()


def _tiny(**kw) -> TrainSettings:
    base = dict(epochs=3, iters_per_epoch=2, val_iters=1, seed=7, loader_workers=0)
    base.update(kw)
    return TrainSettings(**base)


NO_TTA = InferenceSettings(mirroring=False)


@pytest.fixture()
def work_copy(planned_phantom, tmp_path) -> WorkDir:
    dst = tmp_path / "work"
    shutil.copytree(planned_phantom.root, dst, ignore=shutil.ignore_patterns("results"))
    return WorkDir(dst)


def test_interrupted_run_resumes_to_the_same_weights(work_copy, tmp_path):
    """A run stopped after epoch 2 and resumed ends with the weights of an uninterrupted run."""
    cpu = torch.device("cpu")
    straight_root = tmp_path / "straight"
    shutil.copytree(work_copy.root, straight_root)
    straight = WorkDir(straight_root)
    train_and_validate(straight, "3d_fullres", 0, _tiny(), cpu, inference=NO_TTA)

    class Stop(Exception):
        pass

    def stop_after_two(report):
        if report.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_and_validate(
            work_copy, "3d_fullres", 0, _tiny(), cpu, inference=NO_TTA, on_epoch=stop_after_two
        )
    fold = work_copy.fold_dir("3d_fullres", 0)
    assert load_checkpoint(fold / "checkpoint_latest.pt")["epoch"] == 2
    assert not (fold / "checkpoint_final.pt").exists()
    with pytest.raises(AutosegError, match="already has a run; use --resume"):
        train_and_validate(work_copy, "3d_fullres", 0, _tiny(), cpu, inference=NO_TTA)
    train_and_validate(work_copy, "3d_fullres", 0, _tiny(), cpu, resume=True, inference=NO_TTA)

    a = load_checkpoint(straight.fold_dir("3d_fullres", 0) / "checkpoint_final.pt")
    b = load_checkpoint(fold / "checkpoint_final.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["network"]:
        torch.testing.assert_close(a["network"][k], b["network"][k], rtol=0, atol=0)
    log = [json.loads(line) for line in (fold / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2, 3]
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) >= {"organ", "lesion"}


def test_2d_training_runs_and_validates(work_copy):
    fold_dir = train_and_validate(work_copy, "2d", 1, _tiny(epochs=1), torch.device("cpu"), inference=NO_TTA)
    val = sorted((fold_dir / "validation").glob("*.nii.gz"))
    assert val and (fold_dir / "validation" / "summary.json").is_file()
    assert (fold_dir / "checkpoint_final.pt").is_file() and (fold_dir / "settings.json").is_file()
    # saved probabilities (for find-best ensembling) are in the file's geometry and agree with the labels
    for seg_path in val:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))
        with np.load(seg_path.parent / (seg_path.name[: -len(".nii.gz")] + ".npz")) as z:
            probs = z["probabilities"]
        assert probs.dtype == np.float16 and probs.shape == (3, *seg.shape)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)
        agree = (probs.argmax(0) == seg).mean()
        assert agree > 0.999, agree
