"""Calibration through the command line (issue 18): find-best writes a temperature, predict applies it to the
saved probabilities (not to the labels), --no-calibration skips it, instructions and bundles from before
calibration still work (identity, with a note), evaluate --probabilities adds ECE / Brier / NLL and refuses
bad probability files in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg import api
from autoseg.api import train_and_validate
from autoseg.inference.calibrate import apply_temperature
from autoseg.jsonio import read_json, save_npz, write_json
from autoseg.layout import WorkDir
from autoseg.postprocessing import Postprocessing
from autoseg.selection import load_instructions
from autoseg.settings import InferenceSettings, TrainSettings
from tests.test_bad_input import _error_line, _listing, _run
from tests.test_selection import ALL, CASES, ENDING, _make_work

TINY = TrainSettings(epochs=1, iters_per_epoch=3, val_iters=1, seed=5, loader_workers=0)
FAST = InferenceSettings(mirroring=False)


# ---------------------------------------------------------------------------------------- find-best


@pytest.fixture
def work(tmp_path) -> WorkDir:
    """test_selection's hand-built WORK: 2d and 3d_fullres with every fold validated, .npz included."""
    return _make_work(tmp_path / "work", {"2d": ALL, "3d_fullres": ALL})


def out_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_find_best_writes_the_calibration(work, capfd):
    code, capfd_out, err = _run(capfd, "find-best", work.root, "-c", "3d_fullres", "-j", "1")
    assert code == 0, err
    written = read_json(work.inference_instructions)
    cal = written["calibration"]
    assert {"temperature", "kept", "ece_before", "ece_after", "candidates", "voxels", "method"} <= set(cal)
    assert set(cal["candidates"]) == {"identity", "temperature", "zones"}
    assert ("zones" in cal) == (cal["kept"] == "zones")
    # 0.9 where right and 0.6 where wrong: over-confident where right; the fit softens or sharpens, but the
    # relevant-voxel ECE never gets worse and the temperature is a positive number
    assert isinstance(cal["temperature"], float) and cal["temperature"] > 0
    assert set(cal["ece_before"]) == set(cal["ece_after"]) == {"organ", "lesion"}
    for name in ("organ", "lesion"):
        assert cal["ece_after"][name] <= cal["ece_before"][name] + 1e-9
    assert cal["voxels"] > 0 and "NLL" in cal["method"]
    assert load_instructions(work).calibration == cal
    # find-best says in one line what it kept, and the mean ECE before and after on held-out cases
    assert cal["chosen_on"] == "held-out cases"
    line = next(x for x in out_lines(capfd_out) if x.startswith("calibration: "))
    before = np.mean(list(cal["ece_before"].values()))
    if cal["kept"] == "identity":
        assert line.startswith("calibration: none kept: every fit raised ECE") and f"ECE {before:.3f}" in line
    else:
        after = np.mean(list(cal["ece_held_out"].values()))
        assert f"mean ECE {before:.3f} -> {after:.3f} on held-out cases" in line


def test_the_calibration_line_by_hand():
    from autoseg.selection import calibration_line

    base = {"ece_before": {"a": 0.10, "b": 0.06}, "ece_after": {"a": 0.04, "b": 0.02}}
    held = {"ece_held_out": {"a": 0.06, "b": 0.04}}
    assert calibration_line({}) == "calibration: none (no validation probabilities)"
    assert calibration_line({**base, **held, "kept": "temperature", "temperature": 1.5}) == (
        "calibration: temperature 1.5; mean ECE 0.080 -> 0.050 on held-out cases"
    )
    zones = {"band": 3, "temperature": {"far": 0.5, "outer": 2, "inner": 3, "inside": 1}}
    assert calibration_line({**base, "kept": "zones", "zones": zones, "ece_held_out": None}) == (
        "calibration: zone temperatures (far/outer/inner/inside) 0.5/2/3/1; mean ECE 0.080 -> 0.030 on the "
        "fitted cases"
    )
    cands = {
        "temperature": {"ece_held_out": {"a": 0.2, "b": 0.0}},
        "zones": {"ece_held_out": {"a": 0.1, "b": 0.3}},
    }
    assert calibration_line({**base, **held, "kept": "identity", "candidates": cands}) == (
        "calibration: none kept: every fit raised ECE on a structure on held-out cases (ECE 0.080; "
        "temperature 0.100, zones 0.200)"
    )


