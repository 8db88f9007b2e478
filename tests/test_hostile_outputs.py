"""Hostile output paths, output writing and input discovery of predict, evaluate, export-model and
export-network (issue 13), through the CLI.

A refused command exits 2 with exactly one ``error:`` line naming the file, no traceback, writes nothing and
deletes or changes nothing of the user's (every entry of the folders involved, links and folders included, is
compared before and after). Cleanup after a killed run removes only names :mod:`autoseg.atomic` made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.atomic import remove_stale_temporaries, temp_dir_for, temp_path_for, temp_target
from autoseg.layout import WorkDir
from tests.test_bad_input import _error_line, _run

ENDING = ".nii.gz"
PREDICT = ("--device", "cpu", "--no-mirroring", "-c", "2d", "--folds", "all")


# --------------------------------------------------------------------------------------------- helpers


def _snapshot(*folders: Path) -> dict[str, tuple]:
    """Every entry under ``folders`` (files, folders, links, broken links) with its kind, size and mtime,
    without following links."""
    out: dict[str, tuple] = {}
    for folder in folders:
        if not os.path.lexists(folder):
            out[str(folder)] = ("absent",)
            continue
        for root, dirs, files in os.walk(folder):
            for name in dirs + files:
                p = Path(root) / name
                st = p.lstat()
                kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
                target = os.readlink(p) if kind == "link" else None
                out[str(p)] = (kind, target, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return out


def _refused(capfd, *args, watch: tuple[Path, ...] = ()) -> str:
    """Run the command, expect a refusal, and check nothing under ``watch`` changed. Returns the error line."""
    before = _snapshot(*watch)
    code, _, err = _run(capfd, *args)
    line = _error_line(code, err)
    assert _snapshot(*watch) == before, "a refused command changed the disk"
    return line


def _convert(src: Path, dst: Path) -> None:
    """Copy the image ``src`` to ``dst`` in the format of ``dst``'s ending (voxels and geometry only: NIfTI
    metadata would make ITK warn on stderr for MetaImage)."""
    img = sitk.ReadImage(str(src))
    copy = sitk.GetImageFromArray(sitk.GetArrayFromImage(img))
    copy.CopyInformation(img)
    sitk.WriteImage(copy, str(dst), useCompression=True)


def _labels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def trained(planned_phantom, tmp_path_factory) -> WorkDir:
    """The planned phantom with a 2d network trained for one iteration on every case (fold 'all')."""
    import torch

    from autoseg.settings import TrainSettings
    from autoseg.training.loop import train_fold

    work = WorkDir(tmp_path_factory.mktemp("trained") / "work")
    shutil.copytree(planned_phantom.root, work.root)
    settings = TrainSettings(epochs=1, iters_per_epoch=1, val_iters=1, loader_workers=0)
    train_fold(work, "2d", "all", settings, torch.device("cpu"))
    return work


def _inputs(phantom_dataset: Path, folder: Path, cases=(0,), ending: str = ENDING) -> Path:
    """``folder`` with both channels of phantom cases, written with ``ending``."""
    folder.mkdir(parents=True)
    for i in cases:
        for c in (0, 1):
            src = phantom_dataset / "imagesTr" / f"phantom_{i:03d}_{c:04d}{ENDING}"
            dst = folder / f"phantom_{i:03d}_{c:04d}{ending}"
            if ending == ENDING:
                shutil.copyfile(src, dst)
            else:
                _convert(src, dst)
    return folder


# --------------------------------------------------------------------------- temporary names (item 1)


def test_temp_names_are_recognised_and_nothing_else(tmp_path):
    """The maker and the matcher are one pair: every name made is recognised with its target; user names
    that merely look temporary are not."""
    for target, suffix in [
        ("a.nii.gz", ".tmp.nii.gz"),
        ("summary.json", ".tmp"),
        ("m.zip", ".zip"),
        ("x", ""),
    ]:
        made = temp_path_for(tmp_path / target, suffix)
        assert made.is_file() and temp_target(made.name) == target
    folder = temp_dir_for(tmp_path / "b.mhd")
    assert folder.is_dir() and temp_target(folder.name) == "b.mhd"
    for user in [
        ".a.nii.gz.my-notes.txt",
        ".a.nii.gz.abc12345.tmp.nii.gz",  # the old mkstemp form: it cannot be told from a user's name
        ".a.nii.gz.autoseg-tmp-0123.tmp",  # token too short
        ".a.nii.gz.autoseg-tmp-0123456789AB.tmp",  # upper case: not a token autoseg makes
        ".a.nii.gz.autoseg-tmp-0123456789ab.my notes.txt",
        "a.nii.gz.autoseg-tmp-0123456789ab.tmp",  # not hidden
    ]:
        assert temp_target(user) is None, user
    (tmp_path / "keep").mkdir()
    users = [tmp_path / ".a.nii.gz.my-notes.txt", tmp_path / ".b.mhd.autoseg-tmp-0123456789ab.d"]
    users[0].write_text("mine")
    users[1].symlink_to(tmp_path / "keep")  # a link with a temporary's name is never followed nor removed
    removed = remove_stale_temporaries(tmp_path, ["a.nii.gz"])
    assert {p.name for p in removed} == {".a.nii.gz." + n.name.split(".a.nii.gz.")[1] for n in removed}
    assert all(p.exists() or p.is_symlink() for p in users) and folder.is_dir()  # b.mhd: not asked for
    remove_stale_temporaries(tmp_path)
    assert not folder.exists() and all(os.path.lexists(p) for p in users)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([users[0].name, users[1].name, "keep"])


def test_refused_predict_deletes_nothing_in_output(trained, phantom_dataset, tmp_path, capfd):
    """A rerun refused because outputs exist keeps every file in OUTPUT, hidden look-alikes of temporaries
    included; a run that goes ahead (--overwrite) removes autoseg's own stale temporaries and nothing else."""
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    out = tmp_path / "out"
    code, _, err = _run(capfd, "predict", trained.root, inputs, out, *PREDICT)
    assert code == 0, err
    users = [".phantom_000.nii.gz.my-notes.txt", ".phantom_000.nii.gz.abc12345.tmp.nii.gz", "notes.txt"]
    for name in users:
        (out / name).write_text("the user's")
    stale = out / ".phantom_000.nii.gz.autoseg-tmp-0123456789ab.tmp.nii.gz"
    stale.write_bytes(b"half a file")
    line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(out, inputs))
    assert f"{out / ('phantom_000' + ENDING)}: already exists" in line
    code, _, err = _run(capfd, "predict", trained.root, inputs, out, *PREDICT, "--overwrite")
    assert code == 0, err
    assert not stale.exists()
    assert all((out / n).read_text() == "the user's" for n in users)


