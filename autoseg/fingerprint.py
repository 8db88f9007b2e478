"""Dataset fingerprint: what the planner needs to know about a dataset, computed once.

Volumes are read in the canonical orientation (``autoseg.io.volume.CANONICAL_ORIENTATION``), so spacings
and shapes are in the array order that preprocessing and training see. Per case: spacing, shape before and
after cropping to the nonzero region, fraction kept by the crop, the orientation code as stored in the file
(before reorienting), and per foreground label its voxel count and number of connected components
(26-connectivity). Per channel: mean, std, median, min, max and 0.5/99.5 percentiles of intensities over
foreground (label > 0) voxels, pooled over cases from a seeded sample of at most ``samples_per_case`` voxels
each, so the fingerprint is deterministic.
"""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from autoseg.io.dataset import Case, DatasetSpec, check_case_geometry, load_label
from autoseg.io.volume import CANONICAL_ORIENTATION, orientation_code, read_channels
from autoseg.preprocessing.crop import crop_to_nonzero

# 2: per case ``orientation`` and ``label_components``; 3: ``structure_thickness_mm``. An older
# fingerprint.json is recomputed, not upgraded.
FINGERPRINT_SCHEMA_VERSION = 3
_log = logging.getLogger("autoseg")


@dataclass(frozen=True)
class CaseFingerprint:
    """One case. Spacings and shapes in the canonical array order ``(z, y, x)``. ``label_voxels`` and
    ``label_components`` are keyed by foreground label name (every label of dataset.json but background; 0
    when absent from the case). ``orientation`` is the file's own three-letter code (e.g. ``RAS``) before
    reorienting. The last two default to "unknown" (empty) only so that synthetic fingerprints in planner
    tests need not state them; :func:`case_fingerprint` always fills them.
    """

    case_id: str
    spacing_mm: tuple[float, ...]
    shape_before_crop: tuple[int, ...]
    shape_after_crop: tuple[int, ...]
    crop_fraction_kept: float
    label_voxels: dict[str, int]
    label_components: dict[str, int] = field(default_factory=dict)
    orientation: str = ""
    structure_thickness_mm: dict[str, float] = field(default_factory=dict)
    """Typical thickness of each foreground label (and region, keyed by the region's name) in this case, mm:
    see :func:`structure_thickness`; 0 where the structure is absent. The time-budget planner keeps a few
    voxels across it."""


@dataclass(frozen=True)
class IntensityStats:
    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class Fingerprint:
    schema_version: int
    dataset_hash: str
    cases: list[CaseFingerprint]
    intensity: list[IntensityStats]  # one per channel

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing_mm for c in self.cases], dtype=float)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        return np.array([c.shape_after_crop for c in self.cases], dtype=float)

    def structure_thickness(self, names=None) -> dict[str, float]:
        """Per structure (of ``names``, default all), the median over the cases that have it of
        :attr:`CaseFingerprint.structure_thickness_mm`."""
        found = {k for c in self.cases for k in c.structure_thickness_mm}
        out = {}
        for name in sorted(found if names is None else found & set(names)):
            present = [c.structure_thickness_mm.get(name, 0.0) for c in self.cases]
            present = [v for v in present if v > 0]
            if present:
                out[name] = float(np.median(present))
        return out

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Fingerprint:
        return cls(
            schema_version=int(d["schema_version"]),
            dataset_hash=str(d["dataset_hash"]),
            cases=[
                CaseFingerprint(
                    case_id=c["case_id"],
                    spacing_mm=tuple(c["spacing_mm"]),
                    shape_before_crop=tuple(c["shape_before_crop"]),
                    shape_after_crop=tuple(c["shape_after_crop"]),
                    crop_fraction_kept=float(c["crop_fraction_kept"]),
                    label_voxels={k: int(v) for k, v in c["label_voxels"].items()},
                    label_components={k: int(v) for k, v in c["label_components"].items()},
                    orientation=str(c["orientation"]),
                    structure_thickness_mm={
                        k: float(v) for k, v in c.get("structure_thickness_mm", {}).items()
                    },
                )
                for c in d["cases"]
            ],
            intensity=[IntensityStats(**s) for s in d["intensity"]],
        )


def dataset_hash(cases: list[Case], spec: DatasetSpec) -> str:
    """Content hash of the dataset's file list, sizes and mtimes (plus dataset.json's content)."""
    h = hashlib.sha256(repr(sorted(spec.to_json().items())).encode())
    for case in cases:
        for f in (*case.images, case.label):
            if f is None:
                continue
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def case_fingerprint(
    case: Case,
    spec: DatasetSpec,
    samples_per_case: int = 10_000,
    seed: int = 1234,
    fix_nonfinite: bool = False,
) -> tuple[CaseFingerprint, list[np.ndarray]]:
    """Fingerprint one case; also returns a seeded sample of foreground intensities per channel.

    NaN/Inf intensities raise :class:`DatasetError` naming the file, or with ``fix_nonfinite`` are replaced
    (as preprocessing will replace them, see :func:`autoseg.io.volume.replace_nonfinite`)."""
    check_case_geometry(case)
    # spacing in the canonical array order, as preprocessing will see it
    image, geom, source = read_channels(case.images, CANONICAL_ORIENTATION, fix_nonfinite=fix_nonfinite)
    label, _ = load_label(case.label, spec.allowed_values, CANONICAL_ORIENTATION)
    cropped, label_c, _, _ = crop_to_nonzero(image, label)
    fg = (label_c > 0) & (label_c != spec.ignore_label) if spec.ignore_label is not None else label_c > 0
    # a per-case seed derived from the case id keeps the sample independent of processing order
    rng = np.random.default_rng([seed, int(hashlib.sha256(case.case_id.encode()).hexdigest()[:8], 16)])
    samples = []
    for c in range(cropped.shape[0]):
        vals = cropped[c][fg]
        if vals.size > samples_per_case:
            vals = rng.choice(vals, samples_per_case, replace=False)
        samples.append(vals.astype(np.float32))
    counts = np.bincount(label.ravel().astype(np.int64), minlength=max(spec.allowed_values) + 1)
    # named labels; label values that only regions name (region-based datasets) are keyed by their value
    names = {v: str(v) for v in spec.foreground_values} | {v: k for k, v in spec.foreground_labels.items()}
    foreground = spec.foreground_values
    fp = CaseFingerprint(
        case_id=case.case_id,
        spacing_mm=tuple(float(s) for s in geom.spacing_mm),
        shape_before_crop=tuple(int(s) for s in image.shape[1:]),
        shape_after_crop=tuple(int(s) for s in cropped.shape[1:]),
        crop_fraction_kept=float(np.prod(cropped.shape[1:]) / np.prod(image.shape[1:])),
        label_voxels={names[v]: int(counts[v]) for v in foreground},
        label_components={names[v]: count_components(label == v) if counts[v] else 0 for v in foreground},
        orientation=orientation_code(source),
        structure_thickness_mm=_thicknesses(label_c, spec, names, geom.spacing_mm),
    )
    return fp, samples