def test_find_best_fits_the_temperature_that_the_probabilities_need(work):
    """Every validation .npz replaced by probabilities from known logits: labels drawn from softmax(z), the
    model says softmax(3 z) on the relevant voxels; find-best finds T = 3 within a few percent."""
    rng = np.random.default_rng(0)
    shape = (6, 8, 8)
    for k, case in enumerate(CASES):
        z = rng.normal(0, 1.5, size=(3, *shape))
        true = np.exp(z) / np.exp(z).sum(0)
        labels = (rng.random(shape)[None] > np.cumsum(true, 0)).sum(0).astype(np.uint8)
        labels[0, 0, 0] = 1  # every voxel is relevant (within the band of some foreground)
        from autoseg.io.volume import read_header, write_volume

        geometry = read_header(work.gt_segmentations / f"{case}{ENDING}")
        write_volume(labels, geometry, work.gt_segmentations / f"{case}{ENDING}")
        probs = np.exp(3 * z) / np.exp(3 * z).sum(0)
        save_npz(work.validation("3d_fullres", k) / f"{case}.npz", probabilities=probs.astype(np.float16))
    result = api.find_best(work.root, configs=["3d_fullres"], workers=1)
    assert result["calibration"]["temperature"] == pytest.approx(3.0, rel=0.06)
    for name in ("organ", "lesion"):
        assert result["calibration"]["ece_after"][name] < result["calibration"]["ece_before"][name]


def test_find_best_without_probabilities_writes_no_calibration(work, caplog):
    (work.validation("3d_fullres", 2) / f"{CASES[2]}.npz").unlink()
    with caplog.at_level("WARNING", logger="autoseg"):
        result = api.find_best(work.root, configs=["3d_fullres"], workers=1)
    assert result["calibration"] == {}
    assert "no calibration" in caplog.text


def test_instructions_from_before_calibration_still_load(work):
    api.find_best(work.root, configs=["3d_fullres"], workers=1)
    old = read_json(work.inference_instructions)
    del old["calibration"]  # as written before issue 18 (same schema version)
    write_json(work.inference_instructions, old)
    assert load_instructions(work).calibration == {}
    old["calibration"] = {"temperature": -1.0}
    write_json(work.inference_instructions, old)
    with pytest.raises(Exception, match="calibration.temperature"):
        load_instructions(work)
    old["calibration"] = {"temperature": 1.0, "zones": {"band": 3, "temperature": {"far": 1.0, "outer": 2.0}}}
    write_json(work.inference_instructions, old)
    with pytest.raises(
        Exception, match=r"calibration.zones.temperature.*no value for zone\(s\) \['inner', 'inside'\]"
    ):
        load_instructions(work)


# ---------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def trained(planned_phantom, tmp_path_factory) -> WorkDir:
    """fold 0 of 3d_fullres, a few iterations, with instructions that carry a temperature of 2."""
    root = tmp_path_factory.mktemp("trained") / "work"
    shutil.copytree(planned_phantom.root, root, ignore=shutil.ignore_patterns("results"))
    work = WorkDir(root)
    train_and_validate(work, "3d_fullres", 0, TINY, torch.device("cpu"), inference=FAST)
    instructions = {
        "schema_version": 1,
        "best": "3d_fullres",
        "configs": ["3d_fullres"],
        "folds": [0],
        "postprocessing": Postprocessing().to_json(),
        "mean_dice": 0.5,
        "mean_dice_postprocessed": 0.5,
        "scores": {},
        "skipped": [],
        "predict": "",
        "dataset_hash": "",
        "calibration": {
            "temperature": 2.0,
            "ece_before": {},
            "ece_after": {},
            "voxels": 1,
            "method": "test",
        },
    }
    work.inference_instructions.write_text(json.dumps(instructions))
    return work


@pytest.fixture(scope="module")
def one_case(phantom_dataset, tmp_path_factory) -> Path:
    src = phantom_dataset / "imagesTr"
    case = sorted(p.name[: -len("_0000.nii.gz")] for p in src.glob("*_0000.nii.gz"))[1]
    folder = tmp_path_factory.mktemp("input")
    for f in src.glob(f"{case}_000*.nii.gz"):
        shutil.copy(f, folder / f.name)
    return folder


def _predict(work_or_model, one_case, out, *extra, capfd=None, model=False):
    args = ["predict", *(["--model"] if model else []), work_or_model, one_case, out]
    code, _, err = _run(capfd, *args, "--save-probabilities", "--no-mirroring", "--device", "cpu", *extra)
    assert code == 0, err
    (seg,) = sorted(Path(out).glob("*.nii.gz"))
    with np.load(seg.with_name(seg.name.replace(".nii.gz", ".npz"))) as z:
        probs = z["probabilities"]
    return sitk.GetArrayFromImage(sitk.ReadImage(str(seg))), probs, err


