"""Per-case preprocessing (crop → normalize → transpose → resample) and the resumable dataset pipeline.

The same :func:`preprocess_image` serves training (with a label) and inference (without), so the network
always sees data prepared the same way. Outputs per case, in ``WORK/preprocessed/<data_identifier>/``:

- ``<case>.npy``      image ``(C, Z', Y', X')`` float32 in the transposed, resampled grid (memory-mappable)
- ``<case>_seg.npy``  label ``(Z', Y', X')`` uint8 (training only)
- ``<case>_fg.npz``   per foreground label value ``label_<v>``: ``(N, 3)`` int32 voxel coordinates, a seeded
                      sample used for foreground oversampling
- ``<case>.json``     :class:`CaseProperties`, written last: its presence marks the case as finished
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.atomic import remove_stale_temporaries
from autoseg.errors import AutosegError, DatasetError, PlansError
from autoseg.io.dataset import Case, DatasetSpec, check_case_geometry, load_label
from autoseg.io.volume import Geometry, read_channels
from autoseg.jsonio import read_json, save_npy, save_npz, write_json
from autoseg.planning.plans import Configuration, Plans
from autoseg.preprocessing.crop import crop_to_nonzero
from autoseg.preprocessing.normalize import background_values, normalize
from autoseg.preprocessing.resample import new_shape, resample_image, resample_label

MAX_FG_LOCATIONS = 10_000
_log = logging.getLogger("autoseg")


@dataclass(frozen=True)
class CaseProperties:
    """What is needed to map a preprocessed case back to its original image."""

    case_id: str
    geometry: Geometry  # of the image in the plans' orientation (what was cropped and resampled)
    source_geometry: Geometry  # of the image as stored in its file (what outputs are written with)
    bbox: list[list[int]]  # nonzero crop in the reoriented (z, y, x) array, half-open
    spacing_transposed: list[float]  # original spacing in the transposed order
    shape_resampled: list[int]  # shape after resampling (transposed order)
    background: list[float] | None = None  # per channel: the normalised value outside the body (or None)

    def to_json(self) -> dict:
        out = {
            "case_id": self.case_id,
            "geometry": self.geometry.to_json(),
            "source_geometry": self.source_geometry.to_json(),
            "bbox": self.bbox,
            "spacing_transposed": self.spacing_transposed,
            "shape_resampled": self.shape_resampled,
        }
        if self.background is not None:
            out["background"] = self.background
        return out

    @classmethod
    def from_json(cls, d: dict) -> CaseProperties:
        return cls(
            case_id=d["case_id"],
            geometry=Geometry.from_json(d["geometry"]),
            source_geometry=Geometry.from_json(d["source_geometry"]),
            bbox=[list(b) for b in d["bbox"]],
            spacing_transposed=[float(v) for v in d["spacing_transposed"]],
            shape_resampled=[int(v) for v in d["shape_resampled"]],
            background=None if d.get("background") is None else [float(v) for v in d["background"]],
        )


def spacing_outside_training(
    spacing_mm: tuple[float, ...] | list[float], training_spacings_mm, factor: float = 2.0
) -> str | None:
    """Why a case's spacing is far outside the training range, or None if it is not.

    ``spacing_mm`` and each row of ``training_spacings_mm`` (``(N, 3)``, e.g. ``Fingerprint.spacings``) are in
    the same array order (the plans' orientation, before transposing). An axis counts as outside when its
    spacing is below ``min / factor`` or above ``max * factor`` of the training cases on that axis. Meant for
    a warning at prediction time: resampling still works, but the network never saw such anatomy sizes."""
    train = np.asarray(training_spacings_mm, dtype=float).reshape(-1, len(spacing_mm))
    if train.size == 0:
        return None
    low, high = train.min(axis=0), train.max(axis=0)
    out = [
        f"axis {a}: {s:.3g} mm vs {lo:.3g}-{hi:.3g} mm"
        for a, (s, lo, hi) in enumerate(zip(spacing_mm, low, high))
        if s < lo / factor or s > hi * factor
    ]
    if not out:
        return None
    return f"spacing far outside the training range (more than {factor:g}x; {'; '.join(out)})"


def memory_bytes(device=None) -> int:
    """Total memory of ``device`` (a torch device; CPU when None): the GPU's, or this machine's RAM; 0 if
    unknown."""
    import os

    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _check_resampled_size(out_shape, channels: int, case_id: str, spacing_t, target) -> None:
    """Refuse, before allocating, a resampled image larger than this machine's memory (a plan spacing far
    finer than the image's)."""
    need = 4 * channels * int(np.prod([int(s) for s in out_shape], dtype=object))
    have = memory_bytes()
    if have and need > have:
        raise DatasetError(
            f"{case_id}: resampling from spacing {_mm(spacing_t)} mm to the plans' {_mm(target)} mm gives shape "
            f"{[int(s) for s in out_shape]} ({need / 2**30:.1f} GiB), more than this machine's "
            f"{have / 2**30:.1f} GiB of memory"
        )


def _mm(values) -> str:
    return "x".join(f"{v:.4g}" for v in values)


def check_finite(image: np.ndarray, files, case_id: str, stage: str, plans: Plans | None = None) -> None:
    """Raise :class:`DatasetError` naming the channel's file if ``image`` ``(C, ...)`` holds NaN or Inf."""
    for c in range(image.shape[0]):
        finite = np.isfinite(image[c])
        if finite.all():
            continue
        where = files[c] if c < len(files) else (files[0] if files else f"case '{case_id}'")
        scheme = plans.normalization[c].scheme if plans is not None and c < len(plans.normalization) else "?"
        raise DatasetError(
            f"{where}: {int((~finite).sum())} voxel(s) are NaN/Inf once {stage} (normalisation '{scheme}'); "
            "intensities must be finite 32-bit floats (|value| <= 3.4e38) whose normalisation stays finite"
        )


def preprocess_image(
    image: np.ndarray,
    geometry: Geometry,
    source_geometry: Geometry,
    plans: Plans,
    config: Configuration,
    label: np.ndarray | None = None,
    case_id: str = "",
    resample_device: str | None = None,
    files: tuple[Path, ...] | list[Path] = (),
) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """Crop, normalize, transpose and resample one case. ``image`` is ``(C, Z, Y, X)`` as returned by
    :func:`read_channels` (already in the plans' orientation, with ``geometry``).

    ``resample_device`` (``cpu``, ``cuda``) resamples with the torch implementation on that device (same
    results as scipy to float32 rounding, faster for images); ``None`` uses scipy. A normalised or resampled
    channel that is not finite everywhere raises :class:`DatasetError` naming its file (``files``, one per
    channel, else the case id): the network must never see NaN."""
    image, label, mask, bbox = crop_to_nonzero(image, label)
    image = normalize(image, plans.normalization, mask)
    check_finite(image, files, case_id, "normalised", plans)
    background = background_values(image, mask, plans.normalization)
    tf = plans.transpose_forward
    image = image.transpose([0] + [a + 1 for a in tf])
    spacing_t = [geometry.spacing_mm[a] for a in tf]
    target = config.spacing
    out_shape = new_shape(image.shape[1:], spacing_t, target)
    _check_resampled_size(out_shape, image.shape[0], case_id, spacing_t, target)
    if resample_device is None:
        image = resample_image(np.ascontiguousarray(image), spacing_t, target, out_shape)
    else:
        from autoseg.preprocessing import resample_torch

        image = resample_torch.resample_image(image, spacing_t, target, out_shape, device=resample_device)
    if label is not None:
        label = np.ascontiguousarray(label.transpose(tf))
        if resample_device is None:
            label = resample_label(label, spacing_t, target, out_shape)
        else:
            from autoseg.preprocessing import resample_torch

            label = resample_torch.resample_label(label, spacing_t, target, out_shape, device=resample_device)
    check_finite(image, files, case_id, "normalised and resampled", plans)
    props = CaseProperties(
        case_id=case_id,
        geometry=geometry,
        source_geometry=source_geometry,
        bbox=[list(b) for b in bbox],
        spacing_transposed=[float(s) for s in spacing_t],
        shape_resampled=[int(s) for s in out_shape],
        background=background,
    )
    return np.ascontiguousarray(image, dtype=np.float32), label, props


def foreground_locations(label: np.ndarray, values: list[int], case_id: str) -> dict[str, np.ndarray]:
    """A seeded sample of at most ``MAX_FG_LOCATIONS`` voxel coordinates per foreground label value."""
    rng = np.random.default_rng(int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16))
    out = {}
    for v in values:
        coords = np.argwhere(label == v)
        if len(coords) > MAX_FG_LOCATIONS:
            coords = coords[np.sort(rng.choice(len(coords), MAX_FG_LOCATIONS, replace=False))]
        out[f"label_{v}"] = coords.astype(np.int32)
    return out


