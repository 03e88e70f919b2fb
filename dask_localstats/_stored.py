"""Where inputs and outputs are stored, and what they hold.

Two questions protect people's data before anything is written:

*Where.* Every spelling of a place (a relative path, a symlink, a trailing
slash, a ``file://`` URL, any fsspec URL) resolves to one :class:`Location`,
a protocol and an absolute normalized path. Whether an output is an input,
lies inside one or holds one is then a comparison of locations, whatever the
spelling. :func:`locations` finds the stored arrays and files that an array,
lazy or not, reads: a zarr array, a TIFF stack or slices, or any of those
inside a dask graph.

*What.* An :class:`Inventory` lists (without reading them) the entries that
store an input: each stored chunk of a zarr array, each file of a TIFF
stack, with its size and change stamp (for local files, the status-change
time, which a rewrite sets even when it restores the modification time). Its digest identifies the
content an output is computed from; an output records it, and resuming or
finishing refuses when it changed. Compared with the array's chunk grid,
the listing also tells which chunks are absent (:func:`absent_chunks`),
which zarr would otherwise read silently as the fill value.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass

import dask.array as da
import zarr
from dask._task_spec import DataNode, Task

from .errors import MissingChunksError, RefusedError

__all__ = ["Inventory", "Location", "absent_chunks", "locate", "locations"]

_LOCAL = ("file", "local")
_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")
MISSING_CHUNKS = ("error", "fill")


@dataclass(frozen=True)
class Location:
    """A place in a file system: a protocol and an absolute path.

    Attributes
    ----------
    protocol : str
        ``"file"`` for local paths, else the fsspec protocol (``"s3"``, ...)
        or ``"memory"`` for an in-memory zarr store.
    path : str
        Absolute, normalized, ``/``-separated, without a trailing slash;
        local paths have their symlinks resolved.

    Examples
    --------
    >>> out = locate("/data/run/../out.zarr/")
    >>> str(out), out.contains(locate("file:///data/out.zarr/c/0/0"))
    ('/data/out.zarr', True)
    """

    protocol: str
    path: str

    def __str__(self):
        return (
            self.path if self.protocol == "file" else f"{self.protocol}://{self.path}"
        )

    def contains(self, other):
        """Whether `other` is this location or lies inside it."""
        if self.protocol != other.protocol:
            return False
        root = self.path.rstrip("/")
        return other.path == self.path or other.path.startswith(root + "/")

    def overlaps(self, other):
        """Whether one of the two locations contains the other."""
        return self.contains(other) or other.contains(self)

    def join(self, key):
        """The location of `key` (``/``-separated) inside this one."""
        if not key:
            return self
        return Location(self.protocol, f"{self.path.rstrip('/')}/{key.strip('/')}")


def _local(path):
    return Location("file", os.path.realpath(os.path.expanduser(os.fspath(path))))


def protocol_of(fs):
    """The protocol of an fsspec file system: ``"file"`` for this machine's."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return "file" if protocol in _LOCAL else protocol


def _fsspec_location(fs, path):
    protocol = protocol_of(fs)
    if protocol == "file":
        return _local(path)
    return Location(protocol, fs._strip_protocol(path).rstrip("/"))


def _unwrapped(store):
    """The store that a wrapper store (logging, caching, ...) reads through."""
    while isinstance(store, zarr.storage.WrapperStore):
        store = store._store
    return store


def _store_location(store):
    """Location of a zarr store's root, or None for a store of unknown kind."""
    store = _unwrapped(store)
    if isinstance(store, zarr.storage.LocalStore):
        return _local(store.root)
    if isinstance(store, zarr.storage.FsspecStore):
        return _fsspec_location(blocking(store.fs), store.path)
    if isinstance(store, zarr.storage.MemoryStore):
        return Location("memory", str(id(store._store_dict)))
    if isinstance(store, zarr.storage.ZipStore):
        return _local(store.path)
    return None


