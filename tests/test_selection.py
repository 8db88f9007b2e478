"""find-best on a WORK folder written by hand: validation predictions and probabilities with known Dice.

Five cases, fold k validates case ``c<k>``. Every reference is an organ cube [1:5]^3 (64 voxels) with a
2x2x2 lesion inside (organ 56 voxels, lesion 8).

* ``2d`` calls the lesion organ: organ Dice 2*56/(56+64) = 112/120, lesion 0; mean 0.4667.
* ``3d_fullres`` is right but adds a stray 8-voxel organ blob: organ 112/120, lesion 1; mean 0.9667.
* Their probabilities are 0.9 for the predicted class except where each is wrong, where it is only 0.6
  against 0.35 for the right class, while the other configuration says 0.9 for the right class there. The
  average is right everywhere: the ensemble scores 1.
* ``3d_lowres`` lacks fold 3; ``3d_cascade_fullres`` has no fold at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autoseg.errors import AutosegError, PlansError
from autoseg.io.dataset import DatasetSpec
from autoseg.io.volume import Geometry, read_volume, write_volume
from autoseg.jsonio import read_json, save_npz, write_json
from autoseg.layout import WorkDir
from autoseg.planning.plans import ChannelNormalization, Configuration, NetworkTopology, Plans
from autoseg.postprocessing import Postprocessing
from autoseg.selection import (
    InferenceInstructions,
    Scored,
    crossval_dir,
    find_best,
    instructions_path,
    load_instructions,
    rank,
)

ENDING = ".nii.gz"
CASES = [f"c{k}" for k in range(5)]
# origin and spacing off the defaults, so a prediction written with the wrong geometry fails evaluation
GEOMETRY = Geometry(
    shape=(6, 8, 8),
    spacing_mm=(2.0, 1.0, 1.0),
    origin_mm=(10.0, -5.0, 3.0),
    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
)
SPEC = DatasetSpec(
    channel_names=("MRI",), labels={"background": 0, "organ": 1, "lesion": 2}, file_ending=ENDING
)
LESION = (slice(2, 4),) * 3
STRAY = (slice(0, 2), slice(6, 8), slice(6, 8))


def _plans() -> Plans:
    topology = NetworkTopology("unet", 3, [[1, 1, 1]], [[3, 3, 3]], [4])

    def config(name: str, previous: str | None = None) -> Configuration:
        return Configuration(
            name=name,
            dim=3,
            data_identifier="fullres",
            spacing=[2.0, 1.0, 1.0],
            median_shape=[6, 8, 8],
            patch_size=[6, 8, 8],
            batch_size=2,
            network=topology,
            estimated_memory_gb=0.1,
            previous_stage=previous,
        )

    return Plans(
        dataset_name="Fake",
        dataset_hash="hash123",
        channel_names=["MRI"],
        labels=dict(SPEC.labels),
        regions={},
        file_ending=ENDING,
        transpose_forward=[0, 1, 2],
        normalization=[ChannelNormalization("zscore")],
        configurations={
            "2d": config("2d"),
            "3d_fullres": config("3d_fullres"),
            "3d_lowres": config("3d_lowres"),
            "3d_cascade_fullres": config("3d_cascade_fullres", previous="3d_lowres"),
        },
        gpu_memory_gb=8.0,
    )


def _reference() -> np.ndarray:
    seg = np.zeros(GEOMETRY.shape, dtype=np.uint8)
    seg[1:5, 1:5, 1:5] = 1
    seg[LESION] = 2
    return seg


def _probabilities(seg: np.ndarray, unsure: tuple[slice, ...], right: int) -> np.ndarray:
    """0.9 for the class of ``seg``, 0.05 for the others; in ``unsure`` 0.6 for seg's class, 0.35 for ``right``."""
    probs = np.full((3, *seg.shape), 0.05, dtype=np.float32)
    np.put_along_axis(probs, seg[None].astype(np.int64), 0.9, axis=0)
    probs[(slice(None), *unsure)] = 0.05
    probs[(seg[unsure][0, 0, 0], *unsure)] = 0.6
    probs[(right, *unsure)] = 0.35
    return probs


def _prediction(config: str) -> tuple[np.ndarray, np.ndarray]:
    seg = _reference()
    if config == "3d_fullres":
        seg[STRAY] = 1
        return seg, _probabilities(seg, STRAY, right=0)
    seg[LESION] = 1  # 2d and the rest: the lesion is called organ
    return seg, _probabilities(seg, LESION, right=2)


