"""The nearest fill, whole and block by block, against the brute-force reference."""

import itertools
import math
from unittest import mock

import dask.array as da
import numpy as np
import pytest
import reference
from hypothesis import given
from hypothesis import strategies as st
from strategies import booleans, chunkings

from dask_localstats import _engine, _fill
from dask_localstats._engine import fill_of, fill_stage
from dask_localstats._fill import boxes, fill_block, nearest, reach
from dask_localstats._kernels import flagged_dtype


@st.composite
def flagged_grids(draw, max_ndim=3):
    """A flagged grid (values, missing flags) of 1 to `max_ndim` spatial axes.

    Some have a slab of missing samples (whole blocks without a valid one),
    some components per sample.
    """
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=ndim, max_size=ndim)))
    missing = draw(booleans(shape))
    slab = draw(st.integers(0, shape[0]))
    missing[:slab] = True
    components = draw(st.sampled_from([(), (2,)]))
    values = np.arange(np.prod(shape + components), dtype=np.float64)
    flagged = np.empty(shape + components, flagged_dtype(np.float64))
    flagged["value"] = values.reshape(flagged.shape)
    flagged["missing"] = missing.reshape(missing.shape + (1,) * len(components))
    return flagged, ndim


@given(grid=flagged_grids())
def test_fill_of_the_whole_grid_matches_the_reference(grid):
    flagged, ndim = grid
    missing = flagged["missing"].reshape((*flagged.shape[:ndim], -1))[..., 0]
    expected = reference.fill_nearest(flagged["value"], missing)
    np.testing.assert_array_equal(fill_block(flagged, ndim), expected, strict=True)


@given(grid=flagged_grids(), data=st.data())
def test_blocks_filled_from_their_boxes_equal_the_whole_fill(grid, data):
    flagged, ndim = grid
    chunks = data.draw(chunkings(flagged.shape[:ndim]))
    edges = [np.cumsum((0, *c)) for c in chunks]
    blocks = {
        index: tuple(slice(e[i], e[i + 1]) for e, i in zip(edges, index, strict=True))
        for index in itertools.product(*(range(len(c)) for c in chunks))
    }
    reaches = np.array([reach(flagged[b], ndim)[0] for b in blocks.values()])
    with mock.patch.object(_fill, "MAX_SPREAD", np.inf):  # however large
        around = boxes(reaches.reshape([len(c) for c in chunks]), chunks)
    whole = fill_block(flagged, ndim)
    for index, block in blocks.items():
        box = around[index]
        assert all(
            lo <= b.start and b.stop <= hi
            for b, (lo, hi) in zip(block, box, strict=True)
        )
        inner = tuple(
            slice(b.start - lo, b.stop - lo)
            for b, (lo, _) in zip(block, box, strict=True)
        )
        part = fill_block(flagged[tuple(slice(*r) for r in box)], ndim, inner)
        np.testing.assert_array_equal(part, whole[block], strict=True)


@given(grid=flagged_grids(), data=st.data(), most=st.integers(1, 2000))
def test_the_grid_swept_an_axis_at_a_time_equals_the_whole_fill(grid, data, most):
    # a lazy result's way, and a writer's where boxes are wide: sweeps along
    # each axis a line of tiles a task, lines as small as `most` bytes allow
    flagged, ndim = grid
    chunks = data.draw(chunkings(flagged.shape[:ndim]))
    lazy = da.from_array(
        flagged, chunks=chunks + tuple((n,) for n in flagged.shape[ndim:])
    )
    with mock.patch.object(_engine, "SWEEP_BYTES", most):
        filled = fill_stage(lazy, ndim, np.float64)
    np.testing.assert_array_equal(filled.compute(), fill_block(flagged, ndim))
    assert len(fill_of(filled).sweeps) == ndim


def test_sweeps_of_a_grid_with_empty_blocks():
    rng = np.random.default_rng(0)
    flagged = np.empty((5, 7), flagged_dtype(np.float64))
    flagged["value"] = rng.random((5, 7))
    flagged["missing"] = rng.random((5, 7)) < 0.6
    lazy = da.from_array(flagged, chunks=((2, 0, 3), (3, 0, 4)))
    filled = fill_stage(lazy, 2, np.float64)
    np.testing.assert_array_equal(filled.compute(), fill_block(flagged, 2))


def test_a_sweep_task_reads_its_line_of_tiles_and_no_more():
    # blocks of 16 x 16 x 8 cut in tiles so that a line of them holds at
    # most 1024 samples: each line task of each sweep depends
    # on the tiles of one line, of the grid's tiles or the sweep's before
    flagged = da.zeros(
        (64, 48, 40), dtype=flagged_dtype(np.float32), chunks=(16, 16, 8)
    )
    per_sample = 12 + _engine.SWEEP_WORK  # a record and the temporaries
    with mock.patch.object(_engine, "SWEEP_BYTES", per_sample * 1024):
        filled = fill_stage(flagged, 3, np.float32)
    graph = filled.__dask_graph__()
    lines = [k for k in graph if k[0].endswith("-lines")]
    assert len({k[0] for k in lines}) == 3
    for key in lines:
        inputs = graph[key].dependencies
        (layer,) = {k[0] for k in inputs}  # one array's tiles
        tiles = graph.layers[layer].numblocks[:3]
        assert tiles == fill_of(filled).sweeps[0].numblocks  # not the blocks
        axis = int(key[0].rsplit("-sweep", 1)[1].split("-")[0])
        across = {tuple(i for d, i in enumerate(k[1:4]) if d != axis) for k in inputs}
        assert len(across) == 1 and len(inputs) == tiles[axis]
    widths = [max(c) for c in fill_of(filled).sweeps[0].chunks]
    across = [
        n * math.prod(widths) // w for n, w in zip(filled.shape, widths, strict=True)
    ]
    assert max(across) <= 1024 < 64 * 16 * 8  # lines of blocks: too wide


