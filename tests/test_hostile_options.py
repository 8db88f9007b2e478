"""Hostile options and settings, through the CLI: every command checks every option and setting up front.

Each refusal must exit 2 with exactly one ``error:`` line that names the option (or the settings file, its
section and key) and what is allowed, with no traceback; nothing may be written, and nothing of the user's
deleted or changed. Above all, ``train WORK CONFIG FOLD --overwrite`` with a bad option must leave the trained
fold exactly as it was (names, sizes, mtimes): validate everything, then destroy.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.layout import WorkDir
from autoseg.settings import (
    AugmentationSettings,
    InferenceSettings,
    TrainSettings,
    inference_settings,
    load_settings,
)
from tests.test_bad_input import _error_line, _listing, _run

ENDING = ".nii.gz"
NO_MPS = not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available())
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def trained(planned_phantom, tmp_path_factory) -> WorkDir:
    """A copy of the planned phantom with a trained 2d fold 'all' (one iteration, no validation). Every test
    here refuses, so the folder must stay as it is; tests compare its listing before and after."""
    from autoseg.training.loop import train_fold

    work = WorkDir(tmp_path_factory.mktemp("hostile") / "work")
    shutil.copytree(planned_phantom.root, work.root)
    settings = TrainSettings(epochs=1, iters_per_epoch=1, val_iters=1, loader_workers=0)
    train_fold(work, "2d", "all", settings, torch.device("cpu"))
    return work


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _refused(capfd, *args) -> str:
    code, _, err = _run(capfd, *args)
    return _error_line(code, err)


# ------------------------------------------------------------- train --overwrite: validate, then destroy

TRAIN = ("--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "-j", "0", "--device", "cpu")

# (id, extra arguments, expected part of the error line); "{file}" is the settings file written from "toml"
TRAIN_OPTION_CASES = [
    ("device tpu", ["--device", "tpu"], "--device 'tpu': unknown device (use auto, cpu, cuda, cuda:N or mps)"),
    ("device empty", ["--device", ""], "--device '': unknown device"),
    ("device meta", ["--device", "meta"], "--device 'meta': unknown device"),
    ("device cuda:x", ["--device", "cuda:x"], "--device 'cuda:x': unknown device"),
    ("epochs 0", ["--epochs", "0"], "--epochs 0: must be >= 1"),
    ("epochs -3", ["--epochs", "-3"], "--epochs -3: must be >= 1"),
    ("epochs word", ["--epochs", "many"], "Invalid value for '--epochs'"),
    ("iters-per-epoch 0", ["--iters-per-epoch", "0"], "--iters-per-epoch 0: must be >= 1"),
    ("val-iters -5", ["--val-iters", "-5"], "--val-iters -5: must be >= 0"),
    ("time-budget inf", ["--time-budget", "inf"], "--time-budget inf: must be a finite number"),
    ("time-budget nan", ["--time-budget", "nan"], "--time-budget"),
    ("time-budget 1e308", ["--time-budget", "1e308"], "--time-budget 1e+308: must be in [0, 1e+06] (0: none)"),
    ("time-budget -1", ["--time-budget", "-1"], "Invalid value for '--time-budget'"),
    ("workers -2", ["-j", "-2"], "Invalid value for '--workers'"),
    ("workers 100000", ["-j", "100000"], "--workers 100000: must be in [-1, 64]"),
    ("overwrite and resume", ["--resume"], "--overwrite and --resume exclude each other"),
    ("unknown option", ["--epoch", "3"], "No such option: --epoch"),
    ("settings file missing", ["--config-file", "/nonexistent/s.toml"], "/nonexistent/s.toml: cannot read settings"),
    ("loss unknown", ["--loss", "dice+bce"], "--loss dice+bce: unknown loss 'bce'; losses: ce, wce, dice, dice_sq,"),
    ("loss syntax", ["--loss", "0.5*tversky(alpha=0.3"], "--loss 0.5*tversky(alpha=0.3: expected ',' or ')', found the end"),
    ("loss dangling +", ["--loss", "dice+"], "--loss dice+: expected a name, found the end; write a sum of"),
    ("loss alpha 1.5", ["--loss", "tversky(alpha=1.5,beta=0.7)"], "tversky: alpha=1.5 must be a number in [0, 1]"),
    ("loss beta -0.1", ["--loss", "focal_tversky(beta=-0.1)"], "focal_tversky: beta=-0.1 must be a number in [0, 1]"),
    ("loss gamma -2", ["--loss", "0.5*dice+0.5*focal(gamma=-2)"], "focal: gamma=-2 must be a number >= 0"),
    ("loss weight 0", ["--loss", "0*dice+ce"], "dice: weight 0 must be a finite number > 0"),
    ("loss unknown parameter", ["--loss", "focal(alpha=0.25)"], "focal: unknown parameter 'alpha' (parameters: gamma)"),
    ("loss weights count", ["--loss", "ce(weights=[1,2,3,4,5,6,7])"], "ce: 7 weights given, the plans have"),
    ("optimizer lamb", ["--optimizer", "lamb"], "--optimizer lamb: must be sgd or adam or adamw"),
    ("schedule step", ["--schedule", "step"], "--schedule step: must be poly or cosine"),
    ("warmup 0.9", ["--warmup-fraction", "0.9"], "--warmup-fraction 0.9: must be in [0, 0.5]"),
]  # fmt: skip

SETTINGS_CASES = [
    ("initial_lr -1", "[train]\ninitial_lr = -1.0\n", "[train] initial_lr = -1.0: must be > 0"),
    ("initial_lr 0", "[train]\ninitial_lr = 0\n", "[train] initial_lr = 0.0: must be > 0"),
    ("epochs many", '[train]\nepochs = "many"\n', '[train] epochs = "many": must be a whole number'),
    ("epochs 1.5", "[train]\nepochs = 1.5\n", "[train] epochs = 1.5: must be a whole number"),
    ("epochs true", "[train]\nepochs = true\n", "[train] epochs = true: must be a whole number"),
    ("epochs 0", "[train]\nepochs = 0\n", "[train] epochs = 0: must be >= 1"),
    ("iters_per_epoch 0", "[train]\niters_per_epoch = 0\n", "[train] iters_per_epoch = 0: must be >= 1"),
    ("val_iters -1", "[train]\nval_iters = -1\n", "[train] val_iters = -1: must be >= 0"),
    ("num_folds 0", "[train]\nnum_folds = 0\n", "[train] num_folds = 0: must be in [2, 5]"),
    ("num_folds 10", "[train]\nnum_folds = 10\n", "[train] num_folds = 10: must be in [2, 5]"),
    ("oversample 5", "[train]\noversample_foreground = 5\n", "[train] oversample_foreground = 5.0: must be in [0, 1]"),
    ("oversample -0.1", "[train]\noversample_foreground = -0.1\n", "[train] oversample_foreground = -0.1: must be in [0, 1]"),
    ("momentum nan", "[train]\nmomentum = nan\n", "[train] momentum = nan: must be a finite number"),
    ("momentum 1", "[train]\nmomentum = 1.0\n", "[train] momentum = 1.0: must be in [0, 0.999]"),
    ("nesterov without momentum", "[train]\nmomentum = 0.0\n", "[train] momentum = 0.0: must be > 0 with nesterov = true"),
    ("nesterov yes", '[train]\nnesterov = "yes"\n', '[train] nesterov = "yes": must be true or false'),
    ("weight_decay -1", "[train]\nweight_decay = -1e-5\n", "[train] weight_decay = -1e-05: must be >= 0"),
    ("poly_exponent inf", "[train]\npoly_exponent = inf\n", "[train] poly_exponent = inf: must be a finite number"),
    ("grad_clip 0", "[train]\ngrad_clip = 0\n", "[train] grad_clip = 0.0: must be > 0"),
    ("seed -1", "[train]\nseed = -1\n", "[train] seed = -1: must be in [0, 4294967295]"),
    ("seed float", "[train]\nseed = 1e20\n", "[train] seed = 1e+20: must be a whole number"),
    ("loader_workers -2", "[train]\nloader_workers = -2\n", "[train] loader_workers = -2: must be in [-1, 64]"),
    ("time budget -1", "[train]\ntime_budget_minutes = -1\n", "[train] time_budget_minutes = -1.0: must be in [0, 1e+06]"),
    ("deep_supervision 1", "[train]\ndeep_supervision = 1\n", "[train] deep_supervision = 1: must be true or false"),
    ("train compile auto", '[train]\ncompile = "auto"\n', '[train] compile = "auto": must be true or false'),
    ("unknown key", "[train]\nbogus = 5\n", "[train] bogus = 5: unknown setting (known: augmentation, compile,"),
    ("unknown section", "[trian]\nepochs = 5\n", "unknown section(s) ['trian']"),
    ("section not a table", "train = 3\n", "train = 3: must be a [train] table"),
    ("augmentation not a table", "[train]\naugmentation = 3\n", "[train] augmentation = 3: must be a table of settings"),
    ("augmentation twice", "[augmentation]\np_blur = 0.1\n[train.augmentation]\np_blur = 0.2\n", "[augmentation] and [train.augmentation] both given"),
    ("p_rotation 2", "[augmentation]\np_rotation = 2\n", "[augmentation] p_rotation = 2.0: must be in [0, 1] (a probability)"),
    ("p_mirror -0.5", "[train.augmentation]\np_mirror = -0.5\n", "[train] augmentation.p_mirror = -0.5: must be in [0, 1]"),
    ("rotation 400", "[augmentation]\nrotation_deg = 400\n", "[augmentation] rotation_deg = 400.0: must be in [0, 180]"),
    ("scale_min 0", "[augmentation]\nscale_min = 0\n", "[augmentation] scale_min = 0.0: must be > 0"),
    ("scale_min above max", "[augmentation]\nscale_min = 2.0\n", "[augmentation] scale_max = 1.4: must be >= 2 (at least scale_min)"),
    ("augmentation unknown", "[augmentation]\np_flip = 0.5\n", "[augmentation] p_flip = 0.5: unknown setting"),
    ("step_size word", '[inference]\nstep_size = "x"\n', '[inference] step_size = "x": must be a number'),
    ("step_size 0", "[inference]\nstep_size = 0\n", "[inference] step_size = 0.0: must be in (0, 1]"),
    ("mirror_axes [9]", "[inference]\nmirror_axes = [9]\n", "[inference] mirror_axes = [9]: must be patch axes among 0, 1, 2"),
    ("mirror_axes 3", "[inference]\nmirror_axes = 3\n", "[inference] mirror_axes = 3: must be a list of whole numbers"),
    ("mirror_axes []", "[inference]\nmirror_axes = []\n", "[inference] mirror_axes = []: must be patch axes among 0, 1, 2"),
    ("mirror_axes repeated", "[inference]\nmirror_axes = [1, 1]\n", "[inference] mirror_axes = [1, 1]: must not repeat an axis"),
    ("mirror_axes bool", "[inference]\nmirror_axes = [0, true]\n", "[inference] mirror_axes = [0, true]: must be a list of whole numbers"),
    ("tile_batch -1", "[inference]\ntile_batch = -1\n", "[inference] tile_batch = -1: must be in [0, 64]"),
    ("tile_batch 1000", "[inference]\ntile_batch = 1000\n", "[inference] tile_batch = 1000: must be in [0, 64]"),
    ("slab_export_gb -1", "[inference]\nslab_export_gb = -1\n", "[inference] slab_export_gb = -1.0: must be >= 0"),
    ("inference compile 3", "[inference]\ncompile = 3\n", "[inference] compile = 3: must be auto, on or off"),
    ("inference mirroring", '[inference]\nmirroring = "no"\n', '[inference] mirroring = "no": must be true or false'),
    ("not TOML", "[train\nepochs = 1\n", "cannot read settings"),
    ("loss unknown", '[train]\nloss = "dice+hausdorff"\n', '[train] loss = "dice+hausdorff": unknown loss \'hausdorff\''),
    ("loss gamma -1", '[train]\nloss = "focal(gamma=-1)"\n', '[train] loss = "focal(gamma=-1)": focal: gamma=-1 must be a number >= 0'),
    ("loss alpha 2", '[train]\nloss = "tversky(alpha=2)"\n', "tversky: alpha=2 must be a number in [0, 1]"),
    ("loss not text", "[train]\nloss = 3\n", "[train] loss = 3: must be a loss expression (text)"),
    ("loss eval", '[train]\nloss = "__import__(\'os\')"\n', "unexpected \"'\""),
    ("optimizer", '[train]\noptimizer = "rmsprop"\n', '[train] optimizer = "rmsprop": must be sgd or adam or adamw'),
]  # fmt: skip


def _train_refuses(capfd, work: WorkDir, *extra, fold: str = "all") -> str:
    before = _listing(work.root)
    assert (work.fold_dir("2d", "all") / "checkpoint_final.pt").is_file()
    line = _refused(capfd, "train", work.root, "2d", fold, "--overwrite", *TRAIN, *extra)
    assert _listing(work.root) == before  # the trained fold (and everything else) untouched
    return line


@pytest.mark.parametrize(
    "extra, expected", [pytest.param(a, e, id=i.replace(" ", "-")) for i, a, e in TRAIN_OPTION_CASES]
)
def test_train_overwrite_with_a_bad_option_keeps_the_fold(extra, expected, trained, capfd):
    assert expected in _train_refuses(capfd, trained, *extra)


@pytest.mark.parametrize(
    "text, expected", [pytest.param(t, e, id=i.replace(" ", "-")) for i, t, e in SETTINGS_CASES]
)
def test_train_overwrite_with_a_bad_settings_file_keeps_the_fold(text, expected, trained, tmp_path, capfd):
    path = _toml(tmp_path, text)
    line = _train_refuses(capfd, trained, "--config-file", path)
    assert f"error: {path}: " in line and expected in line


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["--loss", "0.5*tversky(alpha=0.3,beta=0.7)+0.5*focal(gamma=2)"],
            "loss = 'dice+ce', now '0.5*tversky(",
        ),
        (
            ["--optimizer", "adamw"],
            "trained with optimizer = 'sgd', now 'adamw'; --resume needs the same recipe",
        ),
        (["--schedule", "cosine"], "trained with schedule = 'poly', now 'cosine'"),
    ],
)
def test_train_resume_refuses_a_changed_recipe(extra, expected, trained, capfd):
    before = _listing(trained.root)
    line = _refused(capfd, "train", trained.root, "2d", "all", "--resume", *TRAIN, *extra)
    assert expected in line and "settings.json: the run was trained with" in line
    assert _listing(trained.root) == before


def test_train_refuses_a_loss_without_a_region_based_form(trained, tmp_path, capfd):
    """wce (class weights) needs softmax classes: a region-based plan refuses it before the run starts."""
    work = WorkDir(tmp_path / "work")
    shutil.copytree(trained.root, work.root)
    plans = json.loads(work.plans.read_text())
    plans["labels"] = {"background": 0, "a": 1, "b": 2}
    plans["regions"], plans["regions_class_order"] = {"whole": [1, 2], "core": [2]}, [1, 2]
    work.plans.write_text(json.dumps(plans))
    before = _listing(work.root)
    line = _refused(capfd, "train", work.root, "2d", "all", "--overwrite", *TRAIN, "--loss", "wce+dice")
    assert "loss = 'wce(weights=auto)+dice': wce needs softmax classes; region-based plans take: ce," in line
    assert _listing(work.root) == before


def test_train_mirror_axes_that_mirror_nothing_in_2d(trained, tmp_path, capfd):
    """Axes beyond a 2D network's two are dropped; when nothing is left, mirroring would silently be off."""
    path = _toml(tmp_path, "[inference]\nmirror_axes = [2]\n")
    line = _train_refuses(capfd, trained, "--config-file", path)
    assert "mirror_axes [2]: configuration '2d' is 2D (patch axes 0 and 1), so the final validation" in line