def locate(target):
    """The :class:`Location` of a path, a URL, a zarr store or a zarr array.

    Parameters
    ----------
    target : str, os.PathLike, zarr store or zarr.Array
        A local path (relative, with symlinks, ``~``), a URL such as
        ``file:///abs/x.zarr`` or ``s3://bucket/x.zarr``, or a zarr object.

    Returns
    -------
    Location or None
        None for a zarr store of a kind whose location is unknown.
    """
    if isinstance(target, zarr.Array):
        root = _store_location(target.store_path.store)
        return None if root is None else root.join(target.store_path.path)
    if isinstance(target, zarr.abc.store.Store):
        return _store_location(target)
    text = os.fspath(target)
    if "://" not in text:
        return _local(text)
    import fsspec

    fs, path = fsspec.core.url_to_fs(text)
    return _fsspec_location(fs, path)


def _graph_sources(array):
    """The zarr arrays and TIFF sources held in the graph of a dask array:
    in the tasks of its materialized layers, the tasks its lazy layers'
    blocks share, and the arguments of its blockwise layers (where
    ``from_zarr(..., inline_array=True)`` keeps its array)."""
    found = {}
    for layer in array.dask.layers.values():
        held = []
        mapping = getattr(layer, "mapping", None) or getattr(layer, "shared", None)
        if isinstance(mapping, dict):
            held.extend(mapping.values())
        indices = getattr(layer, "indices", None) or ()  # (argument, None): a literal
        held.extend(argument for argument, index in indices if index is None)
        held.append(getattr(layer, "task", None))
        for value in held:
            for source in _held(value):
                found[id(source)] = source
    return list(found.values())


def _held(value, depth=4):
    """The stored sources that `value`, a task or an argument, holds: itself,
    or in its arguments a few levels down."""
    if isinstance(value, zarr.Array) or _file_backed(value):
        yield value
    elif depth and isinstance(value, DataNode):
        yield from _held(value.value, depth - 1)
    elif depth and isinstance(value, Task):  # containers too
        for argument in (value.func, *value.args, *value.kwargs.values()):
            yield from _held(argument, depth - 1)
    elif depth and isinstance(value, functools.partial):
        for argument in (*value.args, *value.keywords.values()):
            yield from _held(argument, depth - 1)
    elif depth and isinstance(value, list | tuple | dict):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _held(item, depth - 1)


def _file_backed(value):
    """Whether `value` is a source read from files (TIFF, HDF5)."""
    from ._hdf5 import Hdf5Source
    from ._tiff import TiffSource

    return isinstance(value, TiffSource | Hdf5Source)


def stored_sources(array):
    """The stored arrays (zarr arrays, TIFF sources) that `array` reads.

    `array` may also be a path or URL, of anything :func:`open_source` opens.
    """
    from ._io import open_source

    if isinstance(array, str | os.PathLike):
        array = open_source(array)
    if isinstance(array, zarr.Array) or _file_backed(array):
        return [array]
    if isinstance(array, da.Array):
        return _graph_sources(array)
    return []


def locations(array):
    """Locations of everything stored that `array` reads, whole.

    What a path names is taken whole (an OME-Zarr image or a zarr group,
    not only the array read in it), and so is the outermost zarr group
    holding a zarr array, and the folder of TIFF slices (all in one
    folder): an output inside one of those would change the input, or its
    neighbours. Stored arrays are found in a dask graph's tasks and their
    arguments (see :func:`_graph_sources`); one read through a function's
    closure is not seen: name it in ``to_zarr``'s `inputs` (beside the
    result, whose graph is then searched too).

    Parameters
    ----------
    array : ndarray, dask array, zarr array, TiffStack, TiffSlices or path

    Returns
    -------
    list of Location
        Empty for data held in memory.

    Raises
    ------
    RefusedError
        A zarr array's store is of a kind whose location is unknown.
    """
    found = []
    if isinstance(array, str | os.PathLike):
        found.append(locate(array))
    for source in stored_sources(array):
        files = getattr(source, "files", None)
        if files is not None:
            found.extend(_local(f) for f in files)
            folders = {os.path.dirname(_local(f).path) for f in files}
            if len(files) > 1 and len(folders) == 1:  # a folder of slices
                found.append(_local(folders.pop()))
            continue
        where = locate(source)
        if where is None:
            store = type(source.store_path.store).__name__
            msg = (
                f"an input is a zarr array in a store of unknown kind ({store}), "
                "so the output cannot be checked not to be it; refusing to write"
            )
            raise RefusedError(msg)
        found.append(_outermost_group(source, where))
    return found