# ----------------------------------------------------------------------- .mhd / .nhdr as a unit (item 2)


@pytest.mark.parametrize("ending,data", [(".mhd", ".zraw"), (".nhdr", ".raw.gz")])
def test_header_outputs_are_written_as_a_unit(trained, phantom_dataset, tmp_path, capfd, ending, data):
    """The header names its final data file, both are in place and readable, nothing temporary is left, and
    a refused rerun, --continue and --overwrite keep the pair intact."""
    inputs = _inputs(phantom_dataset, tmp_path / "in", ending=ending)
    out = tmp_path / "out"
    stale = out / f".phantom_000{ending}.autoseg-tmp-00000000dead.d"  # what a SIGKILL mid-write leaves
    stale.mkdir(parents=True)
    (stale / f"phantom_000{data}").write_bytes(b"half")
    code, _, err = _run(capfd, "predict", trained.root, inputs, out, *PREDICT, "--continue")
    assert code == 0, err
    header, datafile = out / f"phantom_000{ending}", out / f"phantom_000{data}"
    assert sorted(p.name for p in out.iterdir()) == sorted([header.name, datafile.name])
    assert datafile.name in header.read_text(encoding="latin-1")
    first = _labels(header)
    assert first.shape == _labels(inputs / f"phantom_000_0000{ending}").shape
    _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(out, inputs))
    before = _snapshot(out)
    code, _, err = _run(capfd, "predict", trained.root, inputs, out, *PREDICT, "--continue")
    assert code == 0, err
    assert _snapshot(out) == before
    code, _, err = _run(capfd, "predict", trained.root, inputs, out, *PREDICT, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([header.name, datafile.name])
    np.testing.assert_array_equal(_labels(header), first)


def test_a_users_data_file_name_in_output_counts_as_an_existing_output(
    trained, phantom_dataset, tmp_path, capfd
):
    """``OUT/phantom_000.zraw`` (no header) would be overwritten by the .mhd output's data file: refused."""
    inputs = _inputs(phantom_dataset, tmp_path / "in", ending=".mhd")
    out = tmp_path / "out"
    out.mkdir()
    (out / "phantom_000.zraw").write_bytes(b"the user's")
    line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(out, inputs))
    assert f"{out / 'phantom_000.zraw'}: already exists" in line


