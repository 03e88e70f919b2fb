"""Writing results into zarr stores: chunk by chunk, resumable, safe.

:func:`to_zarr` stores a lazy result so that an interrupted run can be
continued and nothing that is not the writer's own is ever touched:

- **Whole chunks.** The output's chunks are regular, and one task computes
  and writes one whole chunk (one shard, when sharded; large outputs are
  sharded by default, see :func:`~dask_localstats._layout.auto_shards`), so
  no two tasks write the same object. zarr's local store writes a chunk to
  a temporary file and renames it into place (zarr-python 3.1.6 and later),
  and an object store shows an object whole or not at all, so a process
  killed with SIGKILL leaves whole chunks (and locally stray ``*.partial``
  files). Empty chunks are written too, so "the chunk exists" means "the
  chunk is done" -- unless the machine stopped: zarr does not sync a file
  before renaming it, so a resume reads back each chunk file of a local
  output and computes again those that are empty or do not decode; every
  chunk ends with a crc32c checksum (zarr v3's codec), so one cut short or
  changed in any byte does not decode.
- **One place a unit.** Where units are enough for all threads, a unit's
  task also runs the tasks that only it needs (the chunks of a user's
  arithmetic on a background, their resampling; see
  :func:`~dask_localstats._graph.gathered`), so that on a cluster an output
  block is made on one worker and no chunk travels to its writer; the
  coarse blocks, which several units read, stay tasks of their own.
- **Batches.** The units (chunks or shards) are computed in batches of
  consecutive units whose graphs hold at most ``batch_size`` tasks, each
  graph made (from the lazy layers of :mod:`dask_localstats._graph`) and
  submitted when the one before is done: a job of any size keeps the
  scheduler's graph and the client's memory bounded.
- **A record.** The array's attributes hold a ``dask_localstats`` record: the
  package version, a fingerprint of the computation (the dask graph's name,
  shape, dtype, how the output is stored: chunks, shards, codecs, OME-Zarr
  placement, pyramid levels; and the caller's ``provenance``), an inventory of each
  stored input (see :class:`~dask_localstats._stored.Inventory`) and
  ``"complete": false`` until the last chunk is written and the inputs are
  found unchanged.
- **Resume.** ``resume=True`` checks the record, refuses inputs whose
  inventory changed, removes stray temporary files and computes only the
  chunks that are missing (or torn, see above). A stored coarse block that
  is not a whole ``.npy`` file of its shape and dtype is refused, named.
- **Checkpoints.** The coarse grid of every resampling in the result (see
  :func:`dask_localstats._engine.checkpoint_of`) is stored inside the output
  (``.dask_localstats/coarse-*``) block by block, by the tasks that compute
  the blocks; later batches and resumed runs read the stored blocks instead
  of computing them again.
- **One writer.** A lock created atomically in the output
  (``.dask_localstats.lock``, holding the pid, the host and the start time)
  is held for the whole run: flocked in a local folder, a lease refreshed
  by the writer in an object store (:mod:`dask_localstats._lock`). A second
  writer is refused, naming the holder; a lock whose run is gone is
  reported, and cleared by ``overwrite`` or ``resume``.
- **Anywhere fsspec reaches.** The output is a local path or any fsspec URL
  (``s3://``, ``gs://``...), reached through a
  :class:`~dask_localstats._place.Folder` or
  :class:`~dask_localstats._place.Prefix` that lists, reads, writes whole
  files and creates them only if absent.
- **Only its own.** The output is never an input, inside one or holding one,
  whatever the spelling of either (:class:`~dask_localstats._stored.Location`;
  an input is taken whole, see :func:`~dask_localstats._stored.locations`).
  ``overwrite`` replaces an existing store only when it carries this
  library's record at its root and every file in it is a zarr entry
  (metadata, chunk keys of its arrays, the lock, temporary files): any other
  store is refused, and only the proven entries are deleted, the record
  last.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import operator
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import dask
import dask.array as da
import dask.threaded
import numpy as np
import zarr
from dask._task_spec import List, Task
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from ._checkpoint import checkpointed, coarse_voxels, settle
from ._engine import SPARES, computing, region_task
from ._graph import batches, cull, edges_of, gathered, note, spans
from ._layout import layout_of
from ._lock import LOCK, check_guard, holder, locked
from ._place import Folder, place_of
from ._progress import COARSE, WRITE, Progress, Stage
from ._public import public
from ._pyramid import downsample, halved_axes, level_image
from ._stored import Inventory, locate, locations, stored_sources
from .errors import InputChangedError, RefusedError

__all__ = ["to_zarr"]

RECORD = "dask_localstats"
# Tasks in the graph of one batch of the output's chunks: far below what
# dask.distributed's scheduler handles well, large enough to keep a cluster busy.
DEFAULT_BATCH_SIZE = 50_000
_METADATA = {"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"}
_CHUNK_KEY = re.compile(r"^(c([/.]\d+)*|\d+([/.]\d+)*)$")
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")
_CHECKPOINT = re.compile(
    r"^\.dask_localstats/coarse-[0-9a-f]{20}/\.?(\d+(-\d+)*|extremes)\.npy"
    r"(\.[0-9a-f]{32}\.partial)?$"
)


def _version():
    from . import __version__

    return __version__


# --- the output's place and content ----------------------------------------------


def _check_not_input(where, inputs):
    """Refuse an output that is, is inside, or holds one of the inputs.

    Locations are compared as resolved paths, and local ones also as the
    files they are (device and inode of each existing ancestor), so a bind
    mount or a second mount of the same folder is caught too.
    """
    for label, source in inputs.items():
        for place in locations(source):
            inside = place.contains(where) or _under(where, place)
            if inside:
                msg = f"the output {where} is {label} or inside it ({place}); refusing to write there"
                raise RefusedError(msg)
            if where.contains(place) or _under(place, where):
                msg = f"the output {where} holds {label} ({place}); refusing to write there"
                raise RefusedError(msg)


def _under(inner, outer):
    """Whether the local `inner` is `outer` or inside it, as files on disk."""
    if (
        "file" not in (inner.protocol, outer.protocol)
        or inner.protocol != outer.protocol
    ):
        return False
    try:
        target = os.stat(outer.path)
    except OSError:
        return False
    for folder in [Path(inner.path), *Path(inner.path).parents]:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(folder), target):
                return True
    return False


def _array_prefixes(place, keys):
    """Keys of the folders (``""``: the root) holding a zarr array."""
    prefixes = set()
    for key in keys:
        folder, _, name = key.rpartition("/")
        if name == ".zarray":
            prefixes.add(folder)
        elif name == "zarr.json":
            try:
                meta = json.loads(place.read(key))
            except (OSError, ValueError):
                continue
            if meta.get("node_type") == "array":
                prefixes.add(folder)
    return prefixes


def _is_entry(key, arrays):
    """Whether the file `key` is a zarr entry, our lock, or one of our checkpoints."""
    name = key.rpartition("/")[2]
    if name in _METADATA or key == LOCK or _CHECKPOINT.match(key):
        return True
    parts = key.split("/")
    for depth in range(len(parts) - 1, -1, -1):
        folder = "/".join(parts[:depth])
        if folder in arrays:
            chunk = "/".join(parts[depth:])
            return bool(_CHUNK_KEY.match(_PARTIAL.sub("", chunk)))
    return False


def _check_replaceable(place):
    """Refuse replacing `place` unless it is an output of this library, holding
    zarr entries only; their keys."""
    if not place.is_folder():
        msg = f"the output {place} exists and is not a folder; refusing to replace it"
        raise RefusedError(msg)
    keys, foreign = place.files()
    arrays = _array_prefixes(place, keys)
    foreign = foreign or next((k for k in keys if not _is_entry(k, arrays)), None)
    if foreign is not None:
        msg = (
            f"the output {place} holds {foreign}, which is not a "
            "zarr entry; refusing to delete it (remove it yourself, or choose "
            "another output)"
        )
        raise RefusedError(msg)
    if any(k.rpartition("/")[2] in _METADATA for k in keys) and not _ours(place, keys):
        msg = (
            f"the output {place} is a zarr store that dask_localstats did not "
            "write (its zarr.json holds no record of ours); refusing to delete "
            "it (remove it yourself, or choose another output)"
        )
        raise RefusedError(msg)
    return keys


def _ours(place, keys):
    """Whether the zarr store at `place` (files `keys`) carries this library's
    record at its root, and no zarr v2 entries (it writes zarr v3 only)."""
    try:
        meta = json.loads(place.read("zarr.json"))
    except (OSError, ValueError):
        return False
    attributes = meta.get("attributes") if isinstance(meta, dict) else None
    if not isinstance(attributes, dict) or not isinstance(attributes.get(RECORD), dict):
        return False
    return not any(k.rpartition("/")[2] in _METADATA - {"zarr.json"} for k in keys)


def _clear(place):
    """Delete the zarr entries of the store at `place` (not the lock): the
    chunks first, the metadata after, the record (the root's ``zarr.json``)
    last, so that a run stopped meanwhile leaves an output still ours."""
    keys = [key for key in _check_replaceable(place) if key != LOCK]
    metadata = {key for key in keys if key.rpartition("/")[2] in _METADATA}
    place.delete([key for key in keys if key not in metadata])
    place.delete(sorted(metadata, key=lambda key: (key == "zarr.json", key)))


# --- the record -----------------------------------------------------------------


def _stored_as(layout, ome, pyramid):
    """How the output is stored (JSON-able): its layout, codecs and OME-Zarr
    metadata, part of the record and of its fingerprint."""
    placed = ome and {
        "axes": ome.axes,
        "scale": ome.scale,
        "translation": ome.translation,
    }
    stored = {
        "chunks": list(layout.chunks),
        "shards": layout.shards and list(layout.shards),
        "compressors": [
            c.to_dict() if hasattr(c, "to_dict") else c
            for c in layout.compressors or ()
        ],
        "ome": placed,  # not its name, which is the output folder's
        "pyramid": pyramid,
    }
    return json.loads(json.dumps(stored, default=str))


def _fingerprint(array, stored, provenance):
    described = {
        "version": _version(),
        "graph": array.name,
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "stored": stored,
        "provenance": provenance,
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _inventories(inputs):
    """``{label: Inventory}`` of the stored arrays among the inputs."""
    found = {}
    for label, source in inputs.items():
        for k, stored in enumerate(stored_sources(source)):
            found[label if k == 0 else f"{label} ({k + 1})"] = Inventory.of(stored)
    return found


def _input_changes(recorded, inventories):
    """Words on how the inputs differ from the recorded ones, or None."""
    changes = []
    for label, inventory in inventories.items():
        change = inventory.changes(recorded.get(label, {}))
        if change:
            changes.append(f"{label} {inventory.where}: {change}")
    return "; ".join(changes) or None


def _changed(old, new, prefix=""):
    """``"key: old then, new now"`` for each differing entry, a level deep."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            changes += _changed(a, b, f"{key} ")
        else:
            changes.append(f"{prefix}{key}: {a!r} then, {b!r} now")
    return changes


def _differences(previous, record):
    """Short text of what differs between two records' fingerprinted parts."""
    old, new = previous.get("provenance") or {}, record.get("provenance") or {}
    changes = _changed(old, new)
    changes += _changed(previous.get("stored") or {}, record["stored"], "output ")
    if previous.get("version") != record["version"]:
        changes.append(
            f"version {previous.get('version')} then, {record['version']} now"
        )
    return "; ".join(changes) or "the computation differs"


# --- opening and creating the output ----------------------------------------------


@dataclass
class _Output:
    """The node holding the record (array or OME group) and the array."""

    node: zarr.Array | zarr.Group
    array: zarr.Array

    def mark(self, record):
        self.array.attrs[RECORD] = record
        if self.node is not self.array:
            self.node.attrs[RECORD] = record


def _create(place, array, layout, record, attributes, ome):
    options = dict(
        shape=array.shape,
        chunks=layout.chunks,
        shards=layout.shards,
        dtype=array.dtype,
        compressors=layout.compressors,
        fill_value=0,
        attributes={**(attributes or {}), RECORD: record},
        config={"write_empty_chunks": True},
    )
    if ome is None:
        target = zarr.create_array(place.store(), zarr_format=3, **options)
        return _Output(target, target)
    group = zarr.create_group(
        place.store(),
        zarr_format=3,
        attributes={"ome": ome.attributes(), RECORD: record},
    )
    target = group.create_array("0", dimension_names=ome.dimension_names, **options)
    return _Output(group, target)


def _reopen(place, record, array, layout, inventories):
    """The output of an interrupted run at `place`, checked for resuming."""
    path = place
    try:
        node = zarr.open(store=place.store(), mode="r+")
        target = node["0"] if isinstance(node, zarr.Group) else node
        target = target.with_config({"write_empty_chunks": True})
        previous = target.attrs[RECORD]
    except Exception:  # anything unreadable: not ours to continue
        msg = f"resume: the output {path} is not a store written by dask_localstats; overwrite=True (--overwrite) replaces it"
        raise RefusedError(msg) from None
    if previous.get("fingerprint") != record["fingerprint"]:
        msg = (
            f"resume: the output {path} was written by another computation "
            f"({_differences(previous, record)}); rerun the same one, or overwrite=True (--overwrite)"
        )
        raise RefusedError(msg)
    if previous.get("complete"):
        msg = f"resume: the output {path} is complete; nothing to resume (overwrite=True, --overwrite, computes it again)"
        raise RefusedError(msg)
    stored = (target.shape, target.dtype, target.chunks, target.shards)
    if stored != (array.shape, array.dtype, layout.chunks, layout.shards):
        msg = f"resume: the output {path} has another shape, dtype or chunks; overwrite=True (--overwrite) replaces it"
        raise RefusedError(msg)
    changes = _input_changes(previous.get("inputs", {}), inventories)
    if changes:
        msg = (
            f"resume: the inputs changed since the output {path} was begun "
            f"({changes}); its chunks would mix results: overwrite=True (--overwrite) starts again"
        )
        raise InputChangedError(msg)
    return _Output(node, target)


# --- computing -------------------------------------------------------------------


def _write_chunk(target, block, region, guard=None):
    """Write one whole chunk; a task of the write graph."""
    check_guard(guard)
    target[region] = block
    return np.ones(1, dtype=bool)


def _units(shape, unit, done=frozenset()):
    """``(index, region)`` of the write units not in `done`, in C order."""
    return ((i, r) for i, r in _regions(shape, unit) if i not in done)


def _counts(shape, unit):
    """Blocks of shape `unit` along each axis of `shape`."""
    return [-(-n // u) for n, u in zip(shape, unit, strict=True)]


def _regions(shape, unit):
    """``(index, region)`` of the regular grid of `unit` blocks over `shape`."""
    for index in itertools.product(*map(range, _counts(shape, unit))):
        region = tuple(
            slice(i * u, min((i + 1) * u, n))
            for i, u, n in zip(index, unit, shape, strict=True)
        )
        yield index, region


def _written(target, place, indices):
    """The chunk (or shard) indices whose files exist and decode.

    Stray temporary files of interrupted writes are removed first. In a
    local folder each file found is read back, a few at a time: zarr
    renames a chunk file into place without syncing it, so a machine that
    stops can leave one renamed but not written whole (often empty, which
    zarr would read as a shard of fill values); one that is empty or does
    not decode is deleted and counted as missing. An object store shows an
    object whole or not at all: there, being listed suffices.
    """
    keys, _ = place.files()
    place.delete([key for key in keys if _PARTIAL.search(key)])
    prefix = target.store_path.path.strip("/")
    keys = set(keys)

    def key_of(index):
        key = target.metadata.encode_chunk_key(index)
        return f"{prefix}/{key}" if prefix else key

    found = [index for index in indices if key_of(index) in keys]
    if not isinstance(place, Folder):
        return set(found)

    def whole(index):
        empty = (place.path / key_of(index)).stat().st_size == 0
        return not empty and _decodes(target, index)

    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        kept = list(pool.map(whole, found))
    place.delete([key_of(i) for i, ok in zip(found, kept, strict=True) if not ok])
    return {i for i, ok in zip(found, kept, strict=True) if ok}


def _decodes(target, index):
    """Whether the stored chunk (or shard) `index` of `target` decodes."""
    try:
        target.get_block_selection(index)
    except Exception:  # torn: computed again
        return False
    return True


def _write_pieces(target, shape, dtype, places, pieces, region, guard=None):
    """Compute one whole unit chunk by chunk into one array, and write it.

    ``pieces[k](into=...)`` writes the chunk ``places[k]`` of the unit (a
    task of the write graph). The unit's array is spare memory
    (:class:`~dask_localstats._engine.Spares`), given back once zarr has
    written it.
    """
    unit = SPARES.take(shape, dtype)
    for where, compute in zip(places, pieces, strict=True):
        compute(into=unit[where])
    done = _write_chunk(target, unit, region, guard)
    SPARES.give(unit, done)
    return done


class _Pieces(NamedTuple):
    """How a write task computes the chunks of its unit itself (:func:`_unit_task`)."""

    make: object  # the layer's note ``pieces``: index -> the chunk's computation
    edges: list  # the array's chunk edges per axis (edges_of)
    at: list  # per axis, {edge: the index of the chunk starting there}

    @classmethod
    def of(cls, array):
        """Those of `array`, or None where its layer cannot compute its chunks so."""
        make = note(array.dask.layers.get(array.name), "pieces")
        if make is None:
            return None
        edges = edges_of(array.chunks)
        return cls(make, edges, [{e: i for i, e in enumerate(a)} for a in edges])


def _unit_task(array, key, target, region, guard, pieces=None):
    """The task writing `region` of `target`.

    Where `pieces` (:class:`_Pieces`: `array` is a resampling, or a step
    fused into one) are given and the array's chunks tile the region, the
    task computes them itself, one after the other, into one array
    (:func:`_write_pieces`): a shard is then not pasted together from
    chunks that other tasks made and that waited for it, in fresh memory.
    Else it assembles the region from the chunks' tasks.
    """
    tiled = pieces is not None and all(
        r.start in at and r.stop in at for at, r in zip(pieces.at, region, strict=True)
    )
    if not tiled:
        bounds = [(r.start, r.stop) for r in region]
        block = region_task(array, bounds)
        return Task(key, _write_chunk, target, block, region, guard)
    ranges = zip(pieces.at, region, strict=True)
    inside = [range(at[r.start], at[r.stop]) for at, r in ranges]
    places, parts = [], []  # where in the unit, the chunk's computation
    for index in itertools.product(*inside):
        bounds = zip(spans(pieces.edges, index), region, strict=True)
        places.append(
            tuple(slice(lo - r.start, hi - r.start) for (lo, hi), r in bounds)
        )
        parts.append(pieces.make(index))
    shape = tuple(r.stop - r.start for r in region)
    computed = (target, shape, array.dtype, places, List(*parts), region, guard)
    return Task(key, _write_pieces, *computed)


def _write_graph(array, target, todo, guard=None):
    """A dask array whose computation writes the units `todo` of `array`.

    `todo` lists ``(index, region)`` of the units (whole chunks or shards of
    `target`); each unit's task computes the chunks of `array` in its region
    into one array where `array` is a resampling (:func:`_unit_task`), else
    assembles them (no rechunking layer over the whole array), and the
    graph is culled to what the units need.
    """
    indices = [index for index, _ in todo]
    name = "localstats-write-" + tokenize(array.name, str(locate(target)), indices)
    # a unit computed in one task: only where there are units enough for
    # all threads, whose chunks would otherwise be computed side by side
    pieces = _Pieces.of(array) if _whole_units(len(todo)) else None
    layer = {
        (name, i): _unit_task(array, (name, i), target, region, guard, pieces)
        for i, (_, region) in enumerate(todo)
    }
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[array])
    graph = cull(graph, layer)
    chunks = ((1,) * len(todo),)
    return da.Array(graph, name, chunks, dtype=bool, meta=np.empty((0,), bool))


def _whole_units(count):
    """Whether `count` units are enough for all threads, so that each unit
    can be computed by one task (else its chunks are computed side by side)."""
    return count >= 2 * _threads()


def _in_one_place(writes):
    """`writes` (from :func:`_write_graph`) with each unit's task also running
    the tasks only it needs (:func:`~dask_localstats._graph.gathered`), where
    units are enough for all threads: an output block is made in one place,
    and on a cluster its chunks do not travel between workers."""
    if not _whole_units(writes.npartitions):
        return writes
    keys = [(writes.name, i) for i in range(writes.npartitions)]
    graph = gathered(writes.dask, keys, keep=_stage_block)
    return da.Array(graph, writes.name, writes.chunks, meta=writes._meta)


def _stage_block(key):
    """Whether `key` is a block of a coarse stage (or of its fill), which
    stays a task of its own: the blocks are stored as checkpoints, and the
    progress bar counts them."""
    name = key[0] if isinstance(key, tuple) else key
    return isinstance(name, str) and name.startswith((COARSE, "localstats-filled"))


def _threads():
    """The threads computing: the cluster's, or the local scheduler's."""
    client = _client()
    if client is not None:
        return sum(client.nthreads().values())
    return dask.config.get("num_workers", None) or os.cpu_count() or 1


def _client():
    """The current dask.distributed client, if one is in use."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def _compute(collections, progress=None, tasks=None):
    """Compute dask collections together (shared tasks once); their values.

    `progress`, a :class:`~dask_localstats._progress.Progress`, follows it
    (`tasks`: how many tasks of each stage's prefix it runs).
    Whatever happens, no task of it is still running on return (locally,
    the pool's threads are waited for; on a cluster, the tasks cancelled),
    so that nothing writes once the caller lets the output's lock go.
    """
    client = _client()
    shown = (
        contextlib.nullcontext()
        if progress is None
        else progress.following(client, tasks)
    )
    with shown:
        if client is None:  # the tasks run here: their objects are collected here
            workers = dask.config.get("num_workers", None) or os.cpu_count() or 1
            pool = ThreadPoolExecutor(workers)
            try:
                # the threaded scheduler itself: naming it "threads" would
                # import dask.distributed (0.2 s) to look for a client
                with computing():
                    return dask.compute(
                        *collections, scheduler=dask.threaded.get, pool=pool
                    )
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        futures = client.compute(collections)
        try:
            return client.gather(futures)
        except BaseException:
            client.cancel(futures)
            raise


def _stream(progress):
    """Where to show progress: stderr for True, else the file given."""
    return sys.stderr if progress is True else progress


def _as_dask(array):
    if isinstance(array, da.Array):
        return array
    if isinstance(array, zarr.Array):
        return da.from_zarr(array)
    return da.from_array(np.asarray(array))


@public
def to_zarr(
    array,
    store,
    *,
    chunks=None,
    shards="auto",
    compressors="auto",
    overwrite=False,
    resume=False,
    attributes=None,
    inputs=None,
    provenance=None,
    ome=None,
    pyramid=1,
    progress=False,
    storage_options=None,
    batch_size=DEFAULT_BATCH_SIZE,
):
    """Store a (lazy) array into a new zarr v3 array, chunk by chunk, resumably.

    Parameters
    ----------
    array : dask array, zarr array or array_like
        The result to store; it is computed one output chunk per task, never
        whole.
    store : str, os.PathLike, zarr LocalStore or FsspecStore
        Where to create the zarr array: a local path, or a URL of any file
        system fsspec knows (``s3://bucket/out.zarr``, ``gs://...``), with
        its `storage_options`. In an object store the lock is a lease (see
        :mod:`dask_localstats._lock`) and a chunk is one object, whole.
    chunks : tuple of int or None
        Storage chunks; default: the first chunk shape of `array`.
    shards : "auto", tuple of int or None
        Store chunks together in shards of this shape (multiples of
        `chunks`; zarr v3's sharding codec), far fewer files for large
        volumes. One task computes and writes one whole shard. ``"auto"``
        (default): shards of about 64 MiB (uncompressed) for arrays of
        128 MiB or more, so a terabyte is some 16000 files, not the
        hundreds of thousands of its chunks; smaller arrays are not
        sharded. None: no shards.
    compressors : str, codec, list of codecs or None
        ``"auto"`` (blosc-zstd level 1 with byte shuffle: smaller and faster
        than zarr's default zstd on light-sheet data), a spec such as ``"zstd:3"``,
        ``"blosc-zstd:5"``, ``"blosc-lz4"`` or ``"none"`` (see
        :func:`compressors_of`), or zarr v3 codecs. A crc32c checksum
        follows them (:func:`~dask_localstats._layout.with_checksum`), so
        that a resume tells a damaged chunk from a whole one.
    overwrite : bool
        Replace an existing store, only if it is an output of this library
        (its record at the root) holding nothing but zarr entries (and clear
        a lock left by a run that is gone).
    resume : bool
        Continue an interrupted run into `store`: write only the missing
        chunks, after checking that the computation and its stored inputs
        are the same.
    attributes : dict or None
        User attributes of the array.
    inputs : dict or None
        ``{label: source}`` of the inputs to protect and identify; default:
        the zarr arrays and TIFF files that `array` reads, found in its graph.
    provenance : dict or None
        JSON-able description of the computation (parameters, command),
        stored in the record and part of its fingerprint.
    ome : OmeImage or None
        Write an OME-Zarr 0.5 image (a group whose level ``"0"`` is the array)
        with these axes, scale and translation.
    pyramid : int
        With `ome`: the number of resolution levels, each halving the spatial
        axes still longer than 32 voxels, computed from the level above as
        stored (fewer when no axis is left to halve).
    progress : bool or file
        Show one progress bar over the job (the coarse stage and the writing,
        weighted by voxels, with the rate and the time left) on stderr, or
        as lines in the file given.
    storage_options : dict or None
        fsspec options of a URL `store` (``key``, ``secret``,
        ``endpoint_url``, ...).
    batch_size : int
        Tasks in the graph of one batch. The output is computed in batches
        of consecutive chunks (whole slabs along the first axis when one
        fits), each graph made and submitted when the one before is done,
        so a job of any size keeps the scheduler's graph and the client's
        memory bounded; the coarse blocks neighbouring batches share are
        stored by the first and read by the next (see ``checkpoints``
        above). Results do not depend on it.

    Returns
    -------
    zarr.Array
        The written array; its ``attrs["dask_localstats"]`` is the record.

    Raises
    ------
    RefusedError
        The store exists (without `overwrite` or `resume`), is not an output
        of this library or holds files that are not zarr's, is an input or
        holds one (or an input's location is unknown), or cannot be resumed.
    LockedError
        Another run is writing the store, or left its lock.
    InputChangedError
        An input changed since the store was begun, or during the run: the
        store is left incomplete.

    Examples
    --------
    >>> import tempfile, dask.array as da
    >>> path = tempfile.mkdtemp() + "/out.zarr"
    >>> z = to_zarr(da.ones((4, 6), chunks=2), path)
    >>> z.shape, z.chunks, int(z[:].sum()), z.attrs["dask_localstats"]["complete"]
    ((4, 6), (2, 2), 24, True)
    """
    _check_options(overwrite, resume, pyramid, ome, batch_size)
    array = _as_dask(array)
    layout = layout_of(array, chunks, shards, compressors)
    path = place_of(store, storage_options)
    inputs = inputs if inputs is not None else {"an input": array}
    _check_not_input(path.location(), inputs)
    provenance = json.loads(json.dumps(provenance or {}, default=str))
    inventories = _inventories(inputs)
    stored = _stored_as(layout, ome, pyramid)
    record = {
        "version": _version(),
        "fingerprint": _fingerprint(array, stored, provenance),
        "provenance": provenance,
        "stored": stored,
        "inputs": {k: v.record() for k, v in inventories.items()},
        "complete": False,
    }
    exists = _check_existing(path, overwrite, resume)
    if resume:  # refusals need no lock: checked first, and again under it
        _reopen(path, record, array, layout, inventories)
    with locked(path, clear_stale=overwrite or resume) as guard:
        if resume:
            output = _reopen(path, record, array, layout, inventories)
        else:
            if exists:
                _clear(path)
            output = _create(path, array, layout, record, attributes, ome)
        written = _fill(array, output.array, resume, progress, path, guard, batch_size)
        changes = _input_changes(record["inputs"], _inventories(inputs))
        if changes:
            msg = (
                f"the inputs changed while the output {path} was written "
                f"({changes}); it is left incomplete: overwrite=True (--overwrite) starts again"
            )
            raise InputChangedError(msg)
        if pyramid > 1:
            _write_levels(output.node, ome, pyramid, progress, guard)
        output.mark({**record, "complete": True, "written": written})
    return output.array


def _check_options(overwrite, resume, pyramid, ome, batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        msg = f"`batch_size` must be an int (tasks a batch), got {batch_size!r}"
        raise TypeError(msg)
    if batch_size < 1:
        msg = f"`batch_size` must be at least 1 (tasks a batch), got {batch_size}"
        raise ValueError(msg)
    if overwrite and resume:
        msg = "`overwrite` and `resume` exclude each other"
        raise ValueError(msg)
    if isinstance(pyramid, bool) or not isinstance(pyramid, int) or pyramid < 1:
        msg = f"`pyramid` must be a number of levels >= 1, got {pyramid!r}"
        raise ValueError(msg)
    if pyramid > 1 and ome is None:
        msg = "`pyramid` needs an OME-Zarr output (`ome`, command line: --ome)"
        raise ValueError(msg)


def _check_existing(path, overwrite, resume):
    """Whether the output exists, refusing what the options do not allow.

    A new output's folder is made here, atomically: a folder that appears
    meanwhile (another run) is refused.
    """
    exists = path.exists()
    if exists and not (overwrite or resume):
        who = holder(path)
        busy = "" if who is None else f" (and holds the lock of {who})"
        msg = (
            f"the output {path} exists{busy}; pass overwrite=True (--overwrite) to "
            "replace it, or resume=True (--resume) to continue an interrupted run"
        )
        raise RefusedError(msg)
    if resume and not exists:
        msg = f"resume: the output {path} does not exist; nothing to resume"
        raise RefusedError(msg)
    if exists and overwrite:
        _check_replaceable(path)
    if not exists:
        try:
            path.make()
        except FileExistsError:
            msg = f"the output {path} appeared meanwhile (another run?); refusing to write there"
            raise RefusedError(msg) from None
    return exists


def _write_levels(group, image, count, progress, guard=None):
    """Levels 1 .. `count` - 1 of an OME-Zarr image, each from the one above."""
    spatial = [d for d, a in enumerate(image.axes) if a.get("type") == "space"]
    first = group["0"]
    levels = [("0", image.scale, image.translation)]
    factors = [1] * first.ndim
    for k in range(1, count):
        above = group[str(k - 1)]
        axes = halved_axes(above.shape, spatial)
        if not axes:
            break
        source = da.from_zarr(
            above,
            chunks=[2 * c if d in axes else c for d, c in enumerate(first.chunks)],
        )
        level = downsample(source, axes)
        target = group.require_array(
            str(k), shape=level.shape, chunks=first.chunks, dtype=level.dtype,
            compressors=first.compressors, fill_value=0,
            dimension_names=image.dimension_names,
        ).with_config({"write_empty_chunks": True})  # fmt: skip
        count = math.prod(_counts(level.shape, first.chunks))
        stage = Stage(f"level {k}", WRITE, math.prod(first.chunks), count)
        shown = None if not progress else Progress([stage], _stream(progress))
        units = list(_regions(level.shape, first.chunks))
        _compute([_in_one_place(_write_graph(level, target, units, guard))], shown)
        factors = [f * 2 if d in axes else f for d, f in enumerate(factors)]
        levels.append((str(k), *level_image(image, factors)))
    group.attrs["ome"] = image.attributes(levels)


def _fill(array, target, resume, progress, path, guard, batch_size):
    """Compute and write the chunks of `target` not written yet; how many.

    The chunks are written in batches (see :func:`_batches`); the coarse
    blocks each batch computes are stored with it (or found stored), and
    grids that a step reads whole are settled before the first batch
    (:func:`~dask_localstats._checkpoint.settle`); on any failure the error
    says that the output is left incomplete, to be resumed.
    """
    unit = target.shards or target.chunks
    done = set()
    if resume:
        done = _written(target, path, (i for i, _ in _regions(target.shape, unit)))
    count = math.prod(_counts(target.shape, unit)) - len(done)
    try:
        if count:
            array, checkpoints = checkpointed(array, path, guard)
            stages = [
                Stage("background", COARSE, coarse_voxels(array, c), c.missing)
                for c in checkpoints
                if c.along is None  # not a fill's sweep
            ]
            stages.append(Stage("write", WRITE, math.prod(unit), count))
            shown = None if not progress else Progress(stages, _stream(progress))

            def coarse(collection, files):
                return _compute([collection], shown, {COARSE: len(files)})[0]

            array = settle(array, checkpoints, batch_size, coarse)
            for batch in _batches(array, target, done, checkpoints, guard, batch_size):
                tasks = {WRITE: batch.writes.npartitions, COARSE: len(batch.files)}
                _compute([_in_one_place(batch.writes)], shown, tasks)
                for checkpoint in checkpoints:
                    checkpoint.saved(batch.files)
    except Exception as error:
        error.add_note(
            f"the output {path} is left incomplete; resume=True (--resume) continues it"
        )
        raise
    return count


class _Batch(NamedTuple):
    """The graph of one batch, and the coarse blocks it computes (and stores)."""

    writes: da.Array
    files: list

    @property
    def tasks(self):
        """Tasks in the batch's graph."""
        return len(self.writes.dask)


def _batch(array, target, units, checkpoints, guard):
    writes = _write_graph(array, target, units, guard)
    return _Batch(writes, [f for c in checkpoints for f in c.unsaved(writes.dask)])


def _batches(array, target, done, checkpoints, guard, batch_size):
    """The graphs of the chunks not `done`, batch by batch (see
    :func:`~dask_localstats._graph.batches`): runs of consecutive chunks in
    C order, whole slabs along the first axis when a slab fits. Each graph
    is made only when the one before is computed, so coarse blocks stored
    by a batch are read by the next.
    """
    unit = target.shards or target.chunks
    slab = math.prod(_counts(target.shape[1:], unit[1:]))

    def make(units):
        return _batch(array, target, units, checkpoints, guard)

    units = _units(target.shape, unit, done)
    return batches(units, make, operator.attrgetter("tasks"), batch_size, slab)
