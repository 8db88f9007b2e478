"""The model card of a bundle (issue 18, item 4): generated from a hand-built WORK whose validation numbers are
known, so the card must list exactly those; the Markdown has every section; import-model and predict --model
print the one-line summary; a hostile card is refused in one line; a bundle exported before model cards (no
card members) still imports and predicts."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from autoseg import api
from autoseg.bundle import import_model
from autoseg.layout import WorkDir
from autoseg.model_card import CARD_METRICS, read_card, render_markdown
from autoseg.postprocessing import Postprocessing
from autoseg.selection import InferenceInstructions
from tests.test_bad_input import _error_line, _run
from tests.test_hostile_bundle import _write_checkpoint

CARD = ("model_card.json", "MODEL_CARD.md")

# Hand-made validation rows: fold 0 validates case_a and case_b, fold 1 validates case_c.
FOLD_ROWS = {
    0: [
        {"case": "case_a", "label": "organ", "dice": 0.90, "hd95": 2.0, "nsd": 0.80},
        {"case": "case_a", "label": "lesion", "dice": 0.70, "hd95": 5.0, "nsd": 0.60},
        {"case": "case_b", "label": "organ", "dice": 0.80, "hd95": None, "nsd": 0.70},
        {"case": "case_b", "label": "lesion", "dice": 0.50, "hd95": 7.0, "nsd": 0.40},
    ],
    1: [
        {"case": "case_c", "label": "organ", "dice": 0.60, "hd95": 4.0, "nsd": 0.50},
        {"case": "case_c", "label": "lesion", "dice": 0.30, "hd95": 9.0, "nsd": 0.20},
    ],
}
# find-best's cross-validation after postprocessing: other numbers, so the card shows which source it used.
POSTPROCESSED_ROWS = [
    {"case": "case_a", "label": "organ", "dice": 0.95, "hd95": 1.0, "nsd": 0.9},
    {"case": "case_b", "label": "organ", "dice": 0.85, "hd95": 3.0, "nsd": 0.8},
    {"case": "case_c", "label": "organ", "dice": 0.65, "hd95": 5.0, "nsd": 0.6},
    {"case": "case_a", "label": "lesion", "dice": 0.75, "hd95": 4.0, "nsd": 0.7},
    {"case": "case_b", "label": "lesion", "dice": 0.55, "hd95": 6.0, "nsd": 0.5},
    {"case": "case_c", "label": "lesion", "dice": 0.35, "hd95": 8.0, "nsd": 0.3},
]
CALIBRATION = {
    "temperature": 1.75,
    "ece_before": {"organ": 0.081, "lesion": 0.064},
    "ece_after": {"organ": 0.012, "lesion": 0.019},
    "voxels": 123456,
    "method": "temperature scaling (NLL)",
    "kept": "zones",
    "zones": {"band": 3, "temperature": {"far": 0.9, "outer": 2.5, "inner": 3.25, "inside": 1.5}},
    "ece_held_out": {"organ": 0.02, "lesion": 0.031},
}


def _expected(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for label in ("organ", "lesion"):
        for metric in CARD_METRICS:
            values = [r[metric] for r in rows if r["label"] == label and r[metric] is not None]
            n_all = len([r for r in rows if r["label"] == label])
            out.setdefault(label, {})[metric] = (
                np.mean(values),
                np.std(values),
                len(values),
                n_all - len(values),
            )
    return out


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def hand_work(planned_phantom, tmp_path_factory) -> WorkDir:
    """A WORK with plans, dataset.json, fingerprint, preprocessed data and untrained 3d_fullres folds 0 and 1
    whose validation summaries and settings are written by hand."""
    root = tmp_path_factory.mktemp("hand") / "work"
    shutil.copytree(planned_phantom.root, root, ignore=shutil.ignore_patterns("results"))
    work = WorkDir(root)
    for fold, rows in FOLD_ROWS.items():
        _write_checkpoint(work, "3d_fullres", fold)
        _write(work.validation("3d_fullres", fold) / WorkDir.SUMMARY, {"per_case": rows})
        train = {"epochs": 7 + fold, "initial_lr": 0.01, "augmentation": {"rotation_p": 0.2}}
        _write(work.fold_dir("3d_fullres", fold) / WorkDir.FOLD_SETTINGS, {"train": train, "fold": str(fold)})
    return work


def _instructions(work: WorkDir) -> dict:
    d = InferenceInstructions(
        best="3d_fullres",
        configs=("3d_fullres",),
        folds=(0, 1),
        postprocessing=Postprocessing(),
        mean_dice=0.6,
        mean_dice_postprocessed=0.6,
        scores={},
        skipped=(),
        predict="",
        dataset_hash="",
    ).to_json()
    return {**d, "calibration": CALIBRATION}


def _card_of(bundle: Path) -> dict:
    with zipfile.ZipFile(bundle) as zf:
        return json.loads(zf.read("model_card.json"))


def _assert_numbers(cv: dict, rows: list[dict]) -> None:
    for label, metrics in _expected(rows).items():
        for metric, (mean, std, n, n_excluded) in metrics.items():
            stat = cv["structures"][label][metric]
            assert stat["mean"] == pytest.approx(mean, abs=1e-12), (label, metric)
            assert stat["std"] == pytest.approx(std, abs=1e-12), (label, metric)
            assert (stat["n"], stat["n_excluded"]) == (n, n_excluded), (label, metric)


# ------------------------------------------------------------------------------------------ contents


def test_card_lists_the_fold_validation_numbers(hand_work, tmp_path):
    bundle = tmp_path / "model.zip"
    api.export_model(hand_work.root, bundle, ["3d_fullres"], benchmark=False)
    card = _card_of(bundle)
    (cv,) = card["cross_validation"]
    assert cv["source"] == [
        "results/3d_fullres/fold_0/validation/summary.json",
        "results/3d_fullres/fold_1/validation/summary.json",
    ]
    assert "validation predictions of 3d_fullres folds 0, 1" in cv["description"]
    assert cv["n_cases"] == 3
    _assert_numbers(cv, FOLD_ROWS[0] + FOLD_ROWS[1])
    # HD95 of inner is undefined in case_b: mean over the two others, one excluded
    assert card["cross_validation"][0]["structures"]["organ"]["hd95"]["mean"] == pytest.approx(3.0)
    assert card["calibration"] == {
        "calibrated": False,
        "method": None,
        "temperature": None,
        "ece_before": {},
        "ece_after": {},
        "voxels": None,
        "kept": None,
        "zones": None,
        "ece_held_out": None,
    }
    assert card["benchmark"]["measured"] is False and "--no-benchmark" in card["benchmark"]["note"]
    # the rest comes from the WORK as well
    from autoseg.planning.plans import Plans

    plans = Plans.load(hand_work.plans)
    assert card["dataset"]["name"] == plans.dataset_name
    assert card["dataset"]["modalities"] == plans.channel_names
    assert card["dataset"]["labels"] == plans.labels
    assert card["dataset"]["n_cases"] == 6
    (config,) = card["configurations"]
    assert config["parameters"] == plans.parameter_count("3d_fullres")
    assert config["patch_size"] == plans.configuration("3d_fullres").patch_size
    assert config["folds"] == ["0", "1"]
    recipe = {tuple(r["folds"]): r["settings"] for r in card["recipe"]}
    assert recipe == {
        ("0",): {"epochs": 7, "initial_lr": 0.01, "augmentation.rotation_p": 0.2},
        ("1",): {"epochs": 8, "initial_lr": 0.01, "augmentation.rotation_p": 0.2},
    }
    fp = card["fingerprint"]
    spacings = np.array([c["spacing_mm"] for c in json.loads(hand_work.fingerprint.read_text())["cases"]])
    assert fp["spacing_min"] == pytest.approx(spacings.min(axis=0).tolist())
    assert fp["spacing_max"] == pytest.approx(spacings.max(axis=0).tolist())
    assert [c["channel"] for c in fp["intensity"]] == plans.channel_names
    import torch

    assert card["torch_version"] == torch.__version__


def test_card_prefers_find_best_postprocessed_crossval_and_shows_calibration(hand_work, tmp_path):
    work = WorkDir(tmp_path / "work")
    shutil.copytree(hand_work.root, work.root)
    _write(work.crossval("3d_fullres") / WorkDir.SUMMARY, {"per_case": FOLD_ROWS[0]})
    _write(work.crossval("3d_fullres") / "postprocessed" / WorkDir.SUMMARY, {"per_case": POSTPROCESSED_ROWS})
    _write(work.inference_instructions, _instructions(work))
    bundle = tmp_path / "model.zip"
    api.export_model(work.root, bundle, benchmark=False)
    card = _card_of(bundle)
    (cv,) = card["cross_validation"]
    assert cv["source"] == ["results/crossval/3d_fullres/postprocessed/summary.json"]
    assert "after the postprocessing find-best chose" in cv["description"]
    _assert_numbers(cv, POSTPROCESSED_ROWS)
    assert card["calibration"] == {
        "calibrated": True,
        **CALIBRATION,
        "zones": CALIBRATION["zones"]["temperature"],  # what predict applies, per zone
    }
    # without the postprocessed summary: find-best's cross-validation summary, before postprocessing
    shutil.rmtree(work.crossval("3d_fullres") / "postprocessed")
    api.export_model(work.root, bundle, benchmark=False)
    (cv,) = _card_of(bundle)["cross_validation"]
    assert cv["source"] == ["results/crossval/3d_fullres/summary.json"]
    _assert_numbers(cv, FOLD_ROWS[0])


def test_card_without_validation_says_not_cross_validated(hand_work, tmp_path):
    work = WorkDir(tmp_path / "work")
    shutil.copytree(hand_work.root, work.root, ignore=shutil.ignore_patterns("validation"))
    bundle = tmp_path / "model.zip"
    api.export_model(work.root, bundle, ["3d_fullres"], benchmark=False)
    with zipfile.ZipFile(bundle) as zf:
        card, md = json.loads(zf.read("model_card.json")), zf.read("MODEL_CARD.md").decode()
    assert card["cross_validation"] == []
    assert "Not cross-validated" in md and "not cross-validated" in md.splitlines()[2]


def test_markdown_has_every_section_and_the_numbers(hand_work, tmp_path):
    work = WorkDir(tmp_path / "work")
    shutil.copytree(hand_work.root, work.root)
    _write(work.inference_instructions, _instructions(work))
    bundle = tmp_path / "model.zip"
    api.export_model(work.root, bundle, benchmark=False)
    with zipfile.ZipFile(bundle) as zf:
        md = zf.read("MODEL_CARD.md").decode("utf-8")
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Dataset",
        "## Training data",
        "## Limits known from the data",
        "## Plan",
        "## Recipe",
        "## Cross-validation",
        "## Calibration",
        "## Inference benchmark",
        "## Versions",
    ]
    rows = FOLD_ROWS[0] + FOLD_ROWS[1]
    inner = [r["dice"] for r in rows if r["label"] == "organ"]
    assert f"| organ | {np.mean(inner):.4f} ± {np.std(inner):.4f} (n 3) |" in md
    assert "| organ | 0.0810 | 0.0120 |" in md  # ECE before / after
    assert "- Zone temperatures (far/outer/inner/inside): 0.9/2.5/3.25/1.5" in md
    assert "| organ | 0.0810 | 0.0120 | 0.0200 |" in md  # before, fitted cases, held-out cases
    # generated: the Markdown is the renderer's output for the card in the bundle
    assert md == render_markdown(read_card_from(bundle, tmp_path))


def read_card_from(bundle: Path, tmp_path: Path):
    path = tmp_path / "card.json"
    with zipfile.ZipFile(bundle) as zf:
        path.write_bytes(zf.read("model_card.json"))
    return read_card(path)


def test_benchmark_times_one_prediction_of_the_smallest_case(hand_work, tmp_path):
    bundle = tmp_path / "model.zip"
    api.export_model(hand_work.root, bundle, ["3d_fullres"], folds=[0])
    b = _card_of(bundle)["benchmark"]
    assert b["measured"] is True, b["note"]
    data = hand_work.preprocessed(
        json.loads(hand_work.plans.read_text())["configurations"]["3d_fullres"]["data_identifier"]
    )
    sizes = {
        p.stem: np.load(p, mmap_mode="r").shape for p in data.glob("*.npy") if not p.stem.endswith("_seg")
    }
    smallest = min(sizes, key=lambda c: (int(np.prod(sizes[c])), c))
    assert b["case"] == smallest and b["shape"] == list(sizes[smallest][1:])
    assert 0 < b["seconds"] < 120
    assert b["peak_memory_bytes"] > 2**20 and b["memory"]


# ------------------------------------------------------------------------------- summary on import


@pytest.fixture(scope="module")
def carded(hand_work, tmp_path_factory) -> Path:
    bundle = tmp_path_factory.mktemp("carded") / "model.zip"
    api.export_model(hand_work.root, bundle, ["3d_fullres"], benchmark=False)
    return bundle


def _one_input(phantom_dataset: Path, folder: Path) -> Path:
    folder.mkdir()
    for f in sorted((phantom_dataset / "imagesTr").glob("*_000[0-9].nii.gz"))[:2]:
        shutil.copy(f, folder / f.name)
    return folder


def _summary_line(out: str) -> str:
    (line,) = [x for x in out.splitlines() if x.startswith("model card: ")]
    return line


def test_import_model_and_predict_print_the_summary(carded, phantom_dataset, tmp_path, capfd):
    code, out, err = _run(capfd, "import-model", carded, tmp_path / "w")
    assert code == 0, err
    line = _summary_line(out)
    dataset = json.loads((tmp_path / "w" / "plans.json").read_text())["dataset_name"]
    rows = FOLD_ROWS[0] + FOLD_ROWS[1]
    inner = [r["dice"] for r in rows if r["label"] == "organ"]
    assert line.startswith(f"model card: {dataset}: 6 cases")
    assert f"organ {np.mean(inner):.3f}±{np.std(inner):.3f}" in line and "(3 cases)" in line
    assert "not calibrated" in line
    assert all((tmp_path / "w" / n).is_file() for n in CARD)
    inputs = _one_input(phantom_dataset, tmp_path / "in")
    code, out, err = _run(
        capfd, "predict", "--model", carded, inputs, tmp_path / "out", "--device", "cpu", "--no-mirroring"
    )
    assert code == 0, err
    assert _summary_line(out) == line
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1


# ---------------------------------------------------------------------------- bundles without a card


def _rebuild(bundle: Path, path: Path, drop=(), replace: dict[str, bytes] | None = None) -> Path:
    """``bundle`` without the members ``drop`` and with ``replace``d ones, its manifest made to match."""
    with zipfile.ZipFile(bundle) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json" and n not in drop}
        manifest = json.loads(zf.read("manifest.json"))
    members.update(replace or {})
    manifest["files"] = {n: hashlib.sha256(b).hexdigest() for n, b in members.items()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        for n, b in members.items():
            zf.writestr(n, b)
    return path


def test_bundle_exported_before_model_cards_imports_and_predicts(carded, phantom_dataset, tmp_path, capfd):
    old = _rebuild(carded, tmp_path / "old.zip", drop=CARD)
    with zipfile.ZipFile(old) as zf:
        assert not set(CARD) & set(zf.namelist())
    code, out, err = _run(capfd, "import-model", old, tmp_path / "w")
    assert code == 0, err
    assert _summary_line(out) == "model card: none in this bundle (exported before model cards)"
    assert not any((tmp_path / "w" / n).exists() for n in CARD)
    inputs = _one_input(phantom_dataset, tmp_path / "in")
    code, out, err = _run(
        capfd, "predict", "--model", old, inputs, tmp_path / "out", "--device", "cpu", "--no-mirroring"
    )
    assert code == 0, err
    assert "none in this bundle" in out
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1


# -------------------------------------------------------------------------------------- hostile cards


def _card_edit(carded: Path, edit) -> dict[str, bytes]:
    with zipfile.ZipFile(carded) as zf:
        card = json.loads(zf.read("model_card.json"))
    edit(card)
    return {"model_card.json": json.dumps(card).encode()}


HOSTILE = [
    (
        "only the JSON",
        dict(drop=("MODEL_CARD.md",)),
        "model.zip:model_card.json: the model card comes with MODEL_CARD.md",
    ),
    ("not JSON", dict(replace={"model_card.json": b"{"}), "model.zip:model_card.json: not valid JSON"),
    ("newer schema", "schema", "model.zip:model_card.json: model card schema 99 is not supported"),
    (
        "wrong type",
        "type",
        "model.zip:model_card.json: cross_validation[0].structures.organ.dice.mean: 'high' is not",
    ),
    ("unknown field", "field", "model.zip:model_card.json: the card: unknown field 'extra'"),
    ("other dataset", "dataset", "model.zip:model_card.json: describes another dataset"),
    (
        "binary markdown",
        dict(replace={"MODEL_CARD.md": b"\xff\xfe"}),
        "model.zip:MODEL_CARD.md: not UTF-8 text",
    ),
    (
        "huge markdown",
        dict(replace={"MODEL_CARD.md": b"#" * (2**20 + 1)}),
        "model.zip:MODEL_CARD.md: declares 1048577 bytes; at most 1048576",
    ),
]


def _hostile_edit(kind: str):
    def edit(card: dict) -> None:
        if kind == "schema":
            card["schema_version"] = 99
        elif kind == "type":
            card["cross_validation"][0]["structures"]["organ"]["dice"]["mean"] = "high"
        elif kind == "field":
            card["extra"] = 1
        elif kind == "dataset":
            card["dataset"]["name"] = "Dataset999_Other"

    return edit


@pytest.mark.parametrize("what, how, expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_card_is_refused_in_one_line(what, how, expected, carded, tmp_path, capfd):
    if isinstance(how, str):
        how = dict(replace=_card_edit(carded, _hostile_edit(how)))
    bundle = _rebuild(carded, tmp_path / "model.zip", **how)
    code, _, err = _run(capfd, "import-model", bundle, tmp_path / "w")
    assert expected in _error_line(code, err)
    assert not (tmp_path / "w").exists()


def test_summary_of_a_card_with_control_characters_is_printable(carded, tmp_path):
    def edit(card: dict) -> None:
        card["configs"] = ["3d_fullres\x1b[2J\x07"]
        card["autoseg_version"] = "[bold]x[/bold]\r\n"

    bundle = _rebuild(carded, tmp_path / "model.zip", replace=_card_edit(carded, edit))
    work = import_model(bundle, tmp_path / "w")
    line = api.model_card_summary(work)
    assert line.isprintable() and "\x1b" not in line and "\n" not in line
