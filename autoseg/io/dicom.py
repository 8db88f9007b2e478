"""DICOM series as prediction input: find the series of a folder, check their geometry, read them.

Needs the optional extra ``dicom`` (``pip install 'autoseg[dicom]'``: pydicom, highdicom); without it, a DICOM
input or output stops with one error line naming the extra.

Rules (see README, "DICOM"):

- A folder (searched recursively) is a DICOM input when it holds DICOM files (the ``DICM`` marker at byte 128)
  and no NIfTI/MHA/NRRD images. Files that are not DICOM are ignored (a note counts them); DICOM files that are
  not image slices (DICOMDIR, SEG, RT-STRUCT, SR, multi-frame objects) are ignored too.
- Slices are grouped into series by SeriesInstanceUID and ordered by their position along the slice normal
  (ImagePositionPatient projected on the cross product of the ImageOrientationPatient vectors), never by file
  name. The pixel values are read by SimpleITK's series reader (GDCM), which applies RescaleSlope/Intercept.
- A series is refused, with one line naming it and the problem, when its slices differ in orientation, size or
  pixel spacing, two slices share a position, the slices are not stacked along the normal (gantry tilt or a
  sheared stack), or the slice spacing is irregular (a missing slice: the gap is named). autoseg does not
  resample such series: a silently resampled grid would no longer match the source slices a DICOM-SEG or
  RT-STRUCT refers to.
- One-channel models: every series is a case (``<folder>`` when the folder holds one series, else
  ``<folder>_<SeriesNumber>``). Multi-channel models: a folder is one case and each channel takes the series
  whose SeriesDescription matches its rule: ``--channel 0=T1`` (else the channel's name in dataset.json); an
  exact (case-insensitive) match wins, else a unique substring match; no match or several matches is an error.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.errors import AutosegError, DatasetError
from autoseg.io.dataset import Case
from autoseg.io.volume import Geometry, _geometry_of, _quiet_itk, _short, file_ending, orientation_code

_log = logging.getLogger("autoseg")

EXTRA_HINT = "pip install 'autoseg[dicom]'"
IMAGE_STORAGE_SKIP = {"SEG", "RTSTRUCT", "SR", "RTPLAN", "RTDOSE", "PR", "KO", "REG"}
POSITION_TOLERANCE_MM = 0.01
"""Two slices closer than this along the normal are duplicates."""
SPACING_RTOL = 0.01
"""Slice gaps may differ from the median gap by this fraction (and at least 0.01 mm) before a series is refused."""
IN_PLANE_TOLERANCE = 0.1
"""How far (fraction of a pixel, at least 0.01 mm) a slice may sit off the first slice's normal line."""


def require(*modules: str, why: str = "DICOM input/output") -> None:
    """Import ``modules`` (default checks are the caller's); a missing one is one error line naming the extra."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise AutosegError(
                f"{why} needs the optional packages pydicom and highdicom ({name} is not installed): {EXTRA_HINT}"
            ) from None


def is_dicom_file(path: Path) -> bool:
    """The DICOM Part 10 marker ``DICM`` at byte 128 (cheap; no pydicom needed)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _files_under(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in sorted(files) if not f.startswith("."))
    return out


def is_dicom_input(inputs: Sequence[str | os.PathLike]) -> bool:
    """Whether the predict inputs are DICOM: folders holding DICOM files and no NIfTI/MHA/NRRD images."""
    found = False
    for p in map(Path, inputs):
        if not p.is_dir():
            if p.is_file() and is_dicom_file(p):
                raise DatasetError(f"{p}: give the folder of a DICOM series, not one of its files")
            return False
        files = _files_under(p)
        if any(file_ending(f) for f in files):
            return False
        found = found or any(is_dicom_file(f) for f in files)
    return found


