"""A deterministic synthetic two-channel dataset in the nnU-Net v2 raw layout, for tests and the demo.

Each case is a small anisotropic MR-like volume, arrays in ``(z, y, x)`` order:

* **body**: an elliptic cylinder (slightly tapered along z) of textured soft tissue inside a thin bright
  subcutaneous **fat** shell, surrounded by **air**;
* **organ** (label 1): a randomly sized, placed and rotated ellipsoid inside the body;
* **lesion** (label 2): a smaller ellipsoid placed off-centre inside the organ, so labels are nested by
  construction; it is bright in T2 and only faintly darker than the organ in T1;
* **cysts** (unlabelled, 0-2 per case): small spheres in the body outside the organ that are as bright as
  the lesion in T2 but dark in T1, so that "bright in T2" alone does not find the lesion.

Tissue intensities (before bias field, noise, per-case scale and offset) are in :data:`TISSUE_INTENSITY`.
Every case then gets a slight blur (partial volume), a smooth multiplicative bias field per channel, Gaussian
noise and a per-case intensity scale and offset, so intensity normalisation has something to do.

Spacing is ``(3.0, 1.0, 1.0)`` mm in array order for most cases and :data:`ODD_SPACING_MM` for every fifth
case (index 3, 8, ...); shapes vary per case (z 20-28, y and x 56-72). Origins are off-zero and case 1 has
its x axis flipped (direction ``diag(-1, 1, 1)``) to exercise geometry handling.

Randomness: case ``i`` of seed ``s`` draws from ``SeedSequence(s, spawn_key=(i,))``, i.e. the ``i``-th child
of ``SeedSequence(s)``, so a case does not depend on how many cases are generated, and the same seed always
gives identical arrays. All parameters are drawn first (:func:`draw_case_params`), then rendered without
further randomness except the noise fields, which come from a seed that is itself one of the parameters.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.errors import AutosegError
from autoseg.io.volume import Geometry, write_volume
from autoseg.jsonio import write_json

PHANTOM_VERSION = 1
DATASET_NAME = "AutosegPhantom"
FILE_ENDING = ".nii.gz"
CHANNEL_NAMES = ("T1", "T2")
LABELS = {"background": 0, "organ": 1, "lesion": 2}

DEFAULT_SPACING_MM = (3.0, 1.0, 1.0)
ODD_SPACING_MM = (2.5, 1.25, 1.25)
FLIPPED_CASE_INDEX = 1

# Mean intensity of each tissue per channel (T1, T2), before bias, noise, scale and offset.
TISSUE_INTENSITY: dict[str, tuple[float, float]] = {
    "air": (0.0, 0.0),
    "body": (0.40, 0.30),
    "fat": (0.90, 0.70),
    "organ": (0.75, 0.50),
    "lesion": (0.62, 0.95),
    "cyst": (0.15, 0.90),
}
# Standard deviation of the smooth tissue texture per channel (body; the organ gets half of it).
_TEXTURE_STD = (0.05, 0.04)
_TEXTURE_SIGMA_MM = 3.0
# Point-spread function, so boundaries have partial-volume voxels as in real scans.
_PSF_SIGMA_MM = 0.6


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in millimetres relative to the centre of the field of view, all vectors in array order.

    ``rotation`` is a 3×3 matrix whose columns are the ellipsoid's axes; ``semi_axes_mm`` their half lengths.
    """

    centre_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    rotation: tuple[tuple[float, float, float], ...]

    def half_extent_mm(self) -> np.ndarray:
        """Half the size of the axis-aligned bounding box along (z, y, x)."""
        r = np.asarray(self.rotation)
        return np.sqrt(((r * np.asarray(self.semi_axes_mm)) ** 2).sum(axis=1))