def test_settings_file_that_is_not_utf8_or_a_folder(trained, tmp_path, capfd):
    binary = tmp_path / "s.toml"
    binary.write_bytes(b"\xff\xfe[train]\n")
    assert f"{binary}: cannot read settings" in _train_refuses(capfd, trained, "--config-file", binary)
    assert f"{tmp_path}: cannot read settings" in _train_refuses(capfd, trained, "--config-file", tmp_path)


@pytest.mark.skipif(not NO_MPS, reason="this machine has MPS")
def test_train_device_mps_without_mps(trained, capfd):
    assert "--device mps: Apple MPS is not available" in _train_refuses(capfd, trained, "--device", "mps")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_train_device_cuda_without_cuda(device, trained, capfd):
    assert f"--device {device}: no CUDA GPU" in _train_refuses(capfd, trained, "--device", device)


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_train_device_cuda_index_out_of_range(trained, capfd):
    line = _train_refuses(capfd, trained, "--device", f"cuda:{torch.cuda.device_count()}")
    assert "CUDA GPU(s), numbered from 0" in line


def test_train_all_folds_overwrite_with_a_bad_option_deletes_nothing(trained, capfd):
    assert "--epochs 0: must be >= 1" in _train_refuses(capfd, trained, "--epochs", "0", fold="all-folds")


