"""The CLI end to end on phantoms (plan → train → predict → evaluate) and its one-line errors (exit code 2)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main
from autoseg.layout import WorkDir
from tests.conftest import real_dataset, shrink_network


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_full_pipeline_through_the_cli(phantom_dataset, tmp_path, capsys):
    work = tmp_path / "work"
    code, out, _ = _run(capsys, "plan", phantom_dataset, "--workdir", work, "--workers", "1", "--explain")
    assert code == 0 and "3d_fullres" in out and "target spacing" in out
    shrink_network(WorkDir(work))
    code, out, _ = _run(
        capsys,
        "train",
        work,
        "3d_fullres",
        "0",
        "--epochs",
        "1",
        "--iters-per-epoch",
        "2",
        "--val-iters",
        "1",
        "--device",
        "cpu",
        "--no-mirroring",
    )
    assert code == 0, out
    assert (work / "results/3d_fullres/fold_0/validation/summary.json").is_file()

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for f in sorted((phantom_dataset / "imagesTr").glob("phantom_00[01]_*.nii.gz")):
        shutil.copy(f, inputs / f.name)
    before = sorted(p.name for p in inputs.iterdir())
    preds = tmp_path / "preds"
    code, out, err = _run(
        capsys, "predict", work, inputs, preds, "--folds", "0", "--device", "cpu", "--no-mirroring"
    )
    assert code == 0, err
    assert sorted(p.name for p in inputs.iterdir()) == before  # the input folder is untouched
    for case in ("phantom_000", "phantom_001"):  # phantom_001 has a flipped direction
        src = sitk.ReadImage(str(inputs / f"{case}_0000.nii.gz"))
        pred = sitk.ReadImage(str(preds / f"{case}.nii.gz"))
        assert pred.GetSize() == src.GetSize()
        np.testing.assert_allclose(pred.GetSpacing(), src.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), src.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(pred.GetDirection(), src.GetDirection(), atol=1e-6)
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}

    code, _, err = _run(capsys, "predict", work, inputs, preds, "--folds", "0", "--device", "cpu")
    assert code == 2 and "already exists" in err and "--continue" in err
    code, _, _ = _run(capsys, "predict", work, inputs, preds, "--folds", "0", "--continue", "--device", "cpu")
    assert code == 0

    summary = tmp_path / "eval" / "summary.json"
    refs = tmp_path / "refs"  # the references of the predicted cases (a missing prediction is an error)
    refs.mkdir()
    for case in ("phantom_000", "phantom_001"):
        shutil.copy(phantom_dataset / "labelsTr" / f"{case}.nii.gz", refs)
    code, out, _ = _run(
        capsys,
        "evaluate",
        refs,
        preds,
        "--dataset-json",
        phantom_dataset / "dataset.json",
        "--output",
        summary,
    )
    assert code == 0 and "organ" in out
    data = json.loads(summary.read_text())
    assert {row["case"] for row in data["per_case"]} == {"phantom_000", "phantom_001"}
    assert (tmp_path / "eval" / "per_case.csv").is_file()


def _one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err
    return " ".join(lines)


def test_plan_errors_name_the_problem(tmp_path, capsys, phantom_dataset):
    code, _, err = _run(capsys, "plan", tmp_path / "nope", "--workdir", tmp_path / "w")
    assert "nope/dataset.json: dataset.json not found" in _one_line_error(code, err)
    broken = tmp_path / "broken"
    shutil.copytree(phantom_dataset, broken)
    (broken / "imagesTr" / "phantom_002_0001.nii.gz").write_bytes(b"")
    code, _, err = _run(capsys, "plan", broken, "--workdir", tmp_path / "w2")
    assert "phantom_002_0001.nii.gz: file is empty" in _one_line_error(code, err)
    assert not (tmp_path / "w2" / "plans.json").exists()
    code, _, err = _run(capsys, "plan", phantom_dataset, "--workdir", phantom_dataset / "work")
    assert "must not be inside the dataset folder" in _one_line_error(code, err)


def test_train_and_predict_errors(planned_phantom, phantom_dataset, tmp_path, capsys):
    code, _, err = _run(capsys, "train", planned_phantom.root, "3d_lowres", "0")
    assert "configuration '3d_lowres' is not in the plans" in _one_line_error(code, err)
    code, _, err = _run(capsys, "train", planned_phantom.root, "3d_fullres", "7")
    assert "fold must be 0-4, 'all-folds' or 'all'" in _one_line_error(code, err)
    code, _, err = _run(capsys, "train", tmp_path / "empty", "3d_fullres", "0")
    assert "plans.json: plans not found" in _one_line_error(code, err)
    code, _, err = _run(capsys, "predict", planned_phantom.root, tmp_path, tmp_path / "out", "--folds", "3")
    assert f"{tmp_path}: no images found" in _one_line_error(code, err)
    images = phantom_dataset / "imagesTr"
    code, _, err = _run(capsys, "predict", planned_phantom.root, images, tmp_path / "out", "--folds", "3")
    assert "fold_3/checkpoint_final.pt: not found" in _one_line_error(code, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.realdata
def test_predict_rejects_wrong_channel_count(planned_phantom, tmp_path, capsys):
    """A one-channel spinal-cord image given to the two-channel phantom model."""
    image = real_dataset("Dataset003_SpinalCordTiny") / "imagesTr" / "sct_errsm30_t2w_0000.nii.gz"
    fold = planned_phantom.fold_dir("3d_fullres", 4)
    code, _, err = _run(capsys, "predict", planned_phantom.root, image, tmp_path / "out", "--folds", "4")
    msg = _one_line_error(code, err)
    assert "sct_errsm30_t2w_0000.nii.gz: the model needs 2 channels" in msg
    assert not fold.exists()


@pytest.mark.realdata
def test_spinal_cord_train_predict_keeps_every_orientation(tmp_path, capsys):
    """Dataset003 through the CLI with a narrow network: the PSR and RAS cases come back in their own geometry."""
    dataset = real_dataset("Dataset003_SpinalCordTiny")
    work = tmp_path / "work"
    assert _run(capsys, "plan", dataset, "--workdir", work, "--workers", "2")[0] == 0
    shrink_network(WorkDir(work))
    code, out, _ = _run(
        capsys,
        "train",
        work,
        "3d_fullres",
        "all",
        "--epochs",
        "1",
        "--iters-per-epoch",
        "2",
        "--val-iters",
        "0",
        "--device",
        "cpu",
    )
    assert code == 0, out
    preds = tmp_path / "preds"
    code, _, err = _run(
        capsys,
        "predict",
        work,
        dataset / "imagesTr",
        preds,
        "--folds",
        "all",
        "--device",
        "cpu",
        "--no-mirroring",
    )
    assert code == 0, err
    for image in sorted((dataset / "imagesTr").glob("*_0000.nii.gz")):
        src = sitk.ReadImage(str(image))
        pred = sitk.ReadImage(str(preds / image.name.replace("_0000", "")))
        assert pred.GetSize() == src.GetSize()
        # NIfTI stores the direction as a quaternion: equal up to float rounding, not bit for bit
        np.testing.assert_allclose(pred.GetSpacing(), src.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(pred.GetOrigin(), src.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(pred.GetDirection(), src.GetDirection(), atol=1e-7)


def test_tables_written_to_a_log_keep_whole_configuration_names(capsys):
    """Redirected stdout (a log file, a pipe) has no width: rich's default 80 columns cut find-best's names to
    "ensemble__3…", so a log could not tell the configurations apart. The table gets the width it needs."""
    from rich.table import Table

    from autoseg.cli import _print_table

    name = "ensemble__3d_budget__3d_budget_resse_unet"
    table = Table(title="cross-validation (mean Dice over cases)")
    for col in (
        "configuration",
        "mean Dice",
        "edema",
        "enhancing",
        "necrosis",
        "non_enhancing",
        "whole_tumor",
    ):
        table.add_column(col)
    table.add_row(name + " *", *["0.2711"] * 6)
    _print_table(table)
    printed = capsys.readouterr().out
    assert name + " *" in printed and "non_enhancing" in printed and "…" not in printed
    assert max(len(line) for line in printed.splitlines()) > 80
