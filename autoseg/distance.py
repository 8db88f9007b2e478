"""Signed distance maps of label masks (numpy and scipy only): what the boundary loss multiplies the predicted
probabilities by (Kervadec et al. 2019). Shared by the loss (:mod:`autoseg.networks.losses`, from a patch's
truth) and by the maps stored beside each preprocessed case (:mod:`autoseg.preprocessing.distance_maps`,
from the whole case's labels), so both follow one definition. Distances are Euclidean, in voxels of the array
given."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance map of a boolean mask in voxels: outside the mask the distance to its nearest voxel,
    inside minus (the distance to the nearest voxel outside, less 1), so 0 on the mask's own border voxels;
    zeros when the mask is empty or full (no boundary)."""
    if not mask.any() or mask.all():
        return np.zeros(mask.shape)
    outside = ndimage.distance_transform_edt(~mask)
    inside = ndimage.distance_transform_edt(mask)
    return outside - (inside - 1) * mask


def structure_masks(
    label: np.ndarray, channels: list[list[int]], ignore_label: int | None = None
) -> list[np.ndarray]:
    """One boolean mask per channel: the voxels whose label value is one of the channel's values (a foreground
    class ``[c]``, or a region, a union of values); voxels of ``ignore_label`` belong to none, as the loss
    masks them."""
    keep = None if ignore_label is None else label != ignore_label
    masks = []
    for values in channels:
        m = np.isin(label, np.asarray(values))
        masks.append(m if keep is None else m & keep)
    return masks


def label_distance_maps(
    label: np.ndarray, channels: list[list[int]], ignore_label: int | None = None
) -> np.ndarray:
    """``(len(channels), *label.shape)`` float32: :func:`signed_distance` of each channel's mask
    (:func:`structure_masks`) over the whole of ``label``."""
    out = np.empty((len(channels),) + label.shape, dtype=np.float32)
    for i, m in enumerate(structure_masks(label, channels, ignore_label)):
        out[i] = signed_distance(m)
    return out
