"""Opening sources and storing results.

A source is a NumPy array (computed results), a dask array, a zarr array, or
the path or URL of a zarr array, of a group holding a single array, or of an
OME-Zarr image (its full-resolution level, or another with `level`). Zarr
sources stay zarr arrays: the engine's tasks slice them directly, so nothing
is read before computing.

TIFF sources (with the ``tiff`` extra) are a multi-page TIFF file, or a
folder or glob of 2-D TIFF slices (ClearMap names them ``Z0000.tif``, ...).
They open as :class:`TiffStack` or :class:`TiffSlices`: small, picklable
objects holding only file names, shape and dtype, sliced like arrays. Each
slice opens the file(s) it needs through tifffile's zarr interface, reads the
region and closes them again, so a task reads only its region, no handle
outlives a read, and the graph carries no data to a distributed cluster.

Processing blocks overlap by the reach of the windows, and a storage chunk
is decoded whole whichever part of it a block needs, so blocks reading a
chunked store directly would decode its boundary chunks several times (W7's
blocks decode 2.25 times the volume of 128^3 chunks). A :class:`ChunkCache` keeps the most
recently decoded chunks of one computation, so each is decoded about once,
in bounded memory.
"""

from __future__ import annotations

import collections
import glob
import itertools
import os
import threading
from concurrent.futures import Future

import dask.array as da
import numpy as np
import zarr

from ._ome import level_path
from ._public import public
from ._stored import locate
from .errors import CorruptChunkError, LocalStatsError, SourceNotFoundError

__all__ = ["open_source"]


