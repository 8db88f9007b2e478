"""Shared fixtures: phantom datasets made in tmp folders, real data from ../shared/data (skipped if absent)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from autoseg.layout import WorkDir
from autoseg.planning.plans import Plans

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def real_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not (path / "dataset.json").is_file() and not path.is_dir():
        pytest.skip(f"real data not found at {path}: ../shared/data is absent (e.g. a fresh clone)")
    return path


def shrink_network(work: WorkDir, base: int = 4, cap: int = 32) -> Plans:
    """Make the planned networks narrow (features base*2^stage, capped) so CPU tests train in seconds.

    Patch, batch, strides and kernels stay as planned: only the width changes.
    """
    plans = Plans.load(work.plans)
    configs = {}
    for name, c in plans.configurations.items():
        feats = [min(base * 2**i, cap) for i in range(c.network.n_stages)]
        configs[name] = replace(c, network=replace(c.network, features_per_stage=feats))
    plans = replace(plans, configurations=configs)
    plans.save(work.plans)
    return plans


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory) -> Path:
    from autoseg.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "Dataset900_Phantom", n_cases=6, seed=3)


@pytest.fixture(scope="session")
def planned_phantom(phantom_dataset, tmp_path_factory) -> WorkDir:
    """The phantom dataset planned and preprocessed, with a narrow network. Treat as read-only."""
    from autoseg import api

    work = WorkDir(tmp_path_factory.mktemp("work") / "work")
    api.plan(phantom_dataset, work.root, workers=1)
    shrink_network(work)
    return work
