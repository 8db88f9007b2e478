"""Data augmentation with batchgenerators, configured from :class:`AugmentationSettings`.

batchgenerators draws its random numbers from the global ``np.random``; the training loop seeds it per run
(and restores its state on resume) so a run is reproducible. Spatial augmentation (rotation, scaling) works on
an enlarged patch (:func:`augmentation_patch_size`) and crops its centre, so rotated corners hold real data.
For anisotropic 3D patches (axis 0 more than 3× shorter than the others) rotation is restricted to the plane
of axes 1-2 and low-resolution simulation leaves axis 0 alone, as slices are too thick to rotate across.

Signed distance maps (``"dist"``, for the boundary loss) follow the labels (:func:`augment`): every output
voxel takes the maps of the voxel its label came from (nearest neighbour, as the labels, so a map's sign agrees
with the augmented label voxel for voxel), mirrored with them; the intensity transforms never see them. Their
values stay in voxels of the case (a patch zoomed by ``s`` has distances off by that factor).
"""

from __future__ import annotations

import math

import numpy as np
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform

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


def build_train_transforms(patch_size: list[int], settings: AugmentationSettings) -> Compose:
    dim = len(patch_size)
    aniso = is_anisotropic_patch(patch_size)
    rot = math.radians(settings.rotation_deg)
    if dim == 2 or aniso:
        angles = dict(angle_x=(-rot, rot), angle_y=(0, 0), angle_z=(0, 0))
    else:
        angles = dict(angle_x=(-rot, rot), angle_y=(-rot, rot), angle_z=(-rot, rot))
    transforms = [
        SpatialTransform(
            patch_size,
            patch_center_dist_from_border=None,
            do_elastic_deform=False,
            do_rotation=settings.p_rotation > 0,
            **angles,
            p_rot_per_axis=1,
            do_scale=settings.p_scale > 0,
            scale=(settings.scale_min, settings.scale_max),
            border_mode_data="constant",
            border_cval_data=0,
            order_data=3,
            border_mode_seg="constant",
            border_cval_seg=0,
            order_seg=0,
            random_crop=False,
            p_el_per_sample=0,
            p_scale_per_sample=settings.p_scale,
            p_rot_per_sample=settings.p_rotation,
        ),
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
    if settings.p_mirror > 0:
        transforms.append(MirrorTransform(axes=tuple(range(dim))))
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
