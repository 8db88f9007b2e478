"""Issue 20's levers: bf16 on CPUs with native bf16, skipping tiles with no image content, and their agreement
with the float32, every-tile reference path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg.inference import runner as runner_module
from autoseg.inference.runner import TileRunner, autocast_dtype, cpu_has_native_bf16
from autoseg.inference.sliding_window import _TileGrid, predict_sliding_window
from autoseg.planning.plans import ChannelNormalization
from autoseg.preprocessing.normalize import background_values
from autoseg.settings import (
    InferenceSettings,  # noqa: I001
    SettingError,
)
from tests.test_bad_input import _error_line, _run

CPU = torch.device("cpu")
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(SAPPHIRE)
    assert cpu_has_native_bf16(SAPPHIRE.replace(" avx512_bf16", ""))  # AMX alone
    assert not cpu_has_native_bf16(SKYLAKE)
    assert not cpu_has_native_bf16("")  # no flags line (not x86 Linux)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(runner_module, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert autocast_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert autocast_dtype("auto", torch.device("cuda")) == torch.float16
    assert autocast_dtype("auto", torch.device("mps")) is None
    assert autocast_dtype("fp32", CPU) is None
    assert autocast_dtype("bf16", CPU) == torch.bfloat16


def test_a_bad_precision_is_refused_before_anything_runs(capfd, tmp_path):
    with pytest.raises(SettingError):
        InferenceSettings(precision="fp16")
    code, _, err = _run(
        capfd, "predict", tmp_path / "w", tmp_path / "in", tmp_path / "out", "--precision", "x"
    )
    assert "--precision" in _error_line(code, err) and "auto, fp32 or bf16" in err
    assert not (tmp_path / "out").exists()


class _Counting(torch.nn.Module):
    """Logits (class 1 where the first channel exceeds 0.5, else class 0), counting the tiles it sees."""

    def __init__(self):
        super().__init__()
        self.tiles = 0

    def forward(self, x):
        self.tiles += x.shape[0]
        fg = (x[:, :1] > 0.5).float()
        return torch.cat([5 * (1 - fg), 5 * fg], 1)


def _corner_body() -> np.ndarray:
    """A 64³ image, zero but for a bright 10³ cube in one corner: at patch 32 and step 0.5, 27 tiles of which
    only the one at the origin reaches the cube."""
    image = np.zeros((1, 64, 64, 64), dtype=np.float32)
    image[0, :10, :10, :10] = 1
    return image


def test_tiles_with_only_background_are_not_run_and_give_background():
    image = _corner_body()
    grid = _TileGrid(image, [32, 32, 32], 0.5, 1, [0.0])
    assert (grid.total, grid.skipped) == (27, 26)
    net = _Counting()
    probs = predict_sliding_window(net, image, [32, 32, 32], 2, CPU, background=[0.0])
    assert net.tiles == 1
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-6)
    ref = predict_sliding_window(_Counting(), image, [32, 32, 32], 2, CPU)
    assert np.array_equal(probs.argmax(0), ref.argmax(0))  # the labels of running every tile
    assert probs[0, 40:, 40:, 40:].min() == 1  # covered by skipped tiles only: background


def test_sigmoid_regions_are_zero_where_tiles_were_skipped():
    probs = predict_sliding_window(
        _Counting(), _corner_body(), [32, 32, 32], 2, CPU, activation="sigmoid", background=[0.0]
    )
    assert probs[:, 40:, 40:, 40:].max() == 0 and probs[1, :10, :10, :10].min() > 0.99


def test_nothing_changes_where_no_tile_is_skipped():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 40, 40, 40)).astype(np.float32)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    ref = predict_sliding_window(net, image, [24, 24, 24], 3, CPU)
    same = predict_sliding_window(net, image, [24, 24, 24], 3, CPU, background=[float(image.min())])
    assert np.array_equal(ref, same)  # bit for bit: the skipping path is not even entered
    assert _TileGrid(image, [24, 24, 24], 0.5, 1, [float(image.min())]).skipped == 0


def test_background_is_the_value_outside_the_mask_else_the_minimum_never_for_ct():
    image = np.array([[[[-0.7, 2.0], [3.0, 4.0]]], [[[0.0, 5.0], [-1.0, 1.0]]]], dtype=np.float32)
    mask = np.array([[[False, True], [True, True]]])
    z = ChannelNormalization(scheme="zscore", use_mask=False)
    assert background_values(image, mask, [z, z]) == pytest.approx([-0.7, 0.0])
    assert background_values(image, np.ones_like(mask), [z, z]) == pytest.approx([-0.7, -1.0])
    ct = ChannelNormalization(scheme="ct", clip_low=-1, clip_high=1, mean=0, std=1)
    assert background_values(image, np.ones_like(mask), [z, ct]) is None


def test_bf16_runner_keeps_float32_sums():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 2, 1))
    image = np.random.default_rng(1).normal(size=(1, 20, 20, 20)).astype(np.float32)
    fp32 = predict_sliding_window(TileRunner(net, CPU, "off"), image, [16, 16, 16], 2, CPU)
    bf16_runner = TileRunner(net, CPU, "off", amp=True, dtype=torch.bfloat16)
    assert bf16_runner(torch.zeros(1, 1, 16, 16, 16)).dtype == torch.bfloat16  # the pass itself is bf16
    bf16 = predict_sliding_window(bf16_runner, image, [16, 16, 16], 2, CPU)
    assert bf16.dtype == np.float32
    assert 0 < np.abs(bf16 - fp32).max() < 0.05


# ---- mirroring that pays for itself (autoseg.inference.mirroring, find-best, predict)


def test_every_subset_is_the_mean_of_the_flips_it_contains():
    from autoseg.inference.mirroring import axis_subsets, subset_probabilities

    assert axis_subsets((0, 1, 2)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    flips = {
        f: np.full((2, 1), float(i)) for i, f in enumerate(axis_subsets((0, 1)))
    }  # () 0, (0,) 1, (1,) 2, (0,1) 3
    assert subset_probabilities(flips, ())[0, 0] == 0
    assert subset_probabilities(flips, (1,))[0, 0] == 1  # mean of () and (1,): (0 + 2) / 2
    assert subset_probabilities(flips, (0, 1))[0, 0] == 1.5


def test_the_cheapest_axes_within_the_tolerance_win():
    from autoseg.inference.mirroring import cheapest_axes

    dice = {(): 0.800, (0,): 0.8095, (1,): 0.8092, (0, 1): 0.8100}
    assert cheapest_axes(dice, 0.001) == (0,)  # 0.8095 >= 0.8100 - 0.001; the plain pass is 0.01 short
    assert cheapest_axes(dice, 0.0) == (0, 1)
    assert cheapest_axes(dice, 0.02) == ()


def test_structure_dice_by_label_and_by_region():
    from autoseg.inference.mirroring import structure_dice

    seg = np.array([0, 1, 1, 2])
    probs = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=float)  # labels 0 1 2 2
    assert structure_dice(probs, seg, [[1], [2], [3]], regions=False) == [2 / 3, 2 / 3, None]
    regions = np.array([[0, 1, 1, 1], [0, 0, 0.9, 0.2]])  # whole (1, 2) and label 2 alone
    assert structure_dice(regions, seg, [[1, 2], [2]], regions=True) == [1.0, 0.0]


def test_predict_uses_the_found_axes_unless_told_otherwise():
    from types import SimpleNamespace

    from autoseg.api import _found_mirroring

    found = SimpleNamespace(mirror_axes=(1, 2), configs=("3d_fullres",))
    settings = InferenceSettings()
    assert _found_mirroring(settings, ["3d_fullres"], found).mirror_axes == (1, 2)
    none = SimpleNamespace(mirror_axes=(), configs=("3d_fullres",))
    assert _found_mirroring(settings, ["3d_fullres"], none).mirroring is False
    old = SimpleNamespace(mirror_axes=None, configs=("3d_fullres",))  # instructions from before issue 20
    assert _found_mirroring(settings, ["3d_fullres"], old) == settings
    assert _found_mirroring(settings, ["2d"], found) == settings  # another configuration than find-best's
    explicit = InferenceSettings(mirror_axes=(0,), mirror_axes_from_find_best=False)  # --mirror-axes 0
    assert _found_mirroring(explicit, ["3d_fullres"], found) == explicit
    off = InferenceSettings(mirroring=False)
    assert _found_mirroring(off, ["3d_fullres"], found) == off


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_auto_precision_agrees_with_fp32():
    """On CUDA, "auto" is float16 autocast; its labels agree with float32's on a smooth random network."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 1))
    net = net.to(cuda)
    image = np.random.default_rng(2).normal(size=(1, 40, 40, 40)).astype(np.float32)
    fp32 = predict_sliding_window(TileRunner(net, cuda, "off"), image, [24, 24, 24], 3, cuda)
    runner = TileRunner(net, cuda, "off", amp=True, dtype=autocast_dtype("auto", cuda))
    fp16 = predict_sliding_window(runner, image, [24, 24, 24], 3, cuda)
    assert (fp16.argmax(0) == fp32.argmax(0)).mean() >= 0.995


