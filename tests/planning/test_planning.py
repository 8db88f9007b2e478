"""Planner rules with hand-worked numbers, golden plans, determinism and the plans.json round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.errors import PlansError
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.io.dataset import parse_dataset_json
from autoseg.planning import memory, topology
from autoseg.planning.planner import make_plans
from autoseg.planning.plans import Plans
from autoseg.planning.spacing import target_spacing, transpose_coarse_first
from tests.conftest import real_dataset


def _fingerprint(spacings, shapes, n_channels=1) -> Fingerprint:
    cases = [
        CaseFingerprint(f"c{i}", tuple(map(float, sp)), tuple(sh), tuple(sh), 1.0, {"a": 100})
        for i, (sp, sh) in enumerate(zip(spacings, shapes))
    ]
    stats = IntensityStats(100.0, 20.0, 100.0, -50.0, 400.0, 40.0, 300.0)
    return Fingerprint(1, "test", cases, [stats] * n_channels)


def _spec(channels=("MRI",), labels=("a",)):
    return parse_dataset_json(
        {
            "channel_names": {str(i): c for i, c in enumerate(channels)},
            "labels": {"background": 0, **{n: i + 1 for i, n in enumerate(labels)}},
            "file_ending": ".nii.gz",
        }
    )


def test_target_spacing_is_the_median_for_isotropic_data():
    sp = np.array([[1.0, 1.0, 1.0], [1.2, 0.8, 0.8], [0.9, 1.1, 1.0]])
    target, why = target_spacing(sp, np.full((3, 3), 100))
    assert target == [1.0, 1.0, 1.0] and why == "median spacing per axis"


def test_anisotropic_axis_takes_its_10th_percentile():
    # 11 cases with z spacing 3.0..5.0 mm, in-plane 0.6 mm: 5.0/... median z = 4.0 > 3 * 0.6 and
    # 20 slices * 3 < 320 voxels in plane -> z takes the 10th percentile of 3.0, 3.2, ..., 5.0 = 3.2 mm
    z = np.linspace(3.0, 5.0, 11)
    sp = np.stack([z, np.full(11, 0.6), np.full(11, 0.6)], axis=1)
    sh = np.tile([20, 320, 320], (11, 1))
    target, why = target_spacing(sp, sh)
    assert target[0] == pytest.approx(3.2) and target[1:] == [0.6, 0.6]
    assert "10th percentile" in why


def test_anisotropic_spacing_with_many_slices_keeps_the_median():
    # coarse z but as many slices as in-plane voxels: the rule does not apply
    sp = np.tile([4.0, 1.0, 1.0], (5, 1))
    target, _ = target_spacing(sp, np.tile([200, 200, 200], (5, 1)))
    assert target == [4.0, 1.0, 1.0]


def test_transpose_puts_the_coarse_axis_first_and_ignores_header_noise():
    assert transpose_coarse_first([0.6, 0.6, 3.6]) == [2, 0, 1]
    assert transpose_coarse_first([0.99999988, 1.0, 1.0]) == [0, 1, 2]
    assert transpose_coarse_first([1.0, 1.0, 1.0]) == [0, 1, 2]


def test_pooling_for_hippocampus_patch():
    # 36x50x35 at 1 mm: each axis pooled while its size halves to >= 4 -> 36>18>9>4, 50>25>12>6, 35>17>8>4:
    # three poolings on every axis, total stride 8, patch rounded up to 40x56x40 (nnU-Net v2's plan).
    strides, kernels = topology.pooling_and_kernels([36, 50, 35], [1.0, 1.0, 1.0])
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kernels == [[3, 3, 3]] * 4
    assert topology.round_up_to_stride([36, 50, 35], strides) == [40, 56, 40]
    assert topology.features_per_stage(4, 3) == [32, 64, 128, 256]


def test_pooling_waits_for_the_coarse_axis():
    # spacing 3.6 x 0.6 x 0.6: in plane is pooled first (z is 6x coarser); kernel 1 along z until the in-plane
    # spacing reaches 1.2 -> z still 3x coarser (kernel 1), then 2.4 -> within 2x (kernel 3), then z is pooled too.
    strides, kernels = topology.pooling_and_kernels([20, 320, 256], [3.6, 0.6, 0.6])
    assert strides[:4] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
    assert kernels[:3] == [[1, 3, 3], [1, 3, 3], [3, 3, 3]]


def test_a_short_axis_does_not_stop_the_others():
    # 8x64x64 at 1 mm: z halves once (8 -> 4) and then is too short; y and x go on 32 > 16 > 8 > 4 although
    # their spacing (2, 4, 8, 16 mm) leaves z's 2 mm behind: only axes that can still be pooled are compared.
    strides, kernels = topology.pooling_and_kernels([8, 64, 64], [1.0, 1.0, 1.0])
    assert strides == [[1, 1, 1], [2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert kernels == [[3, 3, 3]] * 5  # once 3-wide, an axis keeps its 3-wide kernel


def test_features_are_capped():
    assert topology.features_per_stage(7, 3) == [32, 64, 128, 256, 320, 320, 320]
    assert topology.features_per_stage(8, 2)[-1] == 512


def test_hippocampus_like_plan_matches_nnunet_v2():
    # MSD Hippocampus: 260 cases, median 36x50x35 at 1 mm. nnU-Net v2 plans 3d_fullres patch 40x56x40,
    # batch 9 = floor(5% of 260*36*50*35 voxels / (40*56*40)) = floor(819000 / 89600).
    fp = _fingerprint([[1, 1, 1]] * 260, [[36, 50, 35]] * 260)
    plans = make_plans(_spec(labels=("anterior", "posterior")), fp)
    c = plans.configurations["3d_fullres"]
    assert c.patch_size == [40, 56, 40]
    assert c.batch_size == 9
    assert c.network.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert c.estimated_memory_gb < 8


def test_prostate_like_anisotropic_plan():
    # 0.6x0.6x3.6 mm (array order z first: 3.6, 0.6, 0.6), 20x320x320 voxels: z stays at 3.6 mm (no case is
    # finer), z is pooled only once the in-plane spacing has caught up, and the patch fits the 8 GB budget.
    fp = _fingerprint([[3.6, 0.6, 0.6]] * 32, [[20, 320, 320]] * 32, n_channels=2)
    plans = make_plans(_spec(channels=("T2", "ADC"), labels=("pz", "tz")), fp)
    c = plans.configurations["3d_fullres"]
    assert c.spacing == [3.6, 0.6, 0.6]
    assert c.network.kernel_sizes[0] == [1, 3, 3]
    assert c.network.strides[1] == [1, 2, 2]
    # 20x320x320 (the median) needs ~9 GB at batch 2; every axis is at 100 % of the median, the tie goes to
    # axis 0 (20 -> 16, its total stride being 4), then y shrinks by one stride of 32: 16x288x320 fits (7.5 GB).
    assert c.patch_size == [16, 288, 320]
    assert c.batch_size == 2
    assert c.estimated_memory_gb <= 8.0
    assert all(p % t == 0 for p, t in zip(c.patch_size, c.network.total_stride()))


def test_memory_budget_shrinks_the_patch_and_the_estimate_grows_with_batch():
    fp = _fingerprint([[1, 1, 1]] * 10, [[200, 200, 200]] * 10)
    small = make_plans(_spec(), fp, gpu_memory_gb=4).configurations["3d_fullres"]
    large = make_plans(_spec(), fp, gpu_memory_gb=16).configurations["3d_fullres"]
    assert np.prod(small.patch_size) < np.prod(large.patch_size)
    assert small.estimated_memory_gb <= 4 and large.estimated_memory_gb <= 16
    one = memory.estimate_step_bytes(small.network, small.patch_size, 1, 1, 2)
    two = memory.estimate_step_bytes(small.network, small.patch_size, 2, 1, 2)
    assert two > one


def test_ct_channel_gets_clipping_and_global_zscore():
    fp = _fingerprint([[1, 1, 1]] * 3, [[50, 50, 50]] * 3)
    plans = make_plans(_spec(channels=("CT",)), fp)
    n = plans.normalization[0]
    assert (n.scheme, n.clip_low, n.clip_high, n.mean, n.std) == ("ct", 40.0, 300.0, 100.0, 20.0)
    plans = make_plans(_spec(channels=("T1",)), fp)
    assert plans.normalization[0].scheme == "zscore"


def test_plans_json_round_trip_and_schema_version(tmp_path):
    fp = _fingerprint([[3.6, 0.6, 0.6]] * 4, [[20, 320, 320]] * 4)
    plans = make_plans(_spec(), fp)
    path = plans.save(tmp_path / "plans.json")
    assert Plans.load(path) == plans
    d = json.loads(path.read_text())
    for cfg in d["configurations"].values():
        for key in ("spacing", "patch_size", "batch_size", "network"):
            assert key in cfg
        for key in ("architecture", "strides", "kernel_sizes", "features_per_stage"):
            assert key in cfg["network"]
    d["schema_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(PlansError, match="schema_version 99 is not supported"):
        Plans.load(path)
    path.write_text('{"schema_version": 1}')
    with pytest.raises(PlansError, match="plans.json: required key 'dataset_name' is missing"):
        Plans.load(path)
    path.write_text("{not json")
    with pytest.raises(PlansError, match="plans.json: invalid plans"):
        Plans.load(path)


def test_plan_is_deterministic(phantom_dataset, tmp_path):
    from autoseg import api

    a = api.plan(phantom_dataset, tmp_path / "a", workers=1, configurations=("3d_fullres",))
    b = api.plan(phantom_dataset, tmp_path / "b", workers=2, configurations=("3d_fullres",))
    assert a.to_json() == b.to_json()
    assert (tmp_path / "a" / "fingerprint.json").read_text() == (
        tmp_path / "b" / "fingerprint.json"
    ).read_text()


@pytest.mark.slow  # ~40 s on 2 cores: the fingerprint reads all four BraTS volumes
@pytest.mark.realdata
def test_brats_plans_fit_the_budget(tmp_path):
    """Dataset001 (240x240x155, 1 mm, 2 channels, 5 labels): fingerprint and plans without preprocessing."""
    from autoseg.fingerprint import compute_fingerprint
    from autoseg.io.dataset import discover_cases, load_dataset_json

    root = real_dataset("Dataset001_BraTS2015DeepMedic")
    spec = load_dataset_json(root)
    assert spec.regions["whole_tumor"] == (1, 2, 3, 4)
    fp = compute_fingerprint(discover_cases(root, spec), spec, workers=2)
    plans = make_plans(spec, fp)
    c3 = plans.configurations["3d_fullres"]
    assert c3.spacing == [1.0, 1.0, 1.0]
    assert c3.estimated_memory_gb <= 8.0 and c3.batch_size >= 2
    assert all(p % t == 0 for p, t in zip(c3.patch_size, c3.network.total_stride()))
    assert plans.configurations["2d"].batch_size > c3.batch_size
    # BraTS intensities were z-scored by the distributors: the background is not zero, nothing is cropped
    assert all(c.crop_fraction_kept > 0.99 for c in fp.cases)


def test_memory_budget_precedence():
    from autoseg.api import memory_budget
    from autoseg.errors import AutosegError

    assert memory_budget(11.0, "cuda") == (11.0, "given with --gpu-memory")
    assert memory_budget(None, None)[0] == 8.0
    assert memory_budget(None, "cpu")[0] == 8.0
    with pytest.raises(AutosegError, match="more than 1 GB"):
        memory_budget(0.5, None)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(AutosegError, match="no CUDA GPU is visible"):
            memory_budget(None, "cuda")


def test_lowres_is_planned_only_when_it_pays():
    # 300x512x512 at 1 mm: the fullres patch (80x160x160) covers 3 % of the image -> spacing is raised by 5 %
    # steps until the lowres patch covers >= 25 %, which leaves about a tenth of the voxels: planned.
    fp = _fingerprint([[1, 1, 1]] * 20, [[300, 512, 512]] * 20)
    plans = make_plans(_spec(), fp)
    low = plans.configurations["3d_lowres"]
    cas = plans.configurations["3d_cascade_fullres"]
    assert low.data_identifier == "lowres" and low.spacing[0] == pytest.approx(1.05**16, rel=1e-6)
    assert np.prod(low.patch_size) / np.prod(low.median_shape) >= 0.25
    assert (
        cas.previous_stage == "3d_lowres" and cas.patch_size == plans.configurations["3d_fullres"].patch_size
    )
    # BraTS-like 155x240x240: fullres covers 22 %, but reaching 25 % keeps 86 % of the voxels: not worth it
    fp = _fingerprint([[1, 1, 1]] * 20, [[155, 240, 240]] * 20)
    plans = make_plans(_spec(), fp)
    assert "3d_lowres" not in plans.configurations
    assert any("would keep 86% of the voxels" in r for r in plans.reasons)
