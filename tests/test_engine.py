"""The chunked engine: lazy results that never depend on chunking."""

import itertools
import math
import os
import subprocess
import sys
from unittest import mock

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask.array.utils import assert_eq
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    Counting,
    chunkings,
    geometries,
    images,
    masks,
    orders,
    percentiles,
    write_zarr,
)

import dask_localstats as dls
from dask_localstats import _engine
from dask_localstats._engine import (
    DEFAULT_BLOCK_BYTES,
    MIN_BLOCKS,
    OUTPUT_CHUNK_BYTES,
    PLANE_BYTES,
    align_blocks,
    auto_chunks,
    coarse_stage,
    plan_blocks,
    read_through,
    resampled_into,
)
from dask_localstats._grid import make_grid
from dask_localstats._interpolate import prefilter, prefilter_halo
from dask_localstats._kernels import Percentile
from dask_localstats.errors import MemoryBudgetError

TESTS = os.path.dirname(__file__)


@given(
    data=st.data(),
    geometry=geometries(max_ndim=3),
    percentile=percentiles,
    order=orders,
)
def test_results_do_not_depend_on_chunking(data, geometry, percentile, order):
    shape, selem, spacing, step = geometry
    source = data.draw(images(shape))
    mask = data.draw(masks(shape))
    kwargs = dict(selem=selem, spacing=spacing, step=step, interpolate=order)
    expected = dls.local_percentile(source, percentile, mask=mask, **kwargs)
    lazy_source = da.from_array(source, chunks=data.draw(chunkings(shape)))
    lazy_mask = (
        None
        if mask is None
        else da.from_array(mask, chunks=data.draw(chunkings(shape)))
    )
    # in units of the smallest budget: one window and its sample
    extent = selem.shape if isinstance(selem, np.ndarray) else selem
    window = math.prod(min(e, n) for e, n in zip(extent, shape, strict=True))
    smallest = window * (source.dtype.itemsize + 1) + 16 * np.size(percentile)
    block_bytes = smallest * data.draw(st.sampled_from([1, 64, 2**20]))
    out_chunks = data.draw(st.one_of(st.none(), chunkings(shape)))
    result = dls.local_percentile(
        lazy_source,
        percentile,
        mask=lazy_mask,
        block_bytes=block_bytes,
        chunks=out_chunks,
        **kwargs,
    )
    assert isinstance(result, da.Array)
    # bit-exact (no tolerance), same dtype and shape, computed chunks as declared
    assert_eq(result, expected, rtol=0, atol=0)


def test_histogram_and_function_are_lazy_for_dask_input():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 16, (20, 24)).astype(np.uint8)
    lazy = da.from_array(source, chunks=(7, 5))
    hist = dls.local_histogram(lazy, 16, selem=(5, 6), block_bytes=512)
    assert_eq(hist, dls.local_histogram(source, 16, selem=(5, 6)), rtol=0, atol=0)
    func = dls.apply_local_function(
        lazy, np.max, selem=(5, 6), interpolate=None, block_bytes=64
    )  # 30 bytes a window, 16 a sample: one center a block
    assert_eq(
        func,
        dls.apply_local_function(source, np.max, selem=(5, 6), interpolate=None),
        rtol=0,
        atol=0,
    )


def test_errors_in_tasks_surface_at_compute():
    source = da.from_array(np.full((8, 8), 20, np.uint8), chunks=4)
    result = dls.local_histogram(source, 16, selem=(4, 4))
    with pytest.raises(ValueError, match=r"value 20, outside \[0, max_bin\)"):
        result.compute()


@pytest.mark.parametrize("order", [0, 1])
def test_one_output_block_reads_only_nearby_source(order):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 1000, (64, 256, 256)).astype(np.uint16)
    counting = Counting(image, chunks=(32, 32, 32))
    source = da.from_array(counting, chunks=counting.chunks, asarray=False)
    result = dls.local_percentile(
        source, 0.5, selem=(16, 16, 16), interpolate=order, block_bytes=2**16
    )
    counting.chunks_read.clear()
    block = result.blocks[0, 2, 3]
    expected = dls.local_percentile(image, 0.5, selem=(16, 16, 16), interpolate=order)
    assert_eq(block, expected[:32, 64:96, 96:128], rtol=0, atol=0)
    # 64 source chunks in all; the block needs its own and its neighbours'
    assert 0 < len(counting.chunks_read) <= 27


