"""The public functions, with ClearMap's signatures.

Each function validates its arguments once, builds the two-stage lazy
pipeline of :mod:`dask_localstats._engine` and, for NumPy input, computes it
with dask's threaded scheduler so that NumPy in gives NumPy out. Options that
go beyond ClearMap are keyword-only.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import dask.array as da
import dask.threaded
import numpy as np
from dask.base import tokenize

from ._engine import (
    OUTPUT_CHUNK_BYTES,
    auto_chunks,
    coarse_stage,
    computing,
    fused,
    identity,
    read_through,
    resample_stage,
    resampled_into,
)
from ._grid import make_grid
from ._interpolate import ALIGNS, each_slab
from ._io import open_source
from ._kernels import Function, Histogram, Missing, Percentile
from ._public import public
from ._stored import check_chunks
from ._tiff import TiffSlices

_PLANES = 4  # TIFF slices a full-resolution chunk holds at least


def _check_interpolate(interpolate):
    if interpolate is None:
        return None
    if isinstance(interpolate, bool) or not isinstance(interpolate, int | np.integer):
        msg = f"`interpolate` must be None or an int in 0..5, got {interpolate!r}"
        raise TypeError(msg)
    if not 0 <= interpolate <= 5:
        msg = f"`interpolate` must be None or an int in 0..5, got {interpolate!r}"
        raise ValueError(msg)
    return int(interpolate)


def _check_choice(name, value, choices):
    if value not in choices:
        msg = f"`{name}` must be one of {choices}, got {value!r}"
        raise ValueError(msg)
    return value


def _check_missing(grid, dtype, nan_policy, min_coverage, fill):
    _check_choice("nan_policy", nan_policy, ("propagate", "omit"))
    _check_choice("fill", fill, ("zero", "nearest"))
    if isinstance(min_coverage, bool) or not isinstance(min_coverage, int | float):
        msg = f"`min_coverage` must be a number in [0, 1], got {min_coverage!r}"
        raise TypeError(msg)
    if not 0 <= min_coverage <= 1:
        msg = f"`min_coverage` must be a number in [0, 1], got {min_coverage!r}"
        raise ValueError(msg)
    if nan_policy == "omit" and dtype.kind != "f":
        nan_policy = "propagate"  # nothing to omit in integers
    min_count = math.ceil(min_coverage * grid.full_count) if min_coverage else 0
    return Missing(nan_policy == "omit", min_count, fill)


def _open_inputs(source, mask, storage_options=None):
    """Open `source` and `mask`; returns ``(source, mask, lazy)``."""
    source = open_source(source, storage_options=storage_options)
    lazy = not isinstance(source, np.ndarray)
    if source.ndim == 0:
        msg = f"`source` must have at least one dimension, got shape {source.shape}"
        raise ValueError(msg)
    _check_known_chunks("source", source)
    if mask is None:
        return source, None, lazy
    mask = open_source(mask, "mask", storage_options=storage_options)
    mask_lazy = not isinstance(mask, np.ndarray)
    _check_known_chunks("mask", mask)
    if mask.shape != source.shape:
        msg = f"`mask` must have the shape of `source` {source.shape}, got {mask.shape}"
        raise ValueError(msg)
    if np.dtype(mask.dtype).kind not in "biu":
        msg = (
            f"`mask` must be boolean or integer (nonzero voxels are kept), got "
            f"dtype {mask.dtype}; pass `mask > 0` for a float mask"
        )
        raise TypeError(msg)
    return source, mask, lazy or mask_lazy


def _check_known_chunks(name, array):
    if isinstance(array, da.Array) and any(math.isnan(n) for n in array.shape):
        msg = (
            f"`{name}` is a dask array of unknown chunk sizes {array.chunks}; call "
            "`compute_chunk_sizes()` on it first"
        )
        raise ValueError(msg)


def _check_dtype(dtype, statistic, source_dtype):
    """The result dtype, and the dtype to compute the coarse grid in.

    A narrower integer dtype than the statistic's own is reached by a cast
    that warns if values wrap (:func:`narrow`).
    """
    natural = statistic.default_dtype(source_dtype)
    if dtype is None:
        return natural, natural
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        msg = f"`dtype` must be a NumPy dtype, got {dtype!r}"
        raise TypeError(msg) from None
    if dtype.kind not in "iufc":
        msg = (
            f"`dtype` must be a numeric dtype that can hold the statistic, got {dtype}"
        )
        raise TypeError(msg)
    narrower = (
        dtype.kind in "iu"
        and natural.kind in "iu"
        and not np.can_cast(natural, dtype, casting="safe")
    )
    return dtype, natural if narrower else dtype


def narrow(values, dtype):
    """`values` cast to the integer `dtype`, warning if any value wraps."""
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        msg = (
            f"`dtype` {dtype} cannot hold values from {values.min()} to "
            f"{values.max()}; they wrap, as in NumPy assignment"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return values.astype(dtype)


def _default_chunks(source, lazy, shape):
    """Chunks of a full-resolution result: the source's, when it has some.

    TIFF slices, stored one plane a file, give chunks of a few whole planes
    (one chunk a plane would make one output file a slice, and a chunk of
    part of a plane would read each file several times); sources in memory,
    or stored in chunks of more than 8 times the output budget (128 MiB of
    float64), get chunks from the output budget.
    """
    itemsize = np.dtype(np.float64).itemsize
    if isinstance(source, TiffSlices) and len(shape) > 1:
        plane = math.prod(shape[1:]) * itemsize
        if plane <= OUTPUT_CHUNK_BYTES:
            depth = max(_PLANES, OUTPUT_CHUNK_BYTES // plane)
            return (min(depth, shape[0]), *shape[1:])
    chunks = getattr(source, "chunks", None) if lazy else None
    if chunks is None:
        return auto_chunks(shape, itemsize)
    sizes = [max(c) if isinstance(c, tuple) else c for c in chunks]
    if math.prod(sizes) * itemsize <= OUTPUT_CHUNK_BYTES * 8:
        return chunks
    return auto_chunks(shape, itemsize)  # the source's chunks are too large


def _computed(result):
    """`result` computed into a NumPy array by dask's threaded scheduler.

    A resampling's chunks are written in place (no copy of the whole result
    from its chunks); other results are stored chunk by chunk.
    """
    out = np.empty(result.shape, result.dtype)
    # the threaded scheduler itself: naming it would import distributed
    written = resampled_into(result, out)
    with computing():
        if written is None:
            result.store(out, lock=False, scheduler=dask.threaded.get)
        else:
            graph, keys = written
            dask.threaded.get(da.Array.__dask_optimize__(graph, keys), keys)
    return out


def _check_block_bytes(block_bytes):
    if block_bytes is None:
        return None
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int | np.integer):
        msg = f"`block_bytes` must be a positive int or None, got {block_bytes!r}"
        raise TypeError(msg)
    if block_bytes <= 0:
        msg = f"`block_bytes` must be a positive int or None, got {block_bytes!r}"
        raise ValueError(msg)
    return int(block_bytes)


def _check_chunks(chunks, shape):
    if chunks is None:
        return None
    flat = [c for c in np.ravel(np.array(chunks, dtype=object)) if c is not None]
    flat = [x for c in flat for x in (c if isinstance(c, tuple) else (c,))]
    if any(isinstance(c, int | np.integer) and c <= 0 and c != -1 for c in flat):
        msg = f"`chunks` must be positive sizes, got {chunks!r}"
        raise ValueError(msg)
    try:
        return da.core.normalize_chunks(chunks, shape)
    except (ValueError, TypeError) as error:
        msg = f"`chunks` does not fit the shape {shape}: {chunks!r} ({error})"
        raise ValueError(msg) from None


def _local_statistic(
    source,
    statistic,
    selem,
    spacing,
    step,
    interpolate,
    mask,
    dtype,
    return_centers,
    *,
    align,
    chunks,
    block_bytes,
    nan_policy,
    min_coverage,
    fill,
    clip,
    missing_chunks,
    storage_options,
):
    source, mask, lazy = _open_inputs(source, mask, storage_options)
    grid = make_grid(source.shape, selem, spacing, step)
    interpolate = _check_interpolate(interpolate)
    _check_choice("align", align, ALIGNS)
    missing = _check_missing(
        grid, np.dtype(source.dtype), nan_policy, min_coverage, fill
    )
    dtype, work = _check_dtype(dtype, statistic, np.dtype(source.dtype))
    block_bytes = _check_block_bytes(block_bytes)
    if chunks is None and interpolate is not None:
        chunks = _default_chunks(source, lazy, grid.shape)
    chunks = _check_chunks(chunks, grid.shape)
    statistic.check(np.dtype(source.dtype))
    for name, array in (("source", source), ("mask", mask)):
        check_chunks(array, name, missing_chunks)  # a listing: after the checks
    result = coarse_stage(source, grid, statistic, work, mask, block_bytes, missing)
    if work != dtype:
        result = result.map_blocks(narrow, dtype, dtype=dtype)
    if interpolate is not None:
        result = resample_stage(
            result, grid, interpolate, align, chunks, bool(clip), block_bytes
        )
    if not lazy:
        result = _computed(result)
    if return_centers:
        return result, grid.center_coordinates()
    return result


@public
def local_percentile(
    source,
    percentile,
    selem=(50, 50),
    spacing=None,
    step=None,
    interpolate=1,
    mask=None,
    dtype=None,
    return_centers=False,
    *,
    align="corners",
    chunks=None,
    block_bytes=None,
    nan_policy="propagate",
    min_coverage=0.0,
    fill="zero",
    clip=False,
    missing_chunks="error",
    storage_options=None,
):
    """Local percentiles on a sub-grid, resampled to the source's shape.

    Parameters
    ----------
    source : array_like, dask array, zarr array or path
        The image (any number of dimensions). A NumPy array gives NumPy
        results; anything else gives lazy dask arrays.
    percentile : float or sequence of float
        Fraction(s) in ``[0, 1]``; a sequence adds a trailing axis.
    selem : int, tuple of int or bool ndarray
        Window extent per axis (an int: the same on every axis), or a boolean
        footprint whose shape is the extent and whose true entries are kept.
        Default ``(50, 50)``, ClearMap's.
    spacing : int, tuple of int or None
        Distance between window centers per axis; default: the extent.
    step : int, tuple of (int or None) or None
        Take every ``step``-th voxel of a window per axis, from its clipped
        start; None: every voxel.
    interpolate : int or None
        B-spline order 0..5 to resample to full resolution (0 is nearest
        neighbour, default 1), or None for the coarse grid.
    mask : array_like, dask array, zarr array, path or None
        Only voxels where the mask is true (nonzero) are used; boolean or
        integer, of the shape of `source`, chunked in any way.
    dtype : dtype or None
        Result dtype; defaults to the source's. Values are cast as NumPy
        assignment casts them (a narrower integer type warns when they wrap).
    return_centers : bool
        Also return the ``(*m, ndim)`` array of center coordinates.
    align : {'corners', 'centers'}
        ``'corners'`` stretches the coarse grid from the first to the last
        voxel (ClearMap); ``'centers'`` puts each sample on its center voxel
        and holds the value beyond the outermost centers.
    chunks : tuple or None
        Chunks of the full-resolution result; default: the source's.
    block_bytes : int or None
        Memory budget of one task: the source region it reads and its
        results (64 MiB by default).
    nan_policy : {'propagate', 'omit'}
        With ``'omit'``, NaN voxels of a float source are left out of the
        windows like masked ones; ``'propagate'`` (default) gives NaN for a
        window holding one, as NumPy does.
    min_coverage : float
        Fraction of a full window's voxels that must be kept (after mask,
        footprint, clipping and NaN omission); a window with fewer, or with
        none, is *missing*. Default 0: only empty windows are.
    fill : {'zero', 'nearest'}
        Missing samples are 0 (default, as in ClearMap), or take the value
        of the nearest valid sample of the grid, before interpolation.
    clip : bool
        Keep order >= 2 interpolation within the coarse grid's minimum and
        maximum (per component); off by default, as in ClearMap.
    missing_chunks : {'error', 'fill'}
        A zarr source or mask whose store lacks chunks (a listing, made
        before computing) raises :class:`~dask_localstats.errors.MissingChunksError`
        by default; ``'fill'`` reads them as the array's fill value, as zarr
        does (for sparse stores).
    storage_options : dict or None
        fsspec options of a `source` or `mask` given as a zarr URL
        (``s3://...``, ``gs://...``): credentials, ``endpoint_url``, ...

    Returns
    -------
    result : ndarray or dask array
        Shape ``source.shape`` (``m`` for the coarse grid), plus a trailing
        axis for a sequence of percentiles.
    centers : ndarray, optional
        Center coordinates, with `return_centers`.

    Raises
    ------
    ValueError, TypeError
        For bad arguments, before anything is computed.

    Notes
    -----
    There are ``m = S // spacing`` centers per axis, centered in the image
    (the first at ``(S - (m - 1) * spacing) // 2``); a center's window
    ``[c - E // 2, c + E - E // 2)`` is clipped to the image. The kept voxels
    of a window (footprint and mask true) are seen in C order.
    The value is ``numpy.percentile(kept, 100 * p)`` over the kept voxels,
    0 for an empty window.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(64, dtype=float).reshape(8, 8)
    >>> local_percentile(image, 0.5, selem=(4, 4), interpolate=None)
    array([[13.5, 17.5],
           [45.5, 49.5]])
    >>> local_percentile(image, [0.0, 1.0], selem=(4, 4)).shape
    (8, 8, 2)
    """
    return _local_statistic(
        source,
        Percentile(percentile),
        selem,
        spacing,
        step,
        interpolate,
        mask,
        dtype,
        return_centers,
        align=align,
        chunks=chunks,
        block_bytes=block_bytes,
        nan_policy=nan_policy,
        min_coverage=min_coverage,
        fill=fill,
        clip=clip,
        missing_chunks=missing_chunks,
        storage_options=storage_options,
    )


@public
def local_histogram(
    source,
    max_bin=4096,
    selem=(50, 50),
    spacing=None,
    step=None,
    interpolate=None,
    mask=None,
    dtype=None,
    return_centers=False,
    *,
    align="corners",
    chunks=None,
    block_bytes=None,
    nan_policy="propagate",
    min_coverage=0.0,
    fill="zero",
    clip=False,
    missing_chunks="error",
    storage_options=None,
    clip_values=False,
):
    """Local histograms on a sub-grid.

    Parameters
    ----------
    source : array_like, dask array, zarr array or path
        Integer image with values in ``[0, max_bin)`` (any number of
        dimensions). A NumPy array gives NumPy results; anything else gives
        lazy dask arrays.
    max_bin : int
        Number of bins; bin ``v`` counts the voxels of value ``v``.
    selem : int, tuple of int or bool ndarray
        Window extent per axis (an int: the same on every axis), or a boolean
        footprint whose shape is the extent and whose true entries are kept.
        Default ``(50, 50)``, ClearMap's.
    spacing : int, tuple of int or None
        Distance between window centers per axis; default: the extent.
    step : int, tuple of (int or None) or None
        Take every ``step``-th voxel of a window per axis, from its clipped
        start; None: every voxel.
    interpolate : int or None
        B-spline order 0..5 to resample every bin to full resolution (0 is
        nearest neighbour), or None (default) for the coarse grid.
    mask : array_like, dask array, zarr array, path or None
        Only voxels where the mask is true (nonzero) are used; boolean or
        integer, of the shape of `source`, chunked in any way.
    dtype : dtype or None
        Dtype of the counts; defaults to int64 (a narrower integer type
        warns when counts wrap).
    return_centers : bool
        Also return the ``(*m, ndim)`` array of center coordinates.
    align : {'corners', 'centers'}
        ``'corners'`` stretches the coarse grid from the first to the last
        voxel (ClearMap); ``'centers'`` puts each sample on its center voxel
        and holds the value beyond the outermost centers.
    chunks : tuple or None
        Chunks of the full-resolution result; default: the source's.
    block_bytes : int or None
        Memory budget of one task: the source region it reads and its
        results (64 MiB by default).
    nan_policy : {'propagate', 'omit'}
        With ``'omit'``, NaN voxels of a float source are left out of the
        windows like masked ones; ``'propagate'`` (default) gives NaN for a
        window holding one, as NumPy does.
    min_coverage : float
        Fraction of a full window's voxels that must be kept (after mask,
        footprint, clipping and NaN omission); a window with fewer, or with
        none, is *missing*. Default 0: only empty windows are.
    fill : {'zero', 'nearest'}
        Missing samples are 0 (default, as in ClearMap), or take the value
        of the nearest valid sample of the grid, before interpolation.
    clip : bool
        Keep order >= 2 interpolation within the coarse grid's minimum and
        maximum (per component); off by default, as in ClearMap.
    missing_chunks : {'error', 'fill'}
        A zarr source or mask whose store lacks chunks (a listing, made
        before computing) raises :class:`~dask_localstats.errors.MissingChunksError`
        by default; ``'fill'`` reads them as the array's fill value, as zarr
        does (for sparse stores).
    storage_options : dict or None
        fsspec options of a `source` or `mask` given as a zarr URL
        (``s3://...``, ``gs://...``): credentials, ``endpoint_url``, ...
    clip_values : bool
        Count values below 0 in the first bin and values of `max_bin` or more
        in the last, instead of raising (off by default, as in ClearMap).

    Returns
    -------
    result : ndarray or dask array
        Shape ``m + (max_bin,)`` (``source.shape + (max_bin,)`` when
        interpolated).
    centers : ndarray, optional
        Center coordinates, with `return_centers`.

    Raises
    ------
    TypeError
        For a float source.
    ValueError
        For bad arguments, or (when computing) a value outside ``[0, max_bin)``.

    Notes
    -----
    There are ``m = S // spacing`` centers per axis, centered in the image
    (the first at ``(S - (m - 1) * spacing) // 2``); a center's window
    ``[c - E // 2, c + E - E // 2)`` is clipped to the image. The kept voxels
    of a window (footprint and mask true) are seen in C order.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.array([0, 1, 1, 2, 2, 2, 3, 3])
    >>> local_histogram(image, max_bin=4, selem=4)
    array([[1, 2, 1, 0],
           [0, 0, 2, 2]])
    """
    return _local_statistic(
        source,
        Histogram(max_bin, clip_values),
        selem,
        spacing,
        step,
        interpolate,
        mask,
        dtype,
        return_centers,
        align=align,
        chunks=chunks,
        block_bytes=block_bytes,
        nan_policy=nan_policy,
        min_coverage=min_coverage,
        fill=fill,
        clip=clip,
        missing_chunks=missing_chunks,
        storage_options=storage_options,
    )


@public
def apply_local_function(
    source,
    function,
    selem=(50, 50),
    spacing=None,
    step=None,
    interpolate=2,
    mask=None,
    fshape=None,
    dtype=None,
    return_centers=False,
    *,
    align="corners",
    chunks=None,
    block_bytes=None,
    nan_policy="propagate",
    min_coverage=0.0,
    fill="zero",
    clip=False,
    missing_chunks="error",
    storage_options=None,
    vectorized=False,
):
    """Apply a function to the voxels of each window of a sub-grid.

    Parameters
    ----------
    source : array_like, dask array, zarr array or path
        The image (any number of dimensions). A NumPy array gives NumPy
        results; anything else gives lazy dask arrays.
    function : callable
        ``function(kept)``, with ``kept`` the window's kept voxels as a 1-D
        array in C order, returns a scalar or an array of shape `fshape`.
    selem : int, tuple of int or bool ndarray
        Window extent per axis (an int: the same on every axis), or a boolean
        footprint whose shape is the extent and whose true entries are kept.
        Default ``(50, 50)``, ClearMap's.
    spacing : int, tuple of int or None
        Distance between window centers per axis; default: the extent.
    step : int, tuple of (int or None) or None
        Take every ``step``-th voxel of a window per axis, from its clipped
        start; None: every voxel.
    interpolate : int or None
        B-spline order 0..5 to resample to full resolution (0 is nearest
        neighbour, default 2), or None for the coarse grid.
    mask : array_like, dask array, zarr array, path or None
        Only voxels where the mask is true (nonzero) are used; boolean or
        integer, of the shape of `source`, chunked in any way.
    fshape : tuple of int or None
        Shape of the function's output; None for a scalar. Checked on a few
        values before computing.
    dtype : dtype or None
        Result dtype; defaults to the source's. Values are cast as NumPy
        assignment casts them.
    return_centers : bool
        Also return the ``(*m, ndim)`` array of center coordinates.
    align : {'corners', 'centers'}
        ``'corners'`` stretches the coarse grid from the first to the last
        voxel (ClearMap); ``'centers'`` puts each sample on its center voxel
        and holds the value beyond the outermost centers.
    chunks : tuple or None
        Chunks of the full-resolution result; default: the source's.
    block_bytes : int or None
        Memory budget of one task: the source region it reads and its
        results (64 MiB by default).
    nan_policy : {'propagate', 'omit'}
        With ``'omit'``, NaN voxels of a float source are left out of the
        windows like masked ones; ``'propagate'`` (default) gives NaN for a
        window holding one, as NumPy does.
    min_coverage : float
        Fraction of a full window's voxels that must be kept (after mask,
        footprint, clipping and NaN omission); a window with fewer, or with
        none, is *missing*. Default 0: only empty windows are.
    fill : {'zero', 'nearest'}
        Missing samples are 0 (default, as in ClearMap), or take the value
        of the nearest valid sample of the grid, before interpolation.
    clip : bool
        Keep order >= 2 interpolation within the coarse grid's minimum and
        maximum (per component); off by default, as in ClearMap.
    missing_chunks : {'error', 'fill'}
        A zarr source or mask whose store lacks chunks (a listing, made
        before computing) raises :class:`~dask_localstats.errors.MissingChunksError`
        by default; ``'fill'`` reads them as the array's fill value, as zarr
        does (for sparse stores).
    storage_options : dict or None
        fsspec options of a `source` or `mask` given as a zarr URL
        (``s3://...``, ``gs://...``): credentials, ``endpoint_url``, ...
    vectorized : bool
        `function` takes an ``axis`` argument (like ``numpy.median`` or
        ``numpy.std``): call it once per batch of windows with equal kept
        counts, as ``function(windows, axis=-1)`` on a 2-D array, instead of
        once per window. The result must have shape ``(windows,) + fshape``.

    Returns
    -------
    result : ndarray or dask array
        Shape ``source.shape + fshape`` (``m + fshape`` for the coarse grid).
    centers : ndarray, optional
        Center coordinates, with `return_centers`.

    Raises
    ------
    ValueError, TypeError
        For bad arguments, before anything is computed.

    Notes
    -----
    There are ``m = S // spacing`` centers per axis, centered in the image
    (the first at ``(S - (m - 1) * spacing) // 2``); a center's window
    ``[c - E // 2, c + E - E // 2)`` is clipped to the image. The kept voxels
    of a window (footprint and mask true) are seen in C order.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.arange(12.0)
    >>> apply_local_function(image, np.ptp, selem=4, interpolate=None)
    array([3., 3., 3.])
    """
    return _local_statistic(
        source,
        Function(function, fshape, vectorized),
        selem,
        spacing,
        step,
        interpolate,
        mask,
        dtype,
        return_centers,
        align=align,
        chunks=chunks,
        block_bytes=block_bytes,
        nan_policy=nan_policy,
        min_coverage=min_coverage,
        fill=fill,
        clip=clip,
        missing_chunks=missing_chunks,
        storage_options=storage_options,
    )


def background_dtype(dtype):
    """The float dtype that holds a percentile of `dtype` values closely enough.

    float32 for integers of up to 16 bits (exact) and float32 images,
    float64 otherwise.

    Examples
    --------
    >>> background_dtype(np.dtype("uint16")), background_dtype(np.dtype("int32"))
    (dtype('float32'), dtype('float64'))
    """
    dtype = np.dtype(dtype)
    small = dtype.kind in "iub" and dtype.itemsize <= 2
    return np.dtype(np.float32 if small or dtype == np.float32 else np.float64)


@public
def subtract_background(source, background, *, dtype=None, storage_options=None):
    """``source - background``, rounded and clipped to `dtype`, lazily.

    Parameters
    ----------
    source : array_like, dask array, zarr array or path
        The image.
    background : dask array or ndarray
        Of the shape of `source`, for example from :func:`local_percentile`
        with a float `dtype` (see :func:`background_dtype`).
    dtype : dtype or None
        Result dtype; default the source's. Integer results are rounded to
        the nearest integer, half away from zero (as the library's other
        integer results, and ``scipy.ndimage``), and clipped to the dtype's
        range (a background above the image gives 0 for unsigned types,
        never a wrapped value); where the background is NaN (unknown), an
        integer result is 0 and a float one NaN.
    storage_options : dict or None
        fsspec options of a `source` given as a zarr URL.

    Returns
    -------
    dask array
        Lazy, chunked like `background`.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.array([[10, 20], [30, 40]], np.uint16)
    >>> subtract_background(image, np.full((2, 2), 25.4)).compute()
    array([[ 0,  0],
           [ 5, 15]], dtype=uint16)
    """
    source = open_source(source, storage_options=storage_options)
    dtype = np.dtype(source.dtype if dtype is None else dtype)
    if dtype.kind not in "iuf":
        msg = f"`dtype` must be an integer or float dtype, got {dtype}"
        raise TypeError(msg)
    if not isinstance(background, da.Array):
        background = np.asarray(background)
    if background.dtype.kind not in "biuf":
        msg = f"`background` must be of a real number dtype, got {background.dtype}"
        raise TypeError(msg)
    if not isinstance(background, da.Array):
        background = da.from_array(background)
    if background.shape != source.shape:
        msg = f"`background` must have the shape of `source` {source.shape}, got {background.shape}"
        raise ValueError(msg)
    if isinstance(source, da.Array):
        image = source.rechunk(background.chunks)
    else:  # its chunks decoded once, if the background's stage reads it too
        image = read_through(background.dask, source, background.chunks)
    if image is None:
        name = "localstats-source-" + tokenize(identity(source))
        image = da.from_array(source, chunks=background.chunks, name=name, asarray=True)
    token = tokenize(image.name, background.name, dtype)
    name = f"localstats-subtract-{token}"
    subtraction = functools.partial(_Subtraction, dtype=dtype)
    in_one_pass = fused(background, name, subtraction, [image], dtype)
    if in_one_pass is not None:  # a resampled background: subtracted piece by piece
        return in_one_pass
    return da.map_blocks(
        _subtract_block, image, background, dtype, dtype=dtype, name=name
    )


@dataclass(frozen=True)
class _Subtraction:
    """``image - background`` a piece at a time (:func:`_subtract_piece`).

    The step :func:`~dask_localstats._engine.fused` passes each piece of
    resampled background to, for one image block: ``where`` indexes the
    block (a slice of its planes, and of its rows where planes are large).
    """

    image: np.ndarray
    dtype: np.dtype

    def __call__(self, where, background, within=None):
        return _subtract_piece(self.image[where], background, self.dtype, within)


def _subtract_block(image, background, dtype):
    """``image - background``, rounded and clipped to `dtype`.

    A slab of planes (first axis) at a time, so the temporaries stay in
    cache and each voxel is read once and written once
    (:func:`_subtract_piece`).
    """
    if image.ndim == 0:
        return _subtract_piece(image, background, dtype).astype(dtype)
    return each_slab(_Subtraction(image, dtype), background, dtype)


# Integers of twice the width: their difference, exact.
_WIDER = {1: np.int16, 2: np.int32, 4: np.int64}


def _subtract_piece(image, background, dtype, within=None):
    """A piece of ``image - background``, rounded and clipped to `dtype`'s
    range (not yet cast): ``image - minimum(image, background)`` where both
    are unsigned and `image` is of `dtype` (the difference clipped at 0, in
    the wider of their dtypes: two passes); in integers of twice the width
    where both are integers of up to 32 bits and `dtype` is an integer
    (exact); from a float32 background in the image's unsigned dtype where
    it can (:func:`_subtract_float32`, told the background's extremes
    `within` if known); else in float64, rounded half away
    from zero by the cast that follows (0.5 added, toward zero for negative
    values), NaN (an unknown background) giving 0 for integer dtypes."""
    # arrays even for 0-d images, for the in-place steps
    image, background = np.asarray(image), np.asarray(background)
    width = max(image.dtype.itemsize, background.dtype.itemsize)
    kinds = image.dtype.kind + background.dtype.kind + dtype.kind
    if kinds == "uuu" and image.dtype == dtype:  # in [0, image]: in range
        below = np.asarray(np.minimum(image, background))
        return np.subtract(image, below, out=below)
    if set(kinds) <= set("iu") and width in _WIDER:  # exact, nothing to round
        wide = _WIDER[width]
        difference = np.asarray(np.subtract(image, background, dtype=wide))
        low, high = _limits(dtype, wide)
        return np.clip(difference, low, high, out=difference)
    if kinds == "ufu" and image.dtype == dtype and background.dtype == np.float32:
        difference = _subtract_float32(image, background, within)
        if difference is not None:
            return difference
    difference = np.asarray(np.subtract(image, background, dtype=np.float64))
    if dtype.kind in "iu":
        half = np.copysign(0.5, difference) if dtype.kind == "i" else 0.5
        difference += half  # the cast's truncation completes the rounding
        np.clip(difference, *_limits(dtype, np.float64), out=difference)
        if difference.size and np.isnan(difference.max()):  # unknown: 0
            np.nan_to_num(difference, copy=False, nan=0.0)
    return difference


def _subtract_float32(image, background, within=None):
    """``image - background`` for a float32 background and an unsigned image
    of up to 16 bits, rounded half away from zero and clipped, in the
    image's dtype; None where the background holds NaN or values of -0.5
    or less.

    The difference rounds as ``image - c``, clipped at 0, for ``c =
    ceil(background - 0.5)``, the background rounded half down: float32
    holds ``background - 0.5`` exactly below 2**23 (higher backgrounds
    give 0 anyway, ``c`` clipped to the dtype's maximum), so these are the
    integers of the exact float64 difference rounded, in four passes over
    float32 and two over the image's dtype instead of as many over float64.
    A background resampled from coefficients of at least 0 and below the
    dtype's maximum (`within`, their extremes) needs no checks: its values
    lie between 0 and that maximum (the passes for its least and greatest
    value, which hold the GIL, are saved).

    Examples
    --------
    >>> image = np.array([0, 3, 3, 4, 9], np.uint16)
    >>> background = np.array([0.4, 2.5, 3.5, 3.5, 70000.0], np.float32)
    >>> _subtract_float32(image, background).tolist()
    [0, 1, 0, 1, 0]
    """
    if not image.size or not image.dtype.itemsize <= 2:
        return None
    top = np.iinfo(image.dtype).max
    if within is not None and within[0] >= 0 and within[1] < top:
        above = False
    elif not background.min() > -0.5:  # False for NaN too
        return None
    else:
        above = background.max() > top  # c would not fit in the image's dtype
    c = np.subtract(background, np.float32(0.5))
    if above:
        np.minimum(c, top, out=c)
    rounded = np.ceil(c, out=c).astype(image.dtype)
    np.minimum(image, rounded, out=rounded)
    return np.subtract(image, rounded, out=rounded)


@functools.cache
def _limits(dtype, within):
    """The range of integer `dtype` that values of `within` can hold and cast
    back without wrapping (float64 rounds 2**63 - 1 up to 2**63)."""
    info = np.iinfo(dtype)
    if np.dtype(within).kind == "f":
        high = float(info.max)
        high = high if int(high) <= info.max else np.nextafter(high, 0.0)
        return float(info.min), high
    room = np.iinfo(within)
    return max(info.min, room.min), min(info.max, room.max)
