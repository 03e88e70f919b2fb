"""The integer fast paths against the brute-force reference."""

import itertools
import warnings
from unittest import mock

import numpy as np
import pytest
import reference
from hypothesis import assume, given
from hypothesis import strategies as st
from strategies import arrays, geometries, masks, percentiles

import dask_localstats as dls
from dask_localstats import _tiles
from dask_localstats._grid import make_grid
from dask_localstats._kernels import Histogram, Percentile, reduce_block


@st.composite
def integer_images(draw, shape):
    """Integers of any width, from a few values to the dtype's whole range."""
    dtype = np.dtype(
        draw(st.sampled_from(["uint8", "int16", "uint16", "int64", "uint64"]))
    )
    # as wide as NumPy's interpolation allows: it subtracts in the source dtype
    info = np.iinfo(dtype)
    low, high = (0, info.max) if dtype.kind == "u" else (info.min // 2, info.max // 2)
    elements = st.integers(low, high)
    if draw(st.booleans()):  # the extremes, where a bisection could overflow
        elements = st.sampled_from([low, low + 1, high])
    return draw(arrays(dtype, shape, elements))


def coarse(source, percentile, geometry, mask):
    shape, selem, spacing, step = geometry
    grid = make_grid(shape, selem, spacing, step)
    # 64-bit extremes do not survive the float interpolation: compare floats
    dtype = np.dtype(np.float64 if source.dtype.itemsize == 8 else source.dtype)
    result = reduce_block(
        source,
        (0,) * source.ndim,
        grid,
        (0,) * source.ndim,
        grid.counts,
        Percentile(percentile),
        dtype,
        mask,
    )
    expected = reference.local_percentile(
        source,
        percentile,
        selem=selem,
        spacing=spacing,
        step=step,
        interpolate=None,
        mask=mask,
        dtype=dtype,
    )
    return result, expected


@pytest.mark.parametrize("sorting", [True, False], ids=["sorted", "histograms"])
@given(
    data=st.data(),
    geometry=geometries(footprints=False),
    percentile=percentiles,
)
def test_both_methods_match_the_reference(sorting, data, geometry, percentile):
    source = data.draw(integer_images(geometry[0]))
    mask = data.draw(masks(geometry[0]))
    # sorted tiles take over when the values span more than _MAX_TABLE
    with mock.patch.object(_tiles, "_MAX_TABLE", -1 if sorting else 1 << 22):
        result, expected = coarse(source, percentile, geometry, mask)
    np.testing.assert_array_equal(result, expected, strict=True)


@given(
    data=st.data(),
    geometry=geometries(footprints=False),
    percentile=percentiles,
    room=st.integers(0, 6),
)
def test_histogram_columns_are_exact_within_any_budget(
    data, geometry, percentile, room
):
    # a budget of a few columns more than the first histograms: where the
    # runs holding ranks do not fit split, sorted tiles take over
    source = data.draw(arrays(np.uint16, geometry[0], st.integers(0, 700)))
    mask = data.draw(masks(geometry[0]))
    columns = _tiles._Columns

    def tight(nbins, budget, single=False):  # coarse columns, whatever fits
        tight = columns(nbins, budget)
        tight.budget = len(tight.edges) + room
        return tight

    with mock.patch.object(_tiles, "_Columns", tight):
        result, expected = coarse(source, percentile, geometry, mask)
    np.testing.assert_array_equal(result, expected, strict=True)


@pytest.mark.parametrize("whole", [False, True], ids=["strips", "by-tile"])
@pytest.mark.parametrize("single", [False, True], ids=["estimated", "single"])
@given(data=st.data(), geometry=geometries(footprints=False), percentile=percentiles)
def test_every_way_of_counting_matches_the_reference(
    whole, single, data, geometry, percentile
):
    # tiles counted one bincount a tile (large tiles) or in strips; columns
    # of one value from the start (few tiles and values) or estimated;
    # forced here, single columns count tiles x values: few values
    high = data.draw(st.sampled_from([3, 300] if single else [3, 300, 65535]))
    source = data.draw(arrays(np.uint16, geometry[0], st.integers(0, high)))
    mask = data.draw(masks(geometry[0]))
    with (
        mock.patch.object(_tiles, "_WHOLE", 1 if whole else 1 << 62),
        mock.patch.object(_tiles, "_SINGLE", 0 if single else 1 << 62),
    ):
        result, expected = coarse(source, percentile, geometry, mask)
        histograms = dls.local_histogram(
            source, max_bin=high + 1, selem=geometry[1], spacing=geometry[2],
            step=geometry[3], mask=mask, interpolate=None,
        )  # fmt: skip
    np.testing.assert_array_equal(result, expected, strict=True)
    expected = reference.local_histogram(
        source, max_bin=high + 1, selem=geometry[1], spacing=geometry[2],
        step=geometry[3], mask=mask, interpolate=None,
    )  # fmt: skip
    np.testing.assert_array_equal(histograms, expected)


@given(data=st.data(), geometry=geometries(footprints=False), percentile=percentiles)
def test_tiles_one_call_a_tile_of_any_integers(data, geometry, percentile):
    source = data.draw(integer_images(geometry[0]))
    mask = data.draw(masks(geometry[0]))
    with mock.patch.object(_tiles, "_WHOLE", 1):
        result, expected = coarse(source, percentile, geometry, mask)
    np.testing.assert_array_equal(result, expected, strict=True)


def test_large_tiles_are_counted_one_call_a_tile():
    # ClearMap's default spacing, the window's extent: 8 windows of 32**3
    source = np.random.default_rng(0).integers(100, 900, (64, 64, 64), np.uint16)
    grid = make_grid(source.shape, (32, 32, 32))
    tiling = _tiles._block_phases((0,) * 3, grid, (0,) * 3, grid.counts)[0]
    samples = _tiles._PhaseTiles(source, None, tiling, (1, 1, 1), 100)
    with mock.patch.object(np, "bincount", wraps=np.bincount) as bincount:
        counts = samples.histograms(None, 800)
    assert bincount.call_count == 8
    expected = [
        np.bincount(w.ravel() - 100, minlength=800)
        for w in (source[:32, :32, :32], source[32:, 32:, 32:])
    ]
    np.testing.assert_array_equal(counts[0, 0, 0], expected[0])
    np.testing.assert_array_equal(counts[1, 1, 1], expected[1])


@given(data=st.data(), geometry=geometries(footprints=False), percentile=percentiles)
def test_counts_in_the_narrowest_dtype_wrap_exactly(data, geometry, percentile):
    # uint8 counts wherever windows hold at most 255 samples: running sums
    # over the tiles wrap around on most images, their differences must not
    source = data.draw(arrays(np.uint16, geometry[0], st.integers(0, 3)))
    mask = data.draw(masks(geometry[0]))
    narrowest = _tiles._count_dtype

    def narrower(most):
        return np.dtype(np.uint8) if most <= 255 else narrowest(most)

    with mock.patch.object(_tiles, "_count_dtype", narrower):
        result, expected = coarse(source, percentile, geometry, mask)
    np.testing.assert_array_equal(result, expected, strict=True)


def test_light_sheet_windows_count_in_uint16_and_sum_past_it():
    assert _tiles._count_dtype(100 * 100) == np.uint16
    assert _tiles._count_dtype(2**16) == np.uint32
    assert _tiles._count_dtype(2**32) == np.uint64
    # 200 rows of tiles of 20 x 40 samples, all in one column: running sums
    # along axis 0 reach 160000 in uint16 counts
    source = np.full((4000, 40), 7, np.uint16)
    source[::3] = 9
    grid = make_grid(source.shape, (40, 40), (20, 40))
    args = (source, (0, 0), grid, (0, 0), grid.counts, Percentile(0.7))
    values, counts = _tiles.tile_reduce(*args, np.float64, None, histogram=False)
    windows = np.lib.stride_tricks.sliding_window_view(source, (40, 40))[::20]
    expected = np.percentile(windows.reshape(len(windows), -1), 70, axis=1)
    np.testing.assert_array_equal(values[1:-1, 0], expected[: grid.counts[0] - 2])
    assert counts[1:-1].tolist() == [[1600]] * (grid.counts[0] - 2)


@pytest.mark.parametrize("percentile", [0.29, 0.31])
def test_windows_of_more_samples_than_uint16_counts(percentile):
    # 100000 samples a window, 70000 of them in one column: uint32 counts
    source = np.where(np.arange(200000) % 10 < 3, 5, 9).astype(np.uint16)
    grid = make_grid(source.shape, (100000,), (20000,))
    args = (source, (0,), grid, (0,), grid.counts, Percentile(percentile))
    values, counts = _tiles.tile_reduce(*args, np.float64, None, histogram=False)
    tiling = _tiles._block_phases((0,), grid, (0,), grid.counts)[0]
    assert _tiles._PhaseTiles(source, None, tiling, (1,), 5, 100000).count == np.uint32
    expected = 5 if percentile < 0.3 else 9
    assert values.tolist() == [expected] * grid.counts[0]
    assert counts.tolist() == [60000, 80000, *[100000] * 6, 80000, 60000]


def test_columns_split_the_runs_holding_ranks():
    columns = _tiles._Columns(100, budget=30)
    np.testing.assert_array_equal(columns.edges, np.arange(0, 100, 16))
    assert columns.table()[[0, 15, 16, 99]].tolist() == [0, 0, 1, 6]
    assert columns.refine(np.array([1, 6]))  # 16..31 and 96..99, whole
    np.testing.assert_array_equal(
        columns.edges, [0, *range(16, 32), 32, 48, 64, 80, 96, 97, 98, 99]
    )
    assert not columns.short
    assert not columns.refine(np.array([1, 16, 21, 24]))  # single values already
    # more splits than the budget holds: the first column in as many parts as fit
    columns = _tiles._Columns(100, budget=10)
    assert columns.refine(np.array([0, 1])) and columns.short
    np.testing.assert_array_equal(columns.edges, [0, 4, 8, 12, 16, 32, 48, 64, 80, 96])


def test_ranks_on_more_values_than_columns_take_sorted_tiles():
    # each window's median on its own value, far apart: the splits do not
    # fit the columns' budget, and splitting a few a pass took hundreds
    source = np.random.default_rng(0).integers(0, 60000, 350, dtype=np.uint16)
    grid = make_grid(source.shape, (6,), (1,))
    percentile = Percentile(0.5)
    args = (source, (0,), grid, (0,), grid.counts, percentile, np.uint16, None)
    values, _ = _tiles.tile_reduce(*args, histogram=False)
    expected = reference.local_percentile(source, 0.5, selem=6, spacing=1)
    np.testing.assert_array_equal(values, expected)
    assert _tiles.tile_reduce(*args, histogram=False, sort=False) is None


def test_narrowed_columns_merge_outside_the_ranks_and_split_back_into_runs():
    columns = _tiles._Columns(100, budget=200)
    columns.refine(np.array([2]))  # 32..47 single values
    columns.narrow(36, 44, per_tile=0)
    np.testing.assert_array_equal(columns.edges, [0, *range(36, 45), 45])
    assert columns.table()[[0, 35, 36, 44, 45, 99]].tolist() == [0, 0, 1, 9, 10, 10]
    assert columns.mapping(np.uint16) == _tiles.Band(35, 10)
    # a rank above: the merged column goes back to runs, then a run to values
    assert columns.refine(np.array([10]))
    np.testing.assert_array_equal(
        columns.edges, [0, *range(36, 45), 45, 48, 64, 80, 96]
    )
    assert isinstance(columns.mapping(np.uint16), np.ndarray)
    assert columns.refine(np.array([10]))
    assert columns.edges.tolist()[10:] == [45, 46, 47, 48, 64, 80, 96]
    edges = columns.edges.copy()
    columns.narrow(0, 99, per_tile=0)  # the whole range: nothing merged
    np.testing.assert_array_equal(columns.edges, edges)


def test_narrowing_splits_the_runs_within_into_a_band_where_tiles_are_large():
    # runs of 16 values: 20..60 holds 32..47 split, and 48..63 a run; all
    # single values add 23 columns, a band where tiles hold 3 x 23 samples
    for per_tile, band in ((3 * 22, False), (3 * 23, True)):
        columns = _tiles._Columns(100, budget=200)
        columns.refine(np.array([2]))
        columns.narrow(20, 60, per_tile)
        inside = [*range(32, 48), 48] if not band else range(21, 61)
        np.testing.assert_array_equal(columns.edges, [0, 20, *inside, 61])
        mapping = columns.mapping(np.uint16)
        assert isinstance(mapping, _tiles.Band) == band
        if band:  # the column of each offset, clipped: the table's
            offsets = np.arange(100)
            clipped = np.clip(offsets, mapping.base, mapping.base + mapping.last)
            np.testing.assert_array_equal(clipped - mapping.base, columns.table())
    assert not isinstance(columns.mapping(np.uint64), _tiles.Band)  # 64 bits


@pytest.mark.parametrize("whole", [False, True], ids=["strips", "by-tile"])
@given(data=st.data(), geometry=geometries(footprints=False))
def test_a_band_counts_what_its_table_counts(whole, data, geometry):
    # any integers up to 32 bits, masked or not: clipping to the band and
    # looking up the same columns in a table give the same histograms
    shape, selem, spacing, step = geometry
    dtype = data.draw(st.sampled_from(["uint8", "int8", "int16", "uint16", "int32"]))
    info = np.iinfo(dtype)  # values anywhere, spanning what a table may
    first = data.draw(st.integers(info.min, info.max))
    last = min(info.max, first + data.draw(st.sampled_from([3, 300, 70000])))
    source = data.draw(arrays(dtype, shape, st.integers(first, last)))
    mask = data.draw(masks(shape))
    grid = make_grid(shape, selem, spacing, step)
    tilings = _tiles._block_phases(
        (0,) * len(shape), grid, (0,) * len(shape), grid.counts
    )
    low, high = _tiles._kept_range(source, mask)
    nbins = high - low + 1
    lo = data.draw(st.integers(0, nbins - 1))
    hi = data.draw(st.integers(lo, nbins - 1))
    columns = _tiles._Columns(nbins, budget=nbins)
    columns.narrow(lo, hi, per_tile=3 * nbins)  # a band, whatever the runs
    assume(not columns.single)  # else the values themselves are the columns
    band = columns.mapping(source.dtype)
    assert isinstance(band, _tiles.Band)
    ncols = len(columns.edges)
    for tiling in tilings:  # every phase: each its field of the words
        samples = _tiles._PhaseTiles(source, mask, tiling, grid.step, low)
        with mock.patch.object(_tiles, "_WHOLE", 1 if whole else 1 << 62):
            clipped = samples.histograms(band, ncols)
            looked_up = samples.histograms(columns.table(), ncols)
        np.testing.assert_array_equal(clipped, looked_up, strict=True)


@given(data=st.data(), geometry=geometries(footprints=False))
def test_tile_sums_of_a_narrow_span_are_those_in_int64(data, geometry):
    # values anywhere in any integer dtype, spanning fewer than 2**16: their
    # offsets taken modulo 2**16 sum to the int64 path's, masked or not
    shape, selem, spacing, step = geometry
    dtype = data.draw(st.sampled_from(["uint8", "int8", "uint16", "int32", "int64"]))
    info = np.iinfo(dtype)
    first = data.draw(st.integers(info.min, info.max))
    last = min(info.max, first + data.draw(st.sampled_from([2, 300, 2**16 - 1])))
    source = data.draw(arrays(dtype, shape, st.integers(first, last)))
    mask = data.draw(masks(shape))
    low, high = _tiles._kept_range(source, mask)
    grid = make_grid(shape, selem, spacing, step)
    origin = (0,) * len(shape)
    for tiling in _tiles._block_phases(origin, grid, origin, grid.counts):
        samples = _tiles._PhaseTiles(source, mask, tiling, grid.step, low)
        with mock.patch.object(
            _tiles, "_SUMS", data.draw(st.sampled_from([1, 1 << 20]))
        ):
            narrow = samples.sums(high - low)
        np.testing.assert_array_equal(narrow, samples.sums(), strict=True)


@pytest.mark.parametrize(("dtype", "step"), [("uint8", 2), ("uint8", 4), ("uint16", 2)])
@given(data=st.data())
def test_words_hold_the_samples_of_every_phase(dtype, step, data):
    # the samples block[..., x::step] are one field of the words from
    # x - x % step: clipping that field clips the samples
    width = data.draw(st.integers(1, 3 * step + 2))
    most = np.iinfo(dtype).max
    block = data.draw(arrays(np.dtype(dtype), (2, 3, width), st.integers(0, most)))
    x = data.draw(st.integers(0, width - 1))
    stop = data.draw(st.integers(x + 1, width))
    region = (slice(0, 2), slice(0, 3, 2), slice(x, stop, step))
    words = _tiles._Words.of(block, region, step)
    samples = block[region]
    reach = x - x % step + step * samples.shape[-1]
    wide = np.dtype(dtype).itemsize * step
    rows = [s % wide == 0 for s in samples.strides[:-1]]  # the words aligned
    if reach > width or not all(rows):  # or the last word past the block
        assert words is None
        return
    assert words.array.shape == samples.shape
    base, last = sorted(data.draw(st.integers(0, 255)) for _ in range(2))
    for part in [(slice(None),), (slice(1, 2), slice(0, 1))]:
        clipped = words.clip(part, _tiles.Band(base, last - base), 0)
        expected = np.clip(samples[part], base, last)
        np.testing.assert_array_equal(clipped, expected)
        assert clipped.dtype.itemsize == np.dtype(dtype).itemsize * step


def test_words_only_where_they_are_exact():
    block = np.arange(2 * 16, dtype=np.uint16).reshape(2, 16)
    region = (slice(0, 2), slice(1, 15, 2))
    assert _tiles._Words.of(block, region, 2).field == 1
    for other in (block.astype(np.int16), block.astype(np.uint32), block.astype(">u2")):
        assert _tiles._Words.of(other, region, 2) is None  # signed, wide, big-endian
    assert _tiles._Words.of(block, (slice(0, 2), slice(0, 15, 3)), 3) is None
    assert _tiles._Words.of(block[:, 1:], (slice(0, 2), slice(0, 15, 2)), 2) is None
    assert _tiles._Words.of(block[:, :15], (slice(0, 2), slice(0, 15, 2)), 2) is None


def test_a_tiling_whose_ranks_fall_outside_the_last_ones_is_exact():
    # step 2: even columns dark, odd ones bright, so the first tiling's ranks
    # (even samples) narrow the columns to dark values, and the next
    # tiling's (odd samples) fall in the merged column above them
    rng = np.random.default_rng(2)
    source = rng.integers(100, 300, (64, 64)).astype(np.uint16)
    source[:, 1::2] += 3000
    grid = make_grid(source.shape, (16, 16), (8, 9), (1, 2))  # odd: 2 phases
    statistic = Percentile(0.3)
    widths, cumulative = [], _tiles._cumulative

    def counted(samples, tiling, columns):
        widths.append(np.diff(columns.edges, append=columns.nbins).max())
        return cumulative(samples, tiling, columns)

    with mock.patch.object(_tiles, "_cumulative", counted):
        values, _ = _tiles.tile_reduce(
            source, (0, 0), grid, (0, 0), grid.counts, statistic, np.float64,
            None, histogram=False,
        )  # fmt: skip
    expected = reference.local_percentile(
        source, 0.3, selem=(16, 16), spacing=(8, 9), step=(1, 2),
        interpolate=None, dtype=np.float64,
    )  # fmt: skip
    np.testing.assert_array_equal(values, expected)
    assert max(widths) > 128  # some pass had a column merged by narrowing


def _longest_regular(first, last):
    """The longest run of >= 3 evenly spaced windows of one width, brute force."""
    best = 0
    for lo in range(len(first)):
        for hi in range(lo + 3, len(first) + 1):
            steps, widths = np.diff(first[lo:hi]), (last - first)[lo:hi]
            if len(set(steps)) == 1 and steps[0] > 0 and len(set(widths)) == 1:
                best = max(best, hi - lo)
    return best


@given(
    first=st.lists(st.integers(0, 6), min_size=1, max_size=12).map(np.cumsum),
    width=st.lists(st.integers(1, 3), min_size=1, max_size=12),
    regular=st.integers(0, 8),
)
def test_running_sums_differ_by_slices_for_evenly_spaced_windows(first, width, regular):
    if regular:  # a run of windows away from the borders
        at = len(first) // 2
        run = first[at] + 2 * np.arange(1, regular + 1)
        first = np.concatenate([first[: at + 1], run, run[-1] + first[at + 1 :]])
    last = first + np.resize(width, len(first))
    # uint16 counts, whose differences wrap as the window sums' do
    shape = (int(last.max()) + 1, 2, 3)
    running = np.random.default_rng(0).integers(0, 2**16, shape, dtype=np.uint16)
    lo, hi = _tiles._regular_run(first, last)
    assert hi - lo == _longest_regular(first, last)
    np.testing.assert_array_equal(
        _tiles._differences(running, first, last), running[last] - running[first]
    )


@given(
    counts=st.lists(
        st.lists(st.integers(0, 3), min_size=3, max_size=3), min_size=1, max_size=5
    ),
    ranks=st.data(),
    dtype=st.sampled_from([np.int32, np.int64]),
)
def test_the_column_of_a_rank_is_the_first_to_exceed_it(counts, ranks, dtype):
    cumulative = np.cumsum(np.array(counts, dtype=dtype), axis=1)
    rank = np.array([ranks.draw(st.integers(0, 10)) for _ in counts])
    expected = np.count_nonzero(cumulative <= rank[:, None], axis=1)  # 3 if none
    np.testing.assert_array_equal(_tiles._column_of(cumulative, rank), expected)


def test_axis_tilings_split_windows_by_step_phase():
    grid = make_grid((8,), (4,), (2,), (2,))  # windows [0,3) [1,5) [3,7) [5,8)
    even, odd = _tiles._axis_phases(grid.windows(0, 0, grid.counts[0]), 0)
    assert isinstance(even, _tiles.AxisTiling)
    assert even.phase == 0 and odd.phase == 1
    np.testing.assert_array_equal(even.rows, [0])
    np.testing.assert_array_equal(odd.rows, [1, 2, 3])
    # odd windows, on samples 1 3 5 7: [0,2) [1,3) [2,4), so four tiles
    np.testing.assert_array_equal(odd.bounds, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(odd.first, [0, 1, 2])
    np.testing.assert_array_equal(odd.last, [2, 3, 4])
    assert odd.ntiles == 4 and odd.region(2) == slice(1, 9, 2)
    assert even.ntiles == 1 and even.region(2) == slice(0, 4, 2)
    classes = list(_tiles._size_classes(odd))
    assert [(c.size, c.tiles.tolist(), c.take) for c in classes] == [
        (1, [0, 1, 2, 3], slice(0, 4))
    ]


@given(
    data=st.data(),
    size=st.integers(1, 300),
    extent=st.integers(1, 120),
    step=st.integers(1, 3),
    across=st.integers(1, 3),
)
def test_thinned_tilings_keep_every_kth_sample_of_each_tile(
    data, size, extent, step, across
):
    spacing = data.draw(st.integers(1, min(size, 60)))
    # axis 0 is thinned (the last axis never is, unless it is the only one);
    # the samples of tile t are those of the whole tiling's tile t whose
    # index along axis 0 is a multiple of k
    block = np.arange(size * across, dtype=np.intp).reshape(size, across)
    grid = make_grid(block.shape, (extent, 1), (spacing, 1), (step, 1))
    for tiling in _tiles._block_phases((0, 0), grid, (0, 0), grid.counts):
        whole = _tiles._PhaseTiles(block, None, tiling, grid.step, 0)
        thin = _tiles._thinned(tiling, grid.step)
        smallest = np.diff(tiling[0].bounds)[_tiles._used_tiles(tiling[0])].min()
        if thin is None:
            assert smallest < 4
            continue
        k = thin[1][0] // step
        assert k in (2, 4, 8) and 2 * k <= smallest and thin[0][1] == tiling[1]
        counts = _tiles._PhaseTiles(block, None, *thin, 0).histograms(None, block.size)
        used = _tiles._used_tiles(tiling[0])
        start = tiling[0].bounds[0]
        for t, (lo, hi) in enumerate(itertools.pairwise(tiling[0].bounds)):
            rows = whole.sub[lo - start : hi - start]
            taken = rows[np.arange(lo, hi) % k == 0].ravel() if used[t] else []
            expected = np.bincount(taken, minlength=block.size)
            np.testing.assert_array_equal(counts[t].sum(axis=0), expected)


def test_a_sample_of_the_windows_leaves_one_exact_pass_a_tiling():
    # equalization-like: two percentiles of big overlapping windows on a
    # smooth background with noise; the sampled estimate splits the right
    # columns, so each tiling (4 phases of the steps) is counted once
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:256, 0:256]
    source = (300 + y + 2 * x + rng.normal(0, 30, (256, 256))).astype(np.uint16)
    grid = make_grid(source.shape, (100, 100), (25, 25), (2, 2))
    statistic = Percentile((0.4, 0.975))
    sizes, histograms = [], _tiles._PhaseTiles.histograms

    def counted(self, *args):
        sizes.append(self.sub.size)
        return histograms(self, *args)

    with mock.patch.object(_tiles._PhaseTiles, "histograms", counted):
        values, _ = _tiles.tile_reduce(
            source, (0, 0), grid, (0, 0), grid.counts, statistic, np.float64,
            None, histogram=False,
        )  # fmt: skip
    tilings = _tiles._block_phases((0, 0), grid, (0, 0), grid.counts)
    assert len(tilings) == 4
    # the estimate reads about a quarter of the first tiling (tiles of 12
    # or 13 samples along axis 0: k = 4), then each tiling is counted once
    estimate, *passes = sizes
    assert len(passes) == len(tilings) and estimate <= passes[0] / 3
    expected = reference.local_percentile(
        source, (0.4, 0.975), selem=(100, 100), spacing=(25, 25), step=(2, 2),
        interpolate=None, dtype=np.float64,
    )  # fmt: skip
    np.testing.assert_array_equal(values, expected)


def test_sorted_tiles_count_and_select():
    block = np.array([5, 1, 4, 4, 9, 0, 2, 7], np.uint16)
    grid = make_grid(block.shape, (4,), (2,))  # windows [0,3) [1,5) [3,7) [5,8)
    tiling = (next(_tiles._axis_phases(grid.windows(0, 0, grid.counts[0]), 0)),)
    tiles = _tiles._SortedTiles(block, None, tiling, grid.step)
    # tiles [5] [1 4] [4 9] [0 2] [7], sorted, the two of size 1 first
    np.testing.assert_array_equal(tiles.values, [5, 7, 1, 4, 4, 9, 0, 2])
    ids = _tiles._window_tiles(tiling)
    np.testing.assert_array_equal(ids, [[0, 1], [1, 2], [2, 3], [3, 4]])
    np.testing.assert_array_equal(tiles.count(ids, 4), [[0, 2], [2, 1], [1, 2], [2, 0]])
    select = tiles.select(ids, 0, 9)
    np.testing.assert_array_equal(select(np.array([0, 1, 3, 2])), [1, 4, 9, 7])
    # the ranks just above come from the values found: a repeat, or the
    # smallest next value of the window's tiles
    np.testing.assert_array_equal(select(np.array([1, 2, 3, 2])), [4, 4, 9, 7])


def test_huge_ranges_take_sorted_tiles_and_big_histograms_decline():
    source = np.array([0, 2**60, 5, 7] * 4, np.int64)
    grid = make_grid(source.shape, (2,))
    args = (source, (0,), grid, (0,), grid.counts, Percentile(0.5), np.float64, None)
    values, counts = _tiles.tile_reduce(*args, histogram=False)
    np.testing.assert_array_equal(values, np.percentile(source.reshape(8, 2), 50, 1))
    assert counts.tolist() == [2] * 8
    histogram = _tiles.tile_reduce(
        source % 8, (0,), grid, (0,), grid.counts, Histogram(8), np.int64, None, True
    )
    assert histogram[0].shape == (8, 8)
    # 8 tiles of 2**21 bins: more entries than the block has voxels
    big = Histogram(2**21)
    assert _tiles.tile_reduce(source % 8, *args[1:5], big, np.int64, None, True) is None


@given(
    data=st.data(),
    geometry=geometries(footprints=False),
    function=st.sampled_from([np.mean, np.var, np.std]),
    vectorized=st.booleans(),
)
def test_numpy_moments_match_the_reference(data, geometry, function, vectorized):
    shape, selem, spacing, step = geometry
    source = data.draw(integer_images(shape))
    mask = data.draw(masks(shape))
    kwargs = dict(selem=selem, spacing=spacing, step=step, mask=mask, dtype=float)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        # NumPy warns of empty windows (NaN) where the fast path declines
        warnings.simplefilter("ignore", RuntimeWarning)
        result = dls.apply_local_function(
            source, function, interpolate=None, vectorized=vectorized, **kwargs
        )
        expected = reference.apply_local_function(
            source,
            function,
            interpolate=None,
            **kwargs,
        )
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=0)


