"""Resolution pyramids of written OME-Zarr images, level by level.

Viewers (napari, neuroglancer) show a large image from a coarse level first.
Each level here halves the spatial axes that are still longer than
:data:`MIN_SIZE` voxels (a stack of few slices keeps its z), by the mean of
each 2 x 2 x ... block (the last voxel of an odd axis counts once). A level
is computed from the level above as stored, chunk by chunk, so no level is
ever held in memory; it is written with the same chunk shape, one whole
chunk per task.

A voxel of level ``k`` covers ``f = 2**k`` voxels of level 0 along a halved
axis: its scale is ``f`` times level 0's, and its center lies
``(f - 1) / 2`` voxels of level 0 further, which the translation records.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

__all__ = ["MIN_SIZE", "halved_axes", "level_image"]

MIN_SIZE = 32


def halved_axes(shape, spatial):
    """The axes of `shape` (among `spatial`) that the next level halves."""
    return [d for d in spatial if shape[d] > MIN_SIZE]


def downsample(array, axes):
    """`array` (dask) halved on `axes` by 2-block means, in its own dtype."""
    pad = [(0, array.shape[d] % 2 if d in axes else 0) for d in range(array.ndim)]
    if any(p for _, p in pad):
        array = da.pad(array, pad, mode="edge")
    mean = da.coarsen(np.mean, array.astype(np.float64), dict.fromkeys(axes, 2))
    dtype = np.dtype(array.dtype)
    if dtype.kind in "iu":
        mean = da.round(mean)
    return mean.astype(dtype)


def level_image(image, factors):
    """Scale and translation of a level whose voxels span `factors` of level 0.

    Parameters
    ----------
    image : OmeImage
        Level 0.
    factors : sequence of int
        Level-0 voxels per voxel, per axis.

    Returns
    -------
    scale, translation : list of float

    Examples
    --------
    >>> from dask_localstats._ome import OmeImage
    >>> level_image(OmeImage.default(3), [1, 4, 4])
    ([1.0, 4.0, 4.0], [0.0, 1.5, 1.5])
    """
    scale = [s * f for s, f in zip(image.scale, factors, strict=True)]
    translation = [
        t + (f - 1) / 2 * s
        for t, s, f in zip(image.translation, image.scale, factors, strict=True)
    ]
    return scale, translation
