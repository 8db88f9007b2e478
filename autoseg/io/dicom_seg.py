"""Label maps as DICOM-SEG (highdicom) and RT-STRUCT (pydicom + scikit-image), and DICOM-SEG read back.

Both writers take a label map in the array order of the source series as autoseg reads it (slices sorted along
the normal, rows, columns: :func:`autoseg.io.dicom.series_geometry`) and the series' slice files in that order.
Each writes one file atomically (temporary name in the target folder, then rename).

DICOM-SEG: one BINARY segment per foreground label of dataset.json (segment label = the label's name, numbered
1, 2, ... in label-value order), algorithm identification "autoseg" with the model as its source, every frame
of the source series kept (also empty ones) so the file carries its whole grid and references every source
slice.

RT-STRUCT: one ROI per foreground label. Contours are traced per slice with
:func:`skimage.measure.find_contours` at level 0.5 on the zero-padded mask (closed polygons through the
mid-points between inside and outside pixel centres, so rasterising a polygon by pixel centres gives the mask
back), then mapped to patient coordinates with the slice's ImagePositionPatient, ImageOrientationPatient and
PixelSpacing. Holes are inner contours of the same ROI; viewers combine a slice's contours by the even-odd rule.
scikit-image is already a dependency; a dedicated RT-STRUCT library (rt-utils) would add OpenCV for the same
contour step and could not be checked against autoseg's own geometry code.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import DatasetError
from autoseg.io.volume import Geometry
from autoseg.jsonio import temp_path_for

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def _replace(write, path: Path) -> Path:
    tmp = temp_path_for(path, ".tmp.dcm")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _headers(files: Sequence[Path]):
    import pydicom

    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for h in heads:  # type 2 attributes (may be empty, must be present) that writers copy over
        for key in _TYPE2:
            if key not in h:
                setattr(h, key, "")
    return heads


_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip


def _check_shape(seg: np.ndarray, headers, where: Path) -> None:
    want = (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    if tuple(seg.shape) != want:
        raise DatasetError(f"{where}: label map shape {seg.shape} does not match the source series {want}")


def _software() -> str:
    from autoseg import __version__

    return str(__version__)


def segments_of(spec) -> list[tuple[str, tuple[int, ...]]]:
    """The segments (ROIs) of a dataset.json (:class:`autoseg.io.dataset.DatasetSpec`): each foreground label
    with its value, or for region-based datasets each region with the values it unites (segments may overlap)."""
    if spec.region_based:
        return [(name, tuple(values)) for name, values in spec.regions.items()]
    return [(name, (v,)) for name, v in sorted(spec.foreground_labels.items(), key=lambda t: t[1])]


def segment_values(spec) -> dict[str, int]:
    """Segment name → label-map value when reading a DICOM-SEG back: labels by name; regions painted in
    ``regions_class_order`` (as predictions are)."""
    values = dict(spec.foreground_labels)
    if spec.region_based:
        values.update(zip(spec.regions, spec.regions_class_order))
    return values


def _as_segments(labels) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(labels, Mapping):
        return [(n, (v,)) for n, v in sorted(labels.items(), key=lambda t: t[1]) if v > 0]
    return [(n, tuple(v)) for n, v in labels]


def write_dicom_seg(
    seg: np.ndarray,
    source_files: Sequence[Path],
    labels,
    path: str | os.PathLike,
    model_name: str = "autoseg model",
) -> Path:
    """Write ``seg`` as a DICOM-SEG referencing ``source_files``. ``labels``: ``{name: value}`` (foreground
    values become segments) or :func:`segments_of`'s ``[(name, values), ...]``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path = Path(path)
    headers = _headers(source_files)
    _check_shape(seg, headers, path)
    items = [(values, name) for name, values in _as_segments(labels)]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="autoseg",
        family=codes.cid7162.ArtificialIntelligence,
        version=_software(),
        source=model_name[:64],
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=name[:64],
            segmented_property_category=codes.cid7150.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, (_, name) in enumerate(items)
    ]
    masks = (
        np.stack([np.isin(seg, v) for v, _ in items], axis=-1) if items else np.zeros((*seg.shape, 0), bool)
    )
    obj = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=_series_number(headers, 900),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="autoseg",
        manufacturer_model_name=model_name[:64],
        software_versions=_software(),
        device_serial_number="0",
        content_description="autoseg segmentation",
        content_label="AUTOSEG",
        omit_empty_frames=False,
    )
    return _replace(lambda tmp: obj.save_as(tmp), path)


