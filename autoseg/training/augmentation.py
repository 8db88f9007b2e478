"""Data augmentation with batchgenerators, configured from :class:`AugmentationSettings`.

batchgenerators draws its random numbers from the global ``np.random``; the training loop seeds it per run
(and restores its state on resume) so a run is reproducible. Spatial augmentation (rotation, scaling) works on
an enlarged patch (:func:`augmentation_patch_size`) and crops its centre, so rotated corners hold real data.
For anisotropic 3D patches (axis 0 more than 3× shorter than the others) rotation is restricted to the plane
of axes 1-2, elastic deformation happens in that plane only (the same in every slice) and low-resolution
simulation leaves axis 0 alone, as slices are too thick to rotate or deform across. 90° rotations and
transposes only exchange axes of similar target spacing and equal patch extent (:func:`interchangeable_axes`).

Signed distance maps (``"dist"``, for the boundary loss) follow the labels (:func:`augment`): every output
voxel takes the maps of the voxel its label came from (nearest neighbour, as the labels, so a map's sign agrees
with the augmented label voxel for voxel), mirrored with them; the intensity transforms never see them. Their
values stay in voxels of the case (a patch zoomed by ``s`` has distances off by that factor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import (
    MirrorTransform,
    Rot90Transform,
    SpatialTransform,
    TransposeAxesTransform,
)

from autoseg.settings import AugmentationSettings


def is_anisotropic_patch(patch_size: list[int]) -> bool:
    """3D patches whose first axis is over 3× shorter than the largest other axis get 2D-style spatial aug."""
    return len(patch_size) == 3 and max(patch_size[1:]) / patch_size[0] > 3


def _rotation(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    m = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def augmentation_patch_size(patch_size: list[int], settings: AugmentationSettings) -> list[int]:
    """Size of the region to extract so that, after a rotation by up to ``rotation_deg`` about any one axis
    (only axis 0 for 2D and anisotropic patches), the centre crop of ``patch_size`` still lies inside it.

    Zooming out (scale > 1) may still reach past the region; those voxels read as 0 (the z-scored mean) and
    background, as at the image border.
    """
    p = np.asarray(patch_size, dtype=float)
    dim = len(p)
    p3 = np.concatenate([[1.0], p]) if dim == 2 else p
    a = math.radians(settings.rotation_deg) if settings.p_rotation > 0 else 0.0
    axes = [0] if dim == 2 or is_anisotropic_patch(patch_size) else [0, 1, 2]
    corners = np.array(np.meshgrid(*[[-v / 2, v / 2] for v in p3], indexing="ij")).reshape(3, -1)
    extent = p3.copy()
    for ax in axes:
        for ang in (-a, a):
            rc = _rotation(ax, ang) @ corners
            extent = np.maximum(extent, rc.max(axis=1) - rc.min(axis=1))
    out = extent[1:] if dim == 2 else extent
    return [int(math.ceil(v - 1e-6)) for v in np.maximum(out, p)]


SPACING_TOLERANCE = 1.2
"""Two axes are interchangeable (90° rotations, transposes) when the larger of their target spacings is at most
this many times the smaller (and the patch is as long along both)."""


def interchangeable_axes(
    spacing: Sequence[float], patch_size: Sequence[int], tolerance: float = SPACING_TOLERANCE
) -> tuple[int, ...]:
    """Patch axes that 90° rotations and transposes may exchange: the largest group of two or more axes whose
    target spacings are within ``tolerance`` (largest / smallest) and along which the patch has the same
    extent; among groups of that size, the one of most similar spacings (then the lowest axes). ``spacing`` is
    the configuration's, in the patch's axis order (3 entries; a 2D patch has the last two). ``()``: none."""
    dim = len(patch_size)
    sp = [float(v) for v in spacing][-dim:]

    def ratio(group: tuple[int, ...]) -> float:
        return max(sp[a] for a in group) / min(sp[a] for a in group)

    for size in range(dim, 1, -1):
        groups = [
            g
            for g in combinations(range(dim), size)
            if len({patch_size[a] for a in g}) == 1 and ratio(g) <= tolerance * (1 + 1e-9)
        ]
        if groups:
            return min(groups, key=ratio)
    return ()


def axis_augmentation_note(
    patch_size: Sequence[int], spacing: Sequence[float], settings: AugmentationSettings
) -> str | None:
    """One line for the run's log on 90° rotations and transposes: the axes they exchange, or why there are
    none; ``None`` when both are off."""
    if settings.p_rot90 == 0 and settings.p_transpose == 0:
        return None
    axes = interchangeable_axes(spacing, patch_size)
    if not axes:
        return (
            f"90-degree rotations and transposes off: no two patch axes have spacings within "
            f"{SPACING_TOLERANCE:g}x and equal extent (spacing {list(spacing)}, patch {list(patch_size)})"
        )
    return f"90-degree rotations and transposes among patch axes {axes}"


_SPATIAL_BORDERS = dict(
    border_mode_data="constant",
    border_cval_data=0,
    order_data=3,
    border_mode_seg="constant",
    border_cval_seg=0,
    order_seg=0,
    random_crop=False,
    patch_center_dist_from_border=None,
)


ELASTIC_ALPHA_2D = 200 / 900
"""What a 2D displacement field (2D patches, planes of thick slices) multiplies ``alpha`` by: at the same alpha
and sigma, batchgenerators' 2D field moves voxels about 4× as far as its 3D one (measured RMS displacement at
alpha 900: 22 and 16 voxels in 2D, 5.6 and 3.9 in 3D, for sigma 9 and 13); nnU-Net v1 used alpha 0-200 in 2D
against 0-900 in 3D, this ratio."""


def _elastic(settings: AugmentationSettings, planar: bool) -> dict:
    scale = ELASTIC_ALPHA_2D if planar else 1.0
    return dict(
        alpha=(scale * settings.elastic_alpha_min, scale * settings.elastic_alpha_max),
        sigma=(settings.elastic_sigma_min, settings.elastic_sigma_max),
        p_el_per_sample=settings.p_elastic,
    )


class InPlaneElasticTransform(AbstractTransform):
    """Elastic deformation within the planes of axes 1-2 of a 3D batch ``(b, c, z, y, x)``, the same in every
    plane of a sample, so nothing moves along axis 0 (thick slices are not mixed): each sample's planes become
    channels of a 2D batch for batchgenerators' SpatialTransform (elastic only), then the batch is reshaped
    back. Its shape is kept; voxels displaced from outside read as 0 (data) and background (seg). A 2D field:
    ``alpha`` times :data:`ELASTIC_ALPHA_2D`."""

    def __init__(self, settings: AugmentationSettings):
        self.kwargs = dict(
            do_elastic_deform=True,
            **_elastic(settings, True),
            do_rotation=False,
            do_scale=False,
            **_SPATIAL_BORDERS,
        )

    def __call__(self, **batch):
        data, seg = batch["data"], batch["seg"]
        spatial = SpatialTransform(list(data.shape[3:]), **self.kwargs)
        out = spatial(
            data=data.reshape(data.shape[0], -1, *data.shape[3:]),
            seg=seg.reshape(seg.shape[0], -1, *seg.shape[3:]),
        )
        return {**batch, "data": out["data"].reshape(data.shape), "seg": out["seg"].reshape(seg.shape)}


def _spatial(patch_size: list[int], settings: AugmentationSettings, aniso: bool) -> SpatialTransform:
    """Rotation, scaling and (3D isotropic and 2D patches) elastic deformation in one interpolation; a 2D
    patch's field has ``alpha`` times :data:`ELASTIC_ALPHA_2D`."""
    rot = math.radians(settings.rotation_deg)
    if len(patch_size) == 2 or aniso:
        angles = dict(angle_x=(-rot, rot), angle_y=(0, 0), angle_z=(0, 0))
    else:
        angles = dict(angle_x=(-rot, rot), angle_y=(-rot, rot), angle_z=(-rot, rot))
    return SpatialTransform(
        patch_size,
        do_elastic_deform=settings.p_elastic > 0 and not aniso,
        **_elastic(settings, len(patch_size) == 2),
        do_rotation=settings.p_rotation > 0,
        **angles,
        p_rot_per_axis=1,
        do_scale=settings.p_scale > 0,
        scale=(settings.scale_min, settings.scale_max),
        **_SPATIAL_BORDERS,
        p_scale_per_sample=settings.p_scale,
        p_rot_per_sample=settings.p_rotation,
    )