def _make_work(root: Path, trained: dict[str, list[int]]) -> WorkDir:
    work = WorkDir(root)
    root.mkdir(parents=True)
    _plans().save(work.plans)
    write_json(work.dataset_json, SPEC.to_json())
    write_json(work.splits, [{"train": [c for c in CASES if c != case], "val": [case]} for case in CASES])
    work.gt_segmentations.mkdir()
    for case in CASES:
        write_volume(_reference(), GEOMETRY, work.gt_segmentations / f"{case}{ENDING}")
    for config, folds in trained.items():
        seg, probs = _prediction(config)
        for k in folds:
            val = work.fold_dir(config, k) / "validation"
            val.mkdir(parents=True)
            write_volume(seg, GEOMETRY, val / f"{CASES[k]}{ENDING}")
            save_npz(val / f"{CASES[k]}.npz", probabilities=probs.astype(np.float16))
            write_json(
                val / "summary.json", {"note": "written by the test; find_best only needs it to exist"}
            )
    return work


ALL = [0, 1, 2, 3, 4]


@pytest.fixture
def work(tmp_path) -> WorkDir:
    return _make_work(tmp_path / "work", {"2d": ALL, "3d_fullres": ALL, "3d_lowres": [0, 1, 2, 4]})


def test_the_ensemble_wins_and_untrained_configurations_are_skipped(work):
    result = find_best(work, workers=1)

    assert result["best"] == "ensemble__2d__3d_fullres"
    assert result["configs"] == ["2d", "3d_fullres"] and result["folds"] == ALL
    scores = result["scores"]
    assert set(scores) == {"2d", "3d_fullres", "ensemble__2d__3d_fullres"}
    assert scores["2d"]["dice"] == pytest.approx({"organ": 112 / 120, "lesion": 0.0})
    assert scores["2d"]["mean_dice"] == pytest.approx((112 / 120) / 2)
    assert scores["3d_fullres"]["mean_dice"] == pytest.approx((112 / 120 + 1) / 2)
    assert scores["ensemble__2d__3d_fullres"] == {
        "configs": ["2d", "3d_fullres"],
        "networks": 2,
        "mean_dice": 1.0,
        "dice": {"organ": 1.0, "lesion": 1.0},
    }
    assert result["skipped"] == [
        {"name": "3d_lowres", "reason": "fold 3 not trained"},
        {"name": "3d_cascade_fullres", "reason": "folds 0, 1, 2, 3, 4 not trained"},
    ]
    assert result["predict"] == f"autoseg predict {work.root} INPUT OUTPUT -c 2d -c 3d_fullres"
    assert result["mean_dice"] == result["mean_dice_postprocessed"] == 1.0
    # perfect predictions: no step changes a voxel, so none is kept (no evidence for it)
    assert result["postprocessing"] == {"keep_largest_foreground": False, "keep_largest": []}

    # the folders: links to each fold's labels (no npz), the ensemble's labels in the reference geometry
    linked = crossval_dir(work, "2d")
    assert sorted(p.name for p in linked.iterdir()) == sorted(
        [f"{c}{ENDING}" for c in CASES] + ["summary.json", "per_case.csv", "report.png"]
    )
    ensemble = read_volume(crossval_dir(work, "ensemble__2d__3d_fullres") / f"c3{ENDING}", dtype=None)
    np.testing.assert_array_equal(ensemble.array, _reference())
    assert ensemble.geometry.matches(GEOMETRY)
    postprocessed = crossval_dir(work, "ensemble__2d__3d_fullres") / "postprocessed" / "summary.json"
    assert read_json(postprocessed)["mean_dice"] == 1.0

    # the instructions file is the returned dict and round-trips through the dataclass
    assert read_json(instructions_path(work)) == json.loads(json.dumps(result))
    assert InferenceInstructions.from_json(read_json(instructions_path(work))).to_json() == result
    loaded = load_instructions(work)
    assert loaded.configs == ("2d", "3d_fullres") and loaded.schema_version == 1
    assert loaded.postprocessing == Postprocessing(False, ())


def test_one_configuration_with_a_stray_blob_gets_foreground_lcc(work):
    result = find_best(work, configs=["3d_fullres"], workers=1)

    assert result["best"] == "3d_fullres" and result["configs"] == ["3d_fullres"]
    assert set(result["scores"]) == {"3d_fullres"} and result["skipped"] == []
    assert result["predict"] == f"autoseg predict {work.root} INPUT OUTPUT -c 3d_fullres"
    # removing the 8 stray voxels in every case takes organ Dice from 112/120 to 1
    report = result["postprocessing_report"]
    assert report["steps"][0]["step"] == "foreground" and report["steps"][0]["changed_cases"] == 5
    assert result["postprocessing"]["keep_largest_foreground"] is True
    assert result["mean_dice"] == pytest.approx((112 / 120 + 1) / 2)
    assert result["mean_dice_postprocessed"] == pytest.approx(1.0)
    cleaned = crossval_dir(work, "3d_fullres") / "postprocessed" / f"c0{ENDING}"
    np.testing.assert_array_equal(read_volume(cleaned, dtype=None).array, _reference())


