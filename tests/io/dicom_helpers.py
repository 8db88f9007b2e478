"""Test helpers for DICOM: write a 3D image as a series of single-slice files (pydicom, independent of autoseg),
and read DICOM-SEG / RT-STRUCT back independently of autoseg's writers (highdicom, pydicom, skimage.draw)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import SimpleITK as sitk

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def quantize(img: sitk.Image, slope: float, intercept: float) -> sitk.Image:
    """The image as the series will store it: ``round((v - intercept) / slope) * slope + intercept``."""
    arr = sitk.GetArrayFromImage(img).astype(np.float64)
    stored = np.clip(np.rint((arr - intercept) / slope), -32768, 32767)
    out = sitk.GetImageFromArray((stored * slope + intercept).astype(np.float32))
    out.CopyInformation(img)
    return out


def write_series(
    img: sitk.Image,
    folder: Path,
    *,
    orientation: str | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    modality: str = "CT",
    description: str = "series",
    series_number: int = 1,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    names: str = "random",
) -> list[Path]:
    """Write ``img`` as one DICOM file per slice into ``folder``: slices along the third index axis after
    reorienting (exactly, by permuting/flipping) to ``orientation`` (e.g. "LPS" axial, "PIR" sagittal,
    "LIP" coronal). Stored values are int16 with ``slope``/``intercept``. Files get shuffled random names
    (``names="random"``) so that name order says nothing about position. Returns the files in slice order."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if orientation is not None:
        img = sitk.DICOMOrient(img, orientation)
    arr = sitk.GetArrayFromImage(img).astype(np.float64)  # (k, j, i) = (slice, row, column)
    direction = np.array(img.GetDirection()).reshape(3, 3)
    sx, sy, sz = img.GetSpacing()
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    series_uid = generate_uid()
    sop_class = CT_STORAGE if modality == "CT" else MR_STORAGE
    rng = random.Random(seed)
    order = list(range(arr.shape[0]))
    if shuffle:
        rng.shuffle(order)
    files = []
    for k in range(arr.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = "Test^Patient"
        ds.PatientID = "TEST01"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyDate = "20250101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = order[k] + 1  # deliberately not the slice order
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in img.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.Rows, ds.Columns = arr.shape[1], arr.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        if modality == "CT":
            ds.RescaleType = "HU"
        stored = np.clip(np.rint((arr[k] - intercept) / slope), -32768, 32767).astype("<i2")
        ds.PixelData = stored.tobytes()
        name = f"{rng.getrandbits(40):010x}" if names == "random" else f"IM{k:04d}.dcm"
        path = folder / name
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        files.append(path)
    return files


def seg_volume_highdicom(seg_path: Path, series_files: list[Path]) -> tuple[np.ndarray, list[str]]:
    """A DICOM-SEG read with highdicom onto its source slices (in ``series_files`` order): label map with
    value = segment number, and the segment labels."""
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(seg_path)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in series_files]
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=numbers, combine_segments=True
    )
    return np.asarray(pixels), [str(s.SegmentLabel) for s in seg.SegmentSequence]


def rasterise_rtstruct(rt_path: Path, series_files: list[Path]) -> dict[str, np.ndarray]:
    """Each ROI of an RT-STRUCT as a mask on the grid of ``series_files`` (in that order): every contour's
    patient coordinates go to (row, column) through the slice's own position/orientation/spacing, its slice is
    found by position, and the polygons of a slice are combined by the even-odd rule (skimage.draw.polygon)."""
    import pydicom
    from skimage.draw import polygon

    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files]
    iop = np.array([float(v) for v in heads[0].ImageOrientationPatient])
    rdir, cdir = iop[:3], iop[3:]
    normal = np.cross(rdir, cdir)
    row_sp, col_sp = (float(v) for v in heads[0].PixelSpacing)
    ipps = np.array([[float(v) for v in h.ImagePositionPatient] for h in heads])
    dists = ipps @ normal
    shape = (len(heads), int(heads[0].Rows), int(heads[0].Columns))
    rt = pydicom.dcmread(rt_path)
    names = {int(r.ROINumber): str(r.ROIName) for r in rt.StructureSetROISequence}
    out = {}
    for rc in rt.ROIContourSequence:
        mask = np.zeros(shape, dtype=bool)
        for c in getattr(rc, "ContourSequence", []):
            pts = np.array([float(v) for v in c.ContourData]).reshape(-1, 3)
            k = int(np.argmin(np.abs(dists - float(pts[0] @ normal))))
            assert abs(dists[k] - pts[0] @ normal) < 1e-2, "contour not on a slice"
            rel = pts - ipps[k]
            cols = rel @ rdir / col_sp
            rows = rel @ cdir / row_sp
            rr, cc = polygon(rows, cols, shape[1:])
            layer = np.zeros(shape[1:], dtype=bool)
            layer[rr, cc] = True
            mask[k] ^= layer
        out[names[int(rc.ReferencedROINumber)]] = mask
    return out