def _axis_transforms(
    patch_size: list[int], settings: AugmentationSettings, spacing: Sequence[float]
) -> list[AbstractTransform]:
    axes = interchangeable_axes(spacing, patch_size)
    out: list[AbstractTransform] = []
    if axes and settings.p_rot90 > 0:
        out.append(Rot90Transform(num_rot=(1, 2, 3), axes=axes, p_per_sample=settings.p_rot90))
    if axes and settings.p_transpose > 0:
        out.append(TransposeAxesTransform(transpose_any_of_these=axes, p_per_sample=settings.p_transpose))
    return out


def _intensity(settings: AugmentationSettings, aniso: bool) -> list[AbstractTransform]:
    return [
        GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_sample=settings.p_noise),
        GaussianBlurTransform(
            (0.5, 1.0), different_sigma_per_channel=True, p_per_sample=settings.p_blur, p_per_channel=0.5
        ),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=settings.p_brightness),
        ContrastAugmentationTransform(p_per_sample=settings.p_contrast),
        SimulateLowResolutionTransform(
            zoom_range=(0.5, 1),
            per_channel=True,
            p_per_channel=0.5,
            order_downsample=0,
            order_upsample=3,
            p_per_sample=settings.p_lowres,
            ignore_axes=(0,) if aniso else None,
        ),
        GammaTransform(
            (0.7, 1.5),
            invert_image=True,
            per_channel=True,
            retain_stats=True,
            p_per_sample=settings.p_gamma_inverted,
        ),
        GammaTransform(
            (0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=settings.p_gamma
        ),
    ]


