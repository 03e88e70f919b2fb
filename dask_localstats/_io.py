"""Opening sources and storing results.

A source is a NumPy array (computed results), a dask array, a zarr array, or
the path or URL of a zarr array, of a group holding a single array, or of an
OME-Zarr image (its full-resolution level, or another with `level`). Zarr
sources stay zarr arrays: the engine's tasks slice them directly, so nothing
is read before computing.

TIFF sources (a multi-page file, or a folder or glob of slices) open as the
lazy arrays of :mod:`dask_localstats._tiff`.

Reading a region names the chunk that does not decode (:func:`read_region`);
the engine's blocks read stored sources through a
:class:`~dask_localstats._cache.ChunkCache`.
"""

from __future__ import annotations

import itertools
import os

import dask.array as da
import numpy as np
import zarr

from ._hdf5 import Hdf5Source, hdf5_path, open_hdf5
from ._ome import level_path
from ._public import public
from ._stored import locate
from ._tiff import TiffSource, open_tiff, tiff_files
from .errors import CorruptChunkError, LocalStatsError, SourceNotFoundError

__all__ = ["open_source"]


def read_region(array, region):
    """``array[region]`` as an ndarray, naming what is damaged if it fails.

    Parameters
    ----------
    array : zarr array or any sliceable array
    region : tuple of slice

    Raises
    ------
    CorruptChunkError
        When a stored chunk of a zarr array does not decode (a truncated or
        overwritten file): the message names the chunk's key and the store.
        TIFF files are named by :func:`_read_tiff` itself.
    """
    try:
        return np.asarray(array[region])
    except (MemoryError, LocalStatsError):
        raise
    except Exception as error:
        if not isinstance(array, zarr.Array):
            raise
        raise _damaged_chunk(array, region, error) from error


def _damaged_chunk(array, region, error):
    """The error naming the first chunk of `region` that does not decode."""
    shape = array.shards or array.chunks
    ranges = [
        range(s.start // c, -(-s.stop // c)) for s, c in zip(region, shape, strict=True)
    ]
    for index in itertools.product(*ranges):
        chunk = tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, shape, array.shape, strict=True)
        )
        try:
            array[chunk]
        except Exception as chunk_error:  # this one is damaged
            key = array.metadata.encode_chunk_key(index)
            msg = (
                f"chunk {key!r} of {locate(array)} cannot be read: "
                f"{type(chunk_error).__name__}: {chunk_error}"
            )
            return CorruptChunkError(msg)
    msg = f"reading {region} of {locate(array)} failed: {type(error).__name__}: {error}"
    return CorruptChunkError(msg)


def _open_zarr(path, name, level=0, storage_options=None):
    options = {} if storage_options is None else {"storage_options": storage_options}
    try:
        node = zarr.open(
            store=os.fspath(path) if isinstance(path, os.PathLike) else path,
            mode="r",
            **options,
        )
    except FileNotFoundError:
        msg = f"`{name}`: no zarr array or group at {path!r}"
        raise SourceNotFoundError(msg) from None
    except Exception as error:  # zarr raises several types for unreadable stores
        msg = f"`{name}`: cannot open {path!r} as zarr: {error}"
        raise ValueError(msg) from None
    if isinstance(node, zarr.Array):
        if level != 0:
            msg = f"`level` applies to OME-Zarr images; {path!r} is a plain array, got level {level}"
            raise ValueError(msg)
        return node
    dataset = level_path(node, level)
    if dataset is not None:
        return node[dataset]
    if level != 0:
        msg = f"`level` applies to OME-Zarr images; {path!r} is a plain group, got level {level}"
        raise ValueError(msg)
    arrays = list(node.arrays())
    if len(arrays) != 1:
        names = sorted(n for n, _ in arrays)
        msg = (
            f"`{name}`: {path!r} is a zarr group with {len(arrays)} arrays "
            f"({names}); give the path of one array"
        )
        raise ValueError(msg)
    return arrays[0][1]


def _zarr_behind(array):
    """The zarr array a dask array plainly wraps (``da.from_zarr``), else itself.

    Reading the store directly lets tasks fetch exactly their region and keeps
    the user's own chunk tasks (for example in ``v - background(v)``) apart
    from ours, so neither pins the other's chunks in memory.
    """
    original = f"original-{array.name}"
    if set(array.dask.layers) == {original, array.name}:
        wrapped = array.dask[original]
        if isinstance(wrapped, zarr.Array) and wrapped.shape == array.shape:
            return wrapped
    return array


@public
def open_source(
    source,
    name="source",
    level=0,
    series=None,
    setup=0,
    timepoint=0,
    *,
    storage_options=None,
):
    """Open any supported kind of source as an array, reading no data.

    Parameters
    ----------
    source : array_like, dask array, zarr array, str or os.PathLike
        The image, or where it is stored: a zarr array, group or OME-Zarr
        image, a multi-page TIFF file, or a folder or glob of 2-D TIFF slices.
    name : str
        Parameter name used in error messages.
    level : int
        Resolution level of an OME-Zarr image or a pyramidal TIFF file;
        0 is full resolution.
    series : str or None
        For a folder or glob of TIFF slices holding several series
        (channels, tiles): which one, by its label or a part of it that only
        one label has. Several series without `series` are refused.
    setup, timepoint : int
        For a BigDataViewer or Imaris HDF5 file (``file.h5``,
        ``file.ims``; a plain dataset is ``file.h5:/path/to/dataset``): the
        setup (Imaris: channel) and time point.
    storage_options : dict or None
        fsspec options of a zarr URL (``s3://...``, ``gs://...``):
        credentials, ``endpoint_url`` and the like.

    Returns
    -------
    ndarray, dask array, zarr array, TiffStack or TiffSlices
        An ndarray only for in-memory input (lists, NumPy arrays); the
        others are read region by region when computing. A dask array that
        plainly wraps a zarr array (``da.from_zarr``) gives that zarr array.

    Raises
    ------
    SourceNotFoundError
        A path that does not exist (a ``FileNotFoundError``).
    ValueError, TypeError
        A path that cannot be opened as an image, or a non-numeric array.

    Examples
    --------
    >>> open_source([[1, 2], [3, 4]]).shape
    (2, 2)
    """
    if isinstance(source, str | os.PathLike):
        hdf5 = hdf5_path(source)
        if hdf5 is not None:
            return open_hdf5(*hdf5, level, setup, timepoint, name)
        tiff = tiff_files(source)
        if tiff is not None:
            return open_tiff(*tiff, source, name, level, series)
        return _open_zarr(source, name, level, storage_options)
    if isinstance(source, TiffSource | Hdf5Source | zarr.Array):
        return source
    if isinstance(source, da.Array):
        return _zarr_behind(source)
    if source is None:
        msg = f"`{name}` must be an array or the path of a zarr array, got None"
        raise TypeError(msg)
    array = np.asarray(source)
    if array.dtype == object:
        msg = f"`{name}` must be a numeric array, got dtype object"
        raise TypeError(msg)
    return array