@pytest.mark.parametrize("ending", [".mhd", ".nhdr"])
def test_header_dataset_plans(phantom_dataset, tmp_path, capfd, ending):
    """A dataset stored as headers with data files plans: the data files are not stray files, and WORK's
    copies of the labels keep theirs."""
    root = tmp_path / "Dataset901_Headers"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
        for f in sorted((phantom_dataset / sub).glob(f"*{ENDING}"))[: 4 if sub == "imagesTr" else 2]:
            target = root / sub / (f.name[: -len(ENDING)] + ending)
            _convert(f, target)
    spec = json.loads((phantom_dataset / "dataset.json").read_text())
    spec.update(file_ending=ending, numTraining=2)
    (root / "dataset.json").write_text(json.dumps(spec))
    assert len(list((root / "labelsTr").iterdir())) == 4  # headers and data files
    work = tmp_path / "work"
    before = _snapshot(root)
    code, _, err = _run(capfd, "plan", root, "--workdir", work, "--workers", "1")
    assert code == 0, err
    assert _snapshot(root) == before
    for label in (root / "labelsTr").glob(f"*{ending}"):
        np.testing.assert_array_equal(_labels(work / "gt_segmentations" / label.name), _labels(label))


def test_header_dataset_with_a_stray_file_is_still_refused(phantom_dataset, tmp_path, capfd):
    root = tmp_path / "Dataset902"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for f in sorted((phantom_dataset / "labelsTr").glob(f"*{ENDING}"))[:2]:
        _convert(f, root / "labelsTr" / f.name.replace(ENDING, ".mhd"))
    (root / "labelsTr" / "orphan.raw").write_bytes(b"\0" * 8)
    spec = json.loads((phantom_dataset / "dataset.json").read_text())
    spec.update(file_ending=".mhd", numTraining=2)
    (root / "dataset.json").write_text(json.dumps(spec))
    from autoseg.errors import DatasetError
    from autoseg.io.dataset import discover_cases

    with pytest.raises(DatasetError, match=r"orphan\.raw: unexpected file"):
        discover_cases(root)


# ------------------------------------------------------------------------ OUTPUT against INPUT (item 3)


def test_output_inside_input_is_refused(trained, phantom_dataset, tmp_path, capfd):
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    for out in (inputs / "preds", inputs / "a" / "b"):
        line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(inputs,))
        assert f"{out}: output folder lies inside the input folder {inputs}" in line
    link = tmp_path / "link"  # an output path that resolves into the input folder through a link
    link.symlink_to(inputs)
    line = _refused(capfd, "predict", trained.root, inputs, link / "preds", *PREDICT, watch=(inputs,))
    assert "lies inside the input folder" in line
    line = _refused(capfd, "predict", trained.root, inputs, link, *PREDICT, watch=(inputs,))
    assert f"{link}: output folder must differ from the input folder" in line
    files = sorted(inputs.iterdir())  # files given one by one: their folder is refused as OUTPUT
    line = _refused(capfd, "predict", trained.root, *files, inputs, *PREDICT, watch=(inputs,))
    assert "must differ from the input folder" in line