def _series_number(headers, offset: int) -> int:
    try:
        return int(headers[0].SeriesNumber) + offset
    except (AttributeError, TypeError, ValueError):
        return offset


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(N, 2)`` of (row, column) pixel coordinates around a 2D mask (see the module)."""
    from skimage.measure import approximate_polygon, find_contours

    out = []
    for c in find_contours(np.pad(mask.astype(np.float32), 1), 0.5):
        c = approximate_polygon(c, tolerance=1e-3)  # drops only points on a straight run (same polygon)
        c = c[:-1] - 1.0 if np.allclose(c[0], c[-1]) else c - 1.0
        if len(c) >= 3:
            out.append(c)
    return out


def write_rtstruct(
    seg: np.ndarray,
    source_files: Sequence[Path],
    labels,
    path: str | os.PathLike,
    model_name: str = "autoseg model",
) -> Path:
    """Write ``seg`` as an RT Structure Set with one ROI per segment (``labels`` as in :func:`write_dicom_seg`),
    contours per source slice."""
    import pydicom
    from pydicom.sequence import Sequence as DSequence
    from pydicom.uid import generate_uid

    path = Path(path)
    headers = _headers(source_files)
    _check_shape(seg, headers, path)
    first = headers[0]
    ds = _rtstruct_dataset(headers, model_name)
    frame_uid = str(getattr(first, "FrameOfReferenceUID", "") or generate_uid())
    ds.ReferencedFrameOfReferenceSequence = DSequence([_referenced_frame(headers, frame_uid)])
    rois, contours, observations = [], [], []
    for number, (name, values) in enumerate(_as_segments(labels), start=1):
        rois.append(_structure_set_roi(number, name, frame_uid))
        contours.append(_roi_contour(seg, headers, number, values))
        observations.append(_roi_observation(number))
    ds.StructureSetROISequence = DSequence(rois)
    ds.ROIContourSequence = DSequence(contours)
    ds.RTROIObservationsSequence = DSequence(observations)

    def save(tmp: Path) -> None:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)

    return _replace(save, path)


def _rtstruct_dataset(headers: list, model_name: str):
    """The RT-STRUCT's file meta and top-level attributes: patient and study copied from the first source
    slice, a new series and instance."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    first = headers[0]
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for key in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
        "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
    ):  # fmt: skip
        setattr(ds, key, getattr(first, key, ""))
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = _series_number(headers, 901)
    ds.SeriesDescription = "autoseg RT-STRUCT"
    ds.InstanceNumber = 1
    ds.Manufacturer = "autoseg"
    ds.ManufacturerModelName = model_name[:64]
    ds.SoftwareVersions = _software()
    ds.StructureSetLabel = "AUTOSEG"
    ds.StructureSetName = model_name[:16]
    ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    return ds


def _image_ref(h):
    """A reference to one source slice (its SOP class and instance)."""
    from pydicom.dataset import Dataset

    r = Dataset()
    r.ReferencedSOPClassUID = h.SOPClassUID
    r.ReferencedSOPInstanceUID = h.SOPInstanceUID
    return r


