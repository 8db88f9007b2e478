"""A structure missed entirely has no HD95: ``evaluate`` says how many cases each mean leaves out, and
``--missing-distance worst`` gives such cases the image diagonal instead (issue 18)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from autoseg import api
from autoseg.errors import AutosegError
from tests.evaluation.test_evaluate import SHAPE, SPACING_MM, liver_cube, write_labels
from tests.test_bad_input import _error_line, _listing, _run

DIAGONAL_MM = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING_MM)))  # (10, 12, 12) x (3, 1, 1)


@pytest.fixture
def missed(tmp_path: Path) -> tuple[Path, Path, Path]:
    """case01: liver one 3 mm slice off (HD95 3 mm); case02: liver missed entirely; tumour nowhere."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    write_labels(ref_dir / "case01.nii.gz", liver_cube(1))
    write_labels(pred_dir / "case01.nii.gz", liver_cube(2))
    write_labels(ref_dir / "case02.nii.gz", liver_cube(1))
    write_labels(pred_dir / "case02.nii.gz", np.zeros(SHAPE, np.uint8))
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(
        json.dumps(
            {
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "liver": 1, "tumour": 2},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    return ref_dir, pred_dir, dataset_json


def _table_row(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if f" {label} " in line)


def test_skip_leaves_the_missed_case_out_and_the_console_says_so(capfd, missed, tmp_path):
    ref_dir, pred_dir, dataset_json = missed
    summary_path = tmp_path / "skip" / "summary.json"
    code, out, err = _run(
        capfd, "evaluate", ref_dir, pred_dir, "--dataset-json", dataset_json, "-o", summary_path
    )
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    assert summary["missing_distance"] == "skip"
    hd95 = summary["mean"]["liver"]["hd95"]
    assert hd95["mean"] == pytest.approx(3.0)  # case01 only: the missed case02 would be infinitely far
    assert hd95["n_excluded"] == 1 and hd95["n_worst"] == 0
    assert "prediction empty: case02" in hd95["excluded_reason"]
    row = _table_row(out, "liver")
    assert "3.0000 (1 excl.)" in row  # HD95 mean, with the case it leaves out
    assert "0.4000" in row and row.count("excl.") == 1  # Dice (0.8 + 0) / 2 counts both cases
    tumour = _table_row(out, "tumour")
    assert tumour.count("n/a (2 excl.)") == 4  # absent from both maps: Dice, IoU, HD95 and NSD undefined


def test_worst_gives_the_missed_case_the_image_diagonal(capfd, missed, tmp_path):
    ref_dir, pred_dir, dataset_json = missed
    summary_path = tmp_path / "worst" / "summary.json"
    args = ("evaluate", ref_dir, pred_dir, "--dataset-json", dataset_json, "-o", summary_path)
    code, out, err = _run(capfd, *args, "--missing-distance", "worst")
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    assert summary["missing_distance"] == "worst"
    assert "image diagonal" in summary["empty_rules"]
    case02 = next(r for r in summary["per_case"] if r["case"] == "case02" and r["label"] == "liver")
    assert DIAGONAL_MM == pytest.approx(math.sqrt(30**2 + 12**2 + 12**2))  # 34.47 mm
    assert case02["hd"] == case02["hd95"] == case02["assd"] == pytest.approx(DIAGONAL_MM)
    hd95 = summary["mean"]["liver"]["hd95"]
    assert hd95["mean"] == pytest.approx((3.0 + DIAGONAL_MM) / 2)
    assert hd95["n_excluded"] == 0 and hd95["n_worst"] == 1
    # absent from both maps is still not defined (no surface on either side), and still excluded
    assert summary["mean"]["tumour"]["hd95"]["n_excluded"] == 2
    assert f"{(3.0 + DIAGONAL_MM) / 2:.4f} (1 worst)" in _table_row(out, "liver")
    per_case_csv = (summary_path.parent / "per_case.csv").read_text().splitlines()
    assert any(line.startswith("case02,liver,") and f"{DIAGONAL_MM!r}" in line for line in per_case_csv)


def test_a_bad_missing_distance_is_one_line_and_writes_nothing(capfd, missed):
    ref_dir, pred_dir, dataset_json = missed
    before = _listing(pred_dir)
    code, _, err = _run(
        capfd, "evaluate", ref_dir, pred_dir, "--dataset-json", dataset_json, "--missing-distance", "ignore"
    )
    assert "--missing-distance" in _error_line(code, err)
    assert _listing(pred_dir) == before
    with pytest.raises(AutosegError, match="--missing-distance 'zero': must be 'skip' or 'worst'"):
        api.evaluate(ref_dir, pred_dir, dataset_json, missing_distance="zero")
    assert _listing(pred_dir) == before