def test_higher_orders_prefilter_the_coarse_grid_once():
    source = da.zeros((40, 40), chunks=10)
    result = dls.local_percentile(source, 0.5, selem=(5, 5), interpolate=3)
    layers = [name for name in result.dask.layers if "prefilter" in name]
    assert len(layers) == 1


def test_plan_blocks_fits_the_budget():
    grid = make_grid((1000, 1000, 500), (64, 64, 64), spacing=(32, 32, 32))
    per_block = plan_blocks(grid, 2, 64 * 2**20)
    extent = [(k - 1) * 32 + 64 for k in per_block]
    assert np.prod(extent) * 2 <= 64 * 2**20
    assert np.prod(extent) * 2 > 64 * 2**20 / 8


def block_extent(grid, counts):
    """Voxels a block of `counts` centers reads along each axis."""
    return [
        min((k - 1) * h + e, s)
        for k, h, e, s in zip(
            counts, grid.spacing, grid.extent, grid.shape, strict=True
        )
    ]


@given(
    shape=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    data=st.data(),
)
def test_plans_fit_their_budget_and_keep_storage_chunks_whole(shape, data):
    ndim = len(shape)
    selem = [data.draw(st.integers(1, min(s, 300))) for s in shape]
    spacing = [
        data.draw(st.integers(1, min(2 * e, s)))
        for e, s in zip(selem, shape, strict=True)
    ]
    storage = [data.draw(st.integers(1, 512)) for _ in shape]
    budget = data.draw(st.integers(1, 2**26))
    grid = make_grid(tuple(shape), tuple(selem), tuple(spacing))
    try:
        counts = plan_blocks(grid, 2, budget, storage=storage)
    except MemoryBudgetError:
        return
    assert math.prod(block_extent(grid, counts)) * 2 <= budget
    assert plan_blocks(grid, 2, budget, storage=storage) == counts  # the same plan
    assert len(counts) == ndim and all(
        1 <= k <= m for k, m in zip(counts, grid.counts, strict=True)
    )