@dataclass(frozen=True)
class CaseParams:
    """Everything random about one case; :func:`render_case` turns it into arrays without other randomness."""

    case_id: str
    geometry: Geometry
    body_semi_axes_mm: tuple[float, float]  # (y, x) at the z centre
    body_centre_mm: tuple[float, float]  # (y, x)
    body_taper: float  # relative shrink of the body's y/x semi-axes at the z ends of the field of view
    fat_thickness_mm: float
    organ: Ellipsoid
    lesion: Ellipsoid
    cysts: tuple[tuple[tuple[float, float, float], float], ...]  # (centre_mm, radius_mm)
    bias_coefficients: tuple[tuple[float, ...], ...]  # per channel, see _bias_field
    noise_std: float
    scale: tuple[float, ...]  # per channel
    offset: tuple[float, ...]  # per channel
    noise_seed: int


@dataclass(frozen=True)
class PhantomCase:
    """One rendered case: ``images`` are float32 ``(z, y, x)`` arrays per channel, ``label`` is uint8."""

    case_id: str
    images: tuple[np.ndarray, ...]
    label: np.ndarray
    geometry: Geometry


def case_id_of(index: int) -> str:
    return f"phantom_{index:03d}"


def _rotation(yaw: float, tilt_y: float, tilt_x: float) -> np.ndarray:
    """Rotation in array order (z, y, x): ``yaw`` about z (in-plane), then small tilts about y and x."""
    c, s = math.cos(yaw), math.sin(yaw)
    about_z = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    c, s = math.cos(tilt_y), math.sin(tilt_y)
    about_y = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    c, s = math.cos(tilt_x), math.sin(tilt_x)
    about_x = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return about_x @ about_y @ about_z


def _as_tuple(m: np.ndarray) -> tuple[tuple[float, float, float], ...]:
    return tuple(tuple(float(v) for v in row) for row in m)


