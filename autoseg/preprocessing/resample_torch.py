"""Resampling with torch, on the GPU when there is one: the same operators as :mod:`.resample`.

Same public functions, shapes and geometry as the scipy resampler (array order, mm; voxel edges aligned), plus a
``device`` keyword; numpy in, numpy out. The results agree with :mod:`.resample` to float32 rounding (below
1e-6 of the data range), because the operators are the same ones, not look-alikes:

- every scipy zoom used there is separable, so along each axis it is a fixed linear map from ``n_in`` to
  ``n_out`` samples. Here that map is built as a small ``(n_out, n_in)`` matrix in float64 and applied with a
  matrix product along its axis (three products per channel; cheap next to the voxel count).
- images (order 3) use scipy's cubic B-spline with ``mode="nearest"``: the input is extended by
  ``_SPLINE_PAD`` edge copies, prefiltered with mirror boundaries (a tridiagonal solve), and evaluated at the
  edge-aligned coordinates. The coarse axis of anisotropic data (:func:`.resample._coarse_axis`) gets the
  linear matrix instead, as in :func:`.resample.resample_channel`.
- labels and probabilities get the linear matrix on every axis (scipy's ``grid_mode=True`` linear zoom, the
  operator of ``torch.nn.functional.interpolate(..., align_corners=False)``). Not ``interpolate`` itself: it
  computes source coordinates in float32, which moves weights by ~1e-5 at index 240 and flips label ties
  (two labels sharing a voxel 0.5 / 0.5) against scipy; on the CPU the products are still no slower than
  scipy's linear zoom.

Memory stays bounded: one channel (or one label's soft mask) at a time, float32, on ``device``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from scipy.linalg import solve_banded

from autoseg.preprocessing.resample import _coarse_axis, new_shape

# scipy.ndimage.zoom pads the input by this many edge samples before its spline prefilter when
# mode="nearest" (scipy.ndimage._interpolation._prepad_for_spline_filter); copying it makes the matrices exact.
_SPLINE_PAD = 12

# Label shares closer than this are a tie, which goes to the smaller value as in scipy: exact ties (0.5 / 0.5)
# are common, and float32 rounding, which differs between scipy, torch and devices, must not decide them.
# Errors here are ~1e-7; real differences this small are too rare to matter.
_TIE_TOLERANCE = 1e-6


def _source_coordinates(n_in: int, n_out: int) -> np.ndarray:
    """Where output sample centres fall on the input's index axis (edge-aligned grids, ``grid_mode=True``)."""
    return (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5


@lru_cache(maxsize=64)
def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of linear interpolation; coordinates clamp to the edge samples."""
    t = np.clip(_source_coordinates(n_in, n_out), 0, n_in - 1)
    lo = np.floor(t).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = t - lo
    w = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(w, (rows, lo), 1 - frac)
    np.add.at(w, (rows, hi), frac)
    return w


def _mirror(k: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected about the first and last sample (scipy's "mirror": ``-1 -> 1``, ``n -> n - 2``)."""
    if n == 1:
        return np.zeros_like(k)
    period = 2 * n - 2
    k = np.abs(k) % period
    return np.where(k >= n, period - k, k)


def _cubic_bspline(d: np.ndarray) -> np.ndarray:
    d = np.abs(d)
    return np.where(d < 1, 2 / 3 - d**2 + d**3 / 2, np.where(d < 2, (2 - d) ** 3 / 6, 0.0))


@lru_cache(maxsize=64)
def _cubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` float64 matrix of scipy's order-3 ``zoom(mode="nearest", grid_mode=True)`` on one axis."""
    n = n_in + 2 * _SPLINE_PAD
    # spline coefficients of the edge-padded signal: solve (c[k-1] + 4 c[k] + c[k+1]) / 6 = x[k] with mirror
    # ends (c[-1] = c[1], c[n] = c[n-2]) for every unit input at once; column j holds input sample j's share
    padded = np.zeros((n, n_in))
    padded[np.arange(n), np.clip(np.arange(n) - _SPLINE_PAD, 0, n_in - 1)] = 1.0
    if n == 1:
        coeffs = padded
    else:
        bands = np.zeros((3, n))
        bands[0, 1:] = 1 / 6  # superdiagonal
        bands[1, :] = 4 / 6
        bands[2, :-1] = 1 / 6  # subdiagonal
        bands[0, 1] = bands[2, n - 2] = 2 / 6  # the mirrored neighbour counts twice at each end
        coeffs = solve_banded((1, 1), bands, padded)
    t = np.clip(_source_coordinates(n_in, n_out) + _SPLINE_PAD, 0, n - 1)
    first = np.floor(t).astype(int) - 1
    w = np.zeros((n_out, n_in))
    for tap in range(4):
        k = first + tap
        w += _cubic_bspline(t - k)[:, None] * coeffs[_mirror(k, n)]
    # The prefilter's weights decay as 0.27^distance; far from the diagonal they become float32 denormals, which
    # make CPU matrix products over 10x slower. Dropping |w| < 1e-9 changes a result by < 1e-8 of the data range.
    w[np.abs(w) < 1e-9] = 0.0
    return w


@contextmanager
def _full_float32_matmul() -> Iterator[None]:
    # TF32 / bf16 matmuls (set_float32_matmul_precision("high"), common for training) would cost ~1e-3 of
    # the range; the setting is process-wide in torch, so it is restored right after.
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


def _apply_along_axes(x: torch.Tensor, weights: dict[int, torch.Tensor]) -> torch.Tensor:
    """Apply ``weights[axis]`` ``(n_out, n_in)`` along each listed axis of ``x``; shrinking axes go first."""
    order = sorted(weights, key=lambda a: weights[a].shape[0] / weights[a].shape[1])
    with _full_float32_matmul():
        for axis in order:
            moved = x.movedim(axis, -1)
            x = torch.matmul(moved, weights[axis].T).movedim(-1, axis).contiguous()
    return x


def _to_tensor(a: np.ndarray, device: torch.device, dtype: np.dtype | None = None) -> torch.Tensor:
    a = np.ascontiguousarray(a, dtype=dtype)
    if not a.flags.writeable:  # e.g. a read-only memmap; torch.from_numpy wants a writable buffer
        a = a.copy()
    return torch.from_numpy(a).to(device)


def _resample_tensor(
    x: torch.Tensor, out_shape: tuple[int, ...], spacing: tuple[float, ...], order: int
) -> torch.Tensor:
    """Resample one float32 array on its device: order 3 (coarse axis linear) or 1, as ``resample_channel``."""
    if tuple(x.shape) == out_shape:
        return x
    coarse = _coarse_axis(spacing) if order == 3 else None
    weights = {}
    for axis, (n_in, n_out) in enumerate(zip(x.shape, out_shape)):
        if n_in == n_out:
            continue  # scipy's zoom by 1 reproduces the samples too
        w = _linear_weights(n_in, n_out) if order == 1 or axis == coarse else _cubic_weights(n_in, n_out)
        weights[axis] = torch.as_tensor(w, dtype=torch.float32, device=x.device)
    return _apply_along_axes(x, weights)


def resample_image(
    image: np.ndarray,
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    out_shape: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Resample every channel of ``image`` ``(C, Z, Y, X)`` from ``spacing`` to ``target`` (cubic B-spline).

    Returns float32 ``(C, *out_shape)``; ``out_shape`` defaults to :func:`.resample.new_shape`. With the same
    shape, returns ``image`` as float32 (not copied when it already is).
    """
    out_shape = tuple(int(v) for v in (out_shape or new_shape(image.shape[1:], spacing, target)))
    if tuple(image.shape[1:]) == out_shape:
        return image.astype(np.float32, copy=False)
    device = torch.device(device)
    out = np.empty((image.shape[0], *out_shape), np.float32)
    with torch.inference_mode():
        for c in range(image.shape[0]):
            x = _to_tensor(image[c], device, np.float32)
            out[c] = _resample_tensor(x, out_shape, spacing, order=3).cpu().numpy()
    return out


def _torch_label_dtype(dtype: np.dtype) -> np.dtype:
    # torch's uint16-uint64 support is partial (absent before 2.3); int64 holds every label value in practice
    if dtype.kind == "u" and dtype.itemsize > 1:
        return np.dtype(np.int64)
    return dtype


def resample_label(
    label: np.ndarray,
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    out_shape: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Resample a label map ``(Z, Y, X)``; output values are a subset of the input's values, same dtype.

    Each value is resampled as a linear soft mask and the output voxel takes the value with the largest share
    (ties go to the smaller value, as in :func:`.resample.resample_label`). With the same shape, returns
    ``label`` itself.
    """
    out_shape = tuple(int(v) for v in (out_shape or new_shape(label.shape, spacing, target)))
    if tuple(label.shape) == out_shape:
        return label
    values = np.unique(label)  # sorted; on the host, where it is several times faster than torch.unique
    if len(values) == 1:
        return np.full(out_shape, values[0], dtype=label.dtype)
    device = torch.device(device)
    with torch.inference_mode():
        lab = _to_tensor(label, device, _torch_label_dtype(label.dtype))
        best = torch.full(out_shape, -1.0, dtype=torch.float32, device=device)
        index = torch.zeros(out_shape, dtype=torch.int32, device=device)
        for i, v in enumerate(values.tolist()):
            soft = _resample_tensor((lab == v).to(torch.float32), out_shape, spacing, order=1)
            better = soft > best + _TIE_TOLERANCE
            index.masked_fill_(better, i)
            best = torch.where(better, soft, best)
        return values[index.cpu().numpy()]


def resample_probabilities(
    probs: np.ndarray,
    spacing: tuple[float, ...],
    out_shape: tuple[int, ...],
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Resample class probabilities / logits ``(K, Z, Y, X)`` to ``out_shape`` linearly (for export).

    Returns float32 ``(K, *out_shape)``; with the same shape, returns ``probs`` itself.
    """
    out_shape = tuple(int(v) for v in out_shape)
    if tuple(probs.shape[1:]) == out_shape:
        return probs
    device = torch.device(device)
    out = np.empty((probs.shape[0], *out_shape), np.float32)
    with torch.inference_mode():
        for k in range(probs.shape[0]):
            x = _to_tensor(probs[k], device, np.float32)
            out[k] = _resample_tensor(x, out_shape, spacing, order=1).cpu().numpy()
    return out