def test_a_pair_without_probabilities_is_skipped(work):
    (work.fold_dir("2d", 2) / "validation" / "c2.npz").unlink()
    result = find_best(work, configs=["2d", "3d_fullres"], workers=1)
    assert result["best"] == "3d_fullres"
    (skipped,) = result["skipped"]
    assert (
        skipped["name"] == "ensemble__2d__3d_fullres"
        and "2d fold 2 has no probabilities c2.npz" in skipped["reason"]
    )


def test_nothing_trained_is_an_error_naming_the_work_folder(tmp_path):
    work = _make_work(tmp_path / "work", {"2d": [0, 1]})
    with pytest.raises(AutosegError, match="no configuration has all 5 folds trained") as info:
        find_best(work, workers=1)
    message = str(info.value)
    assert str(work.root) in message and "2d: folds 2, 3, 4 not trained" in message and "\n" not in message
    assert not instructions_path(work).exists()
    with pytest.raises(PlansError, match="not in the plans"):
        find_best(work, configs=["3d_nonexistent"])


def test_rank_prefers_the_higher_score_then_a_single_then_fewer_networks():
    tied = [
        Scored("ensemble__a__b", ("a", "b"), 2, 0.9),
        Scored("cascade", ("cascade",), 2, 0.9),
        Scored("b", ("b",), 1, 0.9),
        Scored("a", ("a",), 1, 0.9),
        Scored("nothing", ("nothing",), 1, None),
        Scored("better_ensemble", ("a", "c"), 2, 0.91),
    ]
    assert [s.name for s in rank(tied)] == [
        "better_ensemble",
        "b",
        "a",
        "cascade",
        "ensemble__a__b",
        "nothing",
    ]


@pytest.mark.slow
def test_find_best_on_really_trained_folds(planned_phantom, tmp_path):
    """Two folds of 2d and 3d_fullres trained for one epoch on the phantom (flipped and odd-spacing cases
    included): the saved probabilities fit the references, so every ensemble is written and scored."""
    import shutil

    import torch

    from autoseg.api import train_and_validate
    from autoseg.settings import InferenceSettings, TrainSettings

    work = WorkDir(tmp_path / "work")
    shutil.copytree(planned_phantom.root, work.root, ignore=shutil.ignore_patterns("results"))
    cases = sorted(p.name[: -len(ENDING)] for p in work.gt_segmentations.iterdir())
    halves = [cases[::2], cases[1::2]]
    write_json(work.splits, [{"train": halves[1 - k], "val": halves[k]} for k in range(2)])
    settings = TrainSettings(epochs=1, iters_per_epoch=1, val_iters=1, seed=7)
    for config in ("2d", "3d_fullres"):
        for fold in (0, 1):
            train_and_validate(
                work,
                config,
                fold,
                settings,
                torch.device("cpu"),
                inference=InferenceSettings(mirroring=False),
            )

    result = find_best(work, workers=2)

    assert set(result["scores"]) == {"2d", "3d_fullres", "ensemble__2d__3d_fullres"}
    assert result["folds"] == [0, 1] and result["predict"].endswith("-f 0 -f 1")
    assert result["best"] in result["scores"] and result["skipped"] == []
    written = sorted(p.name for p in crossval_dir(work, "ensemble__2d__3d_fullres").glob(f"*{ENDING}"))
    assert written == [f"{c}{ENDING}" for c in cases]


def test_find_best_command_prints_the_choice_and_fails_cleanly(work, tmp_path, capsys):
    from autoseg.cli import main

    assert main(["find-best", str(work.root), "-j", "1"]) == 0
    printed = capsys.readouterr().out
    assert "best: ensemble__2d__3d_fullres (mean Dice 1.0000)" in printed
    assert "skipped 3d_lowres: fold 3 not trained" in printed
    assert "skipped 3d_cascade_fullres: folds 0, 1, 2, 3, 4 not trained" in printed
    assert f"autoseg predict {work.root} INPUT OUTPUT -c 2d -c 3d_fullres" in printed
    empty = _make_work(tmp_path / "empty", {"2d": [0]})
    assert main(["find-best", str(empty.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no configuration has all 5 folds trained" in err


def test_a_fold_trained_but_not_validated_is_named_as_such(work):
    """An interrupted final validation leaves checkpoint_final.pt without validation/summary.json."""
    work.fold_dir("3d_lowres", 3).mkdir(parents=True, exist_ok=True)
    (work.fold_dir("3d_lowres", 3) / "checkpoint_final.pt").write_bytes(b"")
    result = find_best(work, configs=["3d_fullres", "3d_lowres"], workers=1)
    assert {
        "name": "3d_lowres",
        "reason": "fold 3 trained but not validated (rerun its train command with --resume)",
    } in result["skipped"]