@pytest.mark.parametrize(
    "fold, expected",
    [
        ("5", "fold must be 0-4, 'all-folds' or 'all', got '5'"),
        ("x", "fold must be 0-4, 'all-folds' or 'all', got 'x'"),
        ("0.5", "fold must be 0-4, 'all-folds' or 'all', got '0.5'"),
        ("", "fold must be 0-4, 'all-folds' or 'all', got ''"),
        ("-1", "No such option: -1"),
    ],
)
def test_train_refuses_a_bad_fold(fold, expected, trained, capfd):
    assert expected in _train_refuses(capfd, trained, fold=fold)


def test_train_overwrite_with_invalid_splits_keeps_the_fold(trained, tmp_path, capfd):
    """The fold's data and splits are checked before its earlier run is deleted."""
    work = WorkDir(tmp_path / "work")
    work.root.mkdir()
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(trained.root / name, work.root / name)
    (work.root / "preprocessed").symlink_to(trained.root / "preprocessed")
    fold = work.fold_dir("2d", 0)
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pt").write_bytes(b"earlier run")
    work.splits.write_text(json.dumps([{"train": ["nobody"], "val": []}]))
    before = _listing(work.root)
    line = _refused(capfd, "train", work.root, "2d", "0", "--overwrite", *TRAIN)
    assert f"{work.splits}: fold 0 is invalid" in line
    assert _listing(work.root) == before

    work.splits.unlink()
    (work.root / "preprocessed").unlink()
    (work.root / "preprocessed").mkdir()
    before = _listing(work.root)
    line = _refused(capfd, "train", work.root, "2d", "0", "--overwrite", *TRAIN)
    assert "no preprocessed cases" in line
    assert _listing(work.root) == before


