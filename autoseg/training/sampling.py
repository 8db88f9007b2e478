"""Patch sampling from preprocessed cases with foreground oversampling.

Cases are memory-mapped (``np.load(mmap_mode='r')``), so only the patch is read. A batch of ``B`` patches
has ``round(B * oversample_foreground)`` patches (at least one when oversampling is on) centred on a random
voxel of a random foreground label present in the case; the rest are placed uniformly, allowing the patch to
reach past the border by up to half its size (padding with 0 / background) so that border voxels are seen as
often as central ones. For 2D configurations a random slice along axis 0 is taken first.

With ``distance_maps`` (a boundary loss), each patch also gets the case's stored signed distance maps
(:mod:`autoseg.preprocessing.distance_maps`) cropped at the same position, as ``"dist"``; beyond the image
they continue with positive distances (:func:`autoseg.preprocessing.distance_maps.crop_maps`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.preprocessing.distance_maps import crop_maps, open_case_maps


class CaseStore:
    """Lazy, memory-mapped access to the preprocessed cases of one data folder.

    With ``previous_dir`` (cascade), each case's previous-stage label map ``<case>.npy`` from that folder is
    stacked under the label as a second ``seg`` channel, so spatial augmentation moves it with the label.
    With ``distance_maps``, :meth:`maps` gives each case's stored signed distance maps.
    """

    def __init__(
        self,
        data_dir: Path,
        case_ids: list[str],
        previous_dir: Path | None = None,
        distance_maps: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.case_ids = list(case_ids)
        self.previous_dir = Path(previous_dir) if previous_dir is not None else None
        self.distance_maps = distance_maps
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]] = {}
        self._maps: dict[str, tuple[np.ndarray, list[bool]]] = {}

    def get(self, case_id: str) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        """``(image (C, ...), seg (S, ...), foreground locations)`` with S = 1, or 2 with a previous stage."""
        if case_id not in self._cache:
            img = np.load(self.data_dir / f"{case_id}.npy", mmap_mode="r")
            seg = np.load(self.data_dir / f"{case_id}_seg.npy", mmap_mode="r")[None]
            if self.previous_dir is not None:
                prev = np.load(self.previous_dir / f"{case_id}.npy")
                seg = np.concatenate([np.asarray(seg), prev[None].astype(seg.dtype)])
            with np.load(self.data_dir / f"{case_id}_fg.npz", allow_pickle=False) as z:
                fg = {int(k.split("_")[1]): z[k] for k in z.files}
            self._cache[case_id] = (img, seg, fg)
        return self._cache[case_id]

    def maps(self, case_id: str) -> tuple[np.ndarray, list[bool]]:
        """``(maps (C, ...) float16 memory-mapped, per channel: the structure is in the case)``; an unreadable
        map is refused in one line naming it."""
        if case_id not in self._maps:
            maps, info = open_case_maps(self.data_dir, case_id)
            self._maps[case_id] = (maps, [m > 0 for m in info.max_voxels])
        return self._maps[case_id]


def _crop_padded(arr: np.ndarray, start: list[int], size: list[int], fill: float) -> np.ndarray:
    """``arr[..., start:start+size]`` over the last ``len(size)`` axes, padding with ``fill`` outside."""
    spatial = arr.shape[-len(size) :]
    lead = arr.shape[: arr.ndim - len(size)]
    out = np.full(lead + tuple(size), fill, dtype=arr.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, spatial):
        a, b = max(s, 0), min(s + n, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    lead_sl = (slice(None),) * len(lead)
    out[lead_sl + tuple(dst)] = arr[lead_sl + tuple(src)]
    return out


class PatchSampler:
    """Draws training batches ``{"data": (B, C, *patch), "seg": (B, S, *patch)}`` as float32 / int16 arrays
    (S = 2 for a cascade: label, previous stage), with ``"dist": (B, M, *patch)`` float32 when the store has
    distance maps.

    ``patch_size`` is the size to extract (the augmentation's enlarged patch); ``dim`` is 2 or 3.
    """

    def __init__(
        self,
        store: CaseStore,
        patch_size: list[int],
        batch_size: int,
        dim: int,
        oversample_foreground: float,
        rng: np.random.Generator,
    ):
        self.store = store
        self.patch = [int(p) for p in patch_size]
        self.batch_size = batch_size
        self.dim = dim
        self.oversample = oversample_foreground
        self.rng = rng

    def n_foreground(self) -> int:
        if self.oversample <= 0:
            return 0
        return max(1, int(round(self.batch_size * self.oversample)))

    def sample_one(self, case_id: str, force_fg: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(image, seg, distance maps or None)`` of one patch of ``case_id``."""
        img, seg, fg = self.store.get(case_id)
        maps, bounded = self.store.maps(case_id) if self.store.distance_maps else (None, [])
        shape = list(seg.shape[1:])
        center = None
        if force_fg:
            present = [v for v, locs in fg.items() if len(locs)]
            if present:
                v = present[self.rng.integers(len(present))]
                locs = fg[v]
                center = [int(c) for c in locs[self.rng.integers(len(locs))]]
        if self.dim == 2:
            z = center[0] if center is not None else int(self.rng.integers(shape[0]))
            img, seg = img[:, z], seg[:, z]
            maps = None if maps is None else maps[:, z]
            shape = shape[1:]
            center = center[1:] if center is not None else None
        start = self._start(shape, center)
        return (
            _crop_padded(np.asarray(img), start, self.patch, 0.0),
            _crop_padded(np.asarray(seg), start, self.patch, 0),
            None if maps is None else crop_maps(maps, start, self.patch, bounded),
        )

    def _start(self, shape: list[int], center: list[int] | None) -> list[int]:
        """The patch's first voxel: around ``center``, else uniform (at most half a patch past a border)."""
        start = []
        for a, (n, p) in enumerate(zip(shape, self.patch)):
            lo, hi = -(p // 2), n - p + p // 2  # allow half a patch beyond either border
            if hi < lo:
                lo = hi = (n - p) // 2
            if center is not None:
                s = center[a] - p // 2
                s = int(np.clip(s, min(lo, hi), max(lo, hi)))
            else:
                s = int(self.rng.integers(lo, hi + 1))
            start.append(s)
        return start

    def next_batch(self) -> dict[str, np.ndarray]:
        ids = self.store.case_ids
        n_fg = self.n_foreground()
        data, segs, maps = [], [], []
        for b in range(self.batch_size):
            case_id = ids[int(self.rng.integers(len(ids)))]
            # the last n_fg samples of each batch are foreground-centred (as in nnU-Net)
            x, y, m = self.sample_one(case_id, force_fg=b >= self.batch_size - n_fg)
            data.append(x)
            segs.append(y)
            maps.append(m)
        batch = {"data": np.stack(data).astype(np.float32), "seg": np.stack(segs).astype(np.int16)}
        if self.store.distance_maps:
            batch["dist"] = np.stack(maps)
        return batch
