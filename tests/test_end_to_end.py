"""Slow end-to-end runs with the planned (full-width) network: what the demo promises, as a test.

Run with ``scripts/test.sh -m slow`` (several minutes on a 2-core CPU); excluded from CI.
"""

from __future__ import annotations

import json

import pytest

from autoseg import api
from tests.conftest import real_dataset


@pytest.mark.slow
def test_phantom_reaches_dice_08_per_label(tmp_path):
    from autoseg.phantom import make_phantom_dataset

    dataset = make_phantom_dataset(tmp_path / "phantom", n_cases=10, seed=0)
    work = tmp_path / "work"
    api.plan(dataset, work, workers=2)
    fold = api.train(work, "3d_fullres", 0, device="cpu", epochs=3, iters_per_epoch=12, val_iters=4)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    for label in ("organ", "lesion"):
        assert summary["mean"][label]["dice"]["mean"] >= 0.8, summary["mean"][label]


@pytest.mark.slow
@pytest.mark.realdata
def test_spinal_cord_fold0_learns_the_cord(tmp_path):
    """Dataset003 fold 0 validates on the PSR-oriented case: only works because volumes are reoriented."""
    dataset = real_dataset("Dataset003_SpinalCordTiny")
    work = tmp_path / "work"
    api.plan(dataset, work, workers=2)
    fold = api.train(work, "3d_fullres", 0, device="cpu", epochs=8, iters_per_epoch=25, val_iters=5)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert summary["mean"]["spinal_cord"]["dice"]["mean"] >= 0.6