@st.composite
def window_sums(draw):
    """Sums ``(n, S1, S2)`` of some windows' offset values, and the offset:
    small enough for int64 and float64, or not."""
    size = draw(st.integers(1, 5))
    bits = draw(st.sampled_from([4, 16, 26, 40]))
    low = draw(st.integers(-(2**bits), 2**bits))
    n, s1, s2 = [], [], []
    for _ in range(size):
        values = draw(st.lists(st.integers(0, 2**bits), min_size=1, max_size=6))
        repeat = draw(st.sampled_from([1, 1000, 2**20]))  # windows of many samples
        n.append(len(values) * repeat)
        s1.append(sum(values) * repeat)
        s2.append(sum(v * v for v in values) * repeat)
    if max(s2) >= 2**63:
        return None
    return tuple(np.array(x, np.int64) for x in (n, s1, s2)), low


@given(sums=window_sums(), moment=st.sampled_from(["mean", "var"]))
def test_moments_round_the_exact_quotient_once(sums, moment):
    assume(sums is not None)
    (n, s1, s2), low = sums
    result = _tiles._moment(n, s1, s2, low, moment)
    n, s1, s2 = (x.astype(object) for x in (n, s1, s2))
    exact = (low * n + s1) / n if moment == "mean" else (n * s2 - s1 * s1) / (n * n)
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, exact.astype(np.float64))


def test_moments_use_exact_tile_sums_or_decline():
    grid = make_grid((6,), (3,))
    small = np.array([3, 1, 4, 1, 5, 9], np.uint16)
    values, counts = _tiles.tile_moments(small, (0,), grid, (0,), (2,), "var", None)
    np.testing.assert_array_equal(counts, [3, 3])
    np.testing.assert_allclose(values, [np.var([3, 1, 4]), np.var([1, 5, 9])])
    huge = np.array([0, 2**40, 0, 1, 2, 3], np.int64)  # squares beyond 2**53
    assert _tiles.tile_moments(huge, (0,), grid, (0,), (2,), "std", None) is None
    beyond = np.array([2**60, 2**60 + 1] * 3, np.int64)  # floats would round these
    assert _tiles.tile_moments(beyond, (0,), grid, (0,), (2,), "var", None) is None
