"""TIFF sources, read lazily: a multi-page file, or a stack of 2-D slices.

A multi-page TIFF file opens as :class:`TiffStack`; a folder or glob of 2-D
TIFF slices (ClearMap names them ``Z0000.tif``, LaVision's UltraMicroscope
``..._C00_xyz-Table Z0000.ome.tif``) as :class:`TiffSlices`. Both are small,
picklable objects holding only file names, shape and dtype, sliced like
arrays. Each slice opens the file(s) it needs through tifffile's zarr
interface, reads the region and closes them again, so a task reads only its
region, no handle outlives a read, and the graph carries no data to a
distributed cluster.

A folder or pattern may hold files of several *series*: acquisition
software numbers planes, and also channels, tiles and sheets, in the same
names. The plane number is the one number that varies from file to file
within a series; names that differ in any other number belong to other
series (:func:`series_of`). A stack is made of one series, in the order of
its plane numbers; several are refused, naming them and how to pick one.

A read takes the cheapest of three ways (:func:`_read_tiff`): data stored
uncompressed in one piece is mapped and only the region copied; a region
of half the image or more is decoded whole; a smaller one goes through
tifffile's zarr interface, which decodes only the strips or tiles under it
(for huge planes). Opening that interface costs ten times reading a
megapixel slice, which light-sheet jobs read whole.
Patterns are globs, but a path whose brackets are literal (LaVision's
``[00 x 00]``) is taken as written when it matches files that way.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import zarr

from .errors import CorruptChunkError, SourceNotFoundError, _reading

__all__ = ["TiffSlices", "TiffStack", "open_tiff", "tiff_files"]

_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf2", ".tf8")
_ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zmetadata")


def _tifffile():
    try:
        import tifffile
    except ImportError:  # pragma: no cover - the `tiff` extra is not installed
        msg = "reading TIFF needs tifffile: pip install 'dask-localstats[tiff]'"
        raise ImportError(msg) from None
    return tifffile


class TiffSource:
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
    """``selection`` of the first series of the TIFF at `path`.

    Uncompressed data in one piece is mapped (only the region is read); a
    region of at least half the image is decoded whole; a smaller one
    through tifffile's zarr interface, which reads only the pages, strips
    or tiles under it. `expect`, a ``(shape, dtype)`` pair, is checked
    against the file's header first.
    """
    tifffile = _tifffile()
    with _reading(f"TIFF file {path!r}"), tifffile.TiffFile(path) as tif:
        series = tif.series[0].levels[level]
        shape, dtype = tuple(series.shape), np.dtype(series.dtype)
        if expect is not None and (shape, dtype) != expect:
            msg = (
                f"TIFF slice {path!r} has shape {shape} and dtype {dtype}; "
                f"the stack's slices have {expect[0]} and {expect[1]}"
            )
            raise CorruptChunkError(msg)
        if series.dataoffset is not None:  # uncompressed, in one piece
            stored = dtype.newbyteorder(tif.byteorder)
            mapped = np.memmap(path, stored, "r", series.dataoffset, shape)
            return np.array(mapped[selection], dtype=dtype)
        if _share(selection, shape) >= 0.5:
            whole = series.asarray()
            region = whole[selection]
            return region if region.size == whole.size else region.copy()
        with tif.aszarr(series=0, level=level) as store:
            return np.asarray(zarr.open_array(store, mode="r")[selection])


def _share(selection, shape):
    """The share of an array of `shape` that `selection` takes (on a view)."""
    size = np.broadcast_to(np.int8(0), shape)[selection].size
    return size / max(np.prod(shape), 1)


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


class TiffStack(TiffSource):
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


class TiffSlices(TiffSource):
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


def tiff_files(source):
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
            and not f.startswith(".")  # macOS's ._ files, hidden copies
            and os.path.isfile(os.path.join(text, f))
        ]
        return ("slices", files) if files else None
    if os.path.exists(text):
        return ("stack", text) if text.lower().endswith(_TIFF_SUFFIXES) else None
    if any(c in text for c in "*?["):
        text = os.path.expanduser(text)
        literal = text.replace("[", "\0").replace("]", "[]]").replace("\0", "[[]")
        files = glob.glob(literal) or glob.glob(text)  # brackets as written first
        return "slices", [f for f in files if os.path.isfile(f)]
    if text.lower().endswith(_TIFF_SUFFIXES):
        return "stack", text
    return None


def open_tiff(kind, files, source, name, level=0, series=None):
    """A :class:`TiffStack`, or the :class:`TiffSlices` of one series.

    Parameters
    ----------
    kind : {'stack', 'slices'}
    files : str or list of str
        The stack's path, or the slices' files.
    source : str
        The path or pattern given, for messages.
    name : str
        Parameter name for messages.
    level : int
        Pyramid level (stacks only).
    series : str or None
        Which series of slices to take: its label (as :func:`series_of`
        names it) or a part of the label that only one series has.
    """
    if kind == "stack":
        return TiffStack(files, level, name)
    if not files:
        msg = f"`{name}`: no file matches {os.fspath(source)!r}"
        raise SourceNotFoundError(msg)
    if level != 0:
        msg = f"`level` applies to OME-Zarr images and pyramidal TIFF files, not to a stack of slices, got level {level}"
        raise ValueError(msg)
    found = series_of(files)
    if series is not None:
        found = {k: v for k, v in found.items() if k == series} or {
            k: v for k, v in found.items() if series in k
        }
    if len(found) != 1:
        labels = sorted(found or series_of(files))
        shown = ", ".join(repr(label) for label in labels[:4])
        more = f" and {len(labels) - 4} more" if len(labels) > 4 else ""
        what = "none matches" if not found else f"{len(found)} match"
        picked = f"of which {what} {series!r}; " if series is not None else ""
        msg = (
            f"`{name}`: {os.fspath(source)!r} holds {len(labels)} series of "
            f"slices ({shown}{more}); {picked}pick one with --series LABEL "
            "(series= in the library) or a tighter glob"
        )
        raise ValueError(msg)
    files = next(iter(found.values()))
    repeated = _repeated_planes(files)
    if repeated:
        msg = (
            f"`{name}`: {os.fspath(source)!r} holds several files of plane "
            f"{repeated[0]} ({len(repeated)} planes repeated); remove the copies"
        )
        raise ValueError(msg)
    return TiffSlices(files, name)


def _repeated_planes(files):
    """Plane numbers that more than one file of a series has (``Z1``, ``Z01``)."""
    numbers = [[int(n) for n in _NUMBER.findall(os.path.basename(f))] for f in files]
    if len(files) < 2 or not numbers[0]:
        return []
    varying = [i for i in range(len(numbers[0])) if len({n[i] for n in numbers}) > 1]
    planes = [tuple(n[i] for i in varying) for n in numbers]
    return sorted({p[0] for p in planes if p and planes.count(p) > 1})


_NUMBER = re.compile(r"(\d+)")


def series_of(files):
    """The series of a set of slice files, each in the order of its planes.

    Names are split into text and numbers. Files whose names have the same
    text belong together; among them, the number that takes the most values
    is the plane number, and files that differ in any other number (a
    channel, a tile, a sheet) belong to different series.

    Parameters
    ----------
    files : list of str

    Returns
    -------
    dict
        ``{label: files in plane order}``, the label a file name with the
        plane number replaced by ``*``.

    Examples
    --------
    >>> names = [f"x_C0{c}_Z{z:04d}.tif" for c in (0, 1) for z in (10, 9)]
    >>> series_of(names)
    {'x_C00_Z*.tif': ['x_C00_Z0009.tif', 'x_C00_Z0010.tif'], 'x_C01_Z*.tif': ['x_C01_Z0009.tif', 'x_C01_Z0010.tif']}
    """
    shapes = {}
    for f in files:
        parts = _NUMBER.split(os.path.basename(f))
        shapes.setdefault(tuple(parts[::2]), []).append((f, parts))
    found = {}
    for text, members in shapes.items():
        if len(text) == 1:  # no number in the name: natural order
            found.setdefault("(names without numbers)", []).extend(
                f for f, _ in members
            )
            continue
        numbers = [[int(n) for n in parts[1::2]] for _, parts in members]
        values = [len({n[i] for n in numbers}) for i in range(len(text) - 1)]
        plane = max(range(len(values)), key=lambda i: (values[i], i))
        for f, parts in sorted(members, key=lambda m: int(m[1][2 * plane + 1])):
            label = "".join([*parts[: 2 * plane + 1], "*", *parts[2 * plane + 2 :]])
            found.setdefault(label, []).append(f)
    if "(names without numbers)" in found:
        found["(names without numbers)"] = _tifffile().natural_sorted(
            found["(names without numbers)"]
        )
    return found
