"""Gaussian-weighted sliding-window inference over a preprocessed volume.

The volume ``(C, Z, Y, X)`` is tiled with patches overlapping by ``1 - step_size`` (tiles evenly spread so
the first and last touch the borders); each tile's softmax probabilities are weighted by a Gaussian
importance map (σ = patch / 8, so the centre of a tile counts more than its edges) and accumulated; the sum is
divided by the accumulated weights. 2D networks run on slices along axis 0 (patch ``[1, py, px]``). With
mirroring, each tile is also predicted flipped along every combination of the given axes and the results are
averaged. Volumes smaller than the patch are padded with 0 and cropped back. The sums live on the device in a
window along axis 0 (one patch deep, plus what one batch of tiles spans) that moves through the volume,
finished slices going to the result in host memory; if a GPU has no room even for the window (a very wide
volume with many classes), the window lives in CPU memory instead, with a warning.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from autoseg.inference.runner import HEAP, TileRunner

_log = logging.getLogger("autoseg")


def gaussian_importance(patch: list[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Gaussian weights over ``patch``, max 1, never 0 (min clipped to the smallest positive value)."""
    tmp = np.zeros(patch, dtype=np.float32)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g > 0].min()
    return g.astype(np.float32)


def tile_starts(size: int, patch: int, step_size: float) -> list[int]:
    """Start offsets along one axis: as few tiles as give steps <= ``step_size * patch``, evenly spread."""
    if size <= patch:
        return [0]
    n = int(math.ceil((size - patch) / (patch * step_size))) + 1
    span = size - patch
    return [int(round(i * span / (n - 1))) for i in range(n)]


def _accumulators(num_classes: int, shape: tuple[int, ...], device: torch.device):
    """Probability sum ``(K, *shape)`` and weight sum ``shape`` on ``device``, or on the CPU (with a warning)
    when a GPU does not have room for them next to the network's working memory."""
    if device.type == "cuda":
        need = (num_classes + 1) * math.prod(shape) * 4
        free, _ = torch.cuda.mem_get_info(device)
        if need < 0.5 * free:
            try:
                return (
                    torch.zeros((num_classes, *shape), dtype=torch.float32, device=device),
                    torch.zeros(shape, dtype=torch.float32, device=device),
                )
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        _log.warning(
            "the %d-class probability sums of a %s window (%.1f GB) do not fit in GPU memory next to the "
            "network: accumulating them on the CPU (slower)",
            num_classes,
            "x".join(map(str, shape)),
            need / 1e9,
        )
    cpu = torch.device("cpu")
    return (
        torch.zeros((num_classes, *shape), dtype=torch.float32, device=cpu),
        torch.zeros(shape, dtype=torch.float32, device=cpu),
    )


def predict_sliding_window(
    network: torch.nn.Module | TileRunner | list[TileRunner],
    image: np.ndarray,
    patch_size: list[int],
    num_classes: int,
    device: torch.device,
    step_size: float = 0.5,
    mirror_axes: tuple[int, ...] = (),
    tile_batch: int = 2,
    amp: bool = False,
    activation: str = "softmax",
) -> np.ndarray:
    """Probabilities ``(K, Z, Y, X)`` float32 for ``image`` ``(C, Z, Y, X)``: class probabilities with
    ``activation="softmax"``, independent per-channel (region) probabilities with ``"sigmoid"``.

    ``patch_size`` has 2 (2D network, slices along axis 0) or 3 entries. ``mirror_axes`` index the
    network's spatial axes (0..dim-1). ``network`` is a module (run eagerly, with autocast when ``amp``), a
    :class:`TileRunner` (which may compile it; ``amp`` is then the runner's), or a list of runners (folds:
    their probabilities are averaged). The slabs of :func:`probability_slabs`, put together.
    """
    out = np.empty((num_classes, *image.shape[1:]), dtype=np.float32)
    for a, b, slab in probability_slabs(
        network, image, patch_size, num_classes, device, step_size, mirror_axes, tile_batch, amp, activation
    ):
        out[:, a:b] = slab
    return out