# ------------------------------------------------------------------------------------------ predict


@pytest.fixture(scope="module")
def one_case(phantom_dataset, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs") / "in"
    folder.mkdir()
    for c in (0, 1):
        src = phantom_dataset / "imagesTr" / f"phantom_000_{c:04d}{ENDING}"
        shutil.copyfile(src, folder / src.name)
    return folder


PREDICT_CASES = [
    ("step 0", ["--step", "0"], "--step 0.0: must be in (0, 1] (tiles must overlap or touch)"),
    ("step -1", ["--step", "-1"], "--step -1.0: must be in (0, 1]"),
    ("step 1.5", ["--step", "1.5"], "--step 1.5: must be in (0, 1]"),
    ("step nan", ["--step", "nan"], "--step nan: must be a finite number"),
    ("step inf", ["--step", "inf"], "--step inf: must be a finite number"),
    ("mirror-axes 9", ["--mirror-axes", "9"], "--mirror-axes 9: must be patch axes among 0, 1, 2"),
    ("mirror-axes -1", ["--mirror-axes", "-1"], "--mirror-axes -1: must be patch axes among 0, 1, 2"),
    ("mirror-axes 0,0", ["--mirror-axes", "0,0"], "--mirror-axes 0,0: must not repeat an axis"),
    ("mirror-axes empty", ["--mirror-axes", ","], "--mirror-axes : must be patch axes among 0, 1, 2"),
    ("mirror-axes word", ["--mirror-axes", "x"], "--mirror-axes: 'x' is not a whole number"),
    ("mirror-axes beyond 2D", ["--mirror-axes", "2"], "--mirror-axes 2: configuration '2d' is 2D (patch axes 0 and 1), so nothing would be mirrored"),
    ("device tpu", ["--device", "tpu"], "--device 'tpu': unknown device"),
    ("compile maybe", ["--compile", "maybe"], "--compile maybe: must be auto, on or off"),
    ("folds 7", ["-f", "7"], "--folds 7: folds are 0-4 or 'all'"),
    ("folds -1", ["-f", "-1"], "--folds -1: folds are 0-4 or 'all'"),
    ("folds word", ["-f", "x"], "--folds: 'x' is not a whole number"),
    ("folds twice", ["-f", "all", "-f", "all"], "--folds all all: a fold is given twice"),
    ("fold not trained", ["-f", "3"], "fold_3/checkpoint_final.pt: not found (fold 3 of 2d is not trained; see --folds)"),
    ("config twice", ["-c", "2d"], "--config 2d 2d: a configuration is given twice"),
    ("config unknown", ["-c", "3d_bogus"], "configuration '3d_bogus' is not in the plans"),
]  # fmt: skip


@pytest.mark.parametrize(
    "extra, expected", [pytest.param(a, e, id=i.replace(" ", "-")) for i, a, e in PREDICT_CASES]
)
def test_predict_refuses_a_bad_option(extra, expected, trained, one_case, tmp_path, capfd):
    out = tmp_path / "out"
    folds = [] if "-f" in extra else ["-f", "all"]
    before_in, before_work = _listing(one_case), _listing(trained.root)
    line = _refused(
        capfd, "predict", trained.root, one_case, out, "-c", "2d", *folds, "--device", "cpu", *extra
    )
    assert expected in line
    assert not out.exists()
    assert _listing(one_case) == before_in and _listing(trained.root) == before_work


def test_predict_keeps_an_existing_output_folder_on_a_bad_option(trained, one_case, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / f".phantom_000{ENDING}.notes.txt").write_text("mine")
    (out / "phantom_000.nii.gz").write_bytes(b"an earlier prediction")
    before = _listing(out)
    line = _refused(
        capfd, "predict", trained.root, one_case, out, "-c", "2d", "-f", "all", "--overwrite", "--step", "2"
    )
    assert "--step 2.0: must be in (0, 1]" in line
    assert _listing(out) == before


@pytest.mark.skipif(not NO_MPS, reason="this machine has MPS")
def test_predict_device_mps_without_mps(trained, one_case, tmp_path, capfd):
    line = _refused(
        capfd, "predict", trained.root, one_case, tmp_path / "out", "-f", "all", "--device", "mps"
    )
    assert "--device mps: Apple MPS is not available" in line and not (tmp_path / "out").exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_predict_device_cuda_without_cuda(trained, one_case, tmp_path, capfd):
    line = _refused(
        capfd, "predict", trained.root, one_case, tmp_path / "out", "-f", "all", "--device", "cuda"
    )
    assert "--device cuda: no CUDA GPU" in line and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- plan

PLAN_CASES = [
    ("gpu-memory 0", ["--gpu-memory", "0"], "--gpu-memory 0: must be more than 1 and at most 4096 GB"),
    ("gpu-memory nan", ["--gpu-memory", "nan"], "--gpu-memory nan: must be more than 1"),
    ("gpu-memory inf", ["--gpu-memory", "inf"], "--gpu-memory inf: must be more than 1"),
    ("gpu-memory 1e9", ["--gpu-memory", "1e9"], "--gpu-memory 1e+09: must be more than 1 and at most 4096 GB"),
    ("device tpu", ["--device", "tpu"], "--device tpu: use cpu, cuda or auto"),
    ("device mps", ["--device", "mps"], "--device mps: use cpu, cuda or auto"),
    ("resample-device tpu", ["--resample-device", "tpu"], "--resample-device 'tpu': use cpu or cuda"),
    ("resample-device empty", ["--resample-device", ""], "--resample-device '': use cpu or cuda"),
    ("workers 0", ["-j", "0"], "Invalid value for '--workers'"),
    ("workers 100000", ["-j", "100000"], "--workers 100000: must be a whole number from 1 to 64"),
    ("architecture", ["--architecture", "transformer"], "--architecture transformer: unknown architecture 'transformer'; use one of unet, resenc"),
    ("architecture list", ["--architecture", "unet,unetpp,transformer"], "--architecture unet,unetpp,transformer: unknown architecture 'transformer'; use one of unet, resenc, vnet, attention_unet"),
    ("architecture empty", ["--architecture", "unet,"], "--architecture unet,: an empty name; use one of unet"),
]  # fmt: skip
if NO_CUDA:
    PLAN_CASES += [
        ("device cuda", ["--device", "cuda"], "--device cuda: no CUDA GPU"),
        ("resample-device cuda", ["--resample-device", "cuda"], "--resample-device cuda: no CUDA GPU"),
    ]


@pytest.mark.parametrize(
    "extra, expected", [pytest.param(a, e, id=i.replace(" ", "-")) for i, a, e in PLAN_CASES]
)
def test_plan_refuses_a_bad_option(extra, expected, phantom_dataset, tmp_path, capfd):
    work = tmp_path / "work"
    before = _listing(phantom_dataset)
    assert expected in _refused(capfd, "plan", phantom_dataset, "--workdir", work, *extra)
    assert not work.exists() and _listing(phantom_dataset) == before


def test_plan_with_a_bad_option_leaves_an_existing_work_alone(trained, phantom_dataset, capfd):
    before = _listing(trained.root)
    line = _refused(
        capfd, "plan", phantom_dataset, "--workdir", trained.root, "--clean", "--gpu-memory", "nan"
    )
    assert "--gpu-memory nan" in line and _listing(trained.root) == before


# ------------------------------------------------------------------------ evaluate and find-best


EVALUATE_CASES = [
    ("tolerance inf", ["--tolerance", "inf"], "--tolerance inf: must be a finite number of mm, >= 0"),
    ("tolerance nan", ["--tolerance", "nan"], "--tolerance"),
    ("tolerance -1", ["--tolerance", "-1"], "Invalid value for '--tolerance'"),
    ("workers 0", ["-j", "0"], "Invalid value for '--workers'"),
    ("workers 100000", ["-j", "100000"], "--workers 100000: must be a whole number from 1 to 64"),
]  # fmt: skip


@pytest.mark.parametrize(
    "extra, expected", [pytest.param(a, e, id=i.replace(" ", "-")) for i, a, e in EVALUATE_CASES]
)
def test_evaluate_refuses_a_bad_option(extra, expected, phantom_dataset, tmp_path, capfd):
    labels = phantom_dataset / "labelsTr"  # scored against itself: only the options can be wrong
    out = tmp_path / "eval" / "summary.json"
    before = _listing(phantom_dataset)
    line = _refused(
        capfd,
        "evaluate",
        labels,
        labels,
        "--dataset-json",
        phantom_dataset / "dataset.json",
        "-o",
        out,
        *extra,
    )
    assert expected in line
    assert not out.parent.exists() and _listing(phantom_dataset) == before


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["-j", "0"], "Invalid value for '--workers'"),
        (["-j", "100000"], "--workers 100000: must be a whole number from 1 to 64"),
        (["-c", "2d", "-c", "2d"], "--config 2d 2d: a configuration is given twice"),
        (["-c", "bogus"], "configuration 'bogus' is not in the plans"),
    ],
)
def test_find_best_refuses_a_bad_option(extra, expected, trained, capfd):
    before = _listing(trained.root)
    assert expected in _refused(capfd, "find-best", trained.root, *extra)
    assert _listing(trained.root) == before