def test_output_in_work_folders_is_refused(trained, phantom_dataset, tmp_path, capfd):
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    for out in (trained.gt_segmentations, trained.root / "results" / "preds"):
        line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(trained.root, inputs))
        assert f"{out}: lies in the WORK folder's own files" in line


def test_input_inside_output_is_allowed_and_untouched(trained, phantom_dataset, tmp_path, capfd):
    """OUTPUT holding the input folder: outputs go to OUTPUT's top level, the input folder is not touched."""
    out = tmp_path / "out"
    inputs = _inputs(phantom_dataset, out / "in")
    before = _snapshot(inputs)
    code, _, err = _run(capfd, "predict", trained.root, inputs, out, *PREDICT)
    assert code == 0, err
    assert _snapshot(inputs) == before and (out / f"phantom_000{ENDING}").is_file()


# ------------------------------------------------------------- files where folders go, and back (item 4)


def test_predict_output_that_is_a_file_or_under_one(trained, phantom_dataset, tmp_path, capfd):
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    afile = tmp_path / "afile"
    afile.write_text("the user's")
    line = _refused(capfd, "predict", trained.root, inputs, afile, *PREDICT, watch=(tmp_path,))
    assert f"{afile}: is a file, not a folder" in line
    line = _refused(capfd, "predict", trained.root, inputs, afile / "x" / "y", *PREDICT, watch=(tmp_path,))
    assert f"{afile / 'x' / 'y'}: cannot write the output folder here: {afile} is a file" in line


def test_predict_output_that_is_a_broken_link_or_too_long(trained, phantom_dataset, tmp_path, capfd):
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    line = _refused(capfd, "predict", trained.root, inputs, link, *PREDICT, watch=(tmp_path,))
    assert f"{link}: is a broken symbolic link, not a folder" in line
    line = _refused(capfd, "predict", trained.root, inputs, link / "sub", *PREDICT, watch=(tmp_path,))
    assert f"{link} is a broken symbolic link, not a folder" in line
    # a case id that fits the file system but leaves no room for the temporary name it is written under
    long_in = tmp_path / "long"
    long_in.mkdir()
    case = "c" * 225
    for c in (0, 1):
        shutil.copyfile(inputs / f"phantom_000_{c:04d}{ENDING}", long_in / f"{case}_{c:04d}{ENDING}")
    out = tmp_path / "out2"
    line = _refused(capfd, "predict", trained.root, long_in, out, *PREDICT, watch=(tmp_path,))
    assert f"{out / (case + ENDING)}: file name too long to write safely" in line


def test_predict_header_input_without_its_data_file(trained, phantom_dataset, tmp_path, capfd):
    inputs = _inputs(phantom_dataset, tmp_path / "in", ending=".mhd")
    (inputs / "phantom_000_0001.zraw").unlink()
    out = tmp_path / "out"
    line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(tmp_path,))
    assert (
        f"{inputs / 'phantom_000_0001.mhd'}: its data file phantom_000_0001.zraw (named in the header) is missing"
        in line
    )


@pytest.mark.parametrize("mode", [(), ("--continue",), ("--overwrite",)])
def test_predict_output_name_taken_by_a_folder(trained, phantom_dataset, tmp_path, capfd, mode):
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    out = tmp_path / "out"
    (out / f"phantom_000{ENDING}").mkdir(parents=True)
    (out / f"phantom_000{ENDING}" / "mine.txt").write_text("the user's")
    line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, *mode, watch=(out, inputs))
    assert f"{out / ('phantom_000' + ENDING)}: is a folder where predict writes an output file" in line