def test_predict_applies_the_temperature_to_probabilities_only(trained, one_case, tmp_path, capfd):
    labels, calibrated, err = _predict(trained.root, one_case, tmp_path / "cal", capfd=capfd)
    assert "probability calibration: temperature 2" in err
    raw_labels, raw, err = _predict(trained.root, one_case, tmp_path / "raw", "--no-calibration", capfd=capfd)
    assert "not applied (--no-calibration)" in err
    np.testing.assert_array_equal(labels, raw_labels)  # a temperature never changes the labels
    assert not np.array_equal(calibrated, raw)
    np.testing.assert_allclose(
        calibrated.astype(np.float32), apply_temperature(raw, 2.0).astype(np.float32), atol=2e-3
    )
    # T = 2 softens: the most confident class loses probability wherever it was not already 0.5 or 1
    assert calibrated.astype(np.float32).max(0).mean() < raw.astype(np.float32).max(0).mean()


def test_predict_applies_zone_temperatures_to_probabilities_only(trained, one_case, tmp_path, capfd):
    """Instructions whose kept calibration is the zones: predict applies them (each voxel its zone's
    temperature, zones from the probabilities it saves), the labels are those of --no-calibration."""
    from autoseg.evaluation.calibration import apply_zone_temperatures

    work = WorkDir(tmp_path / "zoned")
    shutil.copytree(trained.root, work.root)
    instructions = read_json(work.inference_instructions)
    zones = {"far": 0.5, "outer": 3.0, "inner": 2.0, "inside": 1.0}
    instructions["calibration"].update(kept="zones", zones={"band": 3, "temperature": zones})
    write_json(work.inference_instructions, instructions)
    labels, calibrated, err = _predict(work.root, one_case, tmp_path / "cal", capfd=capfd)
    assert (
        "probability calibration: zone temperatures (far/outer/inner/inside, band 3 voxels) 0.5/3/2/1" in err
    )
    raw_labels, raw, _ = _predict(work.root, one_case, tmp_path / "raw", "--no-calibration", capfd=capfd)
    np.testing.assert_array_equal(labels, raw_labels)
    want = apply_zone_temperatures(raw.astype(np.float32), zones)
    np.testing.assert_allclose(calibrated.astype(np.float32), want, atol=2e-3)
    assert not np.allclose(
        calibrated.astype(np.float32), apply_temperature(raw, 1.5).astype(np.float32), atol=2e-3
    )


def test_old_instructions_and_bundles_predict_as_identity_with_a_note(trained, one_case, tmp_path, capfd):
    work = WorkDir(tmp_path / "old")
    shutil.copytree(trained.root, work.root)
    old = read_json(work.inference_instructions)
    del old["calibration"]
    write_json(work.inference_instructions, old)
    _, raw, _ = _predict(trained.root, one_case, tmp_path / "raw", "--no-calibration", capfd=capfd)
    _, probs, err = _predict(work.root, one_case, tmp_path / "old_out", capfd=capfd)
    assert "no temperature fitted for 3d_fullres" in err
    np.testing.assert_array_equal(probs, raw)
    # a bundle from before calibration: the same
    bundle = tmp_path / "old.zip"
    api.export_model(work.root, bundle)
    _, probs, err = _predict(bundle, one_case, tmp_path / "bundle_out", capfd=capfd, model=True)
    assert "no temperature fitted" in err
    np.testing.assert_array_equal(probs, raw)
    # a bundle with calibration carries its temperature
    new_bundle = tmp_path / "new.zip"
    api.export_model(trained.root, new_bundle)
    _, probs, err = _predict(new_bundle, one_case, tmp_path / "new_out", capfd=capfd, model=True)
    assert "probability calibration: temperature 2" in err
    np.testing.assert_allclose(
        probs.astype(np.float32), apply_temperature(raw, 2.0).astype(np.float32), atol=2e-3
    )


# ---------------------------------------------------------------------------------------- evaluate


@pytest.fixture
def scored(work, tmp_path) -> tuple[Path, Path, Path]:
    """Predictions and probabilities of every case in one folder, the references, dataset.json."""
    pred = tmp_path / "pred"
    pred.mkdir()
    for k, case in enumerate(CASES):
        for name in (f"{case}{ENDING}", f"{case}.npz"):
            shutil.copy(work.validation("3d_fullres", k) / name, pred / name)
    return pred, work.gt_segmentations, work.dataset_json


def test_evaluate_probabilities_adds_calibration_and_the_reliability_diagram(scored, tmp_path, capfd):
    pred, ref, dataset_json = scored
    out = tmp_path / "out" / "summary.json"
    code, _, err = _run(
        capfd,
        "evaluate",
        ref,
        pred,
        "--dataset-json",
        dataset_json,
        "-o",
        out,
        "--probabilities",
        pred,
        "-j",
        "1",
    )
    assert code == 0, err
    cal = read_json(out)["calibration"]
    assert set(cal["mean"]) == {"organ", "lesion"} and cal["n_bins"] == 15
    for m in cal["mean"].values():
        assert 0 <= m["ece"] <= 1 and 0 <= m["brier"] <= 1 and m["nll"] > 0 and m["voxels"] > 0
    assert len(cal["per_case"]) == 2 * len(CASES)
    assert sum(cal["reliability"]["organ"]["count"]) == cal["mean"]["organ"]["voxels"]
    # the stray blob is organ at 0.6 where background is right: the 0.6 bin is observed at 0
    organ = cal["reliability"]["organ"]
    assert organ["confidence"][9] == pytest.approx(0.6, abs=1e-3) and organ["accuracy"][9] == 0.0
    assert (out.parent / "report.png").stat().st_size > 0


