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
from autoseg.inference.uncertainty import member_entropy

_log = logging.getLogger("autoseg")

BACKGROUND_TOLERANCE = 1e-4
"""A voxel is background when every channel is within this (times max(1, |background|)) of its background
value: resampling a constant region leaves float rounding, never more."""


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
    span = size - patch
    # at most one tile per start: a 2D network's patch is 1 deep along axis 0, where steps of step_size * 1
    # voxel would otherwise put two tiles on the same slice (every slice predicted twice at step 0.5)
    n = min(int(math.ceil(span / (patch * step_size))) + 1, span + 1)
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
    member_entropy: bool = False,
    background: list[float] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Probabilities ``(K, Z, Y, X)`` float32 for ``image`` ``(C, Z, Y, X)``: class probabilities with
    ``activation="softmax"``, independent per-channel (region) probabilities with ``"sigmoid"``.

    ``patch_size`` has 2 (2D network, slices along axis 0) or 3 entries. ``mirror_axes`` index the
    network's spatial axes (0..dim-1). ``network`` is a module (run eagerly, with autocast when ``amp``), a
    :class:`TileRunner` (which may compile it; ``amp`` is then the runner's), or a list of runners (folds:
    their probabilities are averaged). The slabs of :func:`probability_slabs`, put together; with
    ``member_entropy`` a pair: the probabilities and the members' mean entropy ``(Z, Y, X)``.

    ``background`` (one value per channel, e.g. :attr:`CaseProperties.background`): tiles in which every
    channel holds only its background value (within :data:`BACKGROUND_TOLERANCE`) are not run; voxels that
    only such tiles cover are background (class 0 probability 1; every region 0). None: every tile runs.
    """
    out = np.empty((num_classes, *image.shape[1:]), dtype=np.float32)
    ent = np.empty(image.shape[1:], dtype=np.float32) if member_entropy else None
    args = (
        network,
        image,
        patch_size,
        num_classes,
        device,
        step_size,
        mirror_axes,
        tile_batch,
        amp,
        activation,
    )
    for a, b, slab, *rest in probability_slabs(*args, member_entropy=member_entropy, background=background):
        out[:, a:b] = slab
        if ent is not None:
            ent[a:b] = rest[0]
    return (out, ent) if member_entropy else out


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
    member_entropy: bool = False,
    background: list[float] | None = None,
) -> Iterator[tuple]:
    """Yield ``(a, b, probabilities[:, a:b])`` (float32, host memory) for consecutive slabs ``[a, b)`` of
    axis 0 that together cover the volume, in order. Arguments as :func:`predict_sliding_window`.

    Tiles are visited in order along axis 0 and their weighted sums kept in a window only as deep as the
    tiles of one batch reach (a patch deep for a 3D network): once no tile still to come touches a slice, it
    is divided by its weights and handed out. So the device holds a window, never the whole volume's sums.
    With several runners (folds), each batch of tiles goes through every runner before the next, so fold
    ensembling needs no per-fold result either. When a runner may compile, the last batch of tiles is topped
    up with repeats to ``tile_batch``, so a compiled network never sees a new shape.

    With ``member_entropy``, yields ``(a, b, probabilities, entropy)``: ``entropy[a:b]`` is the mean over the
    members (runners × flips, Gaussian-weighted over tiles like the probabilities) of each member's own
    normalised entropy (:func:`autoseg.inference.uncertainty.member_entropy`): one scalar per voxel more.
    """
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1] (tiles must overlap or touch), got {step_size}")
    runners = _as_runners(network, device, amp)
    grid = _TileGrid(image, patch_size, step_size, tile_batch, background)
    window = _Window(num_classes, grid.window_shape, device, member_entropy, activation == "softmax")
    weight = torch.from_numpy(gaussian_importance(list(patch_size)).reshape(grid.patch3)).to(window.device)
    img_t = torch.from_numpy(np.ascontiguousarray(grid.image, dtype=np.float32))
    flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    for runner in runners:
        runner.expect(len(grid.chunks) * len(flips))
    fill_to = tile_batch if any(r.mode != "off" for r in runners) else 0
    batch = _Batch(runners, grid.patch3, len(patch_size), flips, fill_to, activation, weight, device)
    try:
        for ci, chunk in enumerate(grid.chunks):
            with torch.inference_mode():  # not held across the yield: the caller's code runs as usual
                batch.accumulate(img_t, chunk, window)
                # slices before the next tile's start are final: out of the window
                outs = window.advance(grid.done_after(ci), grid)
            yield from outs
    finally:  # the memory CPU passes kept for each other goes back once the window is done (or abandoned)
        HEAP.release()


def _as_runners(network, device: torch.device, amp: bool) -> list[TileRunner]:
    """A list of runners: ``network`` itself (a list), a module wrapped in an eager :class:`TileRunner`, or
    one runner (a :class:`TileRunner` or another ``tiles -> logits`` callable with ``mode`` and ``expect``,
    e.g. :class:`autoseg.inference.backends.OnnxRuntimeRunner`)."""
    if isinstance(network, list):
        return network
    if isinstance(network, torch.nn.Module):
        return [TileRunner(network, device, "off", amp)]
    return [network]


class _TileGrid:
    """The tiles of an image (padded with 0 to at least the patch), in batches of ``tile_batch`` with axis 0
    outermost, and the depth of the window that one batch of tiles spans."""

    def __init__(
        self,
        image: np.ndarray,
        patch_size: list[int],
        step_size: float,
        tile_batch: int,
        background: list[float] | None = None,
    ):
        self.patch3 = [1] + list(patch_size) if len(patch_size) == 2 else list(patch_size)
        self.spatial = image.shape[1:]
        pad = [max(0, p - s) for p, s in zip(self.patch3, self.spatial)]
        self.pad_before = [p // 2 for p in pad]
        self.widths = [(b, p - b) for b, p in zip(self.pad_before, pad)]
        body = _body(image, background)  # before padding: the 0 padding is no image content either
        if any(pad):
            image = np.pad(
                image, [(0, 0)] + [(b, p - b) for b, p in zip(self.pad_before, pad)], mode="constant"
            )
        self.image = image
        self.shape = image.shape[1:]
        starts = [tile_starts(s, p, step_size) for s, p in zip(self.shape, self.patch3)]
        tiles = list(itertools.product(*starts))  # axis 0 outermost: starts along axis 0 never decrease
        self.total = len(tiles)
        tiles = self._with_content(tiles, body)
        self.skipped = self.total - len(tiles)
        self.chunks = [tiles[i : i + tile_batch] for i in range(0, len(tiles), tile_batch)]
        depth = min(self.shape[0], max(c[-1][0] - c[0][0] for c in self.chunks) + self.patch3[0])
        self.window_shape = (depth, *self.shape[1:])
        self.yx = tuple(slice(b, b + s) for b, s in zip(self.pad_before[1:], self.spatial[1:]))

    def _with_content(self, tiles: list[tuple[int, ...]], body: np.ndarray | None) -> list[tuple[int, ...]]:
        """The tiles that reach ``body`` (all of them when it is None; at least the first tile, so a blank
        image has one)."""
        if body is None:
            return tiles
        body = np.pad(body, self.widths, constant_values=False) if any(sum(w) for w in self.widths) else body
        keep = [t for t in tiles if body[tuple(slice(s, s + p) for s, p in zip(t, self.patch3))].any()]
        return keep or tiles[:1]

    def done_after(self, ci: int) -> int:
        """Slices before this index along axis 0 are final once batch ``ci`` is summed."""
        return self.chunks[ci + 1][0][0] if ci + 1 < len(self.chunks) else self.shape[0]


def _body(image: np.ndarray, background: list[float] | None) -> np.ndarray | None:
    """Voxels ``(Z, Y, X)`` where some channel of ``image`` differs from its ``background`` value (beyond
    :data:`BACKGROUND_TOLERANCE`); None without one background value per channel."""
    if background is None or len(background) != image.shape[0]:
        return None
    body = np.zeros(image.shape[1:], dtype=bool)
    for c, value in enumerate(background):
        body |= np.abs(image[c] - np.float32(value)) > BACKGROUND_TOLERANCE * max(1.0, abs(value))
    return body


class _Window:
    """The weighted sums of a window of axis-0 slices (probabilities, weights and, when asked, the members'
    entropy) starting at slice ``lo``; every slice before ``lo`` has been handed out."""

    def __init__(
        self,
        num_classes: int,
        shape: tuple[int, ...],
        device: torch.device,
        member_entropy: bool,
        softmax: bool = True,
    ):
        self.acc, self.norm = _accumulators(num_classes + int(member_entropy), shape, device)
        self.softmax = softmax
        self.member_entropy = member_entropy
        self.device = self.acc.device
        self.depth = shape[0]
        self.lo = 0

    @property
    def probs(self) -> torch.Tensor:
        return self.acc[:-1] if self.member_entropy else self.acc

    @property
    def entropy(self) -> torch.Tensor | None:
        return self.acc[-1] if self.member_entropy else None

    def advance(self, done: int, grid: _TileGrid) -> list[tuple]:
        """Hand out the slices ``[lo, done)`` (cropped to the image), in pieces at most the window deep (after
        skipped tiles the next tile to run may start further on than the window reaches), and move the window
        on to start at ``done``."""
        outs = []
        while self.lo < done:
            out = self._advance_to(min(done, self.lo + self.depth), grid)
            if out is not None:
                outs.append(out)
        return outs

    def _advance_to(self, done: int, grid: _TileGrid) -> tuple | None:
        """Hand out the slices ``[lo, done)`` (``done - lo`` at most the depth; cropped to the image, None
        when that leaves nothing) and move the window on to start at ``done``."""
        lo = self.lo
        if done <= lo:
            return None
        n = done - lo
        a, b = max(lo, grid.pad_before[0]), min(done, grid.pad_before[0] + grid.spatial[0])
        out = None
        if b > a:
            w = slice(a - lo, b - lo)
            sums = self._finish(w, grid)
            start, stop = a - grid.pad_before[0], b - grid.pad_before[0]
            out = (start, stop, sums[:-1], sums[-1]) if self.member_entropy else (start, stop, sums)
        keep = self.depth - n
        if keep > 0:
            self.acc[:, :keep] = self.acc[:, n:].clone()
            self.norm[:keep] = self.norm[n:].clone()
        self.acc[:, max(keep, 0) :] = 0
        self.norm[max(keep, 0) :] = 0
        self.lo = done
        return out

    def _finish(self, w: slice, grid: _TileGrid) -> np.ndarray:
        """The sums of window slices ``w`` divided by their weights, cropped to the image. Where tiles were
        skipped, a voxel no tile covered (weight 0) is background."""
        crop = (slice(None), slice(None)) + grid.yx
        if not grid.skipped:
            return (self.acc[:, w] / self.norm[w])[crop].cpu().numpy()
        norm = self.norm[w]
        sums = self.acc[:, w] / norm.clamp_min(torch.finfo(torch.float32).tiny)
        if self.softmax:
            sums[0] += (norm == 0).to(sums.dtype)
        return sums[crop].cpu().numpy()


class _Batch:
    """Runs batches of tiles through every runner with every flip and adds them into a :class:`_Window`."""

    def __init__(self, runners, patch3, dim, flips, fill_to, activation, weight, device):
        self.runners, self.patch3, self.dim, self.flips = runners, patch3, dim, flips
        self.fill_to, self.activation, self.weight, self.device = fill_to, activation, weight, device

    def accumulate(self, img_t: torch.Tensor, chunk: list[tuple[int, ...]], window: _Window) -> None:
        """Run one batch of tiles (topped up with repeats to ``fill_to`` tiles) through every runner, each
        with every flip, and add the Gaussian-weighted probabilities, averaged over runners and flips (and
        the members' mean entropy, when the window keeps it), into ``window``."""
        sls = [tuple(slice(s, s + p) for s, p in zip(t, self.patch3)) for t in chunk]
        fill = [sls[-1]] * max(0, self.fill_to - len(sls))
        x = torch.stack([img_t[(slice(None),) + sl] for sl in sls + fill]).to(self.device)
        if self.dim == 2:
            x = x[:, :, 0]
        members = len(self.flips) * len(self.runners)
        probs, ent = self._members(x, window.member_entropy)
        probs = self._to_window(probs[: len(sls)] / members, window)
        ent = None if ent is None else self._to_window(ent[: len(sls), None] / members, window)
        lo = window.lo
        for b, sl in enumerate(sls):
            where = (slice(sl[0].start - lo, sl[0].stop - lo),) + sl[1:]
            window.probs[(slice(None),) + where] += probs[b] * self.weight
            if ent is not None:
                window.entropy[where] += ent[b, 0] * self.weight
            window.norm[where] += self.weight

    def _members(self, x: torch.Tensor, want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sums over runners and flips of the probabilities ``(B, K, ...)`` and, for a window that keeps it,
        of each member's normalised entropy ``(B, ...)``."""
        probs = ent = None
        region_based = self.activation != "softmax"
        for runner in self.runners:
            for flip in self.flips:
                axes = [a + 2 for a in flip]
                logits = runner(torch.flip(x, axes) if axes else x).float()
                p = torch.softmax(logits, dim=1) if not region_based else torch.sigmoid(logits)
                p = torch.flip(p, axes) if axes else p
                probs = p if probs is None else probs + p
                if want_entropy:
                    h = member_entropy(p, region_based)
                    ent = h if ent is None else ent + h
        return probs, ent

    def _to_window(self, t: torch.Tensor, window: _Window) -> torch.Tensor:
        return (t[:, :, None] if self.dim == 2 else t).to(window.device)