@dataclass(frozen=True)
class DicomSeries:
    """One series: its slice files ordered along the normal, and what identifies it."""

    uid: str
    description: str
    number: int | None
    modality: str
    folder: Path
    files: tuple[Path, ...]
    spacing_mm: float

    def label(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        num = f" #{self.number}" if self.number is not None else ""
        return f"{self.folder}: series{num}{desc} ({self.uid})"


@dataclass(frozen=True)
class DicomCase(Case):
    """A case whose channels are DICOM series (``images`` holds each series' first slice file)."""

    series: tuple[DicomSeries, ...] = field(default=())


def _vec(value, n: int) -> np.ndarray | None:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def scan_series(folder: str | os.PathLike) -> list[DicomSeries]:
    """Every image series under ``folder``, checked (see the module's rules) and ordered by SeriesNumber."""
    require("pydicom")
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    groups: dict[str, list[tuple[Path, object]]] = {}
    skipped_other, skipped_dicom = 0, 0
    for f in _files_under(folder):
        if not is_dicom_file(f):
            skipped_other += 1
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            _log.warning("%s: unreadable DICOM file ignored (%s)", f, _short(exc))
            skipped_dicom += 1
            continue
        modality = str(getattr(ds, "Modality", ""))
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        uid = getattr(ds, "SeriesInstanceUID", None)
        if (
            modality in IMAGE_STORAGE_SKIP
            or uid is None
            or frames > 1
            or "ImagePositionPatient" not in ds
            or "ImageOrientationPatient" not in ds
        ):
            skipped_dicom += 1
            continue
        groups.setdefault(str(uid), []).append((f, ds))
    if skipped_other or skipped_dicom:
        _log.info(
            "%s: ignored %d non-DICOM file(s) and %d DICOM file(s) that are not image slices",
            folder,
            skipped_other,
            skipped_dicom,
        )
    if not groups:
        raise DatasetError(f"{folder}: no DICOM image series found")
    series = []
    for uid, items in groups.items():
        try:
            series.append(_check_series(folder, uid, items))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # e.g. no Rows or PixelSpacing
            raise DatasetError(f"{folder}: series {uid}: incomplete image header ({_short(exc)})") from None
    return sorted(series, key=lambda s: (s.number if s.number is not None else 1 << 30, s.uid))


def _check_series(folder: Path, uid: str, items: list[tuple[Path, object]]) -> DicomSeries:
    first = items[0][1]
    desc = str(getattr(first, "SeriesDescription", "") or "").strip()
    try:
        number = int(getattr(first, "SeriesNumber", None))
    except (TypeError, ValueError):
        number = None
    name = DicomSeries(uid, desc, number, str(getattr(first, "Modality", "")), folder, (), 0.0).label()
    iop0, spacing0, positions = _slice_headers(name, items)
    if len(items) < 2:
        raise DatasetError(f"{name}: a single slice; a 3D series needs at least 2")
    normal = np.cross(iop0[:3], iop0[3:])
    pos = np.array(positions)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    dist, pos = dist[order], pos[order]
    files = [items[i][0] for i in order]
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < POSITION_TOLERANCE_MM)
    if dup.size:
        i = int(dup[0])
        raise DatasetError(
            f"{name}: {files[i].name} and {files[i + 1].name} are at the same position ({dist[i]:.2f} mm "
            "along the normal): several acquisitions or time points in one series are not supported"
        )
    _check_no_tilt(name, files, pos, dist, normal, float(spacing0.min()))
    step = float(np.median(gaps))
    off = np.abs(gaps - step)
    bad = np.flatnonzero(off > max(SPACING_RTOL * step, 0.01))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"{name}: irregular slice spacing: a gap of {gaps[i]:.3g} mm between {files[i].name} (at "
            f"{dist[i]:.2f} mm) and {files[i + 1].name} (at {dist[i + 1]:.2f} mm) where the others are "
            f"{step:.3g} mm (a missing slice?); autoseg does not resample such series"
        )
    return DicomSeries(uid, desc, number, str(getattr(first, "Modality", "")), folder, tuple(files), step)


