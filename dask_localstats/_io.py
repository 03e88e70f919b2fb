"""Opening sources and storing results.

A source is a NumPy array (computed results), a dask array, a zarr array, or
the path or URL of a zarr array, of a group holding a single array, or of an
OME-Zarr image (its full-resolution level, or another with `level`). Zarr
sources stay zarr arrays: the engine's tasks slice them directly, so nothing
is read before computing.

TIFF sources (a multi-page file, or a folder or glob of slices) open as the
lazy arrays of :mod:`dask_localstats._tiff`.

Processing blocks overlap by the reach of the windows, and a storage chunk
is decoded whole whichever part of it a block needs, so blocks reading a
chunked store directly would decode its boundary chunks several times (W7's
blocks decode 2.25 times the volume of 128^3 chunks). A :class:`ChunkCache` keeps the most
recently decoded chunks of one computation, so each is decoded about once,
in bounded memory.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
from concurrent.futures import Future

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


class ChunkCache:
    """The most recently decoded storage chunks of a chunked array.

    Parameters
    ----------
    nbytes : int
        Most bytes of decoded chunks to hold; the least recently used go
        first. Chunks decoded together (a run along the last axis) share
        their memory, which counts until the last of them goes.

    Notes
    -----
    One cache serves one computation: the engine makes it a task of the
    graph, which dask frees when the last block that reads through it is
    done. A cache sent to another process arrives empty.

    Examples
    --------
    >>> import zarr
    >>> z = zarr.create_array({}, shape=(6, 6), chunks=(4, 4), dtype="u2")
    >>> z[:] = np.arange(36).reshape(6, 6)
    >>> cache = ChunkCache(2**20)
    >>> cache.read(z, (slice(3, 5), slice(0, 6)))[:, :3]
    array([[18, 19, 20],
           [24, 25, 26]], dtype=uint16)
    >>> len(cache)  # the chunks that region touched
    4
    """

    def __init__(self, nbytes):
        self.nbytes = int(nbytes)
        self._chunks = collections.OrderedDict()
        self._held = 0
        self._pending = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        return type(self), (self.nbytes,)

    def __len__(self):
        return len(self._chunks)

    def grow(self, nbytes, most):
        """Hold `nbytes` more from now on, up to `most` in all."""
        self.nbytes = max(self.nbytes, min(self.nbytes + int(nbytes), int(most)))

    def read(self, array, slices, out=None):
        """``array[slices]`` (unit steps), pasted together from whole chunks.

        The chunks not held are claimed first, then decoded in runs along
        the last axis, one read each (zarr decodes a read's chunks
        concurrently); a chunk another thread is decoding is waited for.
        Each chunk is pasted as soon as it is at hand, so a read holds the
        region and one run of chunks, whatever the cache keeps. The region
        is pasted into `out` if given (of its shape and the array's dtype).
        """
        shape = tuple(s.stop - s.start for s in slices)
        out = np.empty(shape, array.dtype) if out is None else out

        def paste(index, chunk):
            dst, src = [], []
            for i, c, s in zip(index, array.chunks, slices, strict=True):
                lo, hi = max(s.start, i * c), min(s.stop, (i + 1) * c)
                dst.append(slice(lo - s.start, hi - s.start))
                src.append(slice(lo - i * c, hi - i * c))
            out[tuple(dst)] = chunk[tuple(src)]

        ranges = [
            range(s.start // c, -(-s.stop // c))
            for s, c in zip(slices, array.chunks, strict=True)
        ]
        held, waiting, mine = self._claim(itertools.product(*ranges))
        for index, chunk in held:
            paste(index, chunk)
        del held
        for run in _runs(mine):
            for index, chunk in self._decode(array, run).items():
                paste(index, chunk)
        for index, pending in waiting:
            paste(index, pending.result())
        return out

    def chunk(self, array, index):
        """The whole chunk at `index` (chunk coordinates), decoded once.

        The cache's own array, read-only: no copy is made (a step that only
        reads a region of exactly one chunk needs none).
        """
        held, waiting, mine = self._claim([tuple(index)])
        if held:
            chunk = held[0][1]
        elif waiting:
            chunk = waiting[0][1].result()
        else:
            chunk = self._decode(array, mine)[mine[0]]
        view = chunk.view()
        view.flags.writeable = False
        return view

    def _claim(self, indices):
        """Sort chunk `indices` into those held ``(index, chunk)``, those
        another thread is decoding ``(index, future)``, and those not held,
        claimed for the caller to decode (:meth:`_decode`)."""
        held, waiting, mine = [], [], []
        with self._lock:
            for index in indices:
                if index in self._chunks:
                    self._chunks.move_to_end(index)
                    held.append((index, self._chunks[index][0]))
                elif index in self._pending:
                    waiting.append((index, self._pending[index]))
                else:
                    mine.append(index)
                    self._pending[index] = Future()
        return held, waiting, mine

    def _decode(self, array, run):
        """Decode chunks consecutive along the last axis, claimed by us."""
        first, last = run[0], run[-1]
        region = tuple(
            slice(i * c, min((j + 1) * c, n))
            for i, j, c, n in zip(first, last, array.chunks, array.shape, strict=True)
        )
        try:
            data = read_region(array, region)
        except BaseException as error:
            with self._lock:
                for index in run:
                    self._pending.pop(index).set_exception(error)
            raise
        step = array.chunks[-1]
        # views of the run (copying them out cost a pass, and twice the
        # run's memory meanwhile): the run's memory is counted until the
        # last of them is evicted
        chunks = {
            index: data[..., k * step : (k + 1) * step] for k, index in enumerate(run)
        }
        memory = [data.nbytes, len(chunks)]  # bytes, views held
        with self._lock:
            for index, chunk in chunks.items():
                self._chunks[index] = (chunk, memory)
                self._pending.pop(index).set_result(chunk)
            self._held += data.nbytes
            while self._held > self.nbytes and len(self._chunks) > 1:
                _, (_, evicted) = self._chunks.popitem(last=False)
                evicted[1] -= 1
                if not evicted[1]:
                    self._held -= evicted[0]
        return chunks


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


def _runs(indices):
    """Split chunk indices (in C order) into runs consecutive on the last axis."""
    runs = []
    for index in indices:
        previous = runs[-1][-1] if runs else None
        if previous and previous[:-1] == index[:-1] and previous[-1] + 1 == index[-1]:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


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
