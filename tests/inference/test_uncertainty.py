"""predict --save-uncertainty (issue 18, item 2): the entropy of the ensemble mean and the members' mutual
information, streamed through the sliding window with one scalar per voxel, and uncertainty.csv."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg.inference import sliding_window
from autoseg.inference.runner import TileRunner
from autoseg.inference.sliding_window import predict_sliding_window
from autoseg.inference.uncertainty import (
    DISAGREEMENT,
    ENTROPY,
    UncertaintyTable,
    entropy_map,
    member_entropy,
    structure_rows,
    uncertainty_maps,
)
from autoseg.layout import WorkDir
from autoseg.settings import InferenceSettings, TrainSettings
from tests.test_bad_input import _error_line, _listing, _run

CPU = torch.device("cpu")
BIG = 40.0  # a logit this large: probability 1 to float precision


class _Constant(torch.nn.Module):
    """A "network" whose logits are a fixed ``(K, *patch)`` pattern, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(x.shape[0], *self.logits.shape).clone()


def _runners(*patterns: torch.Tensor) -> list[TileRunner]:
    return [TileRunner(_Constant(p), CPU, "off") for p in patterns]


def _one_hot_logits(k: int, num_classes: int, patch: tuple[int, ...]) -> torch.Tensor:
    logits = torch.full((num_classes, *patch), -BIG)
    logits[k] = BIG
    return logits


def _maps(runners, num_classes, patch, mirror_axes=(), activation="softmax"):
    image = np.zeros((1, *patch), dtype=np.float32)  # one tile covers the image
    probs, ent = predict_sliding_window(
        runners,
        image,
        list(patch),
        num_classes,
        CPU,
        mirror_axes=mirror_axes,
        tile_batch=1,
        activation=activation,
        member_entropy=True,
    )
    return probs, uncertainty_maps(probs, ent, activation == "sigmoid")


PATCH = (4, 6, 8)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_zero_where_every_fold_and_mirror_agrees_with_certainty(num_classes):
    """Three folds, all certain of class 1, mirrored along every axis (24 members): both maps are 0."""
    runners = _runners(*[_one_hot_logits(1, num_classes, PATCH) for _ in range(3)])
    probs, maps = _maps(runners, num_classes, PATCH, mirror_axes=(0, 1, 2))
    assert np.allclose(probs[1], 1)
    assert set(maps) == {ENTROPY, DISAGREEMENT}
    assert np.abs(maps[ENTROPY]).max() < 1e-5
    assert np.abs(maps[DISAGREEMENT]).max() < 1e-5


@pytest.mark.parametrize("num_classes", [2, 3])
def test_maximal_where_two_folds_split_evenly(num_classes):
    """Two certain folds voting for classes 0 and 1: the mean is 0.5/0.5, its entropy log 2 (normalised by
    log K: 1 for two classes) and all of it is disagreement (each member's own entropy is 0)."""
    runners = _runners(_one_hot_logits(0, num_classes, PATCH), _one_hot_logits(1, num_classes, PATCH))
    probs, maps = _maps(runners, num_classes, PATCH)
    assert np.allclose(probs[:2], 0.5)
    expected = math.log(2) / math.log(num_classes)
    np.testing.assert_allclose(maps[ENTROPY], expected, atol=1e-5)
    np.testing.assert_allclose(maps[DISAGREEMENT], expected, atol=1e-5)
    if num_classes == 2:  # the largest value the normalised maps take
        np.testing.assert_allclose(maps[DISAGREEMENT], 1.0, atol=1e-5)