def test_predict_probabilities_name_taken(trained, phantom_dataset, tmp_path, capfd):
    """--save-probabilities writes <case>.npz: a user's file of that name is an existing output."""
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "phantom_000.npz").write_text("the user's")
    line = _refused(
        capfd, "predict", trained.root, inputs, out, *PREDICT, "--save-probabilities", watch=(out, inputs)
    )
    assert f"{out / 'phantom_000.npz'}: already exists" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_output_not_writable(trained, phantom_dataset, tmp_path, capfd):
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = _refused(capfd, "predict", trained.root, inputs, locked / "out", *PREDICT, watch=(locked,))
        assert f"{locked}: is not writable" in line or "not writable" in line
    finally:
        locked.chmod(0o755)


def _references(phantom_dataset: Path, folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for f in sorted((phantom_dataset / "labelsTr").glob(f"*{ENDING}"))[:n]:
        shutil.copyfile(f, folder / f.name)
    return folder


def test_evaluate_output_paths(phantom_dataset, tmp_path, capfd):
    refs = _references(phantom_dataset, tmp_path / "refs")
    preds = _references(phantom_dataset, tmp_path / "preds")
    dj = phantom_dataset / "dataset.json"
    afile = tmp_path / "afile.json"
    afile.write_text("the user's")
    watch = (tmp_path,)
    base = ("evaluate", refs, preds, "--dataset-json", dj, "--output")
    folder = tmp_path / "dir.json"
    folder.mkdir()
    cases = [
        (folder, f"{folder}: is a folder; give the path of the evaluation summary file to write"),
        (afile / "summary.json", f"{afile} is a file, not a folder"),
        (tmp_path / "summary.nii.gz", "--output is the summary's path and must end in .json"),
        (refs / "summary.json", f"lies inside the reference folder {refs}"),
    ]
    images = tmp_path / "images"
    images.mkdir()
    line = _refused(capfd, *base, images / "s.json", "--overlays", "--images", images, watch=watch)
    assert f"{images / 's.json'}: lies inside the image folder {images}" in line
    for output, expected in cases:
        line = _refused(capfd, *base, output, watch=watch)
        assert f"{output}: " in line and expected in line, line
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "per_case.csv").mkdir()
    line = _refused(capfd, *base, tmp_path / "o" / "s.json", watch=watch)
    assert f"{tmp_path / 'o' / 'per_case.csv'}: is a folder" in line
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "overlays").write_text("the user's")
    line = _refused(capfd, *base, tmp_path / "p" / "s.json", "--overlays", watch=watch)
    assert f"{tmp_path / 'p' / 'overlays'}: is a file, not a folder" in line
    png = tmp_path / "q" / "overlays" / (sorted(preds.iterdir())[1].name[: -len(ENDING)] + ".png")
    png.mkdir(parents=True)
    line = _refused(capfd, *base, tmp_path / "q" / "s.json", "--overlays", watch=watch)
    assert f"{png}: is a folder where evaluate writes the case's overlay" in line


def test_export_model_output_paths(trained, tmp_path, capfd):
    folder = tmp_path / "bundle.zip"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("the user's")
    base = ("export-model", trained.root)
    watch = (tmp_path, trained.root)
    for output, extra, expected in [
        (folder, ("--overwrite",), "is a folder; give the path of the model bundle file"),
        (afile / "m.zip", (), f"{afile} is a file, not a folder"),
        (afile, (), "already exists; use --overwrite"),
        (trained.plans, ("--overwrite",), f"is part of the WORK folder {trained.root}"),
    ]:
        line = _refused(capfd, *base, output, "-c", "2d", *extra, watch=watch)
        assert f"{output}: {expected}" in line or (f"{output}: " in line and expected in line), line


def test_export_network_output_paths(trained, tmp_path, capfd):
    folder = tmp_path / "net.pt"
    folder.mkdir()
    afile = tmp_path / "afile.pt"
    afile.write_text("the user's")
    watch = (tmp_path, trained.root)
    base = ("export-network", trained.root, "2d", "all")
    for output, extra, expected in [
        (folder, ("--overwrite",), "is a folder; give the path of the exported network file"),
        (afile / "n.pt", (), f"{afile} is a file, not a folder"),
        (afile, (), "already exists; use --overwrite"),
        (
            trained.fold_dir("2d", "all") / "checkpoint_final.pt",
            ("--overwrite",),
            "is part of the WORK folder",
        ),
        (tmp_path / "n.pt", ("--format", "tflite"), "unknown export format"),
    ]:
        line = _refused(capfd, *base, output, *extra, watch=watch)
        assert expected in line and (str(output) in line or "--format" in line), line
    code, _, err = _run(capfd, *base, afile, "--overwrite")
    assert code == 0, err
    assert afile.stat().st_size > 100


