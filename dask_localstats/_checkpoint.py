"""Checkpoints of the coarse grid inside an output, block by block.

Every coarse grid that a result resamples (see
:func:`dask_localstats._engine.checkpoint_of`) gets a folder in the output,
``.dask_localstats/coarse-<digest of its dask name>/``, with one ``.npy``
file a block, stored whole (see :mod:`dask_localstats._place`) as soon as
the block is computed, in the same graph as the output's chunks. A later run of
the same computation (resuming) reads the blocks found there instead of
computing them, so finishing the last chunks of an interrupted job costs
only their resampling.
"""

from __future__ import annotations

import hashlib
import io
import math

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from ._engine import checkpoint_of
from ._lock import check_guard
from ._progress import COARSE, Stage

__all__ = ["CHECKPOINT_FOLDER", "checkpointed"]

CHECKPOINT_FOLDER = ".dask_localstats"


def _block_key(folder, index):
    return f"{folder}/{'-'.join(map(str, index))}.npy"


def _save_block(block, place, folder, guard=None, block_info=None):
    """Store one coarse block in the output, whole."""
    check_guard(guard)
    data = io.BytesIO()
    np.save(data, block, allow_pickle=False)
    place.write(_block_key(folder, block_info[0]["chunk-location"]), data.getvalue())
    return np.ones((1,) * block.ndim, dtype=bool)


def _load_block(place, key):
    return np.load(io.BytesIO(place.read(key)), allow_pickle=False)


def checkpointed(array, place, guard=None):
    """`array` reading its coarse blocks stored in `place`, and the saves of the rest.

    Every coarse grid that `array` resamples (see
    :func:`dask_localstats._engine.checkpoint_of`) has a folder in
    ``.dask_localstats/`` of the output's `place`, named from its dask name (its computation),
    with one ``.npy`` file a block. Blocks found there are read instead of
    computed; the others get a task that stores them as soon as they are
    computed, in the same graph as the output's chunks.

    Returns
    -------
    array : dask array
    saves : list of dask arrays
        To compute with `array`'s writes.
    stages : list of Stage
        The coarse blocks left to compute, for the progress bar.
    """
    layers, dependencies = dict(array.dask.layers), dict(array.dask.dependencies)
    saves, stages, stored = [], [], None
    for layer in array.dask.layers.values():
        coarse = checkpoint_of(layer)
        if coarse is None or coarse.name not in layers:
            continue
        digest = hashlib.sha256(coarse.name.encode()).hexdigest()[:20]
        folder = f"{CHECKPOINT_FOLDER}/coarse-{digest}"
        stored = set(place.files()[0]) if stored is None else stored
        mapping, missing = dict(layers[coarse.name]), 0
        blocks = [k for k in mapping if isinstance(k, tuple) and k[0] == coarse.name]
        for key in blocks:
            file = _block_key(folder, key[1:])
            if file in stored:
                mapping[key] = (_load_block, place, file)
            else:
                missing += 1
        layers[coarse.name] = MaterializedLayer(mapping)
        if missing:
            saves.append((coarse, folder))
            voxels = math.prod(array.shape[: coarse.ndim]) / len(blocks)
            stages.append(Stage("background", COARSE, voxels, missing))
    graph = HighLevelGraph(layers, dependencies)
    stores = []
    for coarse, folder in saves:
        loaded = da.Array(graph, coarse.name, coarse.chunks, meta=coarse._meta)
        stores.append(
            loaded.map_blocks(
                _save_block,
                place,
                folder,
                guard,
                chunks=tuple((1,) * len(c) for c in coarse.chunks),
                dtype=bool,
                meta=np.empty((0,) * coarse.ndim, bool),
            )
        )
    return da.Array(graph, array.name, array.chunks, meta=array._meta), stores, stages