def case_is_done(out_dir: Path, case_id: str) -> bool:
    return (out_dir / f"{case_id}.json").is_file() and (out_dir / f"{case_id}.npy").is_file()


def preprocess_training_case(
    case: Case,
    spec: DatasetSpec,
    plans: Plans,
    config: Configuration,
    out_dir: Path,
    resample_device: str | None = None,
    fix_nonfinite: bool = False,
) -> str:
    """Preprocess one training case into ``out_dir`` (atomic writes; the JSON marker last)."""
    check_case_geometry(case)
    image, geom, source = read_channels(case.images, plans.orientation, fix_nonfinite=fix_nonfinite)
    label, _ = load_label(case.label, spec.allowed_values, plans.orientation)
    image, label, props = preprocess_image(
        image, geom, source, plans, config, label, case.case_id, resample_device, files=case.images
    )
    save_npy(out_dir / f"{case.case_id}.npy", image)
    save_npy(out_dir / f"{case.case_id}_seg.npy", label.astype(np.uint8))
    save_npz(
        out_dir / f"{case.case_id}_fg.npz",
        **foreground_locations(label, spec.foreground_values, case.case_id),
    )
    write_json(out_dir / f"{case.case_id}.json", props.to_json())
    return case.case_id


def _job(args: tuple) -> str:
    return preprocess_training_case(*args)


