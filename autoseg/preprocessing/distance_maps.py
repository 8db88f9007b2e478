"""Signed distance maps stored beside each preprocessed case, for the boundary loss.

Files, in ``WORK/preprocessed/<data_identifier>/distance_maps/``, beside the cases (a folder of their own, so
nothing that lists a configuration's cases by ``<case>.json`` / ``<case>.npy`` ever takes a map for a case):

- ``<case>.npy``   ``(C, Z', Y', X')`` float16: :func:`autoseg.distance.signed_distance` of each foreground
                   class ``1 .. K-1`` (softmax plans) or region (region-based plans) over the whole case's
                   label ``../<case>_seg.npy``, in voxels of the configuration's spacing (the unit the loss
                   has always used). float16 holds the distances to 1/2048 of their value (0.5 voxel at 1000).
- ``<case>.json``  :class:`MapInfo`: the channels, the ignore label and the largest distance per channel;
                   written after the ``.npy``, so its presence marks a finished map.

They are made at the start of a training run whose loss includes ``boundary`` (:func:`ensure_distance_maps`),
for every case of the folder at once, so the later runs and folds on that configuration reuse them; a map is
made again when a file is missing or unreadable, when it was made for other channels, or when the label file
is newer than it (a case preprocessed again). Nothing here imports torch: the batch workers read the maps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.distance import label_distance_maps
from autoseg.errors import AutosegError
from autoseg.jsonio import read_json, save_npy, write_json
from autoseg.planning.plans import Plans

SCHEMA_VERSION = 1
FOLDER = "distance_maps"
_log = logging.getLogger("autoseg")


def map_file(data_dir: Path, case_id: str) -> Path:
    return Path(data_dir) / FOLDER / f"{case_id}.npy"


def info_file(data_dir: Path, case_id: str) -> Path:
    return Path(data_dir) / FOLDER / f"{case_id}.json"


def map_channels(plans: Plans) -> list[list[int]]:
    """The structures the maps are made of, in the order of the loss's foreground channels: the regions of a
    region-based plan, else each foreground class ``[1], [2], ...``."""
    if plans.region_based:
        return plans.training_regions
    return [[c] for c in range(1, plans.num_classes)]


@dataclass(frozen=True)
class MapInfo:
    """What a stored map was made from (``distance_maps/<case>.json``)."""

    channels: list[list[int]]
    ignore_label: int | None
    max_voxels: list[float]
    """The largest distance per channel; 0 for a structure absent from the case (its map is all zeros)."""

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "unit": "voxel",
            "channels": self.channels,
            "ignore_label": self.ignore_label,
            "max_voxels": self.max_voxels,
        }

    @classmethod
    def read(cls, path: Path) -> MapInfo:
        d = read_json(path, expect=dict)
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"schema_version {d.get('schema_version')!r}, not {SCHEMA_VERSION}")
        return cls(
            channels=[[int(v) for v in c] for c in d["channels"]],
            ignore_label=None if d["ignore_label"] is None else int(d["ignore_label"]),
            max_voxels=[float(v) for v in d["max_voxels"]],
        )


def write_case_maps(
    data_dir: Path, case_id: str, channels: list[list[int]], ignore_label: int | None
) -> MapInfo:
    """Compute the case's maps from its whole label and store them (atomic writes, the JSON last). A label
    that cannot be read or a folder that cannot be written is refused in one line naming the file."""
    seg = Path(data_dir) / f"{case_id}_seg.npy"
    try:
        label = np.load(seg, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise AutosegError(
            f"{seg}: cannot read the label to make its distance map ({type(exc).__name__}: {exc}); run "
            "'autoseg plan' with --clean to preprocess again"
        ) from None
    maps = label_distance_maps(label, channels, ignore_label).astype(np.float16)
    info = MapInfo([list(c) for c in channels], ignore_label, [float(m.max()) for m in maps])
    try:
        save_npy(map_file(data_dir, case_id), maps)
        write_json(info_file(data_dir, case_id), info.to_json())
    except PermissionError as exc:
        raise AutosegError(f"{map_file(data_dir, case_id)}: cannot write the distance map ({exc})") from None
    return info


def _open(data_dir: Path, case_id: str) -> tuple[np.ndarray, MapInfo]:
    """The stored maps (memory-mapped) and their :class:`MapInfo`; ``ValueError`` saying what is wrong."""
    try:
        info = MapInfo.read(info_file(data_dir, case_id))
        maps = np.load(map_file(data_dir, case_id), mmap_mode="r", allow_pickle=False)
        seg_shape = np.load(Path(data_dir) / f"{case_id}_seg.npy", mmap_mode="r").shape
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    want = (len(info.channels),) + tuple(seg_shape)
    if maps.dtype != np.float16 or maps.shape != want:
        raise ValueError(f"shape {maps.shape} {maps.dtype}, not {want} float16 as its label")
    return maps, info


def open_case_maps(data_dir: Path, case_id: str) -> tuple[np.ndarray, MapInfo]:
    """The stored maps ``(C, *spatial)`` float16 (memory-mapped) and what they were made from; an unreadable
    file is refused in one line naming it (:class:`AutosegError`)."""
    try:
        return _open(data_dir, case_id)
    except ValueError as exc:
        raise AutosegError(
            f"{map_file(data_dir, case_id)}: unreadable distance map ({exc}); start the training run again "
            "to make it anew"
        ) from None


def stale_reason(
    data_dir: Path, case_id: str, channels: list[list[int]], ignore_label: int | None
) -> str | None:
    """Why the case's stored maps must be made (again), or None when they are current."""
    path, seg = map_file(data_dir, case_id), Path(data_dir) / f"{case_id}_seg.npy"
    if not path.is_file() or not info_file(data_dir, case_id).is_file():
        return "missing"
    if path.stat().st_mtime_ns < seg.stat().st_mtime_ns:
        return f"older than {seg.name}"
    try:
        _, info = _open(data_dir, case_id)
    except ValueError as exc:
        return f"unreadable ({exc})"
    if info.channels != [list(c) for c in channels] or info.ignore_label != ignore_label:
        return f"made for channels {info.channels} (ignore label {info.ignore_label}), not {channels}"
    return None