def test_maximal_where_the_mirrors_of_one_fold_split_evenly():
    """One fold whose logits favour class 1 on the left half of the patch: its flipped pass (flipped back)
    favours the right half, so every voxel gets one vote each way."""
    logits = _one_hot_logits(0, 2, PATCH)
    logits[:, :, :, : PATCH[2] // 2] = _one_hot_logits(1, 2, PATCH)[:, :, :, : PATCH[2] // 2]
    probs, maps = _maps(_runners(logits), 2, PATCH, mirror_axes=(2,))
    np.testing.assert_allclose(probs, 0.5, atol=1e-6)
    np.testing.assert_allclose(maps[ENTROPY], 1.0, atol=1e-5)
    np.testing.assert_allclose(maps[DISAGREEMENT], 1.0, atol=1e-5)
    _, unmirrored = _maps(_runners(logits), 2, PATCH)
    assert np.abs(unmirrored[DISAGREEMENT]).max() < 1e-5  # one member alone: no disagreement


def test_uncertain_but_agreeing_members_have_entropy_without_disagreement():
    """Every member says 50/50: total uncertainty is maximal, disagreement 0 (the BALD split)."""
    runners = _runners(torch.zeros(2, *PATCH), torch.zeros(2, *PATCH))
    _, maps = _maps(runners, 2, PATCH, mirror_axes=(0,))
    np.testing.assert_allclose(maps[ENTROPY], 1.0, atol=1e-5)
    assert np.abs(maps[DISAGREEMENT]).max() < 1e-5


def test_region_based_maps_average_the_regions_binary_entropy_in_bits():
    """Sigmoid outputs: region 0 split evenly between two folds (1 bit), region 1 certain (0 bits): the map is
    their mean, 0.5, all of it disagreement."""
    a = torch.stack([torch.full(PATCH, BIG), torch.full(PATCH, BIG)])
    b = torch.stack([torch.full(PATCH, -BIG), torch.full(PATCH, BIG)])
    _, maps = _maps(_runners(a, b), 2, PATCH, activation="sigmoid")
    np.testing.assert_allclose(maps[ENTROPY], 0.5, atol=1e-5)
    np.testing.assert_allclose(maps[DISAGREEMENT], 0.5, atol=1e-5)


def test_entropy_functions_agree_and_are_normalised():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    by_hand = -(probs * np.log(probs)).sum(0) / math.log(5)
    np.testing.assert_allclose(entropy_map(probs, False), by_hand, rtol=1e-5)
    t = member_entropy(torch.from_numpy(probs)[None], False)[0].numpy()
    np.testing.assert_allclose(t, by_hand, rtol=1e-5)
    np.testing.assert_allclose(entropy_map(np.full((5, 2, 2), 0.2), False), 1.0, rtol=1e-6)
    assert entropy_map(np.eye(3)[:, :, None], False).max() == 0  # one-hot: 0 log 0 counts as 0


def test_memory_does_not_grow_with_members_or_keep_their_probabilities(monkeypatch):
    """The window holds K probability sums and ONE entropy sum (plus the weights) for any number of folds and
    mirrors: the accumulators asked for are the same for 1 member and for 4 folds × 8 flips."""
    shapes = []
    real = sliding_window._accumulators

    def spy(num_classes, shape, device):
        shapes.append((num_classes, shape))
        return real(num_classes, shape, device)

    monkeypatch.setattr(sliding_window, "_accumulators", spy)
    one = _maps(_runners(_one_hot_logits(1, 3, PATCH)), 3, PATCH)
    many = _maps(
        _runners(*[_one_hot_logits(k % 3, 3, PATCH) for k in range(4)]), 3, PATCH, mirror_axes=(0, 1, 2)
    )
    assert shapes[0] == shapes[1] == (3 + 1, PATCH)
    assert one[0].shape == many[0].shape == (3, *PATCH)


def test_structure_rows_worked_out_by_hand():
    seg = np.zeros((5, 5, 5), dtype=np.uint8)
    seg[1:4, 1:4, 1:4] = 2  # a 3×3×3 cube: 26 boundary voxels, the centre inside only
    ent = np.zeros((5, 5, 5), dtype=np.float32)
    ent[2, 2, 2] = 1.0
    rows = structure_rows("c", seg, {ENTROPY: ent}, {"a": (1,), "b": (2,), "ab": (1, 2)}, (2.0, 1.0, 0.5))
    by = {r["structure"]: r for r in rows}
    assert (
        by["a"]["volume_ml"] == "0" and by["a"]["entropy_inside"] == "" and by["a"]["entropy_boundary"] == ""
    )
    assert float(by["b"]["volume_ml"]) == pytest.approx(27 * 1.0 / 1000)
    assert float(by["b"]["entropy_inside"]) == pytest.approx(1 / 27)
    assert float(by["b"]["entropy_boundary"]) == 0.0
    assert by["b"]["mutual_information_inside"] == ""  # no disagreement map: one member
    assert by["ab"]["volume_ml"] == by["b"]["volume_ml"]


def test_table_keeps_other_cases_only_while_their_map_is_there(tmp_path):
    row = {k: "" for k in ("volume_ml", "entropy_inside", "entropy_boundary")}
    table = UncertaintyTable(tmp_path)
    table.add("b", [{"case": "b", "structure": "s", **row}])
    table.add("a", [{"case": "a", "structure": "s", **row}])
    (tmp_path / "a_uncertainty.npz").write_bytes(b"")
    again = UncertaintyTable(tmp_path)  # "b" has no map beside the table any more: its row goes
    again.add("c", [{"case": "c", "structure": "s", **row}])
    with open(tmp_path / "uncertainty.csv", newline="") as fh:
        assert [r["case"] for r in csv.DictReader(fh)] == ["a", "c"]
    assert not [p for p in tmp_path.iterdir() if "autoseg-tmp" in p.name]


# --- end to end: a tiny trained phantom model --------------------------------------------------------------

TINY = TrainSettings(epochs=1, iters_per_epoch=2, val_iters=1, seed=5, loader_workers=0)


@pytest.fixture(scope="module")
def trained(planned_phantom, tmp_path_factory) -> WorkDir:
    """fold 0 of 3d_fullres trained for two iterations (enough for non-trivial, uncertain outputs)."""
    from autoseg.training.loop import train_fold

    root = tmp_path_factory.mktemp("trained") / "work"
    shutil.copytree(planned_phantom.root, root, ignore=shutil.ignore_patterns("results"))
    work = WorkDir(root)
    train_fold(work, "3d_fullres", 0, TINY, CPU, False)
    return work


@pytest.fixture(scope="module")
def inputs(phantom_dataset, tmp_path_factory) -> Path:
    """Two phantom cases (phantom_001 has a flipped direction)."""
    folder = tmp_path_factory.mktemp("inputs")
    for f in sorted((phantom_dataset / "imagesTr").glob("phantom_00[01]_*.nii.gz")):
        shutil.copy(f, folder / f.name)
    return folder


def _predict(capfd, work, inputs, out, *extra):
    return _run(capfd, "predict", work.root, inputs, out, "--folds", "0", "--device", "cpu", *extra)


def test_predict_saves_float16_maps_in_the_image_grid_and_the_table(trained, inputs, tmp_path, capfd):
    out = tmp_path / "out"
    code, _, err = _predict(capfd, trained, inputs, out, "--save-uncertainty", "--mirror-axes", "2")
    assert code == 0, err
    structures = ["organ", "lesion"]
    rows = list(csv.DictReader(open(out / "uncertainty.csv", newline="")))
    assert [(r["case"], r["structure"]) for r in rows] == [
        (c, s) for c in ("phantom_000", "phantom_001") for s in structures
    ]
    for case in ("phantom_000", "phantom_001"):
        src = sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz"))
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        with np.load(out / f"{case}_uncertainty.npz") as z:
            assert set(z.files) == {ENTROPY, DISAGREEMENT, "spacing_mm", "origin_mm", "direction"}
            ent, mi = z[ENTROPY], z[DISAGREEMENT]
            np.testing.assert_allclose(z["spacing_mm"], src.GetSpacing()[::-1], rtol=1e-6)
            np.testing.assert_allclose(z["origin_mm"], src.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(z["direction"], src.GetDirection(), atol=1e-6)
        assert ent.dtype == mi.dtype == np.float16
        assert ent.shape == mi.shape == sitk.GetArrayFromImage(src).shape == seg.shape
        assert 0 <= ent.min() and ent.max() <= 1 and 0 <= mi.min() and (mi <= ent + 1e-3).all()
        assert ent.max() > 0  # a model trained for two iterations is unsure somewhere
        voxel_ml = np.prod(src.GetSpacing()) / 1000
        for row in (r for r in rows if r["case"] == case):
            value = {"organ": 1, "lesion": 2}[row["structure"]]
            assert float(row["volume_ml"]) == pytest.approx((seg == value).sum() * voxel_ml, rel=1e-4)
            if (seg == value).any():
                assert float(row["entropy_inside"]) == pytest.approx(
                    ent[seg == value].astype(np.float64).mean(), abs=1e-3
                )
                assert row["mutual_information_boundary"] != ""


def test_predict_with_one_member_writes_no_disagreement_and_refuses_an_existing_map(
    trained, inputs, tmp_path, capfd
):
    out = tmp_path / "out"
    code, _, err = _predict(capfd, trained, inputs, out, "--save-uncertainty", "--no-mirroring")
    assert code == 0, err
    with np.load(out / "phantom_000_uncertainty.npz") as z:
        assert ENTROPY in z.files and DISAGREEMENT not in z.files
    rows = list(csv.DictReader(open(out / "uncertainty.csv", newline="")))
    assert rows and all(r["mutual_information_inside"] == "" for r in rows)
    # a map whose label file is missing (a killed run) is refused without --continue / --overwrite
    (out / "phantom_001.nii.gz").unlink()
    only = tmp_path / "only_001"
    only.mkdir()
    for f in inputs.glob("phantom_001_*"):
        shutil.copy(f, only / f.name)
    before = _listing(out)
    code, _, err = _predict(capfd, trained, only, out, "--save-uncertainty", "--no-mirroring")
    assert "phantom_001_uncertainty.npz: already exists" in _error_line(code, err)
    assert _listing(out) == before
    code, _, err = _predict(capfd, trained, inputs, out, "--save-uncertainty", "--no-mirroring", "--continue")
    assert code == 0, err
    rows = list(csv.DictReader(open(out / "uncertainty.csv", newline="")))
    assert sorted({r["case"] for r in rows}) == ["phantom_000", "phantom_001"]  # the table keeps phantom_000


def test_slab_by_slab_export_gives_the_same_maps(trained, inputs, tmp_path):
    """A case too large to hold its probabilities (slab_export_gb = 0) gets its maps slab by slab, on the
    network's grid: they equal the whole-volume export's up to float16 rounding."""
    from autoseg import api

    maps = {}
    for name, gb in (("whole", 2.0), ("slabs", 0.0)):
        settings = InferenceSettings(mirror_axes=(2,), save_uncertainty=True, slab_export_gb=gb)
        api.predict(trained.root, inputs, tmp_path / name, folds=[0], device="cpu", settings=settings)
        with np.load(tmp_path / name / "phantom_001_uncertainty.npz") as z:
            maps[name] = {k: z[k].astype(np.float32) for k in (ENTROPY, DISAGREEMENT)}
    for k in (ENTROPY, DISAGREEMENT):
        np.testing.assert_allclose(maps["slabs"][k], maps["whole"][k], atol=2e-3)
    rows = [(tmp_path / n / "uncertainty.csv").read_text() for n in ("whole", "slabs")]
    assert rows[0].splitlines()[0] == rows[1].splitlines()[0] and len(rows[0]) > 100


def test_configuration_ensemble_maps_their_disagreement(trained, inputs, tmp_path):
    """Two configurations' predictors (here two of 3d_fullres predicting differently: one mirrored), averaged
    in the image grid: the disagreement map is there (two members or more) and never exceeds the entropy."""
    from autoseg.inference.predictor import Predictor, predict_cases
    from autoseg.io.dataset import discover_inputs

    plain = InferenceSettings(mirroring=False, save_uncertainty=True)
    mirrored = InferenceSettings(mirror_axes=(2,), step_size=1.0, save_uncertainty=True)
    predictors = [Predictor(trained, "3d_fullres", [0], CPU, s) for s in (plain, mirrored)]
    cases = [c for c in discover_inputs([inputs], 2) if c.case_id == "phantom_000"]
    out = tmp_path / "out"
    predict_cases(predictors, cases, [out / "phantom_000.nii.gz"])
    with np.load(out / "phantom_000_uncertainty.npz") as z:
        ent, mi = z[ENTROPY].astype(np.float32), z[DISAGREEMENT].astype(np.float32)
    assert ent.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(out / "phantom_000.nii.gz"))).shape
    assert (mi <= ent + 1e-3).all() and mi.max() > 0
    assert [r["case"] for r in csv.DictReader(open(out / "uncertainty.csv", newline=""))] == [
        "phantom_000"
    ] * 2


