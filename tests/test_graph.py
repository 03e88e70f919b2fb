"""Lazy layers and culling: graphs of any size, parts computed alone."""

import itertools
import math

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask._task_spec import Task, TaskRef
from dask.highlevelgraph import HighLevelGraph
from hypothesis import given
from hypothesis import strategies as st
from strategies import Counting

import dask_localstats as dls
from dask_localstats._graph import BlockLayer, batches, cull, gathered


def test_a_petabyte_pipeline_is_built_without_tasks(tmp_path):
    z = zarr.create_array(
        tmp_path / "never-written.zarr",
        shape=(2**17, 2**17, 2**16),  # 2 PiB of uint16, never written
        chunks=(256, 256, 256),
        dtype="u2",
    )
    background = dls.local_percentile(
        z, 0.1, selem=(64,) * 3, spacing=(32,) * 3, missing_chunks="fill"
    )
    result = da.from_zarr(z) - da.minimum(da.from_zarr(z), background)
    lazy = [lay for lay in result.dask.layers.values() if isinstance(lay, BlockLayer)]
    assert len(lazy) == 2  # the coarse stage and the resampling
    assert not any(layer.is_materialized() for layer in lazy)
    assert result.npartitions == 2**26
    part = cull(result.dask, [(result.name, 100, 200, 50)])
    assert len(part) < 100  # one chunk's tasks: a few coarse blocks and reads


