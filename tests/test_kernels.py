"""Window kernels: statistics over gathered windows, against NumPy."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, booleans, geometries

from dask_localstats import _kernels
from dask_localstats._grid import make_grid
from dask_localstats._kernels import Function, Histogram, Percentile, reduce_block


@st.composite
def rows(draw):
    dtype = np.dtype(draw(st.sampled_from(["uint8", "int16", "float32", "float64"])))
    shape = (draw(st.integers(1, 20)), draw(st.integers(1, 30)))
    # few values: ties are likely
    elements = st.integers(0 if dtype.kind == "u" else -3, 5)
    if dtype.kind == "f":
        elements |= st.floats(-3, 6, width=8 * dtype.itemsize)
        if draw(st.booleans()):
            elements |= st.sampled_from([np.nan, np.inf])
    values = draw(arrays(dtype, shape, elements))
    valid = None if draw(st.booleans()) else draw(booleans(shape))
    return values, valid


@given(rows(), st.lists(st.floats(0, 1), min_size=1, max_size=3))
def test_percentile_rows_are_bit_identical_to_numpy(data, percentiles):
    values, valid = data
    result, _ = Percentile(percentiles).reduce(values, valid)
    for i, row in enumerate(values):
        kept = row if valid is None else row[valid[i]]
        for j, p in enumerate(percentiles):
            with np.errstate(invalid="ignore"):
                expected = np.percentile(kept, 100 * p) if kept.size else 0
            np.testing.assert_array_equal(result[i, j], expected, strict=False)
            assert result.dtype == np.result_type(values.dtype, 1.0)


def test_histogram_rows():
    values = np.array([[0, 1, 1, 3], [2, 2, 2, 0]], np.uint8)
    valid = np.array([[True, True, False, True], [True, True, True, True]])
    np.testing.assert_array_equal(
        Histogram(4).reduce(values, valid)[0], [[1, 1, 0, 1], [1, 0, 3, 0]]
    )


def test_function_sees_kept_voxels_in_c_order():
    seen = []
    block = np.arange(36).reshape(6, 6)
    footprint = np.array([[True, False], [True, True]])
    grid = make_grid((6, 6), footprint, spacing=(3, 3))
    reduce_block(
        block,
        (0, 0),
        grid,
        (0, 0),
        (2, 2),
        Function(lambda kept: seen.append(kept.tolist()) or 0),
        np.int64,
    )
    # centers (1, 1), (1, 4), (4, 1), (4, 4): windows start at (0, 0), (0, 3), ...
    assert seen == [[0, 6, 7], [3, 9, 10], [18, 24, 25], [21, 27, 28]]


def test_reduce_block_from_an_offset_block_equals_the_whole():
    rng = np.random.default_rng(1)
    image = rng.random((20, 24))
    grid = make_grid(image.shape, (6, 5), spacing=(4, 3), step=(2, None))
    whole = reduce_block(
        image, (0, 0), grid, (0, 0), grid.counts, Percentile([0.2, 0.9]), np.float64
    )
    lo0, hi0 = grid.region(0, 2, 4)
    lo1, hi1 = grid.region(1, 3, 7)
    part = reduce_block(
        image[lo0:hi0, lo1:hi1],
        (lo0, lo1),
        grid,
        (2, 3),
        (4, 7),
        Percentile([0.2, 0.9]),
        np.float64,
    )
    np.testing.assert_array_equal(part, whole[2:4, 3:7])


def test_batches_bound_memory_without_changing_results(monkeypatch):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 50, (30, 30)).astype(np.float32)
    grid = make_grid(image.shape, (8, 8), spacing=(2, 3))
    args = ((0, 0), grid, (0, 0), grid.counts, Percentile(0.3), np.float32)
    whole = reduce_block(image, *args)
    monkeypatch.setattr("dask_localstats._kernels._BATCH", 100)
    np.testing.assert_array_equal(reduce_block(image, *args), whole)


@pytest.mark.parametrize("percentile", [0.5, [0.5]])
def test_percentile_shapes(percentile):
    assert Percentile(percentile).fshape == (() if np.ndim(percentile) == 0 else (1,))


@pytest.mark.parametrize("high", [2**16 - 1, 3000])
def test_tile_path_matches_gather_path_on_wide_value_ranges(high):
    rng = np.random.default_rng(3)
    image = rng.integers(0, high, (40, 50), endpoint=True).astype(np.uint16)
    image[:5] = high  # a flat region: many equal values
    mask = rng.random(image.shape) < 0.8
    grid = make_grid(image.shape, (12, 10), spacing=(5, 4), step=(2, None))
    statistic = Percentile([0.0, 0.1, 0.5, 0.975, 1.0])
    args = ((0, 0), grid, (0, 0), grid.counts, statistic, np.float64)
    tiled = reduce_block(image, *args, mask=mask)
    gathered = reduce_block(image.astype(np.float64), *args, mask=mask)
    np.testing.assert_array_equal(tiled, gathered)


@given(geometries(footprints=False), st.data())
def test_strided_gathers_are_the_fancy_index(geometry, data):
    shape, selem, spacing, step = geometry
    grid = make_grid(shape, selem, spacing, step)
    image = np.arange(np.prod(shape)).reshape(shape)
    groups = [
        list(grid.windows(d, 0, grid.counts[d]).groups()) for d in range(len(shape))
    ]
    positions = [data.draw(st.sampled_from(g))[1] for g in groups]
    if data.draw(st.booleans()):  # windows out of order: the fancy index
        positions[0] = positions[0][::-1]
    expected = image[_kernels._broadcast(positions)]
    np.testing.assert_array_equal(_kernels._gatherer(positions)(image), expected)


def test_windows_that_do_not_overlap_are_partitioned_past_histograms():
    # integers take the tile histograms, whose one pass is cheaper than a
    # partition, but for too many values, whose sorted tiles would cost more
    image = np.random.default_rng(3).integers(0, 5000, (20, 30)).astype(np.uint16)
    args = ((0, 0), make_grid(image.shape, (10, 10)), (0, 0), (2, 3))
    percentile = Percentile(0.5)
    assert percentile.block_reduce(image, *args, np.float64, None) is not None
    wide = image.astype(np.int64) << 40
    assert percentile.block_reduce(wide, *args, np.float64, None) is None
    overlapping = make_grid(image.shape, (10, 10), (5, 5))
    for values in image, wide:
        assert (
            percentile.block_reduce(
                values, (0, 0), overlapping, (0, 0), (4, 6), np.float64, None
            )
            is not None
        )
    mask = np.ones(image.shape, bool)
    assert percentile.block_reduce(wide, *args, np.float64, mask) is not None
    result = reduce_block(image, *args, percentile, np.float64)
    tiles = image.reshape(2, 10, 3, 10).transpose(0, 2, 1, 3).reshape(2, 3, 100)
    np.testing.assert_array_equal(result, np.percentile(tiles, 50, axis=-1))


def test_integer_results_of_numpy_moments_are_numpy_s_own():
    # np.var gives 297.99999999999994 here, the exact quotient 298: cast to
    # an integer dtype, a rounding below an integer is 1 less
    window = np.array([48, 37, 31, 6, 0, 20, 0, 44, 24], np.uint16)
    grid = make_grid(window.shape, (9,))
    args = (window, (0,), grid, (0,), (1,), Function(np.var))
    assert reduce_block(*args, np.uint16).tolist() == [297]
    assert reduce_block(*args, np.float64).tolist() == [298.0]  # to float rounding
    assert Function(np.var).block_reduce(*args[:-1], np.uint16, None) is None
    # a mean into integers keeps the tile sums: its quotient is NumPy's
    mean = Function(np.mean).block_reduce(*args[:-1], np.uint16, None)
    assert mean[0].tolist() == [np.mean(window).astype(np.uint16)]