def _bad(capfd, pred, ref, dataset_json, probs, tmp_path) -> str:
    before = _listing(tmp_path / "out")
    code, _, err = _run(
        capfd,
        "evaluate",
        ref,
        pred,
        "--dataset-json",
        dataset_json,
        "-o",
        tmp_path / "out" / "s.json",
        "--probabilities",
        probs,
    )
    line = _error_line(code, err)
    assert _listing(tmp_path / "out") == before == {}
    return line


def test_bad_probabilities_get_one_line_naming_the_file(scored, tmp_path, capfd):
    pred, ref, dataset_json = scored
    probs = tmp_path / "probs"
    shutil.copytree(pred, probs)
    assert "probs-missing: probabilities folder not found" in _bad(
        capfd, pred, ref, dataset_json, tmp_path / "probs-missing", tmp_path
    )
    (probs / "c3.npz").unlink()
    line = _bad(capfd, pred, ref, dataset_json, probs, tmp_path)
    assert "c3.npz: no probabilities for case c3" in line
    save_npz(probs / "c3.npz", probabilities=np.zeros((3, 6, 8, 7), np.float16))
    line = _bad(capfd, pred, ref, dataset_json, probs, tmp_path)
    assert "c3.npz: probabilities of shape (6, 8, 7) do not fit the reference" in line
    save_npz(probs / "c3.npz", probabilities=np.zeros((2, 6, 8, 8), np.float16))
    line = _bad(capfd, pred, ref, dataset_json, probs, tmp_path)
    assert "c3.npz: 2 probability channels, the dataset has 3 classes" in line
    save_npz(probs / "c3.npz", other=np.zeros((3, 6, 8, 8), np.float16))
    assert "c3.npz: holds no 'probabilities' array" in _bad(capfd, pred, ref, dataset_json, probs, tmp_path)
    (probs / "c3.npz").write_bytes(b"not a zip")
    assert "c3.npz: not a readable .npz" in _bad(capfd, pred, ref, dataset_json, probs, tmp_path)


def test_calibration_folds_script_fits_what_find_best_fits_and_takes_single_folds(work, capfd, tmp_path):
    """scripts/calibration_folds.py (docs/calibration.md) on every fold gives find-best's temperature and
    ECE; on one fold it uses that fold's cases only; a configuration without probabilities is exit 2."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "calibration_folds.py"
    spec = importlib.util.spec_from_file_location("calibration_folds", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    code, _, err = _run(capfd, "find-best", work.root, "-c", "3d_fullres", "-j", "1")
    assert code == 0, err
    cal = read_json(work.inference_instructions)["calibration"]
    out = tmp_path / "all.json"
    assert script.main([str(work.root), "3d_fullres", "--json", str(out)]) == 0
    fit = json.loads(out.read_text())["3d_fullres"]
    assert fit["temperature"] == pytest.approx(cal["temperature"])
    assert fit["ece_after"] == pytest.approx(cal["ece_after"])
    assert sorted(fit["cases"]) == sorted(CASES)
    # held out: the identity's held-out ECE is the ECE before (the same voxels, pooled), and the kept
    # calibration's held-out ECE is its candidate's
    assert fit["chosen_on"] == "held-out cases"
    for name in ("organ", "lesion"):
        assert fit["candidates"]["identity"]["ece_held_out"][name] == pytest.approx(fit["ece_before"][name])
        assert fit["ece_held_out"][name] == fit["candidates"][fit["kept"]]["ece_held_out"][name]
    assert "held out: before -> one T / zones / kept" in capfd.readouterr().out

    splits = read_json(work.splits)
    assert script.main([str(work.root), "3d_fullres", "--folds", "1", "--json", str(out)]) == 0
    one = json.loads(out.read_text())["3d_fullres"]
    assert one["cases"] == splits[1]["val"]
    assert one["ece_held_out"] is None and one["chosen_on"].startswith("the fitted cases")

    for npz in work.validation("2d", 0).parents[1].glob("fold_*/validation/*.npz"):
        npz.unlink()
    capfd.readouterr()
    assert script.main([str(work.root), "2d"]) == 2
    assert "2d: no validation probabilities" in capfd.readouterr().err
