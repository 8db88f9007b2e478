"""Volumes with geometry: read and write NIfTI / MHA / NRRD through SimpleITK.

Axis order
----------
Arrays are kept in SimpleITK's numpy order, ``(z, y, x)`` for 3D volumes, i.e. the *reverse* of the
physical index order (i, j, k) used by ``Image.GetSpacing()``. Every spacing stored by autoseg
(``Volume.spacing_mm``, plans, fingerprints) is in the same array order, so ``spacing_mm[a]`` is the
voxel size along ``array.shape[a]``. Origin and direction stay in SimpleITK's physical convention
(x, y, z; row-major 3×3 direction cosines), because they are only ever handed back to SimpleITK.

Orientation: readers may ask for a canonical orientation (autoseg uses ``LPS``, the identity direction in
ITK's physical frame, so array axes are (S, P, L) -> (z, y, x)). Reorienting only permutes and flips axes
(``sitk.DICOMOrient``): no interpolation, exactly invertible. Datasets that mix orientations (RAS, LPS, PSR
cases side by side) then present anatomy along the same array axes to the network, and every output is
turned back to the orientation of its input and written with the input's exact geometry.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.imageglobals import LoggingOutputSuppressor

from autoseg.atomic import temp_dir_for, temp_path_for
from autoseg.errors import DatasetError

_log = logging.getLogger("autoseg")

SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd", ".nhdr", ".mhd")
HEADER_ENDINGS = (".mhd", ".nhdr")
"""Formats whose header names a separate data file."""
CANONICAL_ORIENTATION = "LPS"


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in physical space.

    ``spacing_mm`` and ``shape`` are in array order ``(z, y, x)``; ``origin_mm`` and ``direction`` are in
    SimpleITK's physical order (x, y, z) with ``direction`` the flattened 3×3 cosine matrix.
    """

    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    origin_mm: tuple[float, ...]
    direction: tuple[float, ...]

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "origin_mm": list(self.origin_mm),
            "direction": list(self.direction),
        }

    @classmethod
    def from_json(cls, d: dict) -> Geometry:
        return cls(
            shape=tuple(int(v) for v in d["shape"]),
            spacing_mm=tuple(float(v) for v in d["spacing_mm"]),
            origin_mm=tuple(float(v) for v in d["origin_mm"]),
            direction=tuple(float(v) for v in d["direction"]),
        )

    def matches(self, other: Geometry, tol: float = 1e-3) -> bool:
        """Same shape and (within a relative ``tol``) same spacing, origin and direction."""
        if self.shape != other.shape:
            return False
        return (
            np.allclose(self.spacing_mm, other.spacing_mm, rtol=tol, atol=tol)
            and np.allclose(self.origin_mm, other.origin_mm, rtol=tol, atol=max(tol, 1e-2))
            and np.allclose(self.direction, other.direction, atol=tol)
        )


@dataclass
class Volume:
    """A 3D array with its geometry. ``array`` has shape ``geometry.shape`` in ``(z, y, x)`` order.

    ``source_geometry`` is the geometry as stored in the file (differs from ``geometry`` after reorienting).
    """

    array: np.ndarray
    geometry: Geometry
    path: Path | None = field(default=None, compare=False)
    source_geometry: Geometry | None = field(default=None, compare=False)

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        return self.geometry.spacing_mm