def _thicknesses(label: np.ndarray, spec: DatasetSpec, names: dict[int, str], spacing) -> dict[str, float]:
    """:func:`structure_thickness` of every foreground label, and of every region by its name."""
    masks = {names[v]: label == v for v in spec.foreground_values}
    masks.update({name: np.isin(label, values) for name, values in spec.regions.items()})
    return {name: structure_thickness(mask, spacing) for name, mask in masks.items()}


def structure_thickness(mask: np.ndarray, spacing) -> float:
    """Typical thickness of a structure in mm: each connected component's thickness is the diameter of the
    largest ball inside it, and the structure's is the volume-weighted median over its components (half of
    its voxels lie in components at least this thick), so that a few one-voxel specks beside a large structure
    do not make it look thin. 0 for an empty mask.

    A component's diameter is twice the largest Euclidean distance (mm) from one of its voxels to the nearest
    voxel outside, less one voxel along the direction of that nearest outside voxel (the surface lies half a
    voxel from each): a slab 5 voxels thick measures 5 voxels across whichever axis, a line of single voxels
    one voxel; a slab of an even number n of voxels measures n - 1 (the estimate errs thin)."""
    if not mask.any():
        return 0.0
    components, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    inner = (slice(1, -1),) * mask.ndim
    distance, nearest = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing, return_indices=True)
    distance, nearest = distance[inner], nearest[(slice(None), *inner)] - 1
    deepest = ndimage.maximum_position(distance, components, np.arange(1, n + 1))
    spacing = np.asarray(spacing, dtype=float)
    diameters = np.empty(n)
    for i, at in enumerate(deepest):
        step_mm = np.abs(nearest[(slice(None), *at)] - np.asarray(at)) * spacing
        diameters[i] = 2.0 * distance[at] - spacing[int(np.argmax(step_mm))]
    voxels = np.bincount(components.ravel(), minlength=n + 1)[1:]
    order = np.argsort(diameters)
    cumulative = np.cumsum(voxels[order])
    return float(diameters[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def count_components(mask: np.ndarray) -> int:
    """Number of connected components of a boolean mask, full connectivity (26 neighbours in 3D, 8 in 2D);
    0 for an empty mask."""
    _, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return int(n)


def _stats(values: np.ndarray) -> IntensityStats:
    if values.size == 0:
        return IntensityStats(0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    v = values.astype(np.float64)
    p005, p50, p995 = np.percentile(v, [0.5, 50.0, 99.5])
    return IntensityStats(
        mean=float(v.mean()),
        std=float(v.std()),
        median=float(p50),
        min=float(v.min()),
        max=float(v.max()),
        percentile_00_5=float(p005),
        percentile_99_5=float(p995),
    )


def _case_job(args: tuple) -> tuple[CaseFingerprint, list[np.ndarray]]:
    case, spec, samples, fix_nonfinite = args
    return case_fingerprint(case, spec, samples, fix_nonfinite=fix_nonfinite)


def compute_fingerprint(
    cases: list[Case],
    spec: DatasetSpec,
    workers: int = 1,
    samples_per_case: int = 10_000,
    progress=None,
    fix_nonfinite: bool = False,
) -> Fingerprint:
    """Fingerprint all cases (in ``workers`` processes); ``progress`` is called once per finished case.

    Cases whose label map holds no foreground are allowed (they are counted with 0 voxels) and named in one
    warning on the ``autoseg`` logger."""
    jobs = [(c, spec, samples_per_case, fix_nonfinite) for c in cases]
    if workers > 1 and len(cases) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = []
            try:
                for r in pool.map(_case_job, jobs):
                    results.append(r)
                    if progress:
                        progress()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # a refused case: start no other
                raise
    else:
        results = []
        for j in jobs:
            results.append(_case_job(j))
            if progress:
                progress()
    per_case = [r[0] for r in results]
    empty = [c.case_id for c in per_case if c.label_voxels and not any(c.label_voxels.values())]
    if empty:
        _log.warning(
            "%d case(s) have no foreground label: %s (allowed; they add no foreground samples)",
            len(empty),
            ", ".join(empty),
        )
    intensity = [_stats(np.concatenate([r[1][c] for r in results])) for c in range(spec.num_channels)]
    return Fingerprint(
        schema_version=FINGERPRINT_SCHEMA_VERSION,
        dataset_hash=dataset_hash(cases, spec),
        cases=per_case,
        intensity=intensity,
    )