def _outermost_group(array, where):
    """The location of the outermost zarr group holding the zarr `array`
    (at `where`) in its file system, or `where` if none does."""
    fs = _file_system(_unwrapped(array.store_path.store))
    if fs is None:
        return where
    top = where
    folder = where.path
    while (parent := folder.rpartition("/")[0]) and _is_group(fs, parent):
        top, folder = Location(where.protocol, parent), parent
    return top


def _file_system(store):
    """A blocking fsspec file system holding `store`'s files, or None (memory)."""
    if isinstance(store, zarr.storage.LocalStore):
        import fsspec

        return fsspec.filesystem("file")
    if isinstance(store, zarr.storage.FsspecStore):
        return blocking(store.fs)
    return None


def _is_group(fs, folder):
    """Whether `folder` holds zarr group metadata (v3 or v2)."""
    try:
        if fs.exists(f"{folder}/.zgroup"):
            return True
        meta = json.loads(fs.cat_file(f"{folder}/zarr.json"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("node_type") == "group"


# --- inventories ---------------------------------------------------------------


def _walk_local(root):
    """``(key, size, mtime_ns)`` of every file below `root`, keys relative."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                info = entry.stat(follow_symlinks=False)
                key = os.path.relpath(entry.path, root).replace(os.sep, "/")
                yield key, info.st_size, info.st_ctime_ns


def blocking(fs):
    """A blocking twin of an fsspec file system made for asyncio (zarr's)."""
    if hasattr(fs, "sync_fs"):  # fsspec's wrapper of a blocking file system
        return fs.sync_fs
    if getattr(fs, "asynchronous", False):
        return type(fs)(**{**fs.storage_options, "asynchronous": False})
    return fs


def _walk_fsspec(fs, root):
    fs = blocking(fs)
    for path, info in fs.find(root, detail=True).items():
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified")
        key = path[len(root.rstrip("/")) + 1 :] if path != root else ""
        yield key, int(info.get("size") or 0), str(stamp)


def _walk_zarr(array):
    """Entries of the store under a zarr array's path."""
    store, prefix = _unwrapped(array.store_path.store), array.store_path.path
    if isinstance(store, zarr.storage.LocalStore):
        yield from _walk_local(os.path.join(store.root, prefix))
        return
    if isinstance(store, zarr.storage.FsspecStore):
        root = f"{store.path.rstrip('/')}/{prefix}".rstrip("/")
        fs = blocking(store.fs)
        if protocol_of(fs) == "file":  # a file:// URL: status-change times too
            yield from _walk_local(root)
        else:
            yield from _walk_fsspec(fs, root)
        return
    from zarr.core.sync import sync

    async def listing():
        return [key async for key in store.list_prefix(prefix)]

    for key in sync(listing()):
        yield key[len(prefix) :].lstrip("/"), 0, ""


@dataclass(frozen=True)
class Inventory:
    """What stores an input: a listing of its entries, without reading them.

    Attributes
    ----------
    where : str
        The input's location.
    entries : dict
        ``{key: (size, stamp)}``, the stamp the file's status-change time in
        nanoseconds (local files: any write, and any reset of the
        modification time, changes it), or the store's own (an ETag, a time).
    """

    where: str
    entries: dict

    @classmethod
    def of(cls, source):
        """The inventory of a zarr array or TIFF source."""
        files = getattr(source, "files", None)
        if files is not None:
            entries = {}
            for f in files:
                info = os.stat(f)
                entries[f] = (info.st_size, info.st_ctime_ns)
            return cls(os.path.commonpath(files) if files else "", entries)
        entries = {k: (s, t) for k, s, t in _walk_zarr(source)}
        return cls(str(locate(source)), entries)

    @property
    def digest(self):
        """SHA-256 of the sorted listing: equal digests, same stored content."""
        sha = hashlib.sha256()
        for key in sorted(self.entries):
            size, stamp = self.entries[key]
            sha.update(f"{key}\0{size}\0{stamp}\n".encode())
        return sha.hexdigest()

    def record(self):
        """What an output records of this input (JSON-able)."""
        sizes = [size for size, _ in self.entries.values()]
        stamps = [t for _, t in self.entries.values() if isinstance(t, int)]
        return {
            "where": self.where,
            "entries": len(self.entries),
            "bytes": int(sum(sizes)),
            "newest": max(stamps, default=0),
            "digest": self.digest,
        }

    def changes(self, recorded, most=3):
        """How this listing differs from a recorded one, in words, or None."""
        if recorded.get("digest") == self.digest:
            return None
        now = self.record()
        parts = []
        if now["entries"] != recorded.get("entries"):
            parts.append(
                f"{recorded.get('entries')} stored entries then, {now['entries']} now"
            )
        if now["bytes"] != recorded.get("bytes"):
            parts.append(f"{recorded.get('bytes')} bytes then, {now['bytes']} now")
        newer = sorted(
            key
            for key, (_, stamp) in self.entries.items()
            if isinstance(stamp, int) and stamp > recorded.get("newest", 0)
        )
        if newer:
            more = f" and {len(newer) - most} more" if len(newer) > most else ""
            parts.append(f"modified since: {', '.join(newer[:most])}{more}")
        return "; ".join(parts) or "sizes or modification times of entries differ"


def _stored_grid(array):
    """Number of stored chunks (shards, if sharded) per axis of a zarr array."""
    shape = array.shards or array.chunks
    return [-(-n // c) for n, c in zip(array.shape, shape, strict=True)]


def chunk_keys(array):
    """The storage key of every chunk (shard, if sharded) of a zarr array."""
    encode = array.metadata.encode_chunk_key
    grid = itertools.product(*map(range, _stored_grid(array)))
    return (encode(index) for index in grid)


def absent_chunks(array, inventory=None):
    """Keys of the chunks of a zarr array that its store does not hold.

    Parameters
    ----------
    array : zarr.Array
    inventory : Inventory or None
        A listing of the array's store, made if not given.

    Returns
    -------
    list of str
    """
    inventory = inventory or Inventory.of(array)
    return [key for key in chunk_keys(array) if key not in inventory.entries]


def check_chunks(source, name, missing_chunks):
    """Refuse a zarr `source` that lacks chunks, unless they are to be filled.

    Parameters
    ----------
    source : any source
        Only zarr arrays are checked; other kinds hold no absent chunks.
    name : str
        Parameter name for messages.
    missing_chunks : {'error', 'fill'}
        ``'fill'`` reads absent chunks as the array's fill value, as zarr
        does (for sparse stores).

    Raises
    ------
    MissingChunksError
        When chunks are absent and `missing_chunks` is ``'error'``.
    """
    if missing_chunks not in MISSING_CHUNKS:
        msg = (
            f"`missing_chunks` must be one of {MISSING_CHUNKS}, got {missing_chunks!r}"
        )
        raise ValueError(msg)
    if missing_chunks == "fill" or not isinstance(source, zarr.Array):
        return
    absent = absent_chunks(source)
    if absent:
        total = math.prod(_stored_grid(source))
        first = ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else "")
        msg = (
            f"`{name}` {locate(source)} lacks {len(absent)} of its {total} "
            f"chunks ({first}); zarr would read them as the fill value "
            f"{source.fill_value}. If it is sparse on purpose (zarr leaves out "
            "chunks of fill values unless write_empty_chunks is set), pass "
            "missing_chunks='fill' (command line: --missing-chunks fill)"
        )
        raise MissingChunksError(msg)