# ------------------------------------------------------------- export-model, export-network, phantom


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["-f", "7"], "--folds 7: folds are 0-4 or 'all'"),
        (["-f", "../../x"], "--folds ../../x: folds are 0-4 or 'all'"),
        (["-f", "all", "-f", "all"], "--folds all all: a fold is given twice"),
        (["-c", "2d", "-c", "2d"], "--config 2d 2d: a configuration is given twice"),
        (["-c", "bogus"], "configuration 'bogus' is not in the plans"),
    ],
)
def test_export_model_refuses_a_bad_option(extra, expected, trained, tmp_path, capfd):
    out = tmp_path / "model.zip"
    before = _listing(trained.root)
    assert expected in _refused(capfd, "export-model", trained.root, out, *extra)
    assert not out.exists() and list(tmp_path.iterdir()) == [] and _listing(trained.root) == before


@pytest.mark.parametrize(
    "args, expected",
    [
        (["2d", "7"], "fold must be 0-4 or 'all', got '7'"),
        (["2d", "../x"], "fold must be 0-4 or 'all', got '../x'"),
        (["bogus", "all"], "configuration 'bogus' is not in the plans"),
        (["2d", "all", "--format", "pdf"], "unknown export format 'pdf' (use one of torchscript, onnx)"),
    ],
)
def test_export_network_refuses_a_bad_option(args, expected, trained, tmp_path, capfd):
    out = tmp_path / "net.pt"
    config, fold, *extra = args
    before = _listing(trained.root)
    assert expected in _refused(capfd, "export-network", trained.root, config, fold, out, *extra)
    assert list(tmp_path.iterdir()) == [] and _listing(trained.root) == before


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["-n", "1"], "Invalid value for '--cases'"),
        (["-n", "100000000"], "Invalid value for '--cases'"),
        (["--seed", "-1"], "Invalid value for '--seed'"),
    ],
)
def test_phantom_refuses_a_bad_option(extra, expected, tmp_path, capfd):
    assert expected in _refused(capfd, "phantom", tmp_path / "ds", *extra)
    assert not (tmp_path / "ds").exists()