# ---- agreement on real data


def _agreement(ref: np.ndarray, other: np.ndarray, seg: np.ndarray, structures) -> tuple[float, float]:
    """Fraction of voxels with the same arg-max label, and the largest per-structure change of Dice against
    the reference segmentation ``seg``."""
    from autoseg.inference.mirroring import structure_dice

    same = float((ref.argmax(0) == other.argmax(0)).mean())
    a = structure_dice(ref, seg, structures, regions=False)
    b = structure_dice(other, seg, structures, regions=False)
    return same, max((abs(x - y) for x, y in zip(a, b) if x is not None and y is not None), default=0.0)


class _Smooth(torch.nn.Module):
    """A confident, smooth "segmenter": foreground where the 3x3x3 mean intensity exceeds ``threshold``."""

    def __init__(self, threshold: float):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
        torch.nn.init.constant_(self.conv.weight, 1 / 27)
        self.threshold = threshold

    def forward(self, x):
        fg = 8 * (self.conv(x[:, :1]) - self.threshold)
        return torch.cat([-fg, fg], 1)


@pytest.mark.realdata
def test_bf16_and_tile_skipping_agree_with_the_reference_on_a_real_case():
    """A real MS-lesion volume (MNI space, zero outside the brain: small tiles there are skipped) through a
    smooth thresholding network: the skipping path gives exactly the every-tile labels, bf16 the float32
    labels on >= 99.5 % of voxels."""
    from autoseg.io.volume import read_volume
    from tests.conftest import real_dataset

    folder = real_dataset("Dataset002_MSLesionLjubljanaMNI")
    first = sorted((folder / "imagesTr").glob("*_0000.nii.gz"))[0]
    raw = read_volume(first).array.astype(np.float32)[None]
    image = (raw / raw[raw > 0].std()).astype(np.float32)[:, ::2, ::2, ::2].copy()  # 2 mm: seconds
    seg = (image[0] > np.percentile(image[0][image[0] > 0], 70)).astype(np.int16)
    net, patch = _Smooth(float(np.percentile(image[0][image[0] > 0], 70))), [24, 24, 24]
    ref = predict_sliding_window(TileRunner(net, CPU, "off"), image, patch, 2, CPU)
    grid = _TileGrid(image, patch, 0.5, 1, [0.0])
    assert grid.skipped > 0  # the corners of the MNI box hold no brain
    skipped = predict_sliding_window(TileRunner(net, CPU, "off"), image, patch, 2, CPU, background=[0.0])
    bf16 = predict_sliding_window(
        TileRunner(net, CPU, "off", amp=True, dtype=torch.bfloat16), image, patch, 2, CPU
    )
    assert _agreement(ref, skipped, seg, [[1]]) == (1.0, 0.0)  # the skipped tiles gave background anyway
    same, _ = _agreement(ref, bf16, seg, [[1]])
    # labels only: every voxel of this reference sits at the network's threshold, the worst case for the
    # Dice of any rounding (0.007 here); Dice with a trained network: scripts/lever_agreement.py (docs)
    assert same >= 0.995, same