def probability_slabs(
    network: torch.nn.Module | TileRunner | list[TileRunner],
    image: np.ndarray,
    patch_size: list[int],
    num_classes: int,
    device: torch.device,
    step_size: float = 0.5,
    mirror_axes: tuple[int, ...] = (),
    tile_batch: int = 2,
    amp: bool = False,
    activation: str = "softmax",
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(a, b, probabilities[:, a:b])`` (float32, host memory) for consecutive slabs ``[a, b)`` of
    axis 0 that together cover the volume, in order. Arguments as :func:`predict_sliding_window`.

    Tiles are visited in order along axis 0 and their weighted sums kept in a window only as deep as the
    tiles of one batch reach (a patch deep for a 3D network): once no tile still to come touches a slice, it
    is divided by its weights and handed out. So the device holds a window, never the whole volume's sums.
    With several runners (folds), each batch of tiles goes through every runner before the next, so fold
    ensembling needs no per-fold result either. When a runner may compile, the last batch of tiles is topped
    up with repeats to ``tile_batch``, so a compiled network never sees a new shape.
    """
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1] (tiles must overlap or touch), got {step_size}")
    if isinstance(network, list):
        runners = network
    elif isinstance(network, TileRunner):
        runners = [network]
    else:
        runners = [TileRunner(network, device, "off", amp)]
    dim = len(patch_size)
    patch3 = [1] + list(patch_size) if dim == 2 else list(patch_size)
    spatial = image.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch3, spatial)]
    pad_before = [p // 2 for p in pad]
    if any(pad):
        image = np.pad(image, [(0, 0)] + [(b, p - b) for b, p in zip(pad_before, pad)], mode="constant")
    shape = image.shape[1:]
    starts = [tile_starts(s, p, step_size) for s, p in zip(shape, patch3)]
    tiles = list(itertools.product(*starts))  # axis 0 outermost: starts along axis 0 never decrease
    chunks = [tiles[i : i + tile_batch] for i in range(0, len(tiles), tile_batch)]
    depth = min(shape[0], max(c[-1][0] - c[0][0] for c in chunks) + patch3[0])
    acc, norm = _accumulators(num_classes, (depth, *shape[1:]), device)
    weight = torch.from_numpy(gaussian_importance(list(patch_size)).reshape(patch3)).to(acc.device)
    yx = tuple(slice(b, b + s) for b, s in zip(pad_before[1:], spatial[1:]))
    img_t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for runner in runners:
        runner.expect(len(chunks) * len(flips))
    pad_batch = any(r.mode != "off" for r in runners)
    lo = 0  # axis-0 index of the window's first slice; every slice before it has been handed out
    try:
        for ci, chunk in enumerate(chunks):
            with torch.inference_mode():  # not held across the yield: the caller's code runs as usual
                fill_to = tile_batch if pad_batch else 0
                _accumulate_batch(
                    runners,
                    img_t,
                    chunk,
                    patch3,
                    dim,
                    flips,
                    fill_to,
                    activation,
                    acc,
                    norm,
                    weight,
                    lo,
                    device,
                )
                # slices before the next tile's start are final: out of the window
                done = chunks[ci + 1][0][0] if ci + 1 < len(chunks) else shape[0]
                if done <= lo:
                    continue
                n = done - lo
                a, b = max(lo, pad_before[0]), min(done, pad_before[0] + spatial[0])
                slab = None
                if b > a:
                    w = slice(a - lo, b - lo)
                    slab = (acc[:, w] / norm[w])[(slice(None), slice(None)) + yx].cpu().numpy()
                keep = depth - n
                if keep > 0:
                    acc[:, :keep] = acc[:, n:].clone()
                    norm[:keep] = norm[n:].clone()
                acc[:, max(keep, 0) :] = 0
                norm[max(keep, 0) :] = 0
                lo = done
            if slab is not None:
                yield a - pad_before[0], b - pad_before[0], slab
    finally:  # the memory CPU passes kept for each other goes back once the window is done (or abandoned)
        HEAP.release()


def _accumulate_batch(
    runners: list[TileRunner],
    img_t: torch.Tensor,
    chunk: list[tuple[int, ...]],
    patch3: list[int],
    dim: int,
    flips: list[tuple[int, ...]],
    fill_to: int,
    activation: str,
    acc: torch.Tensor,
    norm: torch.Tensor,
    weight: torch.Tensor,
    lo: int,
    device: torch.device,
) -> None:
    """Run one batch of tiles (topped up with repeats to ``fill_to`` tiles) through every runner, each with
    every flip, and add the Gaussian-weighted probabilities, averaged over runners and flips, into the window
    ``acc``/``norm`` whose first slice is ``lo`` along axis 0."""
    sls = [tuple(slice(s, s + p) for s, p in zip(t, patch3)) for t in chunk]
    fill = [sls[-1]] * max(0, fill_to - len(sls))
    x = torch.stack([img_t[(slice(None),) + sl] for sl in sls + fill]).to(device)
    if dim == 2:
        x = x[:, :, 0]
    for runner in runners:
        probs = None
        for flip in flips:
            axes = [a + 2 for a in flip]
            logits = runner(torch.flip(x, axes) if axes else x).float()
            p = torch.softmax(logits, dim=1) if activation == "softmax" else torch.sigmoid(logits)
            p = torch.flip(p, axes) if axes else p
            probs = p if probs is None else probs + p
        probs = probs[: len(sls)] / (len(flips) * len(runners))
        if dim == 2:
            probs = probs[:, :, None]
        probs = probs.to(acc.device)
        for b, sl in enumerate(sls):
            acc[(slice(None), slice(sl[0].start - lo, sl[0].stop - lo)) + sl[1:]] += probs[b] * weight
    for sl in sls:
        norm[(slice(sl[0].start - lo, sl[0].stop - lo),) + sl[1:]] += weight
