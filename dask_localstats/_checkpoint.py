"""Checkpoints of the coarse grid inside an output, block by block.

Every coarse grid that a result resamples (see
:func:`dask_localstats._engine.checkpoint_of`) gets a folder in the output,
``.dask_localstats/coarse-<digest of its dask name>/``, with one ``.npy``
file a block (its checksum appended), stored whole (see
:mod:`dask_localstats._place`) as soon as the block is computed, in the
same graph as the output's chunks. Blocks
found stored are read instead of computed: by a later batch of the same run
(the blocks that neighbouring batches share are computed once) and by a
later run of the same computation (resuming), so finishing the last chunks
of an interrupted job costs only their resampling.

A step that reads a whole grid (the extremes a clip keeps values within, a
fill of missing samples) would make every batch read every block. Such
grids are settled first (:func:`settle`): their blocks computed and stored
in batches of their own, the extremes gathered on the way, stored as
``extremes.npy`` beside the blocks (read back when resuming) and put in the
graph as a value. A grid filled by sweeps along each axis
(:func:`dask_localstats._engine.fill_stage`) has a folder for each sweep's
tiles too, computed a line of tiles at a time and deleted once the filled
grid is stored whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import math
import re
import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import dask.array as da
import google_crc32c
import numpy as np
from dask._task_spec import Alias, DataNode, Task, TaskRef
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from ._engine import (
    BlockLayer,
    checkpoint_of,
    clip_of,
    extremes_of,
    fill_of,
    fill_stage,
)
from ._fill import boxes, reach
from ._graph import batches, cull
from ._lock import check_guard
from .errors import RefusedError

__all__ = ["CHECKPOINT_FOLDER", "Checkpoint", "checkpointed", "settle"]

CHECKPOINT_FOLDER = ".dask_localstats"
_BLOCK = re.compile(r"\d+(-\d+)*\.npy")


def _saved(block, place, key, guard=None):
    """`block`, once stored whole in the output at `key`: a ``.npy`` file
    followed by the CRC-32C of its bytes (which ``numpy.load`` ignores)."""
    check_guard(guard)
    data = io.BytesIO()
    np.save(data, block, allow_pickle=False)
    data.write(_checksum(data.getvalue()))
    place.write(key, data.getvalue())
    return block


def _checksum(data):
    return google_crc32c.value(data).to_bytes(4, "little")


# NumPy parses a .npy header with ast.literal_eval, whose AST construction
# CPython 3.11 does not keep right in concurrent threads (a spurious
# SystemError, python/cpython#106905): blocks are parsed one at a time
_PARSING = threading.Lock()


def _load_block(place, key, shape, dtype):
    """The block stored at `key`, refused (naming the file) unless it is a
    whole ``.npy`` file of `shape` and `dtype`, unchanged since it was
    stored (its checksum, see :func:`_saved`)."""
    data = place.read(key)
    if len(data) < 4 or _checksum(data[:-4]) != data[-4:]:
        _damaged(place, key, "its checksum does not match its bytes")
    data = io.BytesIO(data)
    try:
        with _PARSING:
            block = np.load(data, allow_pickle=False)
    except (ValueError, EOFError, OSError) as error:  # not a whole .npy file
        _damaged(place, key, str(error).splitlines()[0])
    if (block.shape, block.dtype) != (shape, np.dtype(dtype)):
        found = f"shape {block.shape} and dtype {block.dtype}"
        _damaged(place, key, f"{found}, not {shape} and {np.dtype(dtype)}")
    return block


def _damaged(place, key, why):
    msg = (
        f"the stored coarse block {place}/{key} is damaged ({why}); "
        "delete that file and resume to compute it again"
    )
    raise RefusedError(msg)


@dataclass(eq=False)  # one grid's; compared as objects, not by their arrays
class Checkpoint:
    """A coarse grid stored in the output, block by block.

    Attributes
    ----------
    coarse : dask array
        The grid, as computed.
    place : Folder or Prefix
        The output.
    folder : str
        Its blocks' folder in the output.
    guard : Guard or None
        The writer's lock, checked before each block is stored.
    stored : set of str
        The keys of the blocks stored, updated as batches store more.
    along : int or None
        For a sweep of a fill (:func:`dask_localstats._engine.fill_stage`),
        the axis its tasks sweep lines of blocks along: computed a line at
        a time, and not counted in the progress of the coarse grids.
    """

    coarse: da.Array
    place: object
    folder: str
    guard: object = None
    stored: set = field(default_factory=set)
    along: int | None = None

    def key(self, index):
        """The file of the block `index`."""
        return f"{self.folder}/{'-'.join(map(str, index))}.npy"

    @property
    def missing(self):
        """How many blocks are not stored."""
        return self.coarse.npartitions - len(self.stored)

    def substitute(self, node, index):
        """The task of block `index`: read if stored, else `node` storing its result.

        The block is stored by the task that computes it (the block is
        passed on), so the stores run as the blocks do, not as a stage of
        their own that dask's ordering might run ahead of the output.
        """
        file = self.key(index)
        if file in self.stored:
            shape = tuple(c[i] for c, i in zip(self.coarse.chunks, index, strict=True))
            dtype = self.coarse.dtype
            return Task(node.key, _load_block, self.place, file, shape, dtype)
        if isinstance(node, Alias):  # a block of another layer's (a rechunk's)
            inner = TaskRef(node.target)
        elif isinstance(node, Task):
            inner = Task(None, node.func, *node.args, **node.kwargs)
        else:  # data, or an old-style task: kept as it is, not stored
            return node
        return Task(node.key, _saved, inner, self.place, file, self.guard)

    def indices(self, every=False):
        """The indices of the grid's blocks not stored (all of them if `every`)."""
        indices = itertools.product(*map(range, self.coarse.numblocks))
        return [i for i in indices if every or self.key(i) not in self.stored]

    def owns(self, file):
        """Whether `file` is one of this grid's blocks."""
        folder, _, name = file.rpartition("/")
        return folder == self.folder and _BLOCK.fullmatch(name) is not None

    @property
    def extremes(self):
        """The file of the grid's extremes (see :func:`settle`)."""
        return f"{self.folder}/extremes.npy"

    def saved(self, files):
        """Note that a computation stored `files` (this grid's among them)."""
        self.stored.update(filter(self.owns, files))

    def unsaved(self, graph):
        """The files of the blocks that `graph` computes (and stores)."""
        found = []
        for layer in graph.layers.values():
            for key in layer:
                if isinstance(key, tuple) and key[0] == self.coarse.name:
                    file = self.key(key[1:])
                    if file not in self.stored:
                        found.append(file)
        return found