def build_train_transforms(
    patch_size: list[int], settings: AugmentationSettings, spacing: Sequence[float]
) -> Compose:
    """The training augmentation of a batch extracted at :func:`augmentation_patch_size`, cropped to
    ``patch_size``; ``spacing`` is the configuration's target spacing (3 entries, the patch's axis order),
    which decides the axes 90° rotations and transposes exchange (:func:`interchangeable_axes`)."""
    aniso = is_anisotropic_patch(patch_size)
    transforms: list[AbstractTransform] = []
    if aniso and settings.p_elastic > 0:
        transforms.append(InPlaneElasticTransform(settings))
    transforms.append(_spatial(patch_size, settings, aniso))
    transforms += _axis_transforms(patch_size, settings, spacing)
    transforms += _intensity(settings, aniso)
    if settings.p_mirror > 0:
        transforms.append(MirrorTransform(axes=tuple(range(len(patch_size)))))
    return Compose(transforms)


INDEX_LIMIT = 2**24
"""Patches of at least this many voxels carry their maps through the transforms (float32 indices stop being
exact integers there)."""


def augment(transforms: Compose, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Apply ``transforms`` to ``batch``; its ``"dist"`` maps (if any) follow the labels voxel for voxel.

    The spatial transforms only pick voxels for the labels (nearest neighbour, crops, flips), so one extra
    ``seg`` channel holding each voxel's index (+1) in the extracted patch says, after them, where every output
    voxel came from; the maps of all structures are then gathered from there at once (far cheaper than
    interpolating each map). A voxel taken from beyond the extracted patch (index 0: the seg border value) gets
    ``fill``, the patch's largest distance rounded up, a large positive distance (0 for a structure absent from
    the case). Float32 holds indices exactly below 2^24 voxels; larger patches carry the maps themselves as
    ``seg`` channels (:func:`_carry_maps`)."""
    if "dist" not in batch:
        return transforms(**batch)
    seg, dist = batch["seg"], batch["dist"]
    n, spatial = seg.shape[1], dist.shape[2:]
    fill = np.ceil(np.maximum(dist.max(axis=tuple(range(2, dist.ndim))), 0)).astype(np.float32)  # (B, C)
    if int(np.prod(spatial)) >= INDEX_LIMIT:
        return _carry_maps(transforms, batch, fill)
    packed = np.empty((seg.shape[0], n + 1) + spatial, dtype=np.float32)
    packed[:, :n] = seg
    packed[:, n] = np.arange(1, int(np.prod(spatial)) + 1, dtype=np.float32).reshape(spatial)
    out = transforms(data=batch["data"], seg=packed)
    source = out["seg"][:, n].astype(np.int64) - 1  # (B, *patch); -1: from beyond the extracted patch
    maps = np.empty((dist.shape[0], dist.shape[1]) + source.shape[1:], dtype=np.float32)
    for i in range(dist.shape[0]):
        flat = dist[i].reshape(dist.shape[1], -1)
        maps[i] = flat[:, np.maximum(source[i], 0).ravel()].reshape(maps.shape[1:])
        maps[i][:, source[i] < 0] = fill[i][:, None]
    return {"data": out["data"], "seg": np.ascontiguousarray(out["seg"][:, :n]), "dist": maps}


def _carry_maps(transforms: Compose, batch: dict[str, np.ndarray], fill: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`augment` with the maps as extra ``seg`` channels, shifted by ``-fill`` (a whole number of
    voxels, so exactly) so that the seg border value 0 becomes ``fill``."""
    seg, dist = batch["seg"], batch["dist"]
    n, fill = seg.shape[1], fill.reshape(fill.shape + (1,) * (dist.ndim - 2))
    packed = np.empty((seg.shape[0], n + dist.shape[1]) + seg.shape[2:], dtype=np.float32)
    packed[:, :n] = seg
    np.subtract(dist, fill, out=packed[:, n:])
    out = transforms(data=batch["data"], seg=packed)
    return {
        "data": out["data"],
        "seg": np.ascontiguousarray(out["seg"][:, :n]),
        "dist": np.ascontiguousarray(out["seg"][:, n:] + fill, dtype=np.float32),
    }


def center_crop(batch: dict[str, np.ndarray], patch_size: list[int]) -> dict[str, np.ndarray]:
    """Centre-crop ``data``/``seg`` (and ``dist``) spatially to ``patch_size`` (validation batches: no
    augmentation)."""
    out = {}
    for k, v in batch.items():
        spatial = v.shape[2:]
        sl = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(spatial, patch_size))
        out[k] = np.ascontiguousarray(v[(slice(None), slice(None)) + sl])
    return out