def test_dicom_series_input_gets_maps_beside_its_outputs(trained, phantom_dataset, tmp_path, capfd):
    """DICOM input goes through the same export: the map is in the series' own grid (that of the NIfTI label
    file written from it), named by case."""
    pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from tests.io.test_dicom import _phantom_case

    case, _, dicom_in = _phantom_case(phantom_dataset, "axial", tmp_path)
    out = tmp_path / "out"
    code, _, err = _predict(
        capfd, trained, dicom_in, out, "--save-uncertainty", "--mirror-axes", "2", "--output-format", "nifti"
    )
    assert code == 0, err
    seg = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    with np.load(out / f"{case}_uncertainty.npz") as z:
        assert z[ENTROPY].dtype == np.float16 and z[DISAGREEMENT].shape == sitk.GetArrayFromImage(seg).shape
        np.testing.assert_allclose(z["origin_mm"], seg.GetOrigin(), atol=1e-4)
    rows = list(csv.DictReader(open(out / "uncertainty.csv", newline="")))
    assert [r["structure"] for r in rows] == ["organ", "lesion"] and {r["case"] for r in rows} == {case}


def test_save_uncertainty_is_a_setting_and_off_by_default():
    assert InferenceSettings().save_uncertainty is False
    import typer

    from autoseg.cli import app

    predict = typer.main.get_command(app).commands["predict"]
    option = next(p for p in predict.params if "--save-uncertainty" in p.opts)
    assert option.default is False


