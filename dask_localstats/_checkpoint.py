"""Checkpoints of the coarse grid inside an output, block by block.

Every coarse grid that a result resamples (see
:func:`dask_localstats._engine.checkpoint_of`) gets a folder in the output,
``.dask_localstats/coarse-<digest of its dask name>/``, with one ``.npy``
file a block, written aside, synced and renamed into place as soon as the
block is computed, in the same graph as the output's chunks. A later run of
the same computation (resuming) reads the blocks found there instead of
computing them, so finishing the last chunks of an interrupted job costs
only their resampling.
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from pathlib import Path

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from ._engine import checkpoint_of
from ._lock import check_guard
from ._progress import COARSE, Stage

__all__ = ["CHECKPOINT_FOLDER", "checkpointed"]

CHECKPOINT_FOLDER = ".dask_localstats"


def _block_file(folder, index):
    return Path(folder) / ("-".join(map(str, index)) + ".npy")


def _save_block(block, folder, guard=None, block_info=None):
    """Store one coarse block, atomically: written aside, renamed into place."""
    check_guard(guard)
    location = block_info[0]["chunk-location"]
    path = _block_file(folder, location)
    if not path.exists():
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        with open(partial, "wb") as file:
            np.save(file, block, allow_pickle=False)
            file.flush()
            os.fsync(file.fileno())  # whole on disk before it is named
        os.replace(partial, path)
    return np.ones((1,) * block.ndim, dtype=bool)


def _load_block(path):
    return np.load(path, allow_pickle=False)


def checkpointed(array, path, guard=None):
    """`array` reading its coarse blocks stored in `path`, and the saves of the rest.

    Every coarse grid that `array` resamples (see
    :func:`dask_localstats._engine.checkpoint_of`) has a folder in
    ``path/.dask_localstats/``, named from its dask name (its computation),
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
    saves, stages = [], []
    for layer in array.dask.layers.values():
        coarse = checkpoint_of(layer)
        if coarse is None or coarse.name not in layers:
            continue
        digest = hashlib.sha256(coarse.name.encode()).hexdigest()[:20]
        folder = path / CHECKPOINT_FOLDER / f"coarse-{digest}"
        folder.mkdir(parents=True, exist_ok=True)
        mapping, missing = dict(layers[coarse.name]), 0
        blocks = [k for k in mapping if isinstance(k, tuple) and k[0] == coarse.name]
        for key in blocks:
            file = _block_file(folder, key[1:])
            if file.exists():
                mapping[key] = (_load_block, str(file))
            else:
                missing += 1
        layers[coarse.name] = MaterializedLayer(mapping)
        if missing:
            saves.append((coarse, str(folder)))
            voxels = math.prod(array.shape[: coarse.ndim]) / len(blocks)
            stages.append(Stage("background", COARSE, voxels, missing))
    graph = HighLevelGraph(layers, dependencies)
    stores = []
    for coarse, folder in saves:
        loaded = da.Array(graph, coarse.name, coarse.chunks, meta=coarse._meta)
        stores.append(
            loaded.map_blocks(
                _save_block,
                folder,
                guard,
                chunks=tuple((1,) * len(c) for c in coarse.chunks),
                dtype=bool,
                meta=np.empty((0,) * coarse.ndim, bool),
            )
        )
    return da.Array(graph, array.name, array.chunks, meta=array._meta), stores, stages