def _slice_headers(
    name: str, items: list[tuple[Path, object]]
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(orientation, pixel spacing, position of each slice): every slice must have the first slice's
    orientation, pixel grid and pixel spacing."""
    first = items[0][1]
    iop0 = _vec(first.ImageOrientationPatient, 6)
    if iop0 is None:
        raise DatasetError(f"{name}: {items[0][0].name}: ImageOrientationPatient is not six numbers")
    rows, cols = int(first.Rows), int(first.Columns)
    spacing0 = _vec(getattr(first, "PixelSpacing", None) or [], 2)
    if spacing0 is None or np.any(spacing0 <= 0):
        raise DatasetError(f"{name}: {items[0][0].name}: PixelSpacing missing or not positive")
    positions = []
    for f, ds in items:
        iop = _vec(ds.ImageOrientationPatient, 6)
        if iop is None or not np.allclose(iop, iop0, atol=1e-4):
            raise DatasetError(f"{name}: {f.name}: ImageOrientationPatient differs from {items[0][0].name}")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise DatasetError(
                f"{name}: {f.name}: {ds.Rows}x{ds.Columns} pixels, {items[0][0].name} {rows}x{cols}"
            )
        sp = _vec(getattr(ds, "PixelSpacing", None) or [], 2)
        if sp is None or not np.allclose(sp, spacing0, rtol=1e-4, atol=1e-6):
            raise DatasetError(f"{name}: {f.name}: PixelSpacing differs from {items[0][0].name}")
        ipp = _vec(ds.ImagePositionPatient, 3)
        if ipp is None:
            raise DatasetError(f"{name}: {f.name}: ImagePositionPatient is not three numbers")
        positions.append(ipp)
    return iop0, spacing0, positions


def _check_no_tilt(
    name: str, files: list[Path], pos: np.ndarray, dist: np.ndarray, normal: np.ndarray, min_spacing: float
) -> None:
    """Every slice (sorted along the normal) must sit on the line through the first along the normal: an
    in-plane offset that grows along the stack is a gantry tilt (a sheared grid that a plain 3D image cannot
    represent)."""
    offsets = np.linalg.norm((pos - pos[0]) - np.outer(dist - dist[0], normal), axis=1)
    tolerance = max(0.01, IN_PLANE_TOLERANCE * min_spacing)
    if offsets.max() > tolerance:
        i = int(np.argmax(offsets))
        angle = float(np.degrees(np.arctan2(offsets[i], dist[i] - dist[0])))
        raise DatasetError(
            f"{name}: {files[i].name} is shifted {offsets[i]:.3g} mm in-plane from the first slice's line "
            f"along the normal (gantry tilt of about {angle:.1f} degrees, or a sheared stack); autoseg does "
            "not resample such series: reconstruct them without tilt first"
        )


def _case_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return name or "series"


def parse_channel_rules(values: Sequence[str] | None) -> dict[int, str]:
    """``["0=T1", "1=FLAIR"]`` → ``{0: "T1", 1: "FLAIR"}`` (``--channel``)."""
    rules: dict[int, str] = {}
    for v in values or ():
        index, sep, pattern = str(v).partition("=")
        if not sep or not index.strip().isdigit() or not pattern.strip():
            raise AutosegError(f"--channel: '{v}' is not INDEX=DESCRIPTION (e.g. --channel 0=T1)")
        if int(index) in rules:
            raise AutosegError(f"--channel: channel {int(index)} is given twice")
        rules[int(index)] = pattern.strip()
    return rules


def match_channels(
    series: list[DicomSeries], rules: Mapping[int, str], where: Path
) -> tuple[DicomSeries, ...]:
    """The series for channels ``0..len(rules)-1``: by SeriesDescription, exact (case-insensitive) first,
    else a unique substring match."""
    chosen = []
    have = ", ".join(f"'{s.description}'" for s in series) or "none"
    for ch in sorted(rules):
        pattern = rules[ch].lower()
        exact = [s for s in series if s.description.lower() == pattern]
        hits = exact or [s for s in series if pattern in s.description.lower()]
        if not hits:
            raise DatasetError(
                f"{where}: no series matches channel {ch} ('{rules[ch]}' in SeriesDescription); "
                f"series descriptions here: {have}; use --channel {ch}=DESCRIPTION"
            )
        if len(hits) > 1:
            raise DatasetError(
                f"{where}: channel {ch} ('{rules[ch]}') matches {len(hits)} series ("
                + ", ".join(f"'{s.description}'" for s in hits)
                + f"); make it unique with --channel {ch}=DESCRIPTION"
            )
        chosen.append(hits[0])
    return tuple(chosen)


def discover_dicom_cases(
    inputs: Sequence[str | os.PathLike],
    num_channels: int,
    channel_names: Sequence[str] = (),
    rules: Mapping[int, str] | None = None,
) -> list[DicomCase]:
    """Cases from DICOM folders (see the module's rules for cases and channel matching)."""
    rules = dict(rules or {})
    bad = [c for c in rules if c >= num_channels]
    if bad:
        raise AutosegError(
            f"--channel {bad[0]}: the model has {num_channels} channel(s) (0-{num_channels - 1})"
        )
    cases: list[DicomCase] = []
    for folder in map(Path, inputs):
        series = scan_series(folder)
        if num_channels == 1 and not rules:
            for s in series:
                cid = (
                    _case_name(folder.name)
                    if len(series) == 1
                    else _case_name(f"{folder.name}_{s.number if s.number is not None else s.uid[-8:]}")
                )
                cases.append(DicomCase(cid, (s.files[0],), None, series=(s,)))
            continue
        full = {
            c: rules.get(c, channel_names[c] if c < len(channel_names) else "") for c in range(num_channels)
        }
        missing = [c for c, r in full.items() if not r]
        if missing:
            raise AutosegError(
                f"{folder}: the model needs {num_channels} channels; say which series is channel {missing[0]} "
                f"with --channel {missing[0]}=DESCRIPTION"
            )
        chosen = match_channels(series, full, folder)
        cases.append(
            DicomCase(_case_name(folder.name), tuple(s.files[0] for s in chosen), None, series=chosen)
        )
    seen: dict[str, DicomCase] = {}
    for c in cases:
        if c.case_id in seen:
            raise DatasetError(
                f"{c.series[0].folder}: case '{c.case_id}' is given twice (two folders with one name)"
            )
        seen[c.case_id] = c
    return sorted(cases, key=lambda c: c.case_id)


def read_series(series: DicomSeries) -> sitk.Image:
    """The series as a 3D float32 image (rescale slope/intercept applied), slices in ``series.files`` order."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in series.files])
    try:
        with _quiet_itk():
            img = reader.Execute()
    except RuntimeError as exc:
        raise DatasetError(f"{series.label()}: pixel data not readable ({_short(exc)})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"{series.label()}: colour images are not supported")
    img = sitk.Cast(img, sitk.sitkFloat32)
    sx, sy, sz = img.GetSpacing()
    if abs(round(sz, 4) - sz) < 1e-5:  # spacing measured from rounded positions: 0.5000000048 → 0.5
        img.SetSpacing((sx, sy, round(sz, 4)))
    if not np.isclose(img.GetSpacing()[2], series.spacing_mm, rtol=SPACING_RTOL, atol=0.01):
        raise DatasetError(
            f"{series.label()}: the reader's slice spacing {img.GetSpacing()[2]:.4g} mm differs from the "
            f"slice positions' {series.spacing_mm:.4g} mm"
        )
    return img


def series_geometry(series: DicomSeries) -> Geometry:
    """The geometry the series is read with (array order: sorted slices, rows, columns)."""
    import pydicom

    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    iop = _vec(first.ImageOrientationPatient, 6)
    row_sp, col_sp = (float(v) for v in first.PixelSpacing)
    normal = np.cross(iop[:3], iop[3:])
    direction = np.stack([iop[:3], iop[3:], normal], axis=1)  # columns: x (along a row), y (down), z
    return Geometry(
        shape=(len(series.files), int(first.Rows), int(first.Columns)),
        spacing_mm=(series.spacing_mm, row_sp, col_sp),
        origin_mm=tuple(float(v) for v in first.ImagePositionPatient),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )


def read_dicom_channels(case: DicomCase, orientation: str | None) -> tuple[np.ndarray, Geometry, Geometry]:
    """:func:`autoseg.io.volume.read_channels` for a DICOM case: ``(C, Z, Y, X)`` float32 in
    ``orientation``, its geometry, and the geometry as stored (the series' own slice order)."""
    arrays, source, geom = [], None, None
    for s in case.series:
        img = read_series(s)
        g = _geometry_of(img)
        if source is None:
            source = g
        elif not g.matches(source):
            raise DatasetError(
                f"{s.label()}: its grid (shape {g.shape}, spacing {g.spacing_mm}, origin {g.origin_mm}) differs "
                f"from channel 0's {case.series[0].label()}; the channels of a case must share one grid"
            )
        if orientation is not None and orientation_code(g) != orientation:
            img = sitk.DICOMOrient(img, orientation)
        geom = _geometry_of(img)
        arrays.append(sitk.GetArrayFromImage(img))
    return np.stack(arrays).astype(np.float32, copy=False), geom, source