def _referenced_frame(headers: list, frame_uid: str):
    """The frame of reference item: study -> series -> every source slice."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DSequence

    first = headers[0]
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = DSequence([_image_ref(h) for h in headers])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = (
        "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, customary)
    )
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_uid
    frame_ref.RTReferencedStudySequence = DSequence([study_ref])
    return frame_ref


def _structure_set_roi(number: int, name: str, frame_uid: str):
    from pydicom.dataset import Dataset

    roi = Dataset()
    roi.ROINumber = number
    roi.ReferencedFrameOfReferenceUID = frame_uid
    roi.ROIName = name[:64]
    roi.ROIGenerationAlgorithm = "AUTOMATIC"
    return roi


def _roi_contour(seg: np.ndarray, headers: list, number: int, values) -> object:
    """ROI ``number``'s contours: every slice's polygons of ``np.isin(seg[k], values)`` in patient
    coordinates (ImagePositionPatient + column/row steps along ImageOrientationPatient)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DSequence

    first = headers[0]
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_dir, col_dir = iop[:3], iop[3:]
    row_sp, col_sp = (float(v) for v in first.PixelSpacing)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = number
    roi_contour.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
    items_k = []
    for k, h in enumerate(headers):
        mask = np.isin(seg[k], values)
        if not mask.any():
            continue
        ipp = np.array([float(v) for v in h.ImagePositionPatient])
        for c in slice_contours(mask):
            points = ipp + np.outer(c[:, 1] * col_sp, row_dir) + np.outer(c[:, 0] * row_sp, col_dir)
            item = Dataset()
            item.ContourImageSequence = DSequence([_image_ref(h)])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourData = [round(float(v), 4) for v in points.reshape(-1)]  # DS: <= 16 characters
            items_k.append(item)
    roi_contour.ContourSequence = DSequence(items_k)
    return roi_contour


def _roi_observation(number: int):
    from pydicom.dataset import Dataset

    obs = Dataset()
    obs.ObservationNumber = number
    obs.ReferencedROINumber = number
    obs.RTROIInterpretedType = "ORGAN"
    obs.ROIInterpreter = ""
    return obs


def read_dicom_seg(path: str | os.PathLike, labels: Mapping[str, int]) -> tuple[np.ndarray, Geometry]:
    """A DICOM-SEG as a label map on the grid its frames span (sorted along the slice normal, rows, columns).

    Segments are given the value of the dataset.json label with the same name as their SegmentLabel, else their
    segment number. Frames may be left out (empty frames omitted by other writers) as long as the rest lie on
    one regular grid (the spacing of SpacingBetweenSlices or of the closest frames)."""
    import pydicom

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is one line naming the file
        raise DatasetError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    if str(getattr(ds, "SOPClassUID", "")) != SEG_SOP_CLASS:
        raise DatasetError(f"{path}: not a DICOM-SEG (SOP class {getattr(ds, 'SOPClassUID', 'missing')})")
    frames = _SegFrames.read(ds, path)
    index, step, origin = _frame_grid(frames, path)
    out = np.zeros((int(index.max()) + 1, int(ds.Rows), int(ds.Columns)), dtype=np.uint8)
    for i, (k, s) in enumerate(zip(index, frames.segments)):
        value = labels.get(frames.names.get(s, ""), s)
        out[k][frames.pixels[i] > 0] = value
    direction = np.stack([frames.iop[:3], frames.iop[3:], frames.normal], axis=1)
    geom = Geometry(
        shape=tuple(out.shape),
        spacing_mm=(step, frames.row_sp, frames.col_sp),
        origin_mm=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction.reshape(-1)),
    )
    return out, geom