@dataclass(frozen=True)
class MapReport:
    made: list[str]
    """The cases whose maps were made now."""
    seconds: float


def ensure_distance_maps(
    data_dir: Path, case_ids: list[str], channels: list[list[int]], ignore_label: int | None
) -> MapReport:
    """Make the maps of every case in ``case_ids`` that has none current (:func:`stale_reason`); logs the
    cases remade for a reason other than a first run, and what it cost."""
    t0 = time.perf_counter()
    made = []
    for case_id in case_ids:
        reason = stale_reason(data_dir, case_id, channels, ignore_label)
        if reason is None:
            continue
        if reason != "missing":
            _log.warning("%s: distance map %s; making it again", map_file(data_dir, case_id), reason)
        write_case_maps(data_dir, case_id, channels, ignore_label)
        made.append(case_id)
    seconds = time.perf_counter() - t0
    if made:
        _log.info(
            "boundary loss: signed distance maps of %d case(s) made in %.1f s (%s)",
            len(made), seconds, Path(data_dir) / FOLDER,
        )  # fmt: skip
    return MapReport(made, seconds)


def crop_maps(maps: np.ndarray, start: list[int], size: list[int], bounded: list[bool]) -> np.ndarray:
    """``maps[:, start:start + size]`` of ``(C, *spatial)`` maps as float32, extended beyond the image
    with positive distances: at a voxel ``t`` voxels outside, whose nearest image voxel has distance ``d``,
    ``sqrt(max(d, 0)^2 + t^2)`` (a lower bound of the distance to the structure, exact where the nearest
    image voxel belongs to it). Channels not ``bounded`` (a structure absent from the case: all zeros) stay 0.
    """
    spatial = maps.shape[1:]
    lo = [min(max(s, 0), d - 1) for s, d in zip(start, spatial)]
    hi = [min(max(s + n, a + 1), d) for s, n, d, a in zip(start, size, spatial, lo)]
    pads = [(a - s, s + n - b) for s, n, a, b in zip(start, size, lo, hi)]
    box = (slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))
    keep = np.asarray(bounded, dtype=bool)
    if any(p < 0 for pad in pads for p in pad):
        return _away_from_image(maps, box, start, size, lo, hi, keep)
    if not any(p for pad in pads for p in pad):
        return np.ascontiguousarray(maps[box], dtype=np.float32)  # inside the image: the stored values
    out = _edge_padded(maps, box, pads, size)
    t = [
        (np.arange(n) - np.clip(np.arange(n), b, n - a - 1)).astype(np.float32) ** 2
        for (b, a), n in zip(pads, size)
    ]
    for k, ((before, after), n) in enumerate(zip(pads, size)):
        for part in (slice(0, before), slice(n - after, n)):
            if part.start == part.stop:
                continue
            # the voxels past the image along axis k and not along an earlier axis (done there): each once
            region = tuple(
                part if j == k else slice(b, m - a) if j < k else slice(None)
                for j, ((b, a), m) in enumerate(zip(pads, size))
            )
            t2 = sum(
                t[j][region[j]].reshape([-1 if i == j else 1 for i in range(len(size))])
                for j in range(len(size))
            )
            view = out[(slice(None),) + region]
            view[...] = np.sqrt(np.maximum(view, 0) ** 2 + t2)
            view[~keep] = 0
    return out


def _away_from_image(maps, box, start, size, lo, hi, keep) -> np.ndarray:
    """:func:`crop_maps` of a window that misses the image along some axis (its nearest image voxels)."""
    near = [np.clip(np.arange(s, s + n), a, b - 1) - a for s, n, a, b in zip(start, size, lo, hi)]
    out = np.asarray(maps[box], dtype=np.float32)[(slice(None),) + np.ix_(*near)]
    t2 = np.zeros(size, dtype=np.float32)
    for k, (s, n, a, b) in enumerate(zip(start, size, lo, hi)):
        w = np.arange(s, s + n)
        t2 += ((w - np.clip(w, a, b - 1)).astype(np.float32) ** 2).reshape(
            [-1 if j == k else 1 for j in range(len(size))]
        )
    return np.where(keep.reshape((-1,) + (1,) * len(size)), np.sqrt(np.maximum(out, 0) ** 2 + t2), 0).astype(
        np.float32
    )


def _edge_padded(maps: np.ndarray, box: tuple, pads: list[tuple[int, int]], size: list[int]) -> np.ndarray:
    """``maps[box]`` as float32, padded by ``pads`` (before, after per spatial axis) with its edge values,
    written into one array (``np.pad`` copies the whole patch once more)."""
    out = np.empty((maps.shape[0],) + tuple(size), dtype=np.float32)
    inner = tuple(slice(before, n - after) for (before, after), n in zip(pads, size))
    out[(slice(None),) + inner] = maps[box]
    for k, ((before, after), n) in enumerate(zip(pads, size)):  # axis by axis: corners come out right
        lead = (slice(None),) * (k + 1)
        if before:
            out[lead + (slice(0, before),)] = out[lead + (slice(before, before + 1),)]
        if after:
            out[lead + (slice(n - after, n),)] = out[lead + (slice(n - after - 1, n - after),)]
    return out