# --------------------------------------------------------------------- predict's dropped inputs (item 5)


def test_predict_duplicate_channel_in_two_endings(trained, phantom_dataset, tmp_path, capfd):
    inputs = _inputs(phantom_dataset, tmp_path / "in")
    img = sitk.ReadImage(str(inputs / f"phantom_000_0001{ENDING}"))
    sitk.WriteImage(img, str(inputs / "phantom_000_0001.nii"))
    out = tmp_path / "out"
    line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(inputs, out))
    assert "channel 1 of case 'phantom_000' is also given as phantom_000_0001.nii" in line
    files = [
        inputs / f"phantom_000_0000{ENDING}",
        inputs / "phantom_000_0001.nii",
        inputs / f"phantom_000_0001{ENDING}",
    ]
    line = _refused(capfd, "predict", trained.root, *files, out, *PREDICT, watch=(inputs, out))
    assert f"{files[2]}: channel 1 of case 'phantom_000' is also given as phantom_000_0001.nii" in line
    files = [
        inputs / f"phantom_000_0000{ENDING}",
        inputs / f"phantom_000_0001{ENDING}",
        tmp_path / "in" / ".." / "in" / f"phantom_000_0000{ENDING}",
    ]
    line = _refused(capfd, "predict", trained.root, *files, out, *PREDICT, watch=(inputs, out))
    assert "given twice" in line


def test_predict_broken_link_and_folder_named_like_an_image(trained, phantom_dataset, tmp_path, capfd):
    out = tmp_path / "out"
    inputs = _inputs(phantom_dataset, tmp_path / "a", cases=(0, 1))
    broken = inputs / f"phantom_002_0000{ENDING}"
    broken.symlink_to(tmp_path / "gone.nii.gz")
    line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(inputs, out))
    assert f"{broken}: broken symbolic link" in line
    line = _refused(capfd, "predict", trained.root, broken, out, *PREDICT, watch=(inputs, out))
    assert f"{broken}: broken symbolic link" in line
    files = [inputs / f"phantom_000_0000{ENDING}", broken]
    line = _refused(capfd, "predict", trained.root, *files, out, *PREDICT, watch=(inputs, out))
    assert f"{broken}: broken symbolic link" in line
    broken.unlink()
    folder = inputs / f"phantom_002_0000{ENDING}"
    folder.mkdir()
    line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(inputs, out))
    assert f"{folder}: is a folder, but its name says image" in line
    folder.rmdir()
    os.mkfifo(inputs / f"phantom_002_0001{ENDING}")
    line = _refused(capfd, "predict", trained.root, inputs, out, *PREDICT, watch=(inputs, out))
    assert "not a regular file" in line


# ------------------------------------------------------------------ evaluate's missing cases (item 6)


def test_evaluate_missing_prediction_is_an_error(phantom_dataset, tmp_path, capfd):
    refs = _references(phantom_dataset, tmp_path / "refs", n=3)
    preds = _references(phantom_dataset, tmp_path / "preds", n=3)
    missing = sorted(preds.iterdir())[1]
    missing.unlink()
    dj = phantom_dataset / "dataset.json"
    line = _refused(capfd, "evaluate", refs, preds, "--dataset-json", dj, watch=(tmp_path,))
    assert f"{missing}: prediction missing for reference {refs / missing.name} (1 of 3" in line
    assert "--missing-as-empty" in line
    code, out, err = _run(capfd, "evaluate", refs, preds, "--dataset-json", dj, "--missing-as-empty")
    assert code == 0, err
    summary = json.loads((preds / "summary.json").read_text())
    case = missing.name[: -len(ENDING)]
    assert summary["n_cases"] == 3 and summary["n_references"] == 3 and summary["missing_as_empty"] == [case]
    rows = {(r["case"], r["label"]): r for r in summary["per_case"]}
    assert rows[(case, "organ")]["dice"] == 0.0 and rows[(case, "organ")]["fp"] == 0
    others = [r["dice"] for (c, label), r in rows.items() if label == "organ" and c != case]
    assert others == [1.0, 1.0]  # the other predictions are the references
    assert summary["mean"]["organ"]["dice"]["mean"] == pytest.approx(2 / 3)
    assert "3 case(s) scored of 3 reference(s), 1 missing prediction(s) scored as empty: " + case in out