@dataclass(frozen=True)
class _SegFrames:
    """What :func:`read_dicom_seg` needs from a DICOM-SEG's functional groups, one entry per frame."""

    row_sp: float
    col_sp: float
    iop: np.ndarray  # ImageOrientationPatient (row direction, column direction)
    positions: np.ndarray  # (frames, 3) ImagePositionPatient
    segments: list[int]  # ReferencedSegmentNumber per frame
    names: dict[int, str]  # SegmentNumber -> SegmentLabel
    pixels: np.ndarray  # (frames, rows, columns)
    measures: object  # the PixelMeasuresSequence item (SpacingBetweenSlices, SliceThickness)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.iop[:3], self.iop[3:])

    @classmethod
    def read(cls, ds, path: Path) -> _SegFrames:
        try:
            shared = ds.SharedFunctionalGroupsSequence[0]
            frames = ds.PerFrameFunctionalGroupsSequence

            def group(frame, name: str):  # a functional group: per frame, else shared
                return (getattr(frame, name, None) or getattr(shared, name))[0]

            measures = group(frames[0], "PixelMeasuresSequence")
            row_sp, col_sp = (float(v) for v in measures.PixelSpacing)
            iop = np.array(
                [float(v) for v in group(frames[0], "PlaneOrientationSequence").ImageOrientationPatient]
            )
            positions = np.array(
                [[float(v) for v in group(f, "PlanePositionSequence").ImagePositionPatient] for f in frames]
            )
            segments = [
                int(group(f, "SegmentIdentificationSequence").ReferencedSegmentNumber) for f in frames
            ]
            names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
            pixels = ds.pixel_array
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: DICOM-SEG without the geometry autoseg needs ({exc})") from None
        return cls(
            row_sp=row_sp,
            col_sp=col_sp,
            iop=iop,
            positions=positions,
            segments=segments,
            names=names,
            pixels=pixels.reshape(len(frames), int(ds.Rows), int(ds.Columns)),
            measures=measures,
        )


def _frame_grid(frames: _SegFrames, path: Path) -> tuple[np.ndarray, float, np.ndarray]:
    """(slice index per frame, slice step in mm, origin) of the regular grid the frames lie on; refuses frames
    off that grid or not stacked along the slice normal."""
    positions, normal = frames.positions, frames.normal
    dist = positions @ normal
    unique = np.unique(np.round(dist, 3))
    step = float(getattr(frames.measures, "SpacingBetweenSlices", 0) or 0)
    if step <= 0:
        step = (
            float(np.min(np.diff(unique)))
            if len(unique) > 1
            else float(getattr(frames.measures, "SliceThickness", 1))
        )
    index = np.rint((dist - unique[0]) / step).astype(int)
    if np.any(np.abs(index * step - (dist - unique[0])) > 0.01 * step + 1e-3):
        raise DatasetError(f"{path}: frames do not lie on one regular slice grid ({step:.4g} mm)")
    origin = positions[np.argmin(dist)]
    in_plane = positions - np.outer(dist - dist.min(), normal) - origin
    if np.abs(in_plane).max() > 0.01 + 1e-3 * max(frames.row_sp, frames.col_sp):
        raise DatasetError(f"{path}: frames are not stacked along the slice normal")
    return index, step, origin


DICOM_SEG_ENDING = ".seg.dcm"


def is_dicom_seg_name(path: str | os.PathLike) -> bool:
    return Path(path).name.lower().endswith(DICOM_SEG_ENDING)


def load_label_any(path: Path, allowed: set[int], labels: Mapping[str, int]) -> tuple[np.ndarray, Geometry]:
    """:func:`autoseg.io.dataset.load_label` that also reads ``<case>.seg.dcm`` DICOM-SEG files."""
    from autoseg.io.dataset import load_label

    if not is_dicom_seg_name(path):
        return load_label(path, allowed)
    from autoseg.io.dicom import require

    require("pydicom", why=f"{path}: reading DICOM-SEG")
    arr, geom = read_dicom_seg(path, labels)
    unknown = sorted(set(np.unique(arr).tolist()) - set(allowed))
    if unknown:
        raise DatasetError(
            f"{path}: segments with values {unknown} are not labels of dataset.json {sorted(allowed)} "
            "(segments are matched by SegmentLabel = label name, else by segment number)"
        )
    return arr, geom


def match_orientation(array: np.ndarray, geometry: Geometry, target: Geometry) -> tuple[np.ndarray, Geometry]:
    """``array`` permuted/flipped (exactly) into ``target``'s orientation, e.g. a DICOM-SEG's slice order
    into a NIfTI reference's axis order; unchanged when the orientations already agree."""
    import SimpleITK as sitk

    from autoseg.io.volume import _geometry_of, orientation_code, to_sitk

    code = orientation_code(target)
    if orientation_code(geometry) == code:
        return array, geometry
    img = sitk.DICOMOrient(to_sitk(array, geometry), code)
    return sitk.GetArrayFromImage(img), _geometry_of(img)