class _Substituting(MaterializedLayer):
    """A materialized layer of the grid whose blocks are substituted when read.

    The substitution is made each time a block's task is asked for (each
    batch culls the graph anew), so a block stored by one batch is read by
    the next.
    """

    def __init__(self, mapping, checkpoint):
        super().__init__(mapping)
        self.checkpoint = checkpoint

    def __getitem__(self, key):
        node = self.mapping[key]
        if isinstance(key, tuple) and key[0] == self.checkpoint.coarse.name:
            return self.checkpoint.substitute(node, key[1:])
        return node


def _substituted(layer, checkpoint):
    """`layer` (the grid's) with blocks read if stored, else stored when computed."""
    if isinstance(layer, BlockLayer):
        return layer.substituted(checkpoint.substitute)
    return _Substituting(dict(layer), checkpoint)


def checkpointed(array, place, guard=None):
    """`array` reading its coarse blocks stored in `place`, and their checkpoints.

    Every coarse grid that `array` resamples (see
    :func:`dask_localstats._engine.checkpoint_of`), and each sweep of its
    fill if it has one, has a folder in ``.dask_localstats/`` of the
    output's `place`, named from its dask name (its computation), with one
    ``.npy`` file a block. Blocks stored there
    when the returned array's tasks are made are read instead of computed;
    the others are stored by the tasks that compute them
    (:meth:`Checkpoint.unsaved` lists them in a graph).

    Returns
    -------
    array : dask array
    checkpoints : list of Checkpoint
    """
    layers, dependencies = dict(array.dask.layers), dict(array.dask.dependencies)
    checkpoints, listing = [], None
    for layer in array.dask.layers.values():
        coarse = checkpoint_of(layer)
        if coarse is None or coarse.name not in layers:
            continue
        fill = fill_of(coarse)
        sweeps = fill.sweeps if fill else ()
        along = [None, *reversed(range(len(sweeps)))]  # the last axis first
        for grid, axis in zip((coarse, *sweeps), along, strict=True):
            if _find(checkpoints, grid) is not None:
                continue  # a grid that two resamplings read: substituted once
            digest = hashlib.sha256(grid.name.encode()).hexdigest()[:20]
            folder = f"{CHECKPOINT_FOLDER}/coarse-{digest}"
            listing = place.files()[0] if listing is None else listing
            checkpoint = Checkpoint(grid, place, folder, guard, along=axis)
            checkpoint.stored = {k for k in listing if checkpoint.owns(k)}
            layers[grid.name] = _substituted(layers[grid.name], checkpoint)
            checkpoints.append(checkpoint)
    graph = HighLevelGraph(layers, dependencies)
    array = da.Array(graph, array.name, array.chunks, meta=array._meta)
    return array, checkpoints