def draw_case_params(seed: int, index: int) -> CaseParams:
    """Draw the random parameters of case ``index`` for ``seed`` (deterministic; independent of other cases).

    The helpers draw from one generator in a fixed order (geometry, body, organ, lesion, cysts, then the
    intensity parameters below); changing that order changes every phantom."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    geometry = _draw_geometry(rng, index)
    fov = np.asarray(geometry.shape) * np.asarray(geometry.spacing_mm)
    body_semi = (float(rng.uniform(0.43, 0.47) * fov[1]), float(rng.uniform(0.45, 0.48) * fov[2]))
    body_centre = (float(rng.uniform(-0.02, 0.02) * fov[1]), float(rng.uniform(-0.02, 0.02) * fov[2]))
    body_taper = float(rng.uniform(0.0, 0.1))
    fat_mm = float(rng.uniform(2.0, 3.5))
    # The lean tissue: inside the fat shell, where the body is narrowest.
    inner = np.array(body_semi) * (1 - body_taper) - fat_mm - 1.0
    organ = _draw_organ(rng, fov, body_centre, inner)
    lesion = _draw_lesion(rng, organ)
    cysts = _draw_cysts(rng, fov, body_centre, inner, organ)
    bias = tuple(tuple(float(v) for v in rng.normal(0.0, 0.07, size=9)) for _ in CHANNEL_NAMES)
    return CaseParams(
        case_id=case_id_of(index),
        geometry=geometry,
        body_semi_axes_mm=body_semi,
        body_centre_mm=body_centre,
        body_taper=body_taper,
        fat_thickness_mm=fat_mm,
        organ=organ,
        lesion=lesion,
        cysts=cysts,
        bias_coefficients=bias,
        noise_std=float(rng.uniform(0.025, 0.05)),
        scale=(float(rng.uniform(600, 1400)), float(rng.uniform(300, 900))),
        offset=(float(rng.uniform(-20, 60)), float(rng.uniform(-20, 60))),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def _draw_geometry(rng: np.random.Generator, index: int) -> Geometry:
    """Shape, spacing, origin and direction of case ``index`` (draws: shape, then origin)."""
    shape = (int(rng.integers(20, 29)), int(rng.integers(56, 73)), int(rng.integers(56, 73)))
    spacing = ODD_SPACING_MM if index % 5 == 3 else DEFAULT_SPACING_MM
    # Physical (x, y, z) order from here to the Geometry: the field of view straddles the scanner origin.
    flip_x = index == FLIPPED_CASE_INDEX
    direction = (-1.0 if flip_x else 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    half_phys = [(n - 1) / 2 * s for n, s in zip(reversed(shape), reversed(spacing))]
    origin = [-h + float(rng.uniform(-15, 15)) for h in half_phys]
    if flip_x:
        origin[0] = half_phys[0] + float(rng.uniform(-15, 15))
    return Geometry(
        shape=shape,
        spacing_mm=tuple(float(s) for s in spacing),
        origin_mm=tuple(origin),
        direction=direction,
    )


def _draw_organ(
    rng: np.random.Generator, fov: np.ndarray, body_centre: tuple[float, float], inner: np.ndarray
) -> Ellipsoid:
    """The organ: a rotated ellipsoid kept inside the lean tissue (``inner`` semi-axes (y, x)) and in view."""
    organ_axes = np.array([rng.uniform(16, 24), rng.uniform(11, 16), rng.uniform(12, 17)])
    organ_rot = _rotation(rng.uniform(0, math.pi), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))
    organ_half = Ellipsoid((0.0, 0.0, 0.0), tuple(organ_axes), _as_tuple(organ_rot)).half_extent_mm()
    room = np.maximum(inner - organ_half[1:], 0.0)
    room_z = max(fov[0] / 2 - organ_half[0] - 2.0, 0.0)
    organ_centre = np.array(
        [
            rng.uniform(-1, 1) * min(room_z, 6.0),
            body_centre[0] + rng.uniform(-1, 1) * room[0],
            body_centre[1] + rng.uniform(-1, 1) * room[1],
        ]
    )
    return Ellipsoid(
        tuple(float(v) for v in organ_centre), tuple(float(v) for v in organ_axes), _as_tuple(organ_rot)
    )


def _draw_lesion(rng: np.random.Generator, organ: Ellipsoid) -> Ellipsoid:
    """The lesion, strictly inside ``organ``.

    In the organ's normalised frame (organ = unit ball) the lesion is a small ellipsoid with semi-axes
    ``frac`` centred at ``u``; |u| + max(frac) < 1 keeps it strictly inside the organ."""
    organ_centre = np.asarray(organ.centre_mm)
    organ_axes = np.asarray(organ.semi_axes_mm)
    organ_rot = np.asarray(organ.rotation)
    frac = rng.uniform(0.5, 0.62, size=3)
    direction_u = rng.normal(size=3)
    direction_u /= np.linalg.norm(direction_u)
    u = direction_u * rng.uniform(0.15, 0.92 - frac.max())
    lesion_rot = organ_rot @ _rotation(rng.uniform(0, math.pi), 0.0, 0.0)
    return Ellipsoid(
        tuple(float(v) for v in organ_centre + organ_rot @ (u * organ_axes)),
        tuple(float(v) for v in _lesion_semi_axes(organ_axes, frac)),
        _as_tuple(lesion_rot),
    )


def _draw_cysts(
    rng: np.random.Generator,
    fov: np.ndarray,
    body_centre: tuple[float, float],
    inner: np.ndarray,
    organ: Ellipsoid,
) -> tuple[tuple[tuple[float, float, float], float], ...]:
    """0-2 cysts (centre_mm, radius_mm) in the body, each clear of the organ (up to 20 tries each)."""
    cysts = []
    for _ in range(int(rng.integers(0, 3))):
        for _try in range(20):
            radius = float(rng.uniform(2.5, 4.5))
            centre = np.array(
                [
                    rng.uniform(-0.35, 0.35) * fov[0],
                    body_centre[0] + rng.uniform(-0.7, 0.7) * inner[0],
                    body_centre[1] + rng.uniform(-0.7, 0.7) * inner[1],
                ]
            )
            if _outside_ellipsoid(centre, organ, margin_mm=radius + 3.0):
                cysts.append((tuple(float(v) for v in centre), radius))
                break
    return tuple(cysts)


def _lesion_semi_axes(organ_axes: np.ndarray, frac: np.ndarray) -> np.ndarray:
    # The lesion is rotated about the organ's first axis, so its two other axes mix: use their smaller
    # scale for both, which keeps the lesion within the ball of radius max(frac) in the normalised frame.
    out = frac * organ_axes
    inplane = min(organ_axes[1], organ_axes[2])
    out[1:] = frac[1:] * inplane
    return out


def _outside_ellipsoid(point: np.ndarray, e: Ellipsoid, margin_mm: float) -> bool:
    """Whether ``point`` is outside ``e`` grown by ``margin_mm`` along every axis (a conservative test)."""
    q = np.asarray(e.rotation).T @ (point - np.asarray(e.centre_mm))
    return float(((q / (np.asarray(e.semi_axes_mm) + margin_mm)) ** 2).sum()) > 1.0


def _grid_mm(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates in mm relative to the centre of the field of view, broadcastable (z, y, x)."""
    out = []
    for axis, (n, s) in enumerate(zip(geometry.shape, geometry.spacing_mm)):
        shape = [1, 1, 1]
        shape[axis] = n
        out.append(((np.arange(n) - (n - 1) / 2) * s).reshape(shape))
    return out[0], out[1], out[2]