def test_usage_errors_are_one_line(capfd, tmp_path):
    assert "Missing argument" in _refused(capfd, "train")
    assert "No such command 'trian'" in _refused(capfd, "trian")
    assert "No such option: --bogus" in _refused(capfd, "evaluate", tmp_path, tmp_path, "--bogus")
    code, out, _ = _run(capfd, "--help")
    assert code == 0 and "plan" in out


# ------------------------------------------------------------------ the API refuses the same values


def test_settings_dataclasses_refuse_bad_values():
    for bad in (dict(epochs=0), dict(iters_per_epoch=0), dict(val_iters=-5), dict(num_folds=0),
                dict(oversample_foreground=5), dict(initial_lr=-1.0), dict(epochs="many"),
                dict(time_budget_minutes=math.nan), dict(loader_workers=-2), dict(augmentation={})):  # fmt: skip
        with pytest.raises(AutosegError, match=f"setting {next(iter(bad))} = "):
            TrainSettings(**bad)
    with pytest.raises(AutosegError, match=r"setting p_noise = 1.5: must be in \[0, 1\]"):
        AugmentationSettings(p_noise=1.5)
    for bad in (
        dict(mirror_axes=(9,)),
        dict(step_size=math.inf),
        dict(tile_batch=-1),
        dict(compile="sometimes"),
    ):
        with pytest.raises(AutosegError, match=f"setting {next(iter(bad))} = "):
            InferenceSettings(**bad)
    with pytest.raises(AutosegError, match=r"^--mirror-axes 9: must be patch axes among 0, 1, 2$"):
        inference_settings(mirror_axes=[9])
    with pytest.raises(AutosegError, match=r"^--epochs 0: must be >= 1$"):
        load_settings(None, epochs=0)


