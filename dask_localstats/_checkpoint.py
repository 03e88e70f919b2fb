"""Checkpoints of the coarse grid inside an output, block by block.

Every coarse grid that a result resamples (see
:func:`dask_localstats._engine.checkpoint_of`) gets a folder in the output,
``.dask_localstats/coarse-<digest of its dask name>/``, with one ``.npy``
file a block, stored whole (see :mod:`dask_localstats._place`) as soon as
the block is computed, in the same graph as the output's chunks. Blocks
found stored are read instead of computed: by a later batch of the same run
(the blocks that neighbouring batches share are computed once) and by a
later run of the same computation (resuming), so finishing the last chunks
of an interrupted job costs only their resampling.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field

import dask.array as da
import numpy as np
from dask._task_spec import Alias, Task, TaskRef
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from ._engine import BlockLayer, checkpoint_of
from ._lock import check_guard

__all__ = ["CHECKPOINT_FOLDER", "Checkpoint", "checkpointed"]

CHECKPOINT_FOLDER = ".dask_localstats"


def _saved(block, place, key, guard=None):
    """`block`, once stored whole in the output at `key`."""
    check_guard(guard)
    data = io.BytesIO()
    np.save(data, block, allow_pickle=False)
    place.write(key, data.getvalue())
    return block


def _load_block(place, key):
    return np.load(io.BytesIO(place.read(key)), allow_pickle=False)


@dataclass
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
    """

    coarse: da.Array
    place: object
    folder: str
    guard: object = None
    stored: set = field(default_factory=set)

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
            return Task(node.key, _load_block, self.place, file)
        if isinstance(node, Alias):  # a block of another layer's (a rechunk's)
            inner = TaskRef(node.target)
        elif isinstance(node, Task):
            inner = Task(None, node.func, *node.args, **node.kwargs)
        else:  # data, or an old-style task: kept as it is, not stored
            return node
        return Task(node.key, _saved, inner, self.place, file, self.guard)

    def owns(self, file):
        """Whether `file` is one of this grid's blocks."""
        return file.startswith(self.folder + "/") and file.endswith(".npy")

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
    :func:`dask_localstats._engine.checkpoint_of`) has a folder in
    ``.dask_localstats/`` of the output's `place`, named from its dask name
    (its computation), with one ``.npy`` file a block. Blocks stored there
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
        if any(c.coarse.name == coarse.name for c in checkpoints):
            continue  # a grid that two resamplings read: substituted once
        digest = hashlib.sha256(coarse.name.encode()).hexdigest()[:20]
        folder = f"{CHECKPOINT_FOLDER}/coarse-{digest}"
        listing = place.files()[0] if listing is None else listing
        checkpoint = Checkpoint(coarse, place, folder, guard)
        checkpoint.stored = {k for k in listing if checkpoint.owns(k)}
        layers[coarse.name] = _substituted(layers[coarse.name], checkpoint)
        checkpoints.append(checkpoint)
    graph = HighLevelGraph(layers, dependencies)
    array = da.Array(graph, array.name, array.chunks, meta=array._meta)
    return array, checkpoints


def coarse_voxels(array, checkpoint):
    """Output voxels per block of the checkpoint's grid, for progress."""
    return math.prod(array.shape[: checkpoint.coarse.ndim]) / max(
        checkpoint.coarse.npartitions, 1
    )
