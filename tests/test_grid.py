"""Sampling geometry."""

import numpy as np
import pytest
from hypothesis import given
from strategies import geometries

from dask_localstats._grid import make_grid


@given(geometries(footprints=False))
def test_centers_follow_the_spec(geometry):
    shape, selem, spacing, _ = geometry
    grid = make_grid(shape, selem, spacing)
    spacing = spacing or selem
    for d, (s, h) in enumerate(zip(shape, spacing, strict=True)):
        m = s // h
        first = (s - (m - 1) * h) // 2
        np.testing.assert_array_equal(grid.centers(d), first + h * np.arange(m))
    assert grid.center_coordinates().shape == (*grid.counts, len(shape))


def test_windows_are_clipped_and_step_starts_at_the_clipped_start():
    grid = make_grid((10,), (7,), spacing=(3,), step=(2,))
    np.testing.assert_array_equal(grid.centers(0), [2, 5, 8])
    groups = {len(p[0]): p for _, p, _ in grid.windows(0).groups()}
    # center 2: [-1, 6) -> [0, 6) -> 0, 2, 4 ; center 8: [5, 12) -> [5, 10) -> 5, 7, 9
    np.testing.assert_array_equal(groups[3], [[0, 2, 4], [5, 7, 9]])
    np.testing.assert_array_equal(groups[4], [[2, 4, 6, 8]])
    assert grid.region(0, 0, 2) == (0, 9)


def test_footprint_offsets_follow_the_unclipped_origin():
    footprint = np.array([True, False, True, True, False])
    grid = make_grid((6,), footprint, spacing=(3,))
    ((_, positions, offsets),) = (g for g in grid.windows(0).groups() if len(g[0]) == 2)
    # centers 1 and 4: windows [-1, 4) -> [0, 4) and [2, 7) -> [2, 6)
    np.testing.assert_array_equal(positions, [[0, 1, 2, 3], [2, 3, 4, 5]])
    np.testing.assert_array_equal(offsets, [[1, 2, 3, 4], [0, 1, 2, 3]])


def test_int_selem_and_none_steps():
    grid = make_grid((9, 8), 4, step=(None, 2))
    assert grid.extent == (4, 4)
    assert grid.step == (1, 2)
    assert grid.counts == (2, 2)


def test_image_smaller_than_spacing_names_axis_and_sizes():
    with pytest.raises(ValueError, match=r"axis 1: size 8 < spacing 9"):
        make_grid((20, 8), (5, 5), spacing=(5, 9))


def test_none_selem():
    with pytest.raises(TypeError, match=r"`selem` must be an int, a tuple"):
        make_grid((20, 8), None)
