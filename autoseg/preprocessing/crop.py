"""Cropping to the nonzero region (where any channel is nonzero), as nnU-Net does before everything else.

A bounding box is ``((z0, z1), (y0, y1), (x0, x1))`` in array order, half-open.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BBox = tuple[tuple[int, int], ...]


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask ``(Z, Y, X)`` of voxels where any channel of ``image`` ``(C, Z, Y, X)`` is nonzero.

    Holes are filled so that dark structures inside the body (e.g. ventricles) stay inside the mask.
    """
    mask = np.any(image != 0, axis=0)
    return ndimage.binary_fill_holes(mask)


def bbox_of(mask: np.ndarray) -> BBox:
    """Tight bounding box of ``mask``; the whole array if the mask is empty (e.g. an all-zero image)."""
    if not mask.any():
        return tuple((0, int(s)) for s in mask.shape)
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        out.append((int(nz[0]), int(nz[-1]) + 1))
    return tuple(out)


def slicer(bbox: BBox) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in bbox)


def crop_to_nonzero(
    image: np.ndarray, label: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, BBox]:
    """Crop ``image`` ``(C, Z, Y, X)`` (and ``label`` ``(Z, Y, X)``) to the nonzero bounding box.

    Returns ``(image, label, mask, bbox)`` where ``mask`` is the cropped nonzero mask.
    """
    mask = nonzero_mask(image)
    bbox = bbox_of(mask)
    s = slicer(bbox)
    image = image[(slice(None),) + s]
    if label is not None:
        label = label[s]
    return image, label, mask[s], bbox


def uncrop(array: np.ndarray, bbox: BBox, full_shape: tuple[int, ...], fill: float = 0) -> np.ndarray:
    """Place ``array`` (``(..., Z, Y, X)`` cropped by ``bbox``) back into an array of spatial ``full_shape``."""
    lead = array.shape[: array.ndim - len(full_shape)]
    out = np.full(lead + tuple(full_shape), fill, dtype=array.dtype)
    out[(Ellipsis,) + slicer(bbox)] = array
    return out