def _train_tiny(dataset, root, config: str, folds: int, iters: int, architecture: str = "unet"):
    """Plan ``dataset`` (``config`` only, narrow ``architecture``), split its cases into ``folds`` folds and
    train each for ``iters`` iterations (with its final validation, unmirrored): a cross-validated WORK in
    minutes."""
    from autoseg import api
    from autoseg.io.dataset import discover_cases
    from autoseg.jsonio import write_json
    from autoseg.layout import WorkDir
    from tests.conftest import shrink_network

    work = WorkDir(root)
    api.plan(dataset, work.root, workers=1, configurations=(config,), architecture=architecture)
    shrink_network(work)
    cases = sorted(c.case_id for c in discover_cases(dataset))
    parts = [cases[k::folds] for k in range(folds)]
    write_json(work.splits, [{"train": [c for c in cases if c not in p], "val": p} for p in parts])
    for k in range(folds):
        api.train(
            work.root, config, str(k), device="cpu", epochs=1, iters_per_epoch=iters, val_iters=0,
            loader_workers=0, mirroring=False, num_folds=folds,
        )  # fmt: skip
    return work


def _one_case_inputs(dataset, folder):
    """A folder of links to the images of the phantom's first case (an input folder for predict)."""
    folder.mkdir()
    for f in sorted((dataset / "imagesTr").glob("phantom_000_*")):
        (folder / f.name).symlink_to(f)
    return folder


