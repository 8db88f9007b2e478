"""The torch resampler against the scipy one (same operators, so float32 rounding apart), plus hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from autoseg.preprocessing import resample, resample_torch
from autoseg.preprocessing.resample_torch import resample_image, resample_label, resample_probabilities

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

# (source spacing, target spacing): the anisotropic case resamples its coarse axis linearly, the others are
# cubic on every axis; the last one shrinks, keeps and grows one axis each.
CASES = {
    "anisotropic": ((3.0, 1.0, 1.0), (2.0, 0.7, 0.7)),
    "iso_down": ((1.0, 1.0, 1.0), (1.6, 1.6, 1.6)),
    "iso_up": ((1.0, 1.0, 1.0), (0.6, 0.6, 0.6)),
    "mixed": ((1.0, 1.0, 1.0), (1.3, 1.0, 0.8)),
}


def _smooth_volume(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Gaussian-filtered noise ``(C, Z, Y, X)`` float32: smooth like an image, with structure at every voxel."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), (0, 1.0, 2.0, 2.0)).astype(np.float32)


def _label_map(seed: int) -> np.ndarray:
    """Smooth regions with values {0, 1, 3, 7} (2 absent on purpose) as uint16, the dtype torch handles worst."""
    levels = np.digitize(_smooth_volume((1, 16, 48, 40), seed)[0], [-0.05, 0.0, 0.05])
    return np.array([0, 1, 3, 7], np.uint16)[levels]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_images_match_scipy(case, device):
    spacing, target = CASES[case]
    image = _smooth_volume((2, 16, 48, 40), seed=0) * 100 + 20
    expected = resample.resample_image(image, spacing, target)
    out = resample_image(image, spacing, target, device=device)
    assert out.shape == expected.shape == (2, *resample.new_shape(image.shape[1:], spacing, target))
    assert out.dtype == np.float32
    # the same cubic B-spline (coarse axis linear) as scipy's zoom, so only float32 rounding differs: ~2e-7 of
    # the range measured; 1e-5 leaves room for other BLAS / devices while any kernel change (Keys cubic
    # convolution instead of the B-spline, say) shows at ~1e-2
    error = np.abs(out - expected).max() / (image.max() - image.min())
    assert error < 1e-5, f"max abs difference {error:.1e} of the data range"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_labels_match_scipy_and_never_gain_values(case, device):
    spacing, target = CASES[case]
    label = _label_map(seed=1)
    expected = resample.resample_label(label, spacing, target)
    out = resample_label(label, spacing, target, device=device)
    assert out.shape == expected.shape and out.dtype == label.dtype
    assert set(np.unique(out).tolist()) <= {0, 1, 3, 7}
    # every voxel agrees here (exact 0.5 / 0.5 ties included); 99.9% leaves room for near-ties on other devices
    assert (out == expected).mean() > 0.999


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_probabilities_match_scipy(case, device):
    spacing, _ = CASES[case]
    logits = _smooth_volume((3, 16, 48, 40), seed=2) * 20
    probs = torch.softmax(torch.from_numpy(logits), dim=0).numpy()
    out_shape = (21, 37, 55)
    expected = resample.resample_probabilities(probs, spacing, out_shape)
    out = resample_probabilities(probs, spacing, out_shape, device=device)
    assert out.shape == expected.shape == (3, *out_shape)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)  # both linear; ~1e-7 measured


@pytest.mark.parametrize("device", DEVICES)
def test_linear_resampling_worked_by_hand(device):
    # 2 -> 4 samples: output centres sit at input coordinates -0.25, 0.25, 0.75, 1.25, clamped to [0, 1]
    probs = np.array([0.0, 1.0], np.float32).reshape(1, 1, 1, 2)
    out = resample_probabilities(probs, (1.0, 1.0, 1.0), (1, 1, 4), device=device)
    np.testing.assert_allclose(out.ravel(), [0.0, 0.25, 0.75, 1.0], atol=1e-7)
    # 4 -> 2 samples: centres at 0.5 and 2.5, each halfway between a 5 and a 3: exact ties go to the smaller
    label = np.array([5, 3, 5, 3], np.int16).reshape(1, 1, 4)
    assert resample_label(label, (1.0, 1.0, 1.0), (1.0, 1.0, 2.0), device=device).ravel().tolist() == [3, 3]


@pytest.mark.parametrize("n_in,n_out", [(10, 20), (10, 7), (33, 47), (1, 4), (4, 1), (2, 5)])
def test_axis_matrices_are_scipys_zoom(n_in, n_out):
    """Column j of an axis matrix is scipy's 1D zoom of the unit impulse at sample j."""
    for order, weights in [(3, resample_torch._cubic_weights), (1, resample_torch._linear_weights)]:
        impulses = np.eye(n_in)
        expected = np.stack(
            [
                ndimage.zoom(
                    e, n_out / n_in, order=order, mode="nearest", grid_mode=True, prefilter=order > 1
                )
                for e in impulses
            ],
            axis=1,
        )
        np.testing.assert_allclose(weights(n_in, n_out), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_images_stay_constant(device):
    image = np.full((2, 8, 16, 12), 7.0, np.float32)
    image[1] = -3.0
    for spacing, target in CASES.values():
        out = resample_image(image, spacing, target, device=device)
        np.testing.assert_allclose(out[0], 7.0, rtol=1e-6)
        np.testing.assert_allclose(out[1], -3.0, rtol=1e-6)
    single = np.full((8, 16, 12), 4, np.uint8)
    assert (resample_label(single, (1.0, 1.0, 1.0), (1.5, 0.5, 1.0), device=device) == 4).all()


def test_same_spacing_returns_the_input():
    image = _smooth_volume((2, 6, 8, 10), seed=3)
    label = _label_map(seed=4)
    same = (1.0, 0.8, 0.8)
    assert resample_image(image, same, same) is image
    assert resample_label(label, same, same) is label
    assert resample_probabilities(image, same, image.shape[1:]) is image


def test_readonly_strided_integer_input_and_matmul_precision_restored():
    # a read-only, non-contiguous int16 view (as from a memmap and a transpose) is resampled like a copy
    image = (_smooth_volume((1, 40, 16, 12), seed=5) * 1000).astype(np.int16).transpose(0, 3, 2, 1)
    image.setflags(write=False)
    spacing, target = CASES["anisotropic"]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as a training script might leave it (TF32 on GPUs)
    try:
        out = resample_image(image, spacing, target)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    expected = resample.resample_image(image, spacing, target)
    assert np.abs(out - expected).max() / np.ptp(image) < 1e-5