class ChunkCache:
    """The most recently decoded storage chunks of a chunked array.

    Parameters
    ----------
    nbytes : int
        Most bytes of decoded chunks to hold; the least recently used go
        first.

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

    def read(self, array, slices):
        """``array[slices]`` (unit steps), pasted together from whole chunks.

        The chunks not held are claimed first, then decoded in runs along
        the last axis, one read each (zarr decodes a read's chunks
        concurrently); a chunk another thread is decoding is waited for.
        Each chunk is pasted as soon as it is at hand, so a read holds the
        region and one run of chunks, whatever the cache keeps.
        """
        out = np.empty(tuple(s.stop - s.start for s in slices), array.dtype)

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
        held, waiting, mine = [], [], []
        with self._lock:
            for index in itertools.product(*ranges):
                if index in self._chunks:
                    self._chunks.move_to_end(index)
                    held.append((index, self._chunks[index]))
                elif index in self._pending:
                    waiting.append((index, self._pending[index]))
                else:
                    mine.append(index)
                    self._pending[index] = Future()
        for index, chunk in held:
            paste(index, chunk)
        del held
        for run in _runs(mine):
            for index, chunk in self._decode(array, run).items():
                paste(index, chunk)
        for index, pending in waiting:
            paste(index, pending.result())
        return out

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
        chunks = {  # copies: a view would keep the whole run alive
            index: data[..., k * step : (k + 1) * step].copy() if len(run) > 1 else data
            for k, index in enumerate(run)
        }
        with self._lock:
            for index, chunk in chunks.items():
                self._chunks[index] = chunk
                self._held += chunk.nbytes
                self._pending.pop(index).set_result(chunk)
            while self._held > self.nbytes and len(self._chunks) > 1:
                self._held -= self._chunks.popitem(last=False)[1].nbytes
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


def _open_zarr(path, name, level=0):
    try:
        node = zarr.open(
            store=os.fspath(path) if isinstance(path, os.PathLike) else path, mode="r"
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


_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf2", ".tf8")
_ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zmetadata")


def _tifffile():
    try:
        import tifffile
    except ImportError:  # pragma: no cover - the `tiff` extra is not installed
        msg = "reading TIFF needs tifffile: pip install 'dask-localstats[tiff]'"
        raise ImportError(msg) from None
    return tifffile


class _TiffSource:
    """A TIFF image opened lazily: shape, dtype and file names only.

    Subclasses implement ``__getitem__`` by opening the file(s) a selection
    needs through tifffile's zarr interface and closing them afterwards.
    """

    files: tuple
    shape: tuple
    dtype: np.dtype
    chunks: tuple

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        more = ", ..." if len(self.files) > 1 else ""
        return (
            f"{type(self).__name__}({self.files[0]!r}{more}, "
            f"shape={self.shape}, dtype={self.dtype})"
        )

    def __dask_tokenize__(self):
        return (type(self).__name__, self.files, self.shape, self.dtype.str)


def _read_tiff(path, selection, level=0, expect=None):
    """``selection`` of the first series of the TIFF at `path`, via zarr.

    Only the pages, strips or tiles under `selection` are read. `expect`, a
    ``(shape, dtype)`` pair, is checked against the file's header first.
    """
    tifffile = _tifffile()
    try:
        with (
            tifffile.TiffFile(path) as tif,
            tif.aszarr(series=0, level=level) as store,
        ):
            array = zarr.open_array(store, mode="r")
            if expect is not None and (tuple(array.shape), array.dtype) != expect:
                msg = (
                    f"TIFF slice {path!r} has shape {array.shape} and dtype "
                    f"{array.dtype}; the stack's slices have {expect[0]} and "
                    f"{expect[1]}"
                )
                raise CorruptChunkError(msg)
            return np.asarray(array[selection])
    except FileNotFoundError:
        msg = f"TIFF file {path!r} is gone"
        raise SourceNotFoundError(msg) from None
    except (MemoryError, LocalStatsError):
        raise
    except Exception as error:  # tifffile, codecs and zarr raise many kinds
        msg = f"TIFF file {path!r} cannot be read: {type(error).__name__}: {error}"
        raise CorruptChunkError(msg) from error


def _tiff_layout(path, name, level=0):
    """``(shape, dtype, chunks)`` of the TIFF at `path`, reading headers only."""
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(path) as tif:
            levels = len(tif.series[0].levels)
            if not 0 <= level < levels:
                msg = f"`level` must be in [0, {levels}) for {path!r}, got {level}"
                raise ValueError(msg)
            with tif.aszarr(series=0, level=level) as store:
                z = zarr.open_array(store, mode="r")
                return tuple(z.shape), np.dtype(z.dtype), tuple(z.chunks)
    except FileNotFoundError:
        msg = f"`{name}`: no such file {path!r}"
        raise SourceNotFoundError(msg) from None
    except (tifffile.TiffFileError, IndexError, KeyError) as error:
        msg = f"`{name}`: cannot read {path!r} as TIFF: {error}"
        raise ValueError(msg) from None


class TiffStack(_TiffSource):
    """A multi-page TIFF file (its first series), read lazily.

    Parameters
    ----------
    path : str or os.PathLike
        The TIFF file.
    level : int
        Pyramid level of the series, 0 for full resolution.
    name : str
        Parameter name used in error messages.
    """

    def __init__(self, path, level=0, name="source"):
        path = os.path.abspath(os.fspath(path))
        self.files = (path,)
        self.level = int(level)
        self.shape, self.dtype, self.chunks = _tiff_layout(path, name, self.level)

    def __getitem__(self, key):
        return _read_tiff(self.files[0], key, self.level)

    def __dask_tokenize__(self):
        return (*super().__dask_tokenize__(), self.level)


class TiffSlices(_TiffSource):
    """A stack of 2-D TIFF files, one per index of the first axis.

    Parameters
    ----------
    files : sequence of str or os.PathLike
        The slices, in order.
    name : str
        Parameter name used in error messages.

    Notes
    -----
    Only the first file's header is read on opening; a slice of another
    shape or dtype is reported when it is read.
    """

    def __init__(self, files, name="source"):
        self.files = tuple(os.path.abspath(os.fspath(f)) for f in files)
        plane, self.dtype, chunks = _tiff_layout(self.files[0], name)
        if len(plane) != 2:
            msg = (
                f"`{name}`: slices must be 2-D images, got shape {plane} "
                f"in {self.files[0]!r}"
            )
            raise ValueError(msg)
        self.shape = (len(self.files), *plane)
        self.chunks = (1, *chunks)

    def _plane(self, index, selection):
        expect = (self.shape[1:], self.dtype)
        return _read_tiff(self.files[index], selection, expect=expect)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = (
                *key[:i],
                *(slice(None),) * (self.ndim - len(key) + 1),
                *key[i + 1 :],
            )
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        indices = np.arange(len(self.files))[first]
        if indices.ndim == 0:
            return self._plane(int(indices), rest)
        planes = [self._plane(int(i), rest) for i in indices]
        if planes:
            return np.stack(planes)
        # an empty selection: the shape of `rest` without reading anything
        shape = np.broadcast_to(np.zeros((), self.dtype), self.shape[1:])[rest].shape
        return np.empty((0, *shape), self.dtype)


def _tiff_files(source):
    """``("stack", path)``, ``("slices", files)`` or None (not TIFF)."""
    text = os.fspath(source)
    if "://" in text:
        return None
    if os.path.isdir(text):
        if any(os.path.exists(os.path.join(text, m)) for m in _ZARR_METADATA):
            return None
        files = [
            os.path.join(text, f)
            for f in os.listdir(text)
            if f.lower().endswith(_TIFF_SUFFIXES)
            and os.path.isfile(os.path.join(text, f))
        ]
        return ("slices", files) if files else None
    if os.path.exists(text):
        return ("stack", text) if text.lower().endswith(_TIFF_SUFFIXES) else None
    if any(c in text for c in "*?["):
        files = [f for f in glob.glob(os.path.expanduser(text)) if os.path.isfile(f)]
        return "slices", files
    if text.lower().endswith(_TIFF_SUFFIXES):
        return "stack", text
    return None


def _open_tiff(kind, files, source, name, level=0):
    if kind == "stack":
        return TiffStack(files, level, name)
    if not files:
        msg = f"`{name}`: no file matches {os.fspath(source)!r}"
        raise SourceNotFoundError(msg)
    if level != 0:
        msg = f"`level` applies to OME-Zarr images and pyramidal TIFF files, not to a stack of slices, got level {level}"
        raise ValueError(msg)
    return TiffSlices(_tifffile().natural_sorted(files), name)


@public
def open_source(source, name="source", level=0):
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
        tiff = _tiff_files(source)
        if tiff is not None:
            return _open_tiff(*tiff, source, name, level)
        return _open_zarr(source, name, level)
    if isinstance(source, _TiffSource | zarr.Array):
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