def test_a_sweep_keeps_the_first_of_equally_near_samples():
    # along a line: x = 2 is 1 from x' = 1 and from x' = 3 (g = 0 at both):
    # the least, 1; x = 0 is nearer itself (g = 1) than 1 (1 + 0): a tie too
    far = _fill.FAR
    source, distance = _fill._along(np.array([[1, 0, far, 0, far]]))
    assert source.tolist() == [[0, 1, 1, 3, 3]]
    assert distance.tolist() == [[1, 0, 1, 0, 1]]
    # x = 1 is 1 + 3 from x' = 0 (g = 3) and 4 + 0 from x' = 3: 0 first
    source, _ = _fill._along(np.array([[3, far, far, 0]]))
    assert source.tolist() == [[0, 0, 3, 3]]
    # lines all valid or all without candidates are left as they are
    source, distance = _fill._along(np.array([[0, 0], [far, far]]))
    assert source.tolist() == [[0, 1], [0, 1]]
    assert distance.tolist() == [[0, 0], [far, far]]


@given(
    lines=st.lists(
        st.lists(
            st.one_of(
                st.just(_fill.FAR), st.integers(0, 9), st.integers(0, _fill.FAR - 1)
            ),
            min_size=1,
            max_size=12,
        ),
        min_size=1,
        max_size=4,
    ).filter(lambda lines: len({len(line) for line in lines}) == 1)
)
def test_a_sweep_compares_exactly_however_far(lines):
    # any distances below FAR, compared in Python's integers: products of
    # distances and denominators would overflow int64 (the grids that make
    # such distances are huge; the arithmetic is the same)
    g = np.array(lines, np.int64)
    source, distance = _fill._along(g)
    for row, chosen, found in zip(
        lines, source.tolist(), distance.tolist(), strict=True
    ):
        for x in range(len(row)):
            sums = [(x - q) ** 2 + int(v) for q, v in enumerate(row) if v < _fill.FAR]
            if not sums:
                assert found[x] == _fill.FAR
                continue
            assert found[x] == min(sums)
            best = [q for q, v in enumerate(row) if v < _fill.FAR]
            first = min(q for q in best if (x - q) ** 2 + row[q] == min(sums))
            assert chosen[x] == first


def test_a_grid_without_valid_samples_is_swept_to_zeros():
    flagged = np.ones((2, 3), flagged_dtype(np.float64))
    swept = _fill.sweep(_fill.sweep(flagged, 2, 1), 2, 0)
    assert (swept["distance"] >= _fill.FAR).all()
    assert not _fill.swept_values(swept).any()


def test_of_equally_near_samples_the_first_in_c_order_wins():
    missing = np.ones((5, 5), bool)
    missing[0, 2] = missing[2, 0] = missing[2, 4] = missing[4, 2] = False
    # (2, 2) is 2 away from all four; (0, 2) comes first
    assert nearest(missing, np.array([[2, 2]])).tolist() == [[0, 2]]
    missing[0, 2] = True  # then (2, 0)
    assert nearest(missing, np.array([[2, 2]])).tolist() == [[2, 0]]
    # many ties at once, beyond the first query's two nearest
    ring = np.ones((9, 9), bool)
    for y, x in [(0, 4), (4, 0), (4, 8), (8, 4), (1, 1), (1, 7), (7, 1), (7, 7)]:
        ring[y, x] = False
    assert nearest(ring, np.array([[4, 4]])).tolist() == [[0, 4]]
    assert nearest(np.ones((3, 3), bool), np.array([[1, 1]])) is None


def test_reach_is_the_farthest_missing_sample_from_a_valid_one():
    flagged = np.zeros((3, 3), flagged_dtype(np.float32))
    flagged["missing"] = True
    assert reach(flagged, 2)[0] == np.inf
    flagged["missing"][0, 0] = False
    assert reach(flagged, 2)[0] == 8  # (2, 2)
    flagged["missing"] = False
    assert reach(flagged, 2)[0] == 0


def test_boxes_spanning_many_blocks_are_given_up():
    # a gap of 30 blocks: their boxes would hold much of the grid each
    reaches = np.r_[np.zeros(5), np.full(30, np.inf), np.zeros(5)]
    assert boxes(reaches, ((1,) * 40,)) is None
    assert boxes(reaches[:8], ((1,) * 8,)) is not None


@pytest.mark.parametrize("shape", [(13, 11), (7, 9, 8)])
@pytest.mark.parametrize("period", [2, 3, 4])
def test_ties_among_many_equally_near_samples(shape, period):
    # valid samples on a lattice: most missing ones have 2 to 8 nearest
    index = np.indices(shape)
    missing = ((index + 1) % period != 0).any(axis=0)
    flagged = np.empty(shape, flagged_dtype(np.float64))
    flagged["value"] = np.arange(missing.size).reshape(shape)
    flagged["missing"] = missing
    expected = reference.fill_nearest(flagged["value"], missing)
    np.testing.assert_array_equal(fill_block(flagged, len(shape)), expected)