def coarse_voxels(array, checkpoint):
    """Output voxels per block of the checkpoint's grid, for progress."""
    return math.prod(array.shape[: checkpoint.coarse.ndim]) / max(
        checkpoint.coarse.npartitions, 1
    )


class _Sink(NamedTuple):
    """What a batch gives of each block: ``func(block, *args)``, ``(rows, *shape)``."""

    func: object
    args: tuple
    rows: int
    shape: tuple
    dtype: object


def _done(block):
    return np.ones(1, bool)


_DONE = _Sink(_done, (), 1, (), bool)


def settle(array, checkpoints, batch_size, compute):
    """`array` with its steps that read whole grids done first, once.

    For each resampling of `array` whose grid is filled
    (:func:`~dask_localstats._engine.fill_of`) or whose values are clipped
    (:func:`~dask_localstats._engine.clip_of`): the blocks of the
    checkpointed grids its grid
    reads are computed (and stored) first, in batches of at most
    `batch_size` tasks as far as one block allows; then those of its grid.
    A grid filled from the nearest valid samples
    (:func:`~dask_localstats._engine.fill_stage`) is filled block by
    block, each from a box around it (:func:`dask_localstats._fill.boxes`)
    sized by the reaches gathered with the blocks it fills; where the boxes
    would hold too much of the grid, it is swept an axis at a time, each
    sweep's blocks computed (and stored) before the next. When its
    extremes are wanted, they are gathered from all its blocks (computed,
    or read where stored), and their value replaces the task that every
    output block reads. Later batches then read stored blocks only.

    `compute(collection, files)` computes one batch, which stores the
    blocks `files`, and returns its value.
    """
    graph = array.dask
    for layer in array.dask.layers.values():
        grid, extremes = checkpoint_of(layer), clip_of(layer)
        fill = None if grid is None else fill_of(grid)
        mine = None if grid is None else _find(checkpoints, grid)
        if (extremes is None and fill is None) or mine is None:
            continue  # nothing read whole, or not a grid of this result's
        flagged = None if fill is None else _find(checkpoints, fill.flagged)
        sweeps = [] if fill is None else [_find(checkpoints, s) for s in fill.sweeps]
        for checkpoint in checkpoints:
            name = checkpoint.coarse.name
            if checkpoint not in (mine, flagged, *sweeps) and name in grid.dask.layers:
                _batched(graph, checkpoint, _DONE, batch_size, compute)
        if flagged is not None and mine.missing:
            graph = _filled(graph, fill, (flagged, *sweeps, mine), batch_size, compute)
        if extremes is None:
            _batched(graph, mine, _DONE, batch_size, compute)
        else:
            value = _extremes(graph, mine, extremes, batch_size, compute)
            key = (extremes.name, *(0,) * extremes.ndim)
            layer = MaterializedLayer({key: DataNode(key, value)})
            graph = _replaced(graph, key[0], layer)
        if not mine.missing:  # the sweeps' tiles have served: scratch
            _discard([c for c in sweeps if c is not None and c.stored])
    return da.Array(graph, array.name, array.chunks, meta=array._meta)


def _extremes(graph, mine, extremes, batch_size, compute):
    """The extremes of the grid of `mine`, gathered from its blocks and
    stored with them; read if stored and every block is (resuming), unless
    the file is damaged (then gathered and stored again)."""
    if not mine.missing:
        with contextlib.suppress(FileNotFoundError, RefusedError):  # or damaged
            return _load_block(mine.place, mine.extremes, extremes.shape, np.float64)
    ndim = mine.coarse.ndim - (extremes.ndim - 1)
    sink = _Sink(extremes_of, (ndim,), 2, extremes.shape[1:], np.float64)
    parts = _batched(graph, mine, sink, batch_size, compute, every=True)
    parts = parts.reshape(-1, *extremes.shape)
    value = np.stack([parts[:, 0].min(axis=0), parts[:, 1].max(axis=0)])
    return _saved(value, mine.place, mine.extremes, mine.guard)