def _inside(e: Ellipsoid, grid: tuple[np.ndarray, ...]) -> np.ndarray:
    r = np.asarray(e.rotation)
    d = [g - c for g, c in zip(grid, e.centre_mm)]
    total = 0.0
    for j in range(3):
        q = r[0, j] * d[0] + r[1, j] * d[1] + r[2, j] * d[2]
        total = total + (q / e.semi_axes_mm[j]) ** 2
    return total <= 1.0


def _bias_field(
    coefficients: tuple[float, ...], grid: tuple[np.ndarray, ...], fov_mm: np.ndarray
) -> np.ndarray:
    """exp of a quadratic polynomial in coordinates normalised to [-1, 1]: smooth, positive, about ±20 %."""
    z, y, x = (g / (f / 2) for g, f in zip(grid, fov_mm))
    terms = (z, y, x, z * z, y * y, x * x, z * y, z * x, y * x)
    log_b = sum(c * t for c, t in zip(coefficients, terms))
    return np.exp(log_b)


def render_case(p: CaseParams) -> PhantomCase:
    """Render the arrays of one case from its parameters (deterministic)."""
    g = p.geometry
    grid = _grid_mm(g)
    z, y, x = grid
    fov = np.asarray(g.shape) * np.asarray(g.spacing_mm)
    spacing = np.asarray(g.spacing_mm)

    taper = 1 - p.body_taper * (z / (fov[0] / 2)) ** 2
    by, bx = p.body_semi_axes_mm
    cy, cx = p.body_centre_mm
    body = ((y - cy) / (by * taper)) ** 2 + ((x - cx) / (bx * taper)) ** 2 <= 1.0
    lean = ((y - cy) / (by * taper - p.fat_thickness_mm)) ** 2 + (
        (x - cx) / (bx * taper - p.fat_thickness_mm)
    ) ** 2 <= 1.0
    body = np.broadcast_to(body, g.shape)
    lean = np.broadcast_to(lean, g.shape)
    organ = _inside(p.organ, grid)
    # Nested at voxel level too: with 3 mm slices the organ shell around the lesion can be thinner than a
    # voxel, so keep lesion voxels whose 6 neighbours are all organ (the lesion never touches background).
    lesion = _inside(p.lesion, grid) & ndimage.binary_erosion(organ)
    cyst = np.zeros(g.shape, dtype=bool)
    for centre, radius in p.cysts:
        cyst |= (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2
    cyst &= lean & ~organ

    noise_rng = np.random.default_rng(p.noise_seed)
    texture = ndimage.gaussian_filter(noise_rng.standard_normal(g.shape), sigma=_TEXTURE_SIGMA_MM / spacing)
    texture /= texture.std() + 1e-12

    images = []
    for ch in range(len(CHANNEL_NAMES)):
        clean = np.zeros(g.shape)
        for name, mask in (
            ("body", body),
            ("fat", body & ~lean),
            ("organ", organ),
            ("lesion", lesion),
            ("cyst", cyst),
        ):
            clean[mask] = TISSUE_INTENSITY[name][ch]
        clean += texture * _TEXTURE_STD[ch] * (lean & ~organ & ~cyst)
        clean += texture * (_TEXTURE_STD[ch] / 2) * (organ & ~lesion)
        clean = ndimage.gaussian_filter(clean, sigma=_PSF_SIGMA_MM / spacing)
        signal = clean * _bias_field(p.bias_coefficients[ch], grid, fov)
        signal += p.noise_std * noise_rng.standard_normal(g.shape)
        images.append((p.offset[ch] + p.scale[ch] * signal).astype(np.float32))

    label = np.zeros(g.shape, dtype=np.uint8)
    label[organ] = LABELS["organ"]
    label[lesion] = LABELS["lesion"]
    return PhantomCase(case_id=p.case_id, images=tuple(images), label=label, geometry=g)


def phantom_case(seed: int, index: int) -> PhantomCase:
    """Case ``index`` of the phantom dataset for ``seed``, in memory (what :func:`make_phantom_dataset` writes)."""
    return render_case(draw_case_params(seed, index))


def dataset_json(n_cases: int, seed: int) -> dict:
    """The ``dataset.json`` content of a phantom dataset with ``n_cases`` cases."""
    return {
        "name": DATASET_NAME,
        "description": (
            f"Synthetic two-channel MR-like phantom (autoseg.phantom v{PHANTOM_VERSION}, seed {seed}): "
            "an ellipsoidal organ holding an off-centre lesion that is bright in T2, in a textured body."
        ),
        "licence": "CC0 (synthetic)",
        "channel_names": {str(i): n for i, n in enumerate(CHANNEL_NAMES)},
        "labels": dict(LABELS),
        "numTraining": n_cases,
        "file_ending": FILE_ENDING,
        "phantom": {"version": PHANTOM_VERSION, "seed": seed},
    }


def make_phantom_dataset(out_dir: Path, n_cases: int = 10, seed: int = 0, overwrite: bool = False) -> Path:
    """Write ``n_cases`` phantom cases to ``out_dir`` in the nnU-Net v2 raw layout and return ``out_dir``.

    Layout: ``dataset.json``, ``imagesTr/phantom_NNN_0000.nii.gz`` (T1), ``..._0001.nii.gz`` (T2), float32;
    ``labelsTr/phantom_NNN.nii.gz``, uint8 with 0 background, 1 organ, 2 lesion. Every file is written
    atomically and ``dataset.json`` last, so an interrupted run leaves no ``dataset.json``.

    A missing or empty ``out_dir`` is created/used. A non-empty one raises :class:`AutosegError` unless
    ``overwrite`` is true, in which case only ``imagesTr/``, ``labelsTr/`` and ``dataset.json`` are replaced
    (anything else in the folder is left alone). Same ``seed`` gives identical arrays.
    """
    out_dir = Path(out_dir)
    if n_cases < 1:
        raise AutosegError(f"{out_dir}: n_cases must be at least 1, got {n_cases}")
    if out_dir.exists() and not out_dir.is_dir():
        raise AutosegError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise AutosegError(
                f"{out_dir}: folder is not empty; choose an empty folder or pass overwrite=True"
            )
        for name in ("imagesTr", "labelsTr"):
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        (out_dir / "dataset.json").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    for index in range(n_cases):
        case = phantom_case(seed, index)
        for ch, image in enumerate(case.images):
            write_volume(image, case.geometry, out_dir / "imagesTr" / f"{case.case_id}_{ch:04d}{FILE_ENDING}")
        write_volume(case.label, case.geometry, out_dir / "labelsTr" / f"{case.case_id}{FILE_ENDING}")
    write_json(out_dir / "dataset.json", dataset_json(n_cases, seed))
    return out_dir