def physical_centroid(mask: np.ndarray, origin, spacing_xyz, direction) -> np.ndarray:
    """Centroid in patient (LPS) mm of a ``(k, j, i)`` mask on a grid (SimpleITK conventions)."""
    idx = np.argwhere(mask)[:, ::-1].astype(np.float64)  # (i, j, k)
    d = np.array(direction).reshape(3, 3)
    pts = np.array(origin) + (idx * np.array(spacing_xyz)) @ d.T
    return pts.mean(axis=0)


def image_centroid(mask: np.ndarray, img: sitk.Image) -> np.ndarray:
    return physical_centroid(mask, img.GetOrigin(), img.GetSpacing(), img.GetDirection())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(a, b).sum() / s


def sorted_by_position(files: list[Path]) -> list[Path]:
    """Slice files ordered along the normal of their ImageOrientationPatient (pydicom only)."""
    import pydicom

    def key(f: Path) -> float:
        h = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array([float(v) for v in h.ImageOrientationPatient])
        return float(np.array([float(v) for v in h.ImagePositionPatient]) @ np.cross(iop[:3], iop[3:]))

    return sorted(files, key=key)


def series_image(array: np.ndarray, series_files: list[Path]) -> sitk.Image:
    """``array`` ``(slices, rows, columns)`` on the grid of ``series_files`` (sorted along the normal), with the
    geometry taken from their headers: origin = first slice's position, axes = row, column, normal."""
    import pydicom

    heads = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files]
    iop = np.array([float(v) for v in heads[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipps = np.array([[float(v) for v in h.ImagePositionPatient] for h in heads])
    step = float(np.mean(np.diff(ipps @ normal)))
    row_sp, col_sp = (float(v) for v in heads[0].PixelSpacing)
    img = sitk.GetImageFromArray(array)
    img.SetOrigin(tuple(ipps[0]))
    img.SetSpacing((col_sp, row_sp, step))
    img.SetDirection(tuple(np.stack([iop[:3], iop[3:], normal], axis=1).reshape(-1)))
    return img


def compare_in_space(mask_img: sitk.Image, ref_img: sitk.Image) -> tuple[float, float, float]:
    """(Dice, centroid distance in mm, half the smallest voxel size in mm) of two binary masks on the same
    physical grid, possibly stored in different axis orders (permuted/flipped exactly with DICOMOrient)."""
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(ref_img.GetDirection())
    moved = sitk.DICOMOrient(mask_img, code)
    assert np.allclose(moved.GetOrigin(), ref_img.GetOrigin(), atol=1e-2), (
        moved.GetOrigin(),
        ref_img.GetOrigin(),
    )
    assert np.allclose(moved.GetSpacing(), ref_img.GetSpacing(), rtol=1e-3)
    assert np.allclose(moved.GetDirection(), ref_img.GetDirection(), atol=1e-3)
    a = sitk.GetArrayFromImage(moved) > 0
    b = sitk.GetArrayFromImage(ref_img) > 0
    assert a.any() and b.any(), "empty mask"
    own = sitk.GetArrayFromImage(mask_img) > 0  # the centroid in the mask's own geometry, not the moved one
    dist = float(np.linalg.norm(image_centroid(own, mask_img) - image_centroid(b, ref_img)))
    return dice(a, b), dist, 0.5 * min(ref_img.GetSpacing())