@pytest.mark.slow  # minutes on 2 cores: two folds are trained, then 4 flips of every validation case
def test_find_best_records_the_cheapest_mirroring_and_predict_uses_it(phantom_dataset, tmp_path, caplog):
    import logging

    from autoseg import api
    from autoseg.selection import load_instructions

    work = _train_tiny(phantom_dataset, tmp_path / "work", "2d", folds=2, iters=2)
    found = api.find_best(work.root, ["2d"], workers=1, mirror_tolerance=1.0)  # any Dice will do: no axes
    assert found["mirroring"]["mirror_axes"] == []
    assert set(found["mirroring"]["mean_dice"]) == {"", "0", "1", "0,1"}
    assert found["mirroring"]["passes"] == {"": 1, "0": 2, "1": 2, "0,1": 4}
    assert load_instructions(work).mirror_axes == ()
    inputs = _one_case_inputs(phantom_dataset, tmp_path / "in")
    with caplog.at_level(logging.INFO, logger="autoseg"):
        api.predict(work.root, inputs, tmp_path / "out", device="cpu")
    assert "mirroring over axes none, as find-best chose" in caplog.text
    strict = api.find_best(work.root, ["2d"], workers=1, mirror_tolerance=0.0)  # the best subset itself
    best = max(strict["mirroring"]["mean_dice"].items(), key=lambda kv: kv[1])
    assert strict["mirroring"]["mean_dice"][",".join(map(str, strict["mirroring"]["mirror_axes"]))] == best[1]


def test_a_2d_network_predicts_each_slice_once():
    """A 2D patch is 1 deep along axis 0: steps of 0.5 voxel used to put two tiles on every slice."""
    from autoseg.inference.sliding_window import tile_starts

    assert tile_starts(155, 1, 0.5) == list(range(155))
    assert tile_starts(155, 96, 0.5) == [0, 30, 59]  # 3D patches are as before
    assert len(_TileGrid(np.zeros((1, 7, 16, 16), np.float32), [16, 16], 0.5, 1).chunks) == 7