def test_valid_settings_are_kept_and_normalised(tmp_path):
    path = _toml(tmp_path, "[train]\ninitial_lr = 1\nval_iters = 0\n[inference]\nmirror_axes = [2, 0]\n")
    train, infer = load_settings(path, epochs=3)
    assert train.initial_lr == 1.0 and isinstance(train.initial_lr, float)
    assert train.val_iters == 0 and train.epochs == 3
    assert infer.mirror_axes == (2, 0)
    assert (
        TrainSettings(augmentation=AugmentationSettings(scale_min=1.0, scale_max=1.0)).augmentation.scale_max
        == 1.0
    )


def test_api_train_and_predict_refuse_before_touching_anything(trained, one_case, tmp_path):
    from autoseg import api

    before = _listing(trained.root)
    for kwargs in (dict(device="tpu"), dict(epochs=0), dict(initial_lr=-1.0), dict(mirror_axes=(9,))):
        with pytest.raises(AutosegError):
            api.train(
                trained.root, "2d", "all", overwrite=True, loader_workers=0, **{"device": "cpu", **kwargs}
            )
    with pytest.raises(AutosegError, match="fold must be 0-4 or 'all', got '9'"):
        api.train(trained.root, "2d", 9, overwrite=True, device="cpu")
    assert _listing(trained.root) == before
    for kwargs in (
        dict(settings=dict(step_size=0.0)),
        dict(device="tpu"),
        dict(folds=[7]),
        dict(folds=[0, 0]),
        dict(settings=dict(mirror_axes=(5,))),
    ):
        with pytest.raises(AutosegError):
            settings = InferenceSettings(**kwargs.pop("settings", {}))
            api.predict(
                trained.root, one_case, tmp_path / "out", configs=["2d"], settings=settings,
                **{"device": "cpu", **kwargs},
            )  # fmt: skip
    assert not (tmp_path / "out").exists()
    with pytest.raises(AutosegError, match=r"--tolerance inf"):
        api.evaluate(tmp_path, tmp_path, tmp_path / "dataset.json", tolerance_mm=math.inf)


def test_the_shipped_defaults_pass_the_checks():
    defaults = Path(__file__).resolve().parents[1] / "configs" / "default.toml"
    train, infer = load_settings(defaults)
    assert train == TrainSettings() and infer == InferenceSettings()