def preprocess_dataset(
    cases: list[Case],
    spec: DatasetSpec,
    plans: Plans,
    config: Configuration,
    out_dir: Path,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
    resample_device: str | None = None,
    fix_nonfinite: bool = False,
) -> list[str]:
    """Preprocess every case not already finished in ``out_dir`` (resumable). Returns the ids processed now.

    Temporary files (:mod:`autoseg.atomic`'s names, from the atomic writes of ``autoseg.jsonio``) left by a killed run are
    deleted first; so two runs must not write into the same ``out_dir`` at once.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # a killed worker never renamed them; the case they belonged to has no marker and is redone below
    remove_stale_temporaries(out_dir)
    todo = [c for c in cases if not case_is_done(out_dir, c.case_id)]
    for c in cases:
        if c not in todo and progress:
            progress(c.case_id)
    done: list[str] = []
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(_job, (c, spec, plans, config, out_dir, resample_device, fix_nonfinite))
                for c in todo
            ]
            try:
                for fut in as_completed(futures):
                    done.append(fut.result())
                    if progress:
                        progress(done[-1])
            except BaseException:
                # a refused case: start no other (the pool still waits for those already running)
                for fut in futures:
                    fut.cancel()
                raise
    else:
        for c in todo:
            done.append(_job((c, spec, plans, config, out_dir, resample_device, fix_nonfinite)))
            if progress:
                progress(done[-1])
    return done


def load_case_properties(out_dir: Path, case_id: str) -> CaseProperties:
    path = out_dir / f"{case_id}.json"
    try:
        return CaseProperties.from_json(read_json(path, expect=dict))
    except AutosegError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PlansError(
            f"{path}: invalid preprocessed case properties ({type(exc).__name__}: {exc}); run 'autoseg plan' "
            "with --clean to preprocess again"
        ) from None