def test_evaluate_prediction_without_reference_and_wrong_geometry(phantom_dataset, tmp_path, capfd):
    refs = _references(phantom_dataset, tmp_path / "refs", n=2)
    preds = _references(phantom_dataset, tmp_path / "preds", n=2)
    dj = phantom_dataset / "dataset.json"
    base = ("evaluate", refs, preds, "--dataset-json", dj)
    extra = preds / f"zzz{ENDING}"
    shutil.copyfile(sorted(refs.iterdir())[0], extra)
    line = _refused(capfd, *base, watch=(tmp_path,))
    assert f"{extra}: no reference {refs / extra.name}" in line
    extra.unlink()
    target = sorted(preds.iterdir())[0]
    img = sitk.ReadImage(str(target))
    arr = sitk.GetArrayFromImage(img)
    small = sitk.GetImageFromArray(arr[:-1])
    small.CopyInformation(sitk.GetImageFromArray(arr[:-1]))
    sitk.WriteImage(small, str(target))
    line = _refused(capfd, *base, watch=(tmp_path,))
    assert f"{target}: shape" in line and "differs from reference" in line
    moved = sitk.GetImageFromArray(arr)
    moved.CopyInformation(img)
    moved.SetOrigin(tuple(o + 5 for o in img.GetOrigin()))
    sitk.WriteImage(moved, str(target))
    line = _refused(capfd, *base, watch=(tmp_path,))
    assert f"{target}: origin/direction differ from reference" in line
    target.unlink()
    target.symlink_to(tmp_path / "gone.nii.gz")
    line = _refused(capfd, *base, "--missing-as-empty", watch=(tmp_path,))
    assert f"{target}: a broken symbolic link, but named like a label file" in line


# ---------------------------------------------------------------------------- signals during writes (7)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_predict_leaves_only_complete_outputs(trained, phantom_dataset, tmp_path, sig, code):
    """SIGTERM or Ctrl-C while predicting several cases: exit 143 or 130 (or 0 if it won the race), every
    file under a final name is complete, and no temporary file is left behind."""
    inputs = _inputs(phantom_dataset, tmp_path / "in", cases=range(3))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "autoseg", "predict", str(trained.root), str(inputs), str(out), *PREDICT]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (out.is_dir() and any(out.iterdir())):
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (code, 0), err
    assert b"Traceback" not in err
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    assert all(temp_target(n) is None for n in names), names
    for n in names:
        assert _labels(out / n).shape == _labels(inputs / n.replace(ENDING, f"_0000{ENDING}")).shape


@pytest.mark.parametrize("link", [False, True])
def test_copies_of_header_images_keep_their_data(phantom_dataset, tmp_path, link):
    """WORK's copies of labels (gt_segmentations, find-best's cross-validation links, postprocessing) take a
    header's data file along, under its own name, before the header."""
    from autoseg.io.volume import copy_volume

    src = tmp_path / "a" / "case.mhd"
    src.parent.mkdir()
    _convert(sorted((phantom_dataset / "labelsTr").glob(f"*{ENDING}"))[0], src)
    dst = copy_volume(src, tmp_path / "b" / "case.mhd", link=link)
    assert sorted(p.name for p in dst.parent.iterdir()) == ["case.mhd", "case.zraw"]
    np.testing.assert_array_equal(_labels(dst), _labels(src))
