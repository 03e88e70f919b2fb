"""Opening sources and storing results.

A source is a NumPy array (computed results), a dask array, a zarr array, or
the path or URL of a zarr array, of a group holding a single array, or of an
OME-Zarr image (its full-resolution level). Zarr sources stay zarr arrays:
the engine's tasks slice them directly, so nothing is read before computing.
"""

from __future__ import annotations

import os

import dask.array as da
import numpy as np
import zarr

__all__ = ["open_source", "to_zarr"]


def _ome_level(group, level=0):
    """Path of the `level`-th dataset of an OME-Zarr image group, or None."""
    attrs = group.attrs.asdict()
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        return None
    datasets = multiscales[0]["datasets"]
    if not 0 <= level < len(datasets):
        msg = f"`level` must be in [0, {len(datasets)}) for this image, got {level}"
        raise ValueError(msg)
    return datasets[level]["path"]


def _open_zarr(path, name, level=0):
    try:
        node = zarr.open(
            store=os.fspath(path) if isinstance(path, os.PathLike) else path, mode="r"
        )
    except FileNotFoundError:
        msg = f"`{name}`: no zarr array or group at {path!r}"
        raise FileNotFoundError(msg) from None
    except Exception as error:  # zarr raises several types for unreadable stores
        msg = f"`{name}`: cannot open {path!r} as zarr: {error}"
        raise ValueError(msg) from None
    if isinstance(node, zarr.Array):
        return node
    dataset = _ome_level(node, level)
    if dataset is not None:
        return node[dataset]
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


def open_source(source, name="source"):
    """Return ``(array, lazy)`` for any supported kind of source.

    Parameters
    ----------
    source : array_like, dask array, zarr array, str or os.PathLike
        The image, or where it is stored.
    name : str
        Parameter name used in error messages.

    Returns
    -------
    array : ndarray, dask array or zarr array
    lazy : bool
        Whether results should stay lazy (everything but NumPy input).

    Examples
    --------
    >>> array, lazy = open_source([[1, 2], [3, 4]])
    >>> array.shape, lazy
    ((2, 2), False)
    """
    if isinstance(source, str | os.PathLike):
        return _open_zarr(source, name), True
    if isinstance(source, da.Array):
        return _zarr_behind(source), True
    if isinstance(source, zarr.Array):
        return source, True
    if source is None:
        msg = f"`{name}` must be an array or the path of a zarr array, got None"
        raise TypeError(msg)
    array = np.asarray(source)
    if array.dtype == object:
        msg = f"`{name}` must be a numeric array, got dtype object"
        raise TypeError(msg)
    return array, False


def to_zarr(
    array, store, *, chunks=None, compressors="auto", overwrite=False, attributes=None
):
    """Store a (lazy) array into a new compressed zarr v3 array, chunk by chunk.

    Parameters
    ----------
    array : dask array or ndarray
        The result to store; it is computed block by block, never whole.
    store : str, os.PathLike or zarr store
        Where to create the zarr array.
    chunks : tuple of int or None
        Storage chunks; default: the first chunk shape of `array`.
    compressors : codec, list of codecs or "auto"
        zarr v3 compressors; "auto" is zarr's default (zstd).
    overwrite : bool
        Replace an existing array at `store`.
    attributes : dict or None
        User attributes to record in the array's metadata.

    Returns
    -------
    zarr.Array
        The written array.

    Examples
    --------
    >>> import tempfile, dask.array as da
    >>> path = tempfile.mkdtemp() + "/out.zarr"
    >>> z = to_zarr(da.ones((4, 6), chunks=2), path)
    >>> z.shape, z.chunks, int(z[:].sum())
    ((4, 6), (2, 2), 24)
    """
    array = array if isinstance(array, da.Array) else da.from_array(np.asarray(array))
    if chunks is None:
        chunks = tuple(c[0] for c in array.chunks)
    target = zarr.create_array(
        store,
        shape=array.shape,
        chunks=chunks,
        dtype=array.dtype,
        compressors=compressors,
        overwrite=overwrite,
        attributes=attributes or {},
        zarr_format=3,
    )
    array.rechunk(chunks).store(target, lock=False)
    return target
