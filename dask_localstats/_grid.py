"""Geometry of the sampling sub-grid (pure NumPy, no dask).

A local statistic is sampled on a regular grid of *centers*. On every axis
``d`` of a source of shape ``S`` there are ``m = S // H`` centers spaced ``H``
apart, the first one at ``(S - (m - 1) * H) // 2`` so that the grid sits in
the middle of the axis. The *window* of a center ``c`` is the half-open range
``[c - E // 2, c + E - E // 2)`` clipped to the image, optionally subsampled
with a step ``D`` starting at the clipped start. Windows are separable: the
voxels of an n-D window are the Cartesian product of the per-axis index
lists, then filtered by an optional footprint and mask.

Everything downstream (kernels, engine, interpolation) works with the
normalized :class:`Grid` built once, with validation, by :func:`make_grid`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["AxisWindows", "Grid", "make_grid"]


def _as_int(name, value):
    try:
        if isinstance(value, bool | np.bool_):
            raise TypeError
        return operator.index(value)
    except TypeError:
        msg = f"`{name}` must be made of integers, got {value!r}"
        raise TypeError(msg) from None


# Sizes along an axis beyond any image's, so that arithmetic on them stays
# within NumPy's 64-bit integers.
_LARGEST = 2**40


def _as_tuple(name, value, ndim, *, allow_none=False):
    """Normalize an int or a sequence of ints (or None entries) to a tuple."""
    if np.ndim(value) == 0:
        value = (value,) * ndim
    value = tuple(value)
    if len(value) != ndim:
        msg = (
            f"`{name}` must have one entry per source dimension ({ndim}), got {value!r}"
        )
        raise ValueError(msg)
    out = []
    for v in value:
        if v is None and allow_none:
            out.append(1)
            continue
        v = _as_int(name, v)
        if v <= 0:
            msg = f"`{name}` must be positive on every axis, got {value!r}"
            raise ValueError(msg)
        if v > _LARGEST:
            msg = f"`{name}` must be at most 2**40 on every axis, got {value!r}"
            raise ValueError(msg)
        out.append(v)
    return tuple(out)


@dataclass(frozen=True, eq=False)
class AxisWindows:
    """The windows of a run of consecutive centers on one axis.

    Attributes
    ----------
    lo, hi : (k,) int arrays
        Clipped window bounds (half-open) in source coordinates.
    origin : (k,) int array
        Unclipped window start ``c - E // 2``; footprint index 0 sits there.
    count : (k,) int array
        Number of voxels taken, ``ceil((hi - lo) / step)``.
    """

    lo: np.ndarray
    hi: np.ndarray
    origin: np.ndarray
    count: np.ndarray
    step: int

    def groups(self):
        """Yield ``(rows, positions, offsets)`` for runs of equal length.

        ``rows`` indexes the centers of the run, ``positions`` (len(rows), L)
        holds the source coordinates taken and ``offsets`` the matching
        footprint indices.
        """
        for length in np.unique(self.count):
            rows = np.flatnonzero(self.count == length)
            positions = self.lo[rows, None] + self.step * np.arange(length)
            yield rows, positions, positions - self.origin[rows, None]


@dataclass(frozen=True, eq=False)
class Grid:
    """Normalized sampling geometry.

    Attributes
    ----------
    shape : tuple of int
        Source shape ``S``.
    extent : tuple of int
        Window extent ``E`` (the footprint's shape when there is one).
    spacing : tuple of int
        Distance ``H`` between centers.
    step : tuple of int
        Subsampling ``D`` inside a window (1 for none).
    footprint : bool ndarray or None
        Footprint of the window, or None for a full box.
    """

    shape: tuple
    extent: tuple
    spacing: tuple
    step: tuple
    footprint: np.ndarray | None = None

    @property
    def ndim(self):
        return len(self.shape)

    @cached_property
    def counts(self):
        """Number of centers ``m`` per axis."""
        return tuple(s // h for s, h in zip(self.shape, self.spacing, strict=True))

    @cached_property
    def first(self):
        """Position of the first center per axis."""
        return tuple(
            (s - (m - 1) * h) // 2
            for s, m, h in zip(self.shape, self.counts, self.spacing, strict=True)
        )

    @cached_property
    def full_count(self):
        """Voxels of a window that is neither clipped nor masked."""
        if self.footprint is None:
            return math.prod(
                -(-e // d) for e, d in zip(self.extent, self.step, strict=True)
            )
        return int(self.footprint[tuple(slice(None, None, d) for d in self.step)].sum())

    def centers(self, axis, start=0, stop=None):
        """Center positions on `axis` for center indices ``start:stop``."""
        stop = self.counts[axis] if stop is None else stop
        return self.first[axis] + self.spacing[axis] * np.arange(start, stop)

    def center_coordinates(self):
        """Int array of shape ``counts + (ndim,)`` of all center positions."""
        axes = [self.centers(d) for d in range(self.ndim)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)

    def windows(self, axis, start=0, stop=None):
        """The :class:`AxisWindows` of centers ``start:stop`` on `axis`."""
        c = self.centers(axis, start, stop)
        e, s, d = self.extent[axis], self.shape[axis], self.step[axis]
        origin = c - e // 2
        lo = np.maximum(origin, 0)
        hi = np.minimum(origin + e, s)
        return AxisWindows(lo, hi, origin, (hi - lo + d - 1) // d, d)

    def region(self, axis, start, stop):
        """Source range ``(lo, hi)`` read by the windows of centers start:stop."""
        w = self.windows(axis, start, stop)
        return int(w.lo.min()), int(w.hi.max())


def make_grid(shape, selem, spacing=None, step=None):
    """Validate the sampling parameters and build a :class:`Grid`.

    Parameters
    ----------
    shape : tuple of int
        Shape of the source.
    selem : int, tuple of int or bool array
        Window extent (a box), or a footprint whose shape is the extent.
    spacing : int, tuple of int or None
        Distance between centers; defaults to the extent.
    step : int, tuple of (int or None) or None
        Subsampling inside a window; None means none.

    Returns
    -------
    Grid

    Raises
    ------
    ValueError
        Wrong number of entries, non-positive sizes, or an image smaller than
        the spacing on some axis.
    TypeError
        Non-integer sizes.

    Examples
    --------
    >>> g = make_grid((100, 64), selem=(20, 20), spacing=(10, 16))
    >>> g.counts, g.first
    ((10, 4), (5, 8))
    """
    ndim = len(shape)
    footprint = None
    if isinstance(selem, np.ndarray) and selem.ndim > 0 and selem.dtype == bool:
        footprint = selem.copy()
        if footprint.ndim != ndim:
            msg = (
                f"`selem` must have {ndim} dimensions like the source, "
                f"got a footprint of shape {footprint.shape}"
            )
            raise ValueError(msg)
        extent = tuple(footprint.shape)
        if 0 in extent:
            msg = f"`selem` must not be empty, got a footprint of shape {extent}"
            raise ValueError(msg)
    elif isinstance(selem, np.ndarray) and selem.ndim > 0:
        msg = f"`selem` as an array must be boolean, got dtype {selem.dtype}"
        raise TypeError(msg)
    else:
        if selem is None:
            msg = "`selem` must be an int, a tuple of ints or a boolean array, got None"
            raise TypeError(msg)
        extent = _as_tuple("selem", selem, ndim)
    spacing = extent if spacing is None else _as_tuple("spacing", spacing, ndim)
    step = (
        (1,) * ndim if step is None else _as_tuple("step", step, ndim, allow_none=True)
    )
    for d, (s, h) in enumerate(zip(shape, spacing, strict=True)):
        if s < h:
            msg = (
                f"the source is smaller than `spacing` on axis {d}: "
                f"size {s} < spacing {h} (source shape {tuple(shape)}, "
                f"spacing {spacing})"
            )
            raise ValueError(msg)
    return Grid(tuple(int(s) for s in shape), extent, spacing, step, footprint)
