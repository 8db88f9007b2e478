"""Sliding window: tiling, Gaussian weights, a known model reproduced exactly, mirroring, padding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from autoseg.inference.sliding_window import gaussian_importance, predict_sliding_window, tile_starts


def test_tile_starts_cover_the_axis_with_the_given_step():
    assert tile_starts(10, 16, 0.5) == [0]
    assert tile_starts(16, 16, 0.5) == [0]
    assert tile_starts(32, 16, 0.5) == [0, 8, 16]
    starts = tile_starts(100, 30, 0.5)
    assert starts[0] == 0 and starts[-1] == 70
    assert max(b - a for a, b in zip(starts, starts[1:])) <= 15


def test_gaussian_importance_peaks_in_the_centre_and_is_positive():
    g = gaussian_importance([9, 17, 17])
    assert g.max() == pytest.approx(1.0) and g.min() > 0
    assert g[4, 8, 8] == g.max()
    assert g[0, 0, 0] < g[4, 8, 8]


class Threshold(torch.nn.Module):
    """Pointwise 'network': logits from the input, so any tiling must reproduce the same probabilities."""

    def forward(self, x):
        return torch.cat([-x[:, :1] * 10, x[:, :1] * 10], dim=1)


@pytest.mark.parametrize("patch", [[8, 16, 16], [16, 16]])
def test_pointwise_model_is_reproduced_exactly_by_tiling(patch):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 13, 37, 29)).astype(np.float32)  # not a multiple of the patch
    probs = predict_sliding_window(
        Threshold(), image, patch, 2, torch.device("cpu"), step_size=0.5, mirror_axes=tuple(range(len(patch)))
    )
    expected = torch.softmax(torch.from_numpy(np.concatenate([-image * 10, image * 10])), 0).numpy()
    assert probs.shape == (2, 13, 37, 29)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_volume_smaller_than_the_patch_is_padded_and_cropped_back():
    image = np.ones((1, 3, 5, 7), np.float32)
    probs = predict_sliding_window(Threshold(), image, [8, 8, 8], 2, torch.device("cpu"))
    assert probs.shape == (2, 3, 5, 7)
    assert (probs[1] > 0.99).all()


class LeftBiased(torch.nn.Module):
    """Predicts class 1 on the left half of every tile: mirroring along the last axis must average it."""

    def forward(self, x):
        n = x.shape[-1]
        logit = torch.full_like(x[:, :1], -10.0)
        logit[..., : n // 2] = 10
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


def test_mirroring_averages_flipped_predictions():
    image = np.zeros((1, 4, 8, 8), np.float32)
    plain = predict_sliding_window(LeftBiased(), image, [4, 8, 8], 2, torch.device("cpu"))
    mirrored = predict_sliding_window(
        LeftBiased(), image, [4, 8, 8], 2, torch.device("cpu"), mirror_axes=(2,)
    )
    assert plain[1, :, :, 0].min() > 0.99 and plain[1, :, :, -1].max() < 0.01
    # averaged with its flip, every voxel is once on the left half (p=1) and once on the right (p=0)
    np.testing.assert_allclose(mirrored[1], 0.5, atol=1e-4)


def test_accumulators_fall_back_to_the_cpu_when_the_gpu_has_no_room(monkeypatch, caplog):
    """11 classes over 8×256×256 voxels need 25 MB of sums; with 10 MB free on the GPU they go to the CPU, with
    a warning that says why (the GPU itself is never touched here)."""
    from autoseg.inference import sliding_window

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**7, 80 * 10**9))
    with caplog.at_level("WARNING", logger="autoseg"):
        acc, norm = sliding_window._accumulators(11, (8, 256, 256), torch.device("cuda"))
    assert acc.device.type == norm.device.type == "cpu" and acc.shape == (11, 8, 256, 256)
    assert "do not fit in GPU memory" in caplog.text and "accumulating them on the CPU" in caplog.text


class TileDependent(torch.nn.Module):
    """Logits that depend on the whole tile (its mean, as instance normalisation does) and on the position
    in it: overlapping tiles disagree, so the Gaussian weighting and the order of accumulation matter."""

    def forward(self, x):
        centred = x[:, :1] - x[:, :1].mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        ramp = torch.linspace(-1, 1, x.shape[-1]).expand_as(centred)
        return torch.cat([centred, ramp * 2, -centred + ramp], dim=1)


def _reference(network, image, patch, num_classes, step_size, mirror_axes):
    """Sliding window written plainly: whole-volume sums in float64, one tile at a time."""
    dim = len(patch)
    patch3 = [1] + list(patch) if dim == 2 else list(patch)
    spatial = image.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch3, spatial)]
    before = [p // 2 for p in pad]
    image = np.pad(image, [(0, 0)] + [(b, p - b) for b, p in zip(before, pad)])
    shape = image.shape[1:]
    acc = np.zeros((num_classes, *shape))
    norm = np.zeros(shape)
    weight = gaussian_importance(list(patch)).reshape(patch3).astype(np.float64)
    flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for t in itertools.product(*[tile_starts(s, p, step_size) for s, p in zip(shape, patch3)]):
        sl = tuple(slice(a, a + p) for a, p in zip(t, patch3))
        x = torch.from_numpy(image[(slice(None),) + sl][None])
        if dim == 2:
            x = x[:, :, 0]
        probs = 0
        for flip in flips:
            axes = [a + 2 for a in flip]
            out = network(torch.flip(x, axes) if axes else x)
            probs = probs + torch.flip(torch.softmax(out, 1), axes).numpy()[0].astype(np.float64)
        probs = probs / len(flips)
        if dim == 2:
            probs = probs[:, None]
        acc[(slice(None),) + sl] += probs * weight
        norm[sl] += weight
    out = acc / norm
    return out[(slice(None),) + tuple(slice(b, b + s) for b, s in zip(before, spatial))]


@pytest.mark.parametrize("tile_batch", [1, 2, 3])
@pytest.mark.parametrize(
    "patch, shape, step",
    [
        ([8, 16, 16], (21, 37, 29), 0.5),  # several tile rows along axis 0, uneven last step
        ([8, 16, 16], (5, 40, 20), 0.5),  # thinner than the patch along axis 0: padded
        ([8, 16, 16], (16, 16, 16), 1.0),  # tiles that only touch
        ([8, 8], (6, 19, 11), 0.5),  # 2D network over slices: one slice per window row
    ],
)
def test_windowed_accumulation_equals_whole_volume_sums(tile_batch, patch, shape, step):
    """The result built slab by slab from a moving window equals whole-volume weighted sums."""
    image = np.random.default_rng(7).normal(size=(1, *shape)).astype(np.float32)
    axes = tuple(range(len(patch)))
    expected = _reference(TileDependent(), image, patch, 3, step, axes)
    got = predict_sliding_window(
        TileDependent(), image, patch, 3, torch.device("cpu"), step, axes, tile_batch=tile_batch
    )
    assert got.shape == (3, *shape) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_step_size_outside_0_to_1_is_refused():
    with pytest.raises(ValueError, match=r"step_size must be in \(0, 1\]"):
        predict_sliding_window(
            Threshold(), np.zeros((1, 8, 8, 8), np.float32), [4, 4, 4], 2, torch.device("cpu"), 1.5
        )
    from autoseg.errors import AutosegError
    from autoseg.settings import InferenceSettings

    with pytest.raises(AutosegError, match=r"step_size = 0.0: must be in \(0, 1\]"):
        InferenceSettings(step_size=0)


@pytest.mark.parametrize("region_based", [False, True])
@pytest.mark.parametrize(
    "grid, out, rows",
    [
        ((20, 30, 25), (33, 17, 40), [3, 5, 1, 7, 4]),  # up along axis 0, down and up in-plane
        ((20, 30, 25), (7, 30, 25), [6, 6, 8]),  # down along axis 0 only (thick slices)
        ((9, 12, 12), (40, 12, 12), [1] * 9),  # one row per slab, 4× up
        ((12, 10, 10), (12, 10, 10), [12]),  # no resampling, one slab
    ],
)
def test_slab_segmenter_equals_the_whole_volume_export(monkeypatch, grid, out, rows, region_based):
    """Labels built from slabs (resampled in-plane, then blended along axis 0) equal those of the whole-volume
    resampling, for softmax classes and for regions."""
    from types import SimpleNamespace

    from autoseg.inference import export

    rng = np.random.default_rng(len(rows))
    probs = rng.random((4, *grid)).astype(np.float32)
    if not region_based:
        probs /= probs.sum(0, keepdims=True)
    plans = SimpleNamespace(region_based=region_based, regions_class_order=[1, 2, 3, 4])
    monkeypatch.setattr(export, "_cropped_grid", lambda props, plans: (out, (1.0, 1.0, 1.0)))
    monkeypatch.setattr(export, "_to_file_order", lambda seg, props, plans: seg)
    expected = export.probabilities_to_segmentation(probs, None, plans)
    segmenter = export.SlabSegmenter(None, plans, grid)
    a = 0
    for n in rows:
        segmenter.add(a, a + n, probs[:, a : a + n].copy())
        a += n
    got = segmenter.result()
    assert got.shape == out and len(np.unique(got)) >= 3
    assert (got == expected).mean() > 0.9999
    assert len(segmenter.rows) <= 2  # only the rows the last output rows still needed were kept


def test_slab_segmenter_refuses_an_incomplete_volume(monkeypatch):
    from types import SimpleNamespace

    from autoseg.inference import export

    monkeypatch.setattr(export, "_cropped_grid", lambda props, plans: ((10, 4, 4), (1.0, 1.0, 1.0)))
    segmenter = export.SlabSegmenter(None, SimpleNamespace(region_based=False), (10, 4, 4))
    segmenter.add(0, 6, np.full((2, 6, 4, 4), 0.5, np.float32))
    with pytest.raises(RuntimeError, match="slabs cover 5 of 10 output rows"):
        segmenter.result()