def test_calibrated_maps_entropy_of_the_calibrated_mean_disagreement_of_the_networks_own():
    """With a temperature, the saved probabilities and the entropy map are the calibrated mean's; the
    disagreement stays H(uncalibrated mean) - mean member entropy (the members are not calibrated)."""
    from autoseg.inference.calibrate import calibrator
    from autoseg.inference.uncertainty import finish_probabilities

    mean = np.array([[0.9, 0.6, 0.99], [0.1, 0.4, 0.01]], dtype=np.float32)
    member_h = np.array([0.2, 0.5, 0.0], dtype=np.float32)
    calibrate = calibrator({"temperature": 2.0}, region_based=False)
    final, maps = finish_probabilities(mean, member_h, False, True, calibrate)
    np.testing.assert_allclose(final, calibrate(mean))
    assert (final[1] > mean[1]).all()  # softened toward 0.5
    np.testing.assert_allclose(maps["entropy"], entropy_map(final, False), atol=1e-6)
    assert (maps["entropy"] > entropy_map(mean, False)).all()
    np.testing.assert_allclose(
        maps["mutual_information"], np.clip(entropy_map(mean, False) - member_h, 0, 1), atol=1e-6
    )
    same, plain = finish_probabilities(mean, member_h, False, True, None)
    assert same is mean
    np.testing.assert_allclose(plain["entropy"], entropy_map(mean, False))