def file_ending(path: str | os.PathLike) -> str:
    """The supported ending of ``path`` (``.nii.gz`` counts as one), or ``""`` if none matches."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return ""


def _geometry_of(img: sitk.Image) -> Geometry:
    return Geometry(
        shape=tuple(int(s) for s in reversed(img.GetSize())),
        spacing_mm=tuple(float(s) for s in reversed(img.GetSpacing())),
        origin_mm=tuple(float(v) for v in img.GetOrigin()),
        direction=tuple(float(v) for v in img.GetDirection()),
    )


def _header_reader(path: Path) -> sitk.ImageFileReader:
    """A reader that has read ``path``'s header (and checked the file is not empty or truncated)."""
    _check_file(path)
    _check_nifti(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DatasetError(f"{path}: not a readable image ({_short(exc)})") from None
    return reader


def read_header(path: str | os.PathLike) -> Geometry:
    """Read only the header of an image (fast), raising :class:`DatasetError` on unreadable files."""
    path = Path(path)
    reader = _header_reader(path)
    geom = Geometry(
        shape=tuple(int(s) for s in reversed(reader.GetSize())),
        spacing_mm=tuple(float(s) for s in reversed(reader.GetSpacing())),
        origin_mm=tuple(float(v) for v in reader.GetOrigin()),
        direction=tuple(float(v) for v in reader.GetDirection()),
    )
    _check_geometry(path, geom, reader.GetNumberOfComponents())
    return geom


def channels_in_file(path: str | os.PathLike) -> int:
    """Channels stored in one file: the size of the 4th dimension of a 4D image (MSD style), else 1."""
    reader = _header_reader(Path(path))
    return int(reader.GetSize()[3]) if reader.GetDimension() == 4 else 1


def read_4d_channels(
    path: str | os.PathLike, orientation: str | None = None, dtype: np.dtype | type = np.float32
) -> list[Volume]:
    """The 3D volumes of a 4D image whose 4th dimension holds the channels (Medical Segmentation Decathlon
    layout), each with the geometry of the first three dimensions."""
    path = Path(path)
    _check_file(path)
    header = _check_nifti(path)
    try:
        with _quiet_itk():
            img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DatasetError(f"{path}: not a readable image ({_short(exc)})") from None
    if img.GetDimension() != 4:
        raise DatasetError(f"{path}: is {img.GetDimension()}D; expected a 4D image with channels last")
    size = list(img.GetSize())
    vols = []
    for c in range(size[3]):
        vol = sitk.Extract(img, size[:3] + [0], [0, 0, 0, c])
        source = _geometry_of(vol)
        _check_geometry(path, source, vol.GetNumberOfComponentsPerPixel())
        if orientation is not None and orientation_code(source) != orientation:
            vol = sitk.DICOMOrient(vol, orientation)
        arr = _cast_checked(path, sitk.GetArrayFromImage(vol), dtype, header)
        vols.append(Volume(array=arr, geometry=_geometry_of(vol), path=path, source_geometry=source))
    return vols


def orientation_code(geometry: Geometry) -> str:
    """Three-letter orientation (e.g. ``RAS``, ``LPS``, ``PSR``) closest to the geometry's direction."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(geometry.direction)


def read_volume(
    path: str | os.PathLike, dtype: np.dtype | type | None = np.float32, orientation: str | None = None
) -> Volume:
    """Read a 3D image. Raises :class:`DatasetError` naming the file for anything malformed.

    ``dtype=None`` keeps the stored data type. With ``orientation`` (e.g. ``"LPS"``) the image is permuted and
    flipped to that orientation; ``source_geometry`` keeps the geometry as stored.
    """
    path = Path(path)
    _check_file(path)
    header = _check_nifti(path)
    try:
        with _quiet_itk():
            img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DatasetError(f"{path}: not a readable image ({_short(exc)})") from None
    source = _geometry_of(img)
    _check_geometry(path, source, img.GetNumberOfComponentsPerPixel())
    if header is not None and header.get_data_dtype().kind == "f":
        img = _restore_nonfinite(path, img)
    if orientation is not None and orientation_code(source) != orientation:
        img = sitk.DICOMOrient(img, orientation)
    arr = sitk.GetArrayFromImage(img)
    if dtype is not None:
        arr = _cast_checked(path, arr, dtype, header)
    return Volume(array=arr, geometry=_geometry_of(img), path=path, source_geometry=source)


def _cast_checked(path: Path, arr: np.ndarray, dtype, header: nib.Nifti1Header | None) -> np.ndarray:
    """``arr`` as ``dtype``, refusing intensities that only become Inf on the way: stored values times a NIfTI
    scale factor beyond the 32-bit float range, or float64 values beyond it (a genuine NaN/Inf in the file is
    left for the caller's own check, which can replace them)."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype, copy=False)
    if np.dtype(dtype).kind != "f" or arr.dtype.kind != "f":
        return out  # integers always fit a float (int64's largest is 9.2e18)
    stored_int = header is not None and header.get_data_dtype().kind in "iub"
    if stored_int:  # an integer file stores no NaN/Inf: every one came from the scale factor
        overflow = int((~np.isfinite(out)).sum())
    elif arr.dtype.itemsize > out.dtype.itemsize:
        overflow = int(np.isinf(out).sum()) - int(np.isinf(arr).sum())
    else:
        return out
    if overflow <= 0:
        return out
    limit = float(np.finfo(np.dtype(dtype)).max)
    if stored_int:
        slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
        raise DatasetError(
            f"{path}: {overflow} intensity value(s) overflow {np.dtype(dtype).itemsize * 8}-bit float "
            f"(|value| <= {limit:.2g}) once scaled by the NIfTI header (scl_slope {slope:g}, scl_inter {inter:g})"
        )
    finite = arr[np.isfinite(arr)]
    top = float(np.abs(finite).max()) if finite.size else float("inf")
    raise DatasetError(
        f"{path}: {overflow} intensity value(s) (up to {top:.3g}) are beyond the "
        f"{np.dtype(dtype).itemsize * 8}-bit float range autoseg computes in (|value| <= {limit:.2g})"
    )


def reorient_to(array: np.ndarray, geometry: Geometry, target: Geometry) -> np.ndarray:
    """Permute/flip ``array`` (with ``geometry``) into the orientation of ``target`` and check it then has
    ``target``'s shape: the exact inverse of reading with ``orientation=...``."""
    if orientation_code(geometry) == orientation_code(target):
        out = array
    else:
        out = sitk.GetArrayFromImage(sitk.DICOMOrient(to_sitk(array, geometry), orientation_code(target)))
    if tuple(out.shape) != tuple(target.shape):
        raise ValueError(f"reoriented shape {out.shape} does not match the target shape {target.shape}")
    return out


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Wrap ``array`` (array order) into a SimpleITK image with ``geometry``."""
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape}")
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(reversed(geometry.spacing_mm)))
    img.SetOrigin(geometry.origin_mm)
    img.SetDirection(geometry.direction)
    return img


def write_volume(array: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> Path:
    """Write ``array`` with ``geometry`` to ``path`` atomically (temporary name in the same folder, then rename).

    The format follows the ending of ``path``. A crash mid-write never leaves a file at ``path``. A header with
    a separate data file (``.mhd`` + ``.zraw``, ``.nhdr`` + ``.raw.gz``: :func:`data_file_names`) is written as
    a unit: into a private temporary folder beside ``path`` under the final names (so the header names the
    final data file), then the data file is renamed into place, the header last.
    """
    path = Path(path)
    ending = file_ending(path)
    if not ending:
        raise ValueError(f"{path}: unsupported file ending (use one of {', '.join(SUPPORTED_ENDINGS)})")
    image = to_sitk(array, geometry)
    if ending in HEADER_ENDINGS:
        folder = temp_dir_for(path)
        try:
            sitk.WriteImage(image, str(folder / path.name), useCompression=True)
            for f in sorted(folder.iterdir()):
                if f.name != path.name:
                    os.replace(f, path.parent / f.name)
            os.replace(folder / path.name, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return path
    tmp = temp_path_for(path, ".tmp" + ending)  # SimpleITK picks the format from the ending
    try:
        sitk.WriteImage(image, tmp, useCompression=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def copy_volume(src: str | os.PathLike, dst: str | os.PathLike, link: bool = False) -> Path:
    """Copy the image file ``src`` to ``dst`` (hard-link it with ``link``, copying across file systems), each
    file atomically: a header's data files (:func:`header_data_files`) first, beside ``dst`` under their own
    names, then the header, so a copy that looks finished has its data."""
    src, dst = Path(src), Path(dst)
    for source, target in [*((d, dst.with_name(d.name)) for d in header_data_files(src)), (src, dst)]:
        tmp = temp_path_for(target)
        try:
            if link:
                tmp.unlink()
                try:
                    os.link(source, tmp)
                except OSError:
                    shutil.copyfile(source, tmp)
            else:
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return dst


def data_file_names(path: str | os.PathLike) -> tuple[str, ...]:
    """Names of the data files :func:`write_volume` writes beside the header ``path`` (none for one-file
    formats): ``<stem>.zraw`` for ``.mhd``, ``<stem>.raw.gz`` for ``.nhdr`` (both compressed)."""
    name = Path(path).name
    ending = file_ending(name)
    stem = name[: -len(ending)] if ending else name
    return {".mhd": (stem + ".zraw",), ".nhdr": (stem + ".raw.gz",)}.get(ending, ())


def header_data_files(path: str | os.PathLike) -> list[Path]:
    """The data files a ``.mhd`` (``ElementDataFile``) or ``.nhdr`` (``data file:``) header names, one file
    or a ``LIST``, as paths beside the header; ``[]`` for other formats, data inside the header (``LOCAL``),
    file-name patterns, or an unreadable header (the reader reports those)."""
    path = Path(path)
    ending = file_ending(path)
    if ending not in HEADER_ENDINGS:
        return []
    try:
        with open(path, "rb") as fh:
            text = fh.read(1 << 16).decode("latin-1")
    except OSError:
        return []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if ending == ".mhd":
            key, sep, value = line.partition("=")
            found = sep and key.strip().lower() == "elementdatafile"
        else:
            key, sep, value = line.partition(":")
            found = sep and key.strip().lower() in ("data file", "datafile")
        if not found:
            continue
        value = value.strip()
        if value.upper() == "LOCAL" or "%" in value or not value:
            return []
        if value.upper().startswith("LIST"):
            names = [ln.strip() for ln in lines[i + 1 :] if ln.strip()]
        else:
            names = [value]
        return [path.parent / n for n in names if "/" not in n and "\\" not in n]
    return []


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if not path.is_file():
        raise DatasetError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty (0 bytes)")
    if not file_ending(path):
        raise DatasetError(f"{path}: unsupported file ending (use one of {', '.join(SUPPORTED_ENDINGS)})")
    for data in header_data_files(path):
        if not data.is_file():
            raise DatasetError(f"{path}: its data file {data.name} (named in the header) is missing")


def _check_geometry(path: Path, geom: Geometry, components: int) -> None:
    if components != 1:
        raise DatasetError(f"{path}: has {components} components per voxel; expected a scalar image")
    if len(geom.shape) != 3:
        raise DatasetError(f"{path}: is {len(geom.shape)}D with shape {geom.shape}; expected a 3D volume")
    if any(s <= 0 or not np.isfinite(s) or s > 100 for s in geom.spacing_mm):
        spacing = ", ".join(f"{s:.4g}" for s in geom.spacing_mm)
        raise DatasetError(f"{path}: implausible voxel spacing ({spacing}) mm (must be in (0, 100])")


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings while reading: ITK prints them (e.g. "unexpected scales in sform") straight to
    the process's stderr, several lines each, around autoseg's own one-line error; the checks here report
    what matters (spacing, shape, truncation) themselves."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _nifti_header(path: Path) -> nib.Nifti1Header | None:
    """The NIfTI-1/2 header of ``path`` as stored (no fixes applied), or None for other formats.

    Raises :class:`DatasetError` if the file ends inside its header; a file that is not NIfTI at all returns
    None and is left to ITK to report."""
    if file_ending(path) not in (".nii", ".nii.gz"):
        return None
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
    except EOFError:
        raise DatasetError(f"{path}: truncated or corrupt (the file ends inside its header)") from None
    except (OSError, zlib.error):
        return None
    for size, cls in ((348, nib.Nifti1Header), (540, nib.Nifti2Header)):
        for order in "<>":
            if len(head) >= size and struct.unpack(order + "i", head[:4])[0] == size:
                try:
                    return cls.from_fileobj(io.BytesIO(head[:size]), check=False)
                except Exception:  # nibabel raises several types for garbage headers; ITK reports them
                    return None
    return None


def _check_nifti(path: Path) -> nib.Nifti1Header | None:
    """What ITK hides in NIfTI files: a zero or non-finite ``pixdim`` (ITK silently reads it as 1 mm) and a
    truncated file (ITK fills the missing voxels with zeros). Cheap: reads the header and, for ``.nii.gz``,
    the gzip trailer (the full stream only when the trailer disagrees, e.g. multi-member gzip)."""
    header = _nifti_header(path)
    if header is None:
        return None
    ndim = int(header["dim"][0])
    sizes = [int(v) for v in header["dim"][1 : 1 + min(max(ndim, 0), 7)]]
    if not 1 <= ndim <= 7 or any(n < 1 for n in sizes):
        # niftilib would print its own complaint straight to stderr before ITK refuses the file
        raise DatasetError(
            f"{path}: the NIfTI header gives {ndim} dimension(s) of sizes {sizes}; "
            "expected 1-7 dimensions of at least 1 voxel each"
        )
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(max(ndim, 0), 3)]]
    if any(not np.isfinite(v) or v == 0 for v in pixdim):
        spacing = ", ".join(f"{v:g}" for v in reversed(pixdim))
        raise DatasetError(
            f"{path}: implausible voxel spacing ({spacing}) mm in the NIfTI header (pixdim must be finite and "
            "non-zero)"
        )
    # ITK decomposes these matrices (printing VNL's failures straight to stderr): refuse NaN/Inf first
    for code, fields, what in (
        ("sform_code", ("srow_x", "srow_y", "srow_z"), "sform"),
        (
            "qform_code",
            ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"),
            "qform",
        ),
    ):
        if int(header[code]) > 0 and not all(np.all(np.isfinite(header[f])) for f in fields):
            raise DatasetError(
                f"{path}: the NIfTI header's {what} (orientation and position) holds NaN or Inf"
            )
    try:
        shape = [int(v) for v in header["dim"][1 : 1 + ndim]]
        needed = int(header["vox_offset"]) + int(np.prod(shape, dtype=np.int64)) * (
            int(header["bitpix"]) // 8
        )
    except (ValueError, OverflowError):
        return header  # nonsense dimensions: ITK refuses the file
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            stored = struct.unpack("<I", f.read(4))[0]  # gzip ISIZE: uncompressed size mod 2**32
        if stored == needed % 2**32:
            return header
        total = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise DatasetError(f"{path}: truncated or corrupt (the compressed data ends early)") from None
    else:
        total = path.stat().st_size
    if total < needed:
        raise DatasetError(f"{path}: truncated or corrupt ({total} bytes of data, the header needs {needed})")
    return header


def _restore_nonfinite(path: Path, img: sitk.Image) -> sitk.Image:
    """ITK's NIfTI reader turns NaN and Inf voxels into 0, which would hide them from autoseg's checks:
    put the stored non-finite values back (float NIfTI only; costs a second read of the voxels)."""
    try:
        with LoggingOutputSuppressor():  # nibabel logs its header fixes ("pixdim ... should be positive")
            raw = np.asanyarray(nib.load(str(path)).dataobj.get_unscaled()).T  # nibabel is (x, y, z)
    except Exception:  # nibabel refuses a file ITK read: nothing more to learn from it
        return img
    bad = ~np.isfinite(raw)
    if raw.shape != tuple(reversed(img.GetSize())) or not bad.any():
        return img
    arr = sitk.GetArrayFromImage(img)
    arr[bad] = raw[bad]
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def _short(exc: BaseException) -> str:
    """First meaningful line of a SimpleITK/ITK exception, which are many lines long."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "description:" in low:
            return ln.split(":", 1)[1].strip()
    for ln in lines:
        if ln.startswith(("sitk::ERROR:", "itk::ERROR:")):
            # 'Unable to determine ImageIO reader for "/full/path"': the path is already at the line's start
            return ln.split(":", 3)[-1].strip().split(' for "')[0][:200]
    for ln in reversed(lines):
        if not ln.startswith(("File", "itk::", "sitk::", "Exception thrown in SimpleITK")):
            return ln[:200]
    return "unreadable"


def replace_nonfinite(array: np.ndarray) -> tuple[np.ndarray, int]:
    """``array`` with NaN and -Inf replaced by its finite minimum and +Inf by its finite maximum (0 where no
    value is finite), and the number of voxels replaced. A copy only when something was replaced."""
    bad = ~np.isfinite(array)
    n = int(bad.sum())
    if n == 0:
        return array, 0
    finite = array[~bad]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    out = array.copy()
    out[np.isnan(array) | np.isneginf(array)] = low
    out[np.isposinf(array)] = high
    return out, n


def read_channels(
    files: tuple[Path, ...] | list[Path],
    orientation: str | None,
    four_d: bool = False,
    fix_nonfinite: bool = False,
) -> tuple[np.ndarray, Geometry, Geometry]:
    """Read the channel files of one case (or, with ``four_d``, the channels of one 4D file), reoriented to
    ``orientation``, stacked into ``(C, Z, Y, X)`` float32. Returns ``(image, geometry after reorienting,
    geometry as stored)``.

    NaN or Inf intensities raise :class:`DatasetError` naming the file, unless ``fix_nonfinite``: then they
    are replaced (see :func:`replace_nonfinite`) and a warning names the file and the count."""
    if four_d:
        vols = read_4d_channels(files[0], orientation=orientation)
        files = [files[0]] * len(vols)
    else:
        vols = [read_volume(f, orientation=orientation) for f in files]
    ref = vols[0].geometry
    for v in vols[1:]:
        if v.geometry.shape != ref.shape:
            raise DatasetError(f"{v.path}: shape {v.geometry.shape} differs from {files[0]} {ref.shape}")
    for f, v in zip(files, vols):
        if fix_nonfinite:
            v.array, n = replace_nonfinite(v.array)
            if n:
                _log.warning("%s: replaced %d NaN/Inf intensity value(s) (--fix-nonfinite)", f, n)
            continue
        finite = np.isfinite(v.array)
        if not finite.all():
            raise DatasetError(
                f"{f}: contains {int((~finite).sum())} NaN/Inf intensity value(s) "
                "(use --fix-nonfinite to replace them by the image's finite minimum/maximum)"
            )
    return np.stack([v.array for v in vols]), ref, vols[0].source_geometry