def test_plan_blocks_cuts_disjoint_windows_for_threads_unless_tiny():
    grid = make_grid((128, 512, 512), (50, 50, 50))  # 64 MiB: one block fits
    per_block = plan_blocks(grid, 2, 64 * 2**20)
    blocks = [-(-m // k) for m, k in zip(grid.counts, per_block, strict=True)]
    assert math.prod(blocks) >= MIN_BLOCKS
    tiny = make_grid((16, 64, 64), (8, 8, 8))  # 128 KiB: one block
    assert plan_blocks(tiny, 2, 64 * 2**20) == tiny.counts
    # overlapping windows: cutting would read voxels twice, and their tile
    # paths hold the GIL; one block
    overlapping = make_grid((128, 512, 512), (50, 50, 50), (25, 25, 25))
    assert plan_blocks(overlapping, 2, 64 * 2**20) == overlapping.counts


def test_histogram_blocks_and_chunks_fit_the_budget(tmp_path):
    """The bins count in the budget of blocks and of output chunks."""
    source = zarr.create_array(
        tmp_path / "empty.zarr", shape=(512,) * 3, chunks=(64,) * 3, dtype="u2"
    )  # never written: nothing is computed here
    budget = DEFAULT_BLOCK_BYTES
    for interpolate in (None, 1):
        hist = dls.local_histogram(
            source, 4096, selem=8, interpolate=interpolate, missing_chunks="fill"
        )
        per_block = [max(c) for c in hist.chunks]
        assert math.prod(per_block) * 8 <= budget, per_block
        if interpolate is None:  # blocks: the region read and the counts
            centers = math.prod(per_block[:3])
            assert centers * 8**3 * 3 + centers * 4096 * 16 <= budget
    assert hist.chunks[-1] != (4096,)  # the bins axis is split


def test_a_task_over_the_budget_is_refused_before_computing(tmp_path):
    source = da.zeros((64, 64), chunks=32, dtype="u2").map_blocks(_fail, dtype="u2")
    with pytest.raises(MemoryBudgetError, match=r"more than `block_bytes`=67108864"):
        dls.local_histogram(source, 2**24, selem=8)
    with pytest.raises(MemoryBudgetError, match=r"`block_bytes`=1000"):
        dls.local_percentile(source, 0.5, selem=(30, 30), block_bytes=1000)


def _fail(block):
    raise AssertionError("the source was read")


def test_auto_chunks():
    assert auto_chunks((100, 10), 8, 800) == ((10,) * 10, (10,))
    assert auto_chunks((3,), 8, 1) == ((1, 1, 1),)
    # planes (the first axis's) of at most PLANE_BYTES, then the first axis cut
    chunks = auto_chunks((1024, 1024, 40), 8)
    assert [max(c) for c in chunks] == [51, 1024, 40]
    chunks = auto_chunks((128, 512, 512), 8)
    assert [max(c) for c in chunks] == [32, 256, 256]
    assert PLANE_BYTES == 256 * 256 * 8 and 32 * PLANE_BYTES <= OUTPUT_CHUNK_BYTES


def test_blocks_fill_their_budget_more_closely_than_halving():
    # light-sheet windows: halving gives blocks of 21 x 21 centers (700 x
    # 700 voxels, 63 MB); 17 x 27 (600 x 850, 65 MB) fit too, in blocks a
    # whole storage chunk deep, and read 13% fewer voxels in all
    grid = make_grid((128, 2048, 2048), (1, 200, 200), (1, 25, 25), (1, 2, 2))
    budget = 64 * 2**20
    counts = plan_blocks(grid, 2, budget, storage=(64, 256, 256))
    assert counts == (64, 17, 27)
    extent = block_extent(grid, counts)
    assert math.prod(extent) * 2 <= budget and extent[0] >= 64
    assert _engine._near_counts(82, 21) == [11, 12, 14, 17, 21, 28, 41]


def test_blocks_are_shifted_to_touch_fewer_storage_chunks():
    grid = make_grid((1024,), (64,), spacing=(32,))
    plain = align_blocks(grid, (8,))
    aligned = align_blocks(grid, (8,), storage=(128,))
    assert sum(plain[0]) == sum(aligned[0]) == 32

    def touched(sizes):
        bounds = np.cumsum((0, *sizes))
        regions = [grid.region(0, a, b) for a, b in itertools.pairwise(bounds)]
        return sum((hi - 1) // 128 - lo // 128 + 1 for lo, hi in regions)

    assert touched(aligned[0]) < touched(plain[0])


def test_overlapping_blocks_decode_each_storage_chunk_once(tmp_path):
    image = np.random.default_rng(0).integers(0, 500, (17, 30, 25), np.uint16)
    z = Counting(zarr.open_array(write_zarr(tmp_path / "a.zarr", image, (5, 7, 9))))
    grid = make_grid(image.shape, (6, 8, 5), (2, 2, 2))
    # blocks of a few centers, whose windows reach into their neighbours'
    # chunks; the cache is made big enough to hold every chunk
    with mock.patch.object(_engine, "CACHE_BLOCKS", 100):
        coarse = coarse_stage(
            z, grid, Percentile(0.5), np.dtype(np.uint16), block_bytes=1200
        )
    assert min(coarse.numblocks) > 2
    assert_eq(
        coarse,
        dls.local_percentile(image, 0.5, selem=(6, 8, 5), spacing=2, interpolate=None),
        rtol=0,
        atol=0,
    )
    assert len(z.chunks_read) == len(set(z.chunks_read)) == 4 * 5 * 3


def test_read_through_reads_the_source_through_its_coarse_stage_cache(tmp_path):
    image = np.random.default_rng(1).integers(0, 500, (8, 30, 25), np.uint16)
    z = zarr.open_array(write_zarr(tmp_path / "a.zarr", image, (4, 7, 9)))
    coarse = dls.local_percentile(z, 0.5, selem=(1, 6, 5), interpolate=None)
    chunks = ((3, 5), (30,), (10, 15))
    image_through = read_through(coarse.dask, z, chunks)
    assert read_through(coarse.dask, zarr.open_array(z.store), chunks) is None
    assert "localstats-coarse" in str(image_through.dask.dependencies)
    # alone: its graph keeps the source and the cache, not the coarse blocks
    np.testing.assert_array_equal(image_through.compute(), image, strict=True)
    assert image_through.chunks == chunks
    # a block of exactly one storage chunk is the cache's chunk, read-only
    whole = read_through(coarse.dask, z, ((4, 4), (7, 7, 7, 7, 2), (9, 9, 7)))
    blocks = dask.compute(*whole.to_delayed().ravel())
    assert all(not b.flags.writeable for b in blocks)
    np.testing.assert_array_equal(whole.compute(), image, strict=True)


def test_spare_memory_is_reused_only_when_given_back_free():
    spares = _engine.Spares(most=2)
    first = spares.take((4, 6), np.uint16)
    spares.give(first, np.zeros(3))
    second = spares.take((3, 5), np.uint16)  # smaller: the same memory
    assert second.shape == (3, 5) and second.dtype == np.uint16
    assert np.shares_memory(first, second)
    spares.give(second, second[0])  # the result is a view of it: not kept
    assert not np.shares_memory(spares.take((3, 5), np.uint16), first)
    spares.give(np.empty((3, 5), np.uint16), None)  # not taken here: not kept
    spares.give(first, None)  # nor what was given back already
    assert not spares._free
    small, large = spares.take((2,), np.float64), spares.take((9,), np.float64)
    spares.give(small, None)
    assert not np.shares_memory(spares.take((4,), np.float64), small)  # too small
    spares.give(large, None)
    assert np.shares_memory(spares.take((3,), np.float64), large)  # the only fit
    spares.clear()
    three = [spares.take((n,), np.uint8) for n in (5, 6, 7)]
    for array in three:  # at most `most` wait: the largest
        spares.give(array, None)
    assert sorted(b.nbytes for b in spares._free) == [6, 7]
    spares.clear()
    assert not spares._free


@pytest.mark.skipif(sys.platform != "linux", reason="glibc and per-thread page faults")
def test_freed_memory_is_kept_for_the_next_arrays_where_workers_trim_it():
    # dask.distributed starts workers with MALLOC_TRIM_THRESHOLD_=65536,
    # which fixes glibc's mmap threshold at 128 KiB: each array of 1 MiB is
    # mapped afresh and its pages faulted in (a kernel's block 2-3x slower)
    code = (
        "import strategies as s; from dask_localstats import _engine as e; "
        "before = s.faults_of_an_array_made_again(); kept = e.keep_freed_memory(); "
        "print(before, kept, s.faults_of_an_array_made_again())"
    )
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    before, kept, after = done.stdout.split()
    if kept != "True":
        pytest.skip("not glibc")
    assert int(before) >= 128 and int(after) < 16, (before, after)


def test_coarse_blocks_paste_into_the_last_blocks_region(tmp_path):
    image = np.random.default_rng(3).integers(0, 900, (12, 40, 33), np.uint16)
    z = zarr.open_array(write_zarr(tmp_path / "a.zarr", image, (4, 9, 8)))
    kwargs = dict(selem=(3, 9, 7), spacing=(2, 4, 5), interpolate=None)
    expected = dls.local_percentile(image, 0.3, **kwargs)
    budget = 4 * 17 * 15 * 2  # blocks of a few planes: edge blocks are smaller
    lazy = dls.local_percentile(z, 0.3, block_bytes=budget, **kwargs)
    assert lazy.numblocks[0] > 2
    regions = []

    def take(shape, dtype):
        regions.append(_engine.Spares.take(_engine.SPARES, shape, dtype))
        return regions[-1]

    # one thread: each block pastes into the memory of a block before,
    # unless it is larger than all of them
    with mock.patch.object(_engine.SPARES, "take", side_effect=take):
        result = lazy.compute(scheduler="sync")
    np.testing.assert_array_equal(result, expected, strict=True)
    assert len(regions) == lazy.npartitions
    for k, region in enumerate(regions[1:], start=1):
        if region.nbytes <= max(r.nbytes for r in regions[:k]):
            assert any(np.shares_memory(region, r) for r in regions[:k])
    assert len({id(r.base) for r in regions}) < len(regions) // 2


@pytest.mark.parametrize("order", [1, 3])
def test_resampled_into_writes_each_chunk_in_place(order):
    image = np.random.default_rng(2).integers(0, 500, (20, 30, 2), np.uint16)
    background = dls.local_percentile(
        da.from_array(image), (0.2, 0.7), selem=(6, 5, 1), interpolate=order,
        chunks=((7, 13), (10, 10, 10), (2,)),
    )  # fmt: skip
    out = np.empty(background.shape, background.dtype)
    graph, keys = resampled_into(background, out)
    regions = dask.threaded.get(graph, keys)
    assert len(regions) == 6 and all(r.base is out for r in regions)
    np.testing.assert_array_equal(out, background.compute(), strict=True)
    assert resampled_into(background + 1, out) is None  # not a resampling
    assert resampled_into(background, out.astype(np.float32)) is None
    coarse = dls.local_percentile(image, 0.5, selem=(6, 5, 1), interpolate=None)
    assert resampled_into(da.from_array(coarse), coarse) is None


@given(
    shape=st.tuples(st.integers(1, 250), st.integers(1, 60)),
    chunks=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    order=st.integers(2, 5),
    components=st.sampled_from([(), (2,)]),
)
def test_coefficients_chunk_by_chunk_are_those_of_the_whole_grid(
    shape, chunks, order, components
):
    grid = np.random.default_rng(4).normal(size=shape + components) * 1000
    coarse = da.from_array(grid, chunks=chunks + components)
    coefficients = _engine._coefficients(coarse, order, 2)
    whole = prefilter(grid, order, 2)
    np.testing.assert_allclose(coefficients.compute(), whole, rtol=0, atol=1e-9)
    long = [d for d in range(2) if shape[d] > 4 * prefilter_halo(order)]
    for d in long:  # no task holds the whole of a long axis
        assert coefficients.numblocks[d] > 1


@pytest.mark.parametrize("order", [1, 3])
def test_large_chunks_resample_to_the_same_bits_however_cut(order):
    # planes of 7200 voxels are made a piece at a time, whose order of
    # float sums the engine fixes for all chunks (it followed each chunk's
    # shape: one plane a chunk summed otherwise than twelve)
    source = np.random.default_rng(4).normal(size=(12, 80, 90))
    options = dict(selem=(4, 8, 8), interpolate=order)
    whole = dls.local_percentile(source, 0.5, chunks=(12, 80, 90), **options)
    for chunks in [(1, 80, 90), (5, 80, 90), (12, 40, 90)]:
        cut = dls.local_percentile(source, 0.5, chunks=chunks, **options)
        np.testing.assert_array_equal(cut, whole, strict=True)


def test_prefilter_chunks_follow_the_grid_not_the_blocks():
    # coarse blocks of any size, one prefilter: the same coefficients, bit
    # for bit (with the coarse blocks' chunks, the halo's rounding differed)
    source = np.random.default_rng(3).normal(size=4000) * 1000  # 1000 samples
    lazy = da.from_array(source, chunks=500)
    results = [
        dls.local_percentile(lazy, 0.5, selem=4, interpolate=3, block_bytes=b)
        for b in (200, 2000, 2**20)
    ]
    assert _engine._prefilter_chunks((1000,), 1, 32)[0] == (64,) * 15 + (40,)
    computed = [r.compute() for r in results]
    for other in computed[1:]:
        np.testing.assert_array_equal(other, computed[0], strict=True)


def test_a_computation_leaves_the_objects_before_it_out_of_collections():
    import gc

    from dask_localstats._engine import computing

    seen = []

    def record(block):
        seen.append(gc.get_freeze_count())
        return block

    image = da.from_array(np.arange(64.0).reshape(8, 8), chunks=4)
    with computing():
        assert gc.get_freeze_count() > 0
        image.map_blocks(record).compute(scheduler="threads")
    assert gc.get_freeze_count() == 0 and min(seen) > 0
    # computations running at once share the freeze, undone by the last;
    # an error inside still undoes it
    with computing():
        with pytest.raises(ZeroDivisionError), computing():
            1 / 0  # noqa: B018
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    # objects frozen by the caller stay frozen: neither frozen again nor
    # unfrozen (counting them would count objects other threads free)
    gc.freeze()
    try:
        freeze = mock.patch.object(gc, "freeze", wraps=gc.freeze)
        unfreeze = mock.patch.object(gc, "unfreeze", wraps=gc.unfreeze)
        with freeze as froze, unfreeze as unfroze, computing():
            assert gc.get_freeze_count() > 0
        froze.assert_not_called()
        unfroze.assert_not_called()
    finally:
        gc.unfreeze()