def _discard(checkpoints):
    """Delete the blocks `checkpoints` stored (only those: their files)."""
    for checkpoint in checkpoints:
        check_guard(checkpoint.guard)
        checkpoint.place.delete(sorted(checkpoint.stored))
        checkpoint.stored.clear()


def _replaced(graph, name, layer, after=()):
    """`graph` with its layer `name` replaced by `layer`, which reads `after`."""
    layers = {**graph.layers, name: layer}
    return HighLevelGraph(layers, {**graph.dependencies, name: set(after)})


def _filled(graph, fill, checkpoints, batch_size, compute):
    """`graph` with its grid filled by `fill` settled.

    `checkpoints` are those of the grid flagged, of the sweeps, and of the
    grid filled. From boxes where they are narrow (:func:`_boxed_fill`),
    else swept: each sweep's blocks computed and stored, in order, so that
    the filled grid's blocks read them.
    """
    flagged, *sweeps, mine = checkpoints
    boxed = _boxed_fill(graph, fill, flagged, mine, batch_size, compute)
    if boxed is None:
        for checkpoint in sweeps:
            _batched(graph, checkpoint, _DONE, batch_size, compute)
        return graph
    name = mine.coarse.name
    layer = _substituted(boxed.dask.layers[name], mine)
    return _replaced(graph, name, layer, [fill.flagged.name])


def _boxed_fill(graph, fill, flagged, mine, batch_size, compute):
    """`mine`'s grid filled block by block from boxes (a dask array), or None.

    The blocks of the `flagged` grid are computed (or read) in batches,
    each giving its reach, which sizes the box each block is filled from
    (:func:`dask_localstats._fill.boxes`). None where the boxes would hold
    too many of the grid's samples (gaps spanning many blocks): the grid
    is then swept an axis at a time
    (:func:`dask_localstats._engine.fill_stage`).
    """
    sink = _Sink(reach, (fill.ndim,), 1, (), np.float64)
    reaches = _batched(graph, flagged, sink, batch_size, compute, every=True)
    reaches = reaches.reshape(fill.flagged.numblocks[: fill.ndim])
    around = boxes(reaches, fill.flagged.chunks[: fill.ndim])
    if around is None:
        return None
    name, dtype = mine.coarse.name, mine.coarse.dtype
    return fill_stage(fill.flagged, fill.ndim, dtype, around, name)


def _find(checkpoints, grid):
    """The checkpoint of `grid` (a dask array) among `checkpoints`, or None."""
    return next((c for c in checkpoints if c.coarse.name == grid.name), None)


def _batched(graph, checkpoint, sink, batch_size, compute, every=False):
    """Compute blocks of a checkpoint's grid in batches; what `sink` gives of each.

    The blocks not stored (all, stored ones read, if `every`), in C order,
    as many a batch as fit `batch_size` tasks (all in one if None); a
    sweep's a line of blocks at a time (:attr:`Checkpoint.along`), each
    line in one batch. Returns the sinks' values concatenated along their
    first axis (an empty array if no block is computed).
    """
    axis, lines = checkpoint.along, {}
    for index in checkpoint.indices(every):
        line = index if axis is None else index[:axis] + index[axis + 1 :]
        lines.setdefault(line, []).append(index)
    name = checkpoint.coarse.name

    def batch(run):
        part = [index for line in run for index in line]
        sinks = "localstats-settle-" + tokenize(name, part, sink.func.__name__)
        tasks = {}
        for k, index in enumerate(part):
            key = (sinks, k, *(0,) * len(sink.shape))
            tasks[key] = Task(key, sink.func, TaskRef((name, *index)), *sink.args)
        with_sinks = HighLevelGraph(
            {**graph.layers, sinks: MaterializedLayer(tasks)},
            {**graph.dependencies, sinks: {name}},
        )
        chunks = ((sink.rows,) * len(part), *((n,) for n in sink.shape))
        meta = np.empty((0,) * len(chunks), sink.dtype)
        return da.Array(cull(with_sinks, list(tasks)), sinks, chunks, meta=meta)

    values = [np.empty((0, *sink.shape), sink.dtype)]
    made = batches(lines.values(), batch, lambda c: len(c.dask), batch_size)
    for collection in made:
        files = checkpoint.unsaved(collection.dask)
        values.append(compute(collection, files if axis is None else []))
        checkpoint.saved(files)
    return np.concatenate(values)