@pytest.mark.parametrize("order", [0, 1])
def test_one_block_reads_only_the_source_near_it(order):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 64, (24, 160, 128)).astype(np.uint16)
    storage = (8, 16, 16)
    source = Counting(image, storage)
    selem, spacing = (1, 20, 20), (1, 5, 5)
    options = dict(selem=selem, spacing=spacing, interpolate=order, dtype="float32")
    background = dls.local_percentile(
        da.from_array(source, chunks=storage), 0.25, block_bytes=40_000, **options
    )
    result = dls.subtract_background(da.from_array(source, chunks=storage), background)
    index = (2, 5, 4)
    block = result.blocks[index].compute()
    whole = dls.subtract_background(image, dls.local_percentile(image, 0.25, **options))
    region = tuple(
        slice(sum(c[:i]), sum(c[: i + 1]))
        for c, i in zip(result.chunks, index, strict=True)
    )
    np.testing.assert_array_equal(block, whole[region])
    # the chunks read lie within a processing block and a window of the output
    # block, on every axis
    coarse = next(
        v for v in background.dask.dependencies if v.startswith("localstats-coarse")
    )
    centers = background.dask.layers[coarse]
    reach = [
        n // max(k, 1) * s + e  # a processing block's extent, roughly
        for n, k, s, e in zip(
            image.shape, centers.numblocks, spacing, selem, strict=True
        )
    ]
    read = set(source.chunks_read)
    assert read
    for chunk in read:
        for d, (r, c) in enumerate(zip(region, storage, strict=True)):
            lo, hi = chunk[d] * c, (chunk[d] + 1) * c
            assert hi > r.start - reach[d] and lo < r.stop + reach[d], (chunk, d)
    assert (
        len(read)
        < math.prod(-(-s // c) for s, c in zip(image.shape, storage, strict=True)) / 4
    )


def test_cull_keeps_layer_names_and_dependencies():
    layer = BlockLayer(
        "squares",
        (4,),
        lambda key, index: dask._task_spec.Task(
            key, np.square, np.arange(index[0], index[0] + 2)
        ),
    )
    squares = da.Array(
        dask.highlevelgraph.HighLevelGraph.from_collections("squares", layer, []),
        "squares",
        ((2,) * 4,),
        dtype=int,
        meta=np.empty((0,), int),
    )
    total = squares + 1
    part = cull(total.dask, [(total.name, 2)])
    assert set(part.layers) == {total.name, "squares"}
    assert part.dependencies[total.name] == {"squares"}
    assert dict(part.layers["squares"]).keys() == {("squares", 2)}
    assert len(layer) == 4 and list(layer)[1] == ("squares", 1)
    with pytest.raises(KeyError):
        layer[("squares", 4)]
    np.testing.assert_array_equal(
        total.compute(),
        np.square(list(itertools.chain.from_iterable((i, i + 1) for i in range(4))))
        + 1,
    )


def test_cull_keeps_dependencies_through_layers_left_out():
    # a task of `last` reads a block of `first` itself, not of `middle`
    first = da.from_array(np.arange(6), chunks=3)
    middle = first + 1
    layer = {
        ("last", 0): dask._task_spec.Task(
            ("last", 0), np.negative, dask._task_spec.TaskRef((first.name, 1))
        )
    }
    graph = dask.highlevelgraph.HighLevelGraph.from_collections("last", layer, [middle])
    part = cull(graph, [("last", 0)])
    assert set(part.layers) == {"last", first.name}  # `middle` left out
    assert part.dependencies["last"] == {first.name}
    last = da.Array(part, "last", ((3,),), dtype=int, meta=np.empty((0,), int))
    np.testing.assert_array_equal(last.compute(), [-3, -4, -5])


def test_cull_takes_only_the_chunks_wanted_of_materialized_layers():
    x = da.from_array(np.arange(8), chunks=4)  # materialized layers of 2 chunks
    y = da.from_array(np.arange(8, 16), chunks=4)
    total = x + y
    part = cull(total.dask, [(total.name, 0)])
    for name in (x.name, y.name):
        assert list(part.layers[name]) == [(name, 0)]


def test_cull_finds_the_keys_an_overlap_layer_holds_under_other_names(tmp_path):
    # a 1-D map_overlap (as the prefilter of orders >= 2 makes) holds its
    # neighbours' slices as "getitem-..." keys inside its "overlap-..." layer
    x = da.arange(64, chunks=16)
    y = da.map_overlap(lambda b: b * 2, x, depth=3, boundary="none")
    keys = [(y.name, 0), (y.name, 2)]
    graph = cull(y.dask, keys)
    blocks = dask.get(dict(graph), keys)
    np.testing.assert_array_equal(np.concatenate(blocks), np.r_[0:32:2, 64:96:2])
    image = (np.arange(4096) % 251).astype(np.uint8)
    lazy = dls.local_percentile(da.from_array(image, chunks=512), 0.5, 8, interpolate=3)
    out = dls.to_zarr(lazy, tmp_path / "out.zarr")  # failed: a key left as data
    np.testing.assert_array_equal(
        out[:], dls.local_percentile(image, 0.5, 8, interpolate=3)
    )


@given(
    weights=st.lists(st.integers(1, 9), max_size=150),
    batch_size=st.one_of(st.none(), st.integers(1, 60)),
    whole=st.integers(1, 5),
)
def test_batches_are_runs_in_order_within_the_size_unless_one_item_is_larger(
    weights, batch_size, whole
):
    # items of uneven weight: the size estimated from the first items is
    # too large for heavier runs later, which are halved
    made = []

    def make(run):
        made.append(run)
        return run

    def tasks(run):
        return sum(weights[i] for i in run)

    runs = []
    for run in batches(range(len(weights)), make, tasks, batch_size, whole):
        assert made[-1] is run  # made when asked for, not ahead
        runs.append(run)
    assert [i for run in runs for i in run] == list(range(len(weights)))
    if batch_size is None:
        assert len(runs) <= 1
    else:
        assert all(tasks(run) <= batch_size or len(run) == 1 for run in runs)


@pytest.mark.parametrize("count", [1, 5, 64])
def test_a_probe_holding_every_item_is_made_once_and_is_the_one_batch(count):
    made = []

    def make(run):
        made.append(run)
        return run

    runs = list(batches(range(count), make, len, batch_size=count))
    assert runs == [list(range(count))]
    assert made == runs  # not made again after probing


def test_a_probe_larger_than_a_batch_is_split():
    runs = list(batches(range(10), list, len, batch_size=4))
    assert runs == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def _node(i, *values):
    return 2 * sum(values) + i


@st.composite
def dags(draw):
    """Tasks ``("t", i)``, each reading some of those before it, and the
    keys wanted (every task no other reads, and some more)."""
    n = draw(st.integers(1, 14))
    reads = [
        draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        for i in range(n)
    ]
    read = set().union(*reads)
    sinks = {i for i in range(n) if i not in read}
    keys = sinks | draw(st.sets(st.integers(0, n - 1), max_size=3))
    kept = draw(st.sets(st.integers(0, n - 1), max_size=2))
    tasks = {
        ("t", i): Task(("t", i), _node, i, *(TaskRef(("t", j)) for j in sorted(r)))
        for i, r in enumerate(reads)
    }
    return tasks, [("t", i) for i in sorted(keys)], {("t", i) for i in kept}


@given(dags())
def test_each_key_gathers_the_tasks_only_it_needs(dag):
    tasks, keys, kept = dag
    graph = HighLevelGraph.from_collections("t", tasks)
    made = dict(gathered(graph, keys, keep=kept.__contains__))
    assert dask.get(made, keys) == dask.get(tasks, keys)
    readers = {k: {d for d, t in tasks.items() if k in t.dependencies} for k in tasks}

    def reached(k):
        """The keys that tasks reading `k` lead to; None past a kept task."""
        found = set()
        for reader in readers[k]:
            if reader in keys:
                found.add(reader)
                continue
            further = None if reader in kept else reached(reader)
            if further is None:
                return None
            found |= further
        return found

    def alone(k):  # needed through one key only, and free to join it
        if k in keys or k in kept:
            return False
        found = reached(k)
        return found is not None and len(found) == 1

    assert set(made) == {k for k in tasks if not alone(k)}
