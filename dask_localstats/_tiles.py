"""Tiles: the fast paths for integer sources and box windows.

In real use windows overlap heavily (ClearMap's light-sheet correction takes
windows of 200 x 200 voxels every 25 voxels, so each voxel lies in 64
windows); gathering every window visits each voxel that many times. Instead,
the work here follows the voxels, whatever the overlap.

Tiling
------
On each axis the window bounds cut the block into *tiles*, and every window
is a box of whole tiles. With a step, windows whose (clipped) start has the
same phase modulo the step share one subsampled grid, so each phase is tiled
separately; every sample still falls in exactly one tile. One axis's tiles
for one phase are an :class:`AxisTiling` (:func:`_axis_phases`); a *tiling*
of the block is a tuple of them, one per axis, and :func:`_block_phases`
lists the block's tilings (one per combination of the axes' phases).

Paths
-----
:func:`tile_reduce` computes percentiles and local histograms,
:func:`tile_moments` means, variances and standard deviations:

- *Tile histograms* (percentiles, and local histograms;
  :func:`_percentile_select`):

  1. One ``np.bincount`` per row of tiles gives each tile's histogram of
     the values (:meth:`_PhaseTiles.histograms`), in *columns*: a lookup
     table maps each value, offset by the block's least kept value, to its
     column, or, where the columns are single values but a first and a
     last that hold those below and above (a :class:`Band`), clipping the
     values does, at less than half the cost (with a step along the last
     axis, small unsigned values are clipped as fields of wider words,
     contiguous: :class:`_Words`). Work: one pass over the
     samples, whatever the windows. Tiles
     of many samples (windows that do not overlap, ClearMap's default
     spacing) are counted one call a tile, on the values themselves where
     the columns are single values and the values unsigned of up to 16
     bits (:meth:`_PhaseTiles._by_tile`).
  2. A window's histogram is the sum of its tiles' histograms: running sums
     over the tiles, axis by axis, then a difference per window
     (:func:`_window_sums`). Work: tiles times columns.
  3. A wanted rank falls in the column where the window's cumulative count
     exceeds it. At first the columns are runs of about sqrt(range)
     values; the runs holding some rank are split into single values and
     the histograms counted again (:class:`_Columns`). Where the ranks
     fall is first estimated from every k-th row of the block's first
     tiling (about an eighth of its samples, :func:`_estimate`), and the
     columns carry over to the block's next tilings, whose windows have
     like percentiles, so a tiling is usually counted once. After the
     estimate and after each tiling, the columns below and above the ranks
     (and a margin) merge into one each, and those between become single
     values where that adds few columns (:meth:`_Columns.narrow`): a band,
     so the next tiling sums fewer columns and clips instead of looking up
     (a rank falling in a merged column splits it back into runs). Where tiles
     times values are few (at most 1 / :data:`_SINGLE` of the samples), the
     columns are single values from the start: one pass, no estimate.

- *Sorted tiles* (percentiles of values spanning more than ``_MAX_TABLE``
  values, too many for lookup tables; :class:`_SortedTiles`). Each tile's
  samples are sorted once (``ndarray.sort``, which releases the GIL). How
  many samples of a window lie at or below some value is then a binary
  search per tile, and each wanted order statistic a bisection on the
  value (:meth:`_SortedTiles.select`).
- *Local histograms* (:class:`~dask_localstats._kernels.Histogram`): steps
  1 and 2 of the tile histograms, with the requested bins as columns.
- *Moments* (``numpy.mean``, ``numpy.var``, ``numpy.std`` given to
  ``apply_local_function``): exact integer sums of the values and their
  squares per tile (:meth:`_PhaseTiles.sums`, ``np.add.reduceat``; in
  ``uint16`` and ``uint32`` where the values span fewer than 2**16), then
  per window with running sums as in step 2, and one division a window,
  rounded once (:func:`_moment`).

For percentiles, NumPy's interpolation between the two order statistics is
then applied as for the other kernels, so results are bit-identical to
``numpy.percentile``.

Declining
---------
:func:`tile_reduce` declines (returns None, and the gathering kernel takes
over) when the first tile histograms of some tiling would hold more
entries than the block has voxels and than ``_MAX_ENTRIES``, and, when told
not to sort, where sorted tiles would be needed;
:func:`tile_moments` declines when its integer sums could exceed 2**53.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np

_MAX_ENTRIES = 1 << 23
_MAX_TABLE = 1 << 22  # values a percentile's lookup tables may span
_LOOPED = 256
_STRIP = 1 << 16  # counts a bincount call makes: they stay in cache
_SAMPLES = 1 << 16  # samples a bincount call counts: its keys stay in cache
_SUMS = 1 << 20  # samples whose sums a group of rows of tiles takes at once
_WHOLE = 1 << 15  # samples of a tile counted alone (:meth:`_PhaseTiles._by_tile`)
_THIN = 8  # the estimate of where ranks fall reads 1 / _THIN of the samples
_SINGLE = 8  # single-value columns at once where tiles x values x this <= samples
_MARGIN = 8  # values kept single beyond a tiling's ranks, at least, for the next
_PASSES = 4  # passes short of columns a tiling may take before sorted tiles


class AxisTiling(NamedTuple):
    """The tiles of one axis of a block, for the windows of one step phase.

    A block's tiling for one phase is a tuple of these, one per axis (called
    `tiling` below); a window is then the box of tiles ``first[w]:last[w]``
    on every axis.

    Attributes
    ----------
    rows : numpy.ndarray
        The windows of this phase, as indices into the axis's windows.
    phase : int
        Where the phase's samples start in the block: along this axis they
        are ``block[phase::step]``.
    bounds : numpy.ndarray
        Increasing tile bounds in the coordinates of those samples (sample
        ``i`` is block index ``phase + i * step``): tile ``t`` holds the
        samples ``bounds[t]:bounds[t + 1]``. Every window starts and stops
        on a bound; samples between windows form tiles no window uses.
    first : numpy.ndarray
        Each window's first tile (one entry per row).
    last : numpy.ndarray
        One past each window's last tile.
    """

    rows: np.ndarray
    phase: int
    bounds: np.ndarray
    first: np.ndarray
    last: np.ndarray

    @property
    def ntiles(self):
        """The number of tiles."""
        return len(self.bounds) - 1

    def region(self, step):
        """The slice of the block that holds the tiles' samples."""
        lo, hi = self.bounds[0], self.bounds[-1]
        return slice(self.phase + step * lo, self.phase + step * hi, step)


class SizeClass(NamedTuple):
    """The used tiles of one size on one axis (see :func:`_size_classes`).

    Attributes
    ----------
    tiles : numpy.ndarray
        Their indices, increasing.
    size : int
        Their common number of samples.
    take : slice or numpy.ndarray
        What selects their samples, in order, from the axis's region: a
        slice when the tiles are consecutive, else the sample indices.
    """

    tiles: np.ndarray
    size: int
    take: slice | np.ndarray


def _axis_phases(windows, origin):
    """Split one axis's windows by step phase; tile each phase.

    Parameters
    ----------
    windows : dask_localstats._grid.AxisWindows
        The windows of the block's centers on this axis.
    origin : int
        The block's first source index on this axis.

    Yields
    ------
    AxisTiling
        One per phase (start modulo the step) of the windows.
    """
    lo, hi, step = windows.lo - origin, windows.hi - origin, windows.step
    phases = lo % step
    for phase in np.unique(phases):
        rows = np.flatnonzero(phases == phase)
        start = (lo[rows] - phase) // step
        stop = (hi[rows] - phase + step - 1) // step
        bounds = np.unique(np.concatenate([start, stop]))
        yield AxisTiling(
            rows,
            int(phase),
            bounds,
            np.searchsorted(bounds, start),
            np.searchsorted(bounds, stop),
        )


def _offsets(values, low, dtype=np.intp):
    """``values - low`` in `dtype`, exact whenever the result fits.

    64-bit values are subtracted modulo 2**64, which is exact for results in
    range however far `values` and `low` are from zero.
    """
    dtype = np.dtype(dtype)
    if max(values.dtype.itemsize, dtype.itemsize) < 8:
        return np.subtract(values, low, dtype=np.intp).astype(dtype, copy=False)
    modulo = np.uint64(low % 2**64)
    difference = np.subtract(values, modulo, dtype=np.uint64, casting="unsafe")
    if dtype.kind in "iu" and dtype.itemsize == 8:
        return difference.view(dtype)  # two's complement: the same bits
    return difference.astype(dtype)


def _small_unsigned(dtype):
    """Whether values of `dtype` (8 or 16-bit unsigned) can index a table."""
    return dtype.kind == "u" and dtype.itemsize <= 2


def _raw_table(table, low, dtype):
    """`table` indexed by raw values of `dtype` (8 or 16 bits unsigned), or None.

    Saves subtracting `low` from every sample: the table is shifted by `low`
    and covers the whole dtype (masked samples may hold any value).
    """
    if table is None or not _small_unsigned(dtype):
        return None
    raw = np.zeros(1 << (8 * dtype.itemsize), dtype=table.dtype)
    raw[low : low + len(table)] = table
    return raw


def _count_dtype(most):
    """The narrowest unsigned dtype holding counts up to `most`.

    Tile and window counts of samples are at most `most`. Running sums over
    tiles (:func:`_window_sums`) may exceed it, but they wrap modulo the
    dtype's range, so their differences, the window totals, come out exact;
    light-sheet windows of 100 x 100 samples count in ``uint16``, a quarter
    of the memory traffic of ``int64``.
    """
    for dtype in (np.uint16, np.uint32):
        if most <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _used_tiles(axis):
    """Whether each tile of an :class:`AxisTiling` lies in some window."""
    delta = np.zeros(len(axis.bounds), dtype=np.intp)
    np.add.at(delta, axis.first, 1)
    np.add.at(delta, axis.last, -1)
    return np.cumsum(delta)[:-1] > 0


def _used_samples(axis):
    """Samples of one axis in a tile of some window, or None for all."""
    used = _used_tiles(axis)
    if used.all():
        return None
    return np.repeat(used, np.diff(axis.bounds))


class Band(NamedTuple):
    """Columns of single values between a first and a last that may hold more.

    Offset ``o`` (a value minus the block's least) is then in column
    ``clip(o, base, base + last) - base``: one clipping pass maps the
    samples, where other columns need a lookup table (:meth:`_Columns.mapping`).
    """

    base: int
    last: int


class _Words(NamedTuple):
    """The samples of a phase as fields of wider words, for a fast clip.

    With a step ``s`` on the last axis, ``s`` consecutive values of the
    block (unsigned, little-endian) read as one unsigned word of ``s``
    times their width hold one sample each, always in the same field:
    the samples ``block[..., x::s]`` are the field ``x % s`` of the words
    starting at ``x - x % s``. Getting the field (a shift or a mask) and
    clipping it are two passes over contiguous words, in their dtype:
    cheaper than one clip of the strided samples, which cannot use SIMD.
    """

    array: np.ndarray  # the words, one a sample, of the shape of the samples
    field: int  # which field of a word holds the sample
    bits: int  # the width of a field

    @classmethod
    def of(cls, block, region, step):
        """The words of ``block[region]``, or None where they do not apply."""
        dtype = block.dtype
        if dtype.kind != "u" or step not in (2, 4) or dtype.itemsize * step > 4:
            return None  # keys of up to 32 bits: np.bincount takes no uint64
        if np.dtype(f"<u{dtype.itemsize}") != dtype or not block.size:
            return None  # big-endian
        x = region[-1]
        start, stop = int(x.start), int(x.stop)  # Python ints: the words' dtype
        n, field = len(range(start, stop, step)), start % step
        start -= field
        if start + n * step > block.shape[-1] or block.strides[-1] != dtype.itemsize:
            return None  # the last word would reach past the block
        values = block[(*region[:-1], slice(start, start + n * step))]
        wide = np.dtype(f"<u{dtype.itemsize * step}")
        misaligned = values.ctypes.data % wide.itemsize
        if misaligned or any(st % wide.itemsize for st in values.strides[:-1]):
            return None
        return cls(values.view(wide), field, 8 * dtype.itemsize)

    def clip(self, part, band, low):
        """The samples ``part`` of the phase, clipped to `band` (offsets
        from `low`), in words."""
        words = self.array[part]
        shift = self.bits * self.field
        out = np.right_shift(words, shift) if shift else None
        if shift < 8 * words.dtype.itemsize - self.bits:  # fields above it
            mask = (1 << self.bits) - 1
            out = np.bitwise_and(words if out is None else out, mask, out=out)
        lowest = int(low + band.base)
        return np.clip(out, lowest, lowest + int(band.last), out=out)


class _Strip(NamedTuple):
    """A strip of a row of tiles, counted by one ``np.bincount`` a few rows
    at a time (:meth:`_PhaseTiles.histograms`)."""

    lo: int  # its first key, in the row's histograms
    hi: int  # one past its last
    across: tuple  # its slice of axis 1 (none for 1-D blocks)
    rows: int  # rows of samples a call counts
    offsets: np.ndarray  # what each sample's key adds to its column


class _PhaseTiles:
    """The samples of one step phase of a block, tile by tile.

    The tile histograms path and the moments path read the samples through
    this class, one row of tiles (along axis 0) at a time, each sample
    labelled with its flat tile index, or large tiles one tile at a time.
    Samples outside every window (gaps between windows) and masked ones are
    left out. Values are offset by `low`.

    Parameters
    ----------
    block, mask : numpy.ndarray
        The block and its mask (or None).
    tiling : tuple of AxisTiling
        The phase's tiling, one per axis.
    steps : tuple of int
        The grid's step per axis.
    low : int
        Subtracted from every value (the block's least kept value).
    most : int, optional
        The most samples a window holds (default: the block's size), which
        sets the dtype of the histograms' counts (:func:`_count_dtype`).
    """

    def __init__(self, block, mask, tiling, steps, low, most=None):
        region = tuple(axis.region(s) for axis, s in zip(tiling, steps, strict=True))
        self.sub, self.low, self.tiling = block[region], low, tiling
        self._block, self._region, self._step = block, region, steps[-1]
        self.most = block.size if most is None else most
        self.count = _count_dtype(self.most)
        self.masked = None if mask is None else mask[region].astype(bool, copy=False)
        self.shape = tuple(axis.ntiles for axis in tiling)
        # tile bounds per axis, within the samples
        self.edges = [axis.bounds - axis.bounds[0] for axis in tiling]
        self.used = [np.flatnonzero(_used_tiles(axis)) for axis in tiling]

    @functools.cached_property
    def words(self):
        """The samples as :class:`_Words`, or None: made when a band clips."""
        return _Words.of(self._block, self._region, self._step)

    @property
    def per_tile(self):
        """Samples a tile holds, on average."""
        return self.sub.size / max(math.prod(self.shape), 1)

    @functools.cached_property
    def keep(self):
        """Which samples count (unmasked, and in some window), or None: all.

        Only the strips and the sums read it; tiles counted alone skip the
        gaps between windows and apply the mask themselves.
        """
        keep = self.masked
        for d, axis in enumerate(self.tiling):
            used = _used_samples(axis)
            if used is not None:
                shape = [1] * self.sub.ndim
                shape[d] = len(used)
                used = np.broadcast_to(used.reshape(shape), self.sub.shape)
                keep = used if keep is None else keep & used
        return keep

    @functools.cached_property
    def inner(self):
        """Flat tile index of each sample along axes 1.. (the strips go along
        axis 0 a row of tiles at a time)."""
        inner = np.zeros((1,) * self.sub.ndim, dtype=np.intp)
        for d, axis in enumerate(self.tiling[1:], start=1):
            bounds = axis.bounds
            index = np.searchsorted(bounds, np.arange(bounds[0], bounds[-1]), "right")
            shape = [1] * self.sub.ndim
            shape[d] = len(index)
            inner = inner * self.shape[d] + (index - 1).reshape(shape)
        return inner

    def histograms(self, table, ncols, check=None):
        """Histograms ``(*shape, ncols)`` of the samples' columns, per tile.

        A sample of value ``v`` counts in column ``table[v - low]`` of its
        tile (column ``v - low`` when `table` is None; as a :class:`Band`
        says, when it is one). One
        ``np.bincount`` per strip of a row of tiles (a few tiles along axis
        1, so that its counts stay in cache, and about :data:`_SAMPLES`
        samples, so that its keys do), on keys ``tile * ncols + column``
        (``uint16`` or ``uint32`` when they fit, the width of the
        :class:`_Words` where a band clips them); tiles of at least
        :data:`_WHOLE` samples one call a tile (:meth:`_by_tile`). Counts
        are of the narrowest dtype that holds a window's
        (:func:`_count_dtype`). `check`, if given, is called with the least
        and greatest kept value of each strip (or tile) first.
        """
        if self._whole():
            return self._by_tile(table, ncols, check)
        across, stride = self._across
        per_row = across * stride
        group = max(1, _STRIP // (stride * ncols))
        span = min(group, across) * stride * ncols  # keys of a strip, and one
        key, words = self._key(span, table)
        keys_of, shift = self._keys(table, key, ncols)
        strips = self._strips(key, ncols, group, shift)
        out = np.empty((self.shape[0], per_row * ncols), dtype=self.count)
        for t, strip in itertools.product(range(self.shape[0]), strips):
            first, last = self.edges[0][t], self.edges[0][t + 1]
            empty = strip.hi - strip.lo  # the key of samples left out
            total = 0
            for r in range(first, last, strip.rows):
                part = (slice(r, min(r + strip.rows, last)), *strip.across)
                values = self.sub[part]
                keep = None if self.keep is None else self.keep[part]
                if check is not None:
                    kept = values if keep is None else values[keep]
                    if kept.size:
                        check(int(kept.min()), int(kept.max()))
                if words is None:
                    keys = keys_of(values)
                else:  # the same keys, from the words
                    keys = words.clip(part, table, self.low)
                keys += strip.offsets
                if keep is not None:
                    keys[~keep] = empty
                total += np.bincount(keys.ravel(), minlength=empty + 1)[:-1]
            out[t, strip.lo : strip.hi] = total
        return out.reshape((*self.shape, ncols))

    @property
    def _across(self):
        """The tiles along axis 1 (1 for 1-D blocks), and the tiles of a row
        of tiles per tile of axis 1."""
        across = self.shape[1] if len(self.shape) > 1 else 1
        return across, math.prod(self.shape[1:]) // across

    def _strips(self, key, ncols, group, shift):
        """The strips of :meth:`histograms` along axis 1, `group` tiles wide,
        the same for every row of tiles: each with the offsets of its
        samples' keys (``tile * ncols``, less the strip's first key and
        `shift`, modulo the range of `key`, like the values' keys)."""
        across, stride = self._across
        bits = 8 * np.dtype(key).itemsize
        inner = self.inner.astype(key) * key(ncols)
        strips = []
        for a in range(0, across, group):
            b = min(a + group, across)
            lo, hi = stride * ncols * a, stride * ncols * b
            part, plane = (), math.prod(self.sub.shape[1:])  # samples a row
            if len(self.shape) > 1:
                part = (slice(self.edges[1][a], self.edges[1][b]),)
                width = int(self.edges[1][b] - self.edges[1][a])
                plane = width * math.prod(self.sub.shape[2:])
            offsets = inner[(slice(None), *part)] - key((lo + shift) % (1 << bits))
            # runs of at least as many samples as counts: each call zeroes those
            rows = max(1, max(_SAMPLES, 4 * (hi - lo)) // max(plane, 1))
            strips.append(_Strip(lo, hi, part, rows, offsets))
        return strips

    def _key(self, span, table):
        """The dtype of keys below `span`, and the :class:`_Words` to clip
        (None: the samples themselves)."""
        words = self.words if isinstance(table, Band) else None
        if words is not None and span < np.iinfo(words.array.dtype).max:
            return words.array.dtype.type, words
        key = next(k for k in (np.uint16, np.uint32, np.intp) if span < np.iinfo(k).max)
        return key, None

    def _whole(self):
        """Whether every used tile holds at least :data:`_WHOLE` samples."""
        smallest = [
            np.diff(edges)[used].min() if len(used) else 0
            for edges, used in zip(self.edges, self.used, strict=True)
        ]
        return math.prod(int(n) for n in smallest) >= _WHOLE

    def _by_tile(self, table, ncols, check):
        """:meth:`histograms` by one ``np.bincount`` a tile (large tiles).

        A tile of that many samples needs no tile index in its keys, and
        tiles no window uses are skipped; with `table` None, unsigned values
        of up to 16 bits are counted as they are (counts below `low` are
        dropped), saving a pass over the samples.
        """
        out = np.zeros((*self.shape, ncols), dtype=self.count)
        as_is = table is None and _small_unsigned(self.sub.dtype)
        key = np.uint32 if ncols < 2**32 else np.intp
        keys_of, shift = (None, 0) if as_is else self._keys(table, key, ncols)
        for index in itertools.product(*self.used):
            box = tuple(
                slice(edges[i], edges[i + 1])
                for edges, i in zip(self.edges, index, strict=True)
            )
            values = self.sub[box]
            if self.masked is not None:
                values = values[self.masked[box]]
            if not values.size:
                continue
            if check is not None:
                check(int(values.min()), int(values.max()))
            if as_is:
                counts = np.bincount(values.ravel(), minlength=self.low + ncols)
                out[index] = counts[self.low :]
            else:
                keys = keys_of(values)
                if shift:
                    keys -= key(shift % 2 ** (8 * np.dtype(key).itemsize))
                out[index] = np.bincount(keys.ravel(), minlength=ncols)
        return out

    def _keys(self, table, key, ncols):
        """What maps sample values to their columns, in the dtype `key`,
        and what to subtract from its keys after (modulo the dtype's range).

        One column a value (`table` None) maps 8 and 16-bit unsigned
        values through a table too: one pass, where subtracting `low` and
        casting takes three. A :class:`Band` clips the values (one pass,
        cheaper than a lookup) and leaves the subtraction to the caller,
        who folds it into the tile offsets.
        """
        if isinstance(table, Band):  # values of up to 32 bits (_Columns.mapping)
            lowest = self.low + table.base  # values the dtype holds: exact
            highest = lowest + table.last

            def clipped(values):
                out = np.empty(values.shape, key)
                return np.clip(values, lowest, highest, out=out, casting="unsafe")

            return clipped, lowest
        if table is None and _small_unsigned(self.sub.dtype):
            table = np.arange(min(ncols, (1 << 8 * self.sub.dtype.itemsize) - self.low))
        if table is not None:  # its columns are below `ncols`: they fit
            table = table.astype(key, copy=False)
        raw = _raw_table(table, self.low, self.sub.dtype)
        if raw is not None:
            return lambda values: raw.take(values).astype(key, copy=False), 0
        if table is not None:
            return lambda values: table.take(
                _offsets(values, self.low), mode="clip"
            ).astype(key, copy=False), 0
        return lambda values: _offsets(values, self.low, key), 0

    def sums(self, span=None):
        """Kept counts and sums of ``values`` and ``values**2`` per tile.

        Returns an int64 array ``(*shape, 3)``. Rows of tiles (along axis
        0) are summed a group of about :data:`_SUMS` samples at a time, over
        the tiles of each axis in turn (``reduceat``); where every sample is
        kept, the counts are the tiles' sizes. Where the kept values span
        fewer than 2**16 values (`span`, the greatest less the least), their
        offsets are taken modulo 2**16, exact in ``uint16``, and their
        squares in ``uint32``: passes over a quarter and a half of int64's
        bytes.
        """
        out = np.empty((*self.shape, 3), dtype=np.int64)
        if self.keep is None:
            sizes = [np.diff(edges) for edges in self.edges]
            out[..., 0] = functools.reduce(np.multiply.outer, sizes)
        rows = self.edges[0]
        deepest = int(np.diff(rows).max(initial=1)) * math.prod(self.sub.shape[1:])
        group = max(1, _SUMS // max(deepest, 1))
        for t in range(0, self.shape[0], group):
            tiles = slice(t, min(t + group, self.shape[0]))
            part = slice(rows[tiles.start], rows[tiles.stop])
            if span is not None and span < 2**16:  # kept offsets: exact modulo 2**16
                low = self.low % 2**16
                x = np.subtract(self.sub[part], low, dtype=np.uint16, casting="unsafe")
                square = np.uint32
            else:
                x, square = _offsets(self.sub[part], self.low, np.int64), np.int64
            counted = []
            if self.keep is not None:
                keep = self.keep[part]
                x[~keep] = 0
                counted = [(0, keep)]
            squares = np.square(x, dtype=square)
            bounds = rows[tiles.start : tiles.stop + 1] - part.start
            for k, values in [*counted, (1, x), (2, squares)]:
                total = _row_sums(values, bounds)
                for d, edges in enumerate(self.edges[1:], start=1):
                    total = np.add.reduceat(total, edges[:-1], axis=d)
                out[tiles, ..., k] = total
        return out


def _row_sums(values, bounds):
    """Sums (int64) of `values` over axis 0 between consecutive `bounds`.

    One reduction where the runs are of one length (``reduceat`` along the
    first axis runs several times slower than ``sum``).

    Examples
    --------
    >>> _row_sums(np.arange(6).reshape(3, 2), np.array([0, 1, 3])).tolist()
    [[0, 1], [6, 8]]
    """
    sizes = np.diff(bounds)
    if (sizes == sizes[0]).all():
        runs = values.reshape(len(sizes), int(sizes[0]), *values.shape[1:])
        return runs.sum(axis=1, dtype=np.int64)
    sums = [
        values[a:b].sum(axis=0, dtype=np.int64) for a, b in itertools.pairwise(bounds)
    ]
    return np.stack(sums)


def _size_classes(axis):
    """The tiles of an :class:`AxisTiling` that some window uses, by size.

    Yields
    ------
    SizeClass
        One per tile size, in increasing size.
    """
    bounds = axis.bounds
    used = np.flatnonzero(_used_tiles(axis))
    sizes = np.diff(bounds)[used]
    for size in np.unique(sizes):
        tiles = used[sizes == size]
        begin = bounds[tiles] - bounds[0]
        if tiles[-1] - tiles[0] == len(tiles) - 1:
            take = slice(begin[0], begin[0] + len(tiles) * size)
        else:
            take = (begin[:, None] + np.arange(size)).ravel()
        yield SizeClass(tiles, int(size), take)


class _SortedTiles:
    """The kept samples of one step phase of a block, sorted tile by tile.

    The data of the sorted tiles path. Each tile's samples are copied into
    one run of a flat buffer, `values`, and sorted there (``ndarray.sort``
    releases the GIL). Tiles of equal shape (one :class:`SizeClass` per
    axis) are gathered together: a reshape and a transpose of the block when
    they are consecutive. Masked samples become the dtype's maximum and are
    counted out, so a tile's kept values are the first ``kept[tile]`` of its
    run, which begins at ``start[tile]``.

    Parameters
    ----------
    block, mask : numpy.ndarray
        The block and its mask (or None).
    tiling : tuple of AxisTiling
        The phase's tiling, one per axis.
    steps : tuple of int
        The grid's step per axis.
    """

    def __init__(self, block, mask, tiling, steps):
        region = tuple(axis.region(s) for axis, s in zip(tiling, steps, strict=True))
        sub = block[region]
        keep = None if mask is None else mask[region].astype(bool, copy=False)
        self.shape = tuple(axis.ntiles for axis in tiling)
        total = math.prod(self.shape)
        # one more tile, empty, for the padding of _window_tiles
        self.start = np.zeros(total + 1, dtype=np.intp)
        self.kept = np.zeros(total + 1, dtype=np.intp)
        # every combination of one size class per axis: tiles of one shape
        groups = list(itertools.product(*(_size_classes(axis) for axis in tiling)))
        size = sum(math.prod(len(c.tiles) * c.size for c in group) for group in groups)
        self.values = np.empty(size, dtype=block.dtype)
        sentinel = np.iinfo(block.dtype).max
        offset, ndim = 0, block.ndim
        for group in groups:
            index = tuple(c.take for c in group)
            counts = tuple(len(c.tiles) for c in group)
            sizes = tuple(c.size for c in group)
            split = tuple(x for pair in zip(counts, sizes, strict=True) for x in pair)
            order = (*range(0, 2 * ndim, 2), *range(1, 2 * ndim, 2))
            run = math.prod(sizes)
            part = self.values[offset : offset + math.prod(counts) * run]
            part = part.reshape(*counts, *sizes)
            np.copyto(part, _gather(sub, index).reshape(split).transpose(order))
            part = part.reshape(-1, run)
            tiles = np.ravel_multi_index(
                np.ix_(*(c.tiles for c in group)), self.shape
            ).ravel()
            self.start[tiles] = offset + run * np.arange(len(tiles))
            if keep is None:
                self.kept[tiles] = run
            else:
                kept = _gather(keep, index).reshape(split).transpose(order)
                kept = kept.reshape(-1, run)
                part[~kept] = sentinel
                self.kept[tiles] = kept.sum(axis=1)
            part.sort(axis=1)
            offset += part.size
        self.depth = int(self.kept.max()).bit_length()

    def count(self, tiles, values):
        """How many kept values of each tile in `tiles` are <= `values`."""
        start, kept = self.start[tiles], self.kept[tiles]
        found = np.zeros(np.shape(tiles), dtype=np.intp)
        for bit in reversed(range(self.depth)):  # binary search, all at once
            trial = found + (1 << bit)
            inside = trial <= kept
            probe = self.values.take(np.where(inside, start + trial - 1, 0))
            found = np.where(inside & (probe <= values), trial, found)
        return found

    def select(self, tiles, low, high):
        """A selector of order statistics of windows made of tiles.

        `tiles` holds each window's tile ids (rows, as from
        :func:`_window_tiles`); `low` and `high` bound the kept values.
        A rank is found by bisection on the value, counting the values not
        above the midpoint in the window's tiles. The next rank (NumPy's
        interpolation asks for ranks in pairs) is the same value if it
        repeats, else the smallest larger value among the tiles' next ones.
        """
        bits = (int(high) - int(low)).bit_length()
        dtype = self.values.dtype
        last = {}

        def select(rank):
            if last and np.isin(rank - last["rank"], (0, 1)).all():
                return self._next(tiles, rank, last["value"], last["below"])
            lo = np.full(len(rank), low, dtype=dtype)
            hi = np.full(len(rank), high, dtype=dtype)
            for _ in range(bits):
                mid = (lo & hi) + ((lo ^ hi) >> 1)  # floor of the mean, no overflow
                above = self.count(tiles, mid[:, None]).sum(axis=1) > rank
                hi = np.where(above, mid, hi)
                lo = np.where(above, lo, mid + 1)
            last.update(rank=rank, value=lo, below=self.count(tiles, lo[:, None]))
            return lo

        return select

    def _next(self, tiles, rank, value, below):
        """Values of `rank` given those of the ranks just under them."""
        beyond = below < self.kept[tiles]
        following = self.values.take(np.where(beyond, self.start[tiles] + below, 0))
        following = np.where(beyond, following, np.iinfo(following.dtype).max)
        repeats = below.sum(axis=1) > rank
        return np.where(repeats, value, following.min(axis=1))


def _gather(array, index):
    """``array`` restricted to `index` (a slice or indices) on every axis."""
    for d, take in enumerate(index):
        array = array[(slice(None),) * d + (take,)]
    return array


def _window_sums(tiles, tiling):
    """Sum per-tile integers over each window's box of tiles.

    `tiles` has the tiling's shape, then any trailing axes. Axis by axis:
    running sums over the tiles, then the difference between each window's
    last and first tile (two slices of the running sums where the windows
    are evenly spaced and of one width, as windows away from the image's
    borders are). Integer sums wrap modulo the dtype's range, so every
    window total that fits in the dtype is exact.
    """
    for d, axis in enumerate(tiling):
        if _one_tile_each(axis):
            continue  # nothing to sum
        moved = np.moveaxis(tiles, d, 0)
        running = np.empty((len(moved) + 1, *moved.shape[1:]), dtype=moved.dtype)
        running[0] = 0
        if len(moved) <= _LOOPED:  # whole slices at a time: faster than cumsum
            for i, part in enumerate(moved):
                np.add(running[i], part, out=running[i + 1])
        else:
            np.cumsum(moved, axis=0, out=running[1:])
        tiles = np.moveaxis(_differences(running, axis.first, axis.last), 0, d)
    return tiles


def _one_tile_each(axis):
    """Whether each window of `axis` is one tile, in order."""
    return np.array_equal(axis.first, np.arange(axis.ntiles)) and np.array_equal(
        axis.last, axis.first + 1
    )


def _differences(running, first, last):
    """``running[last] - running[first]``: for the evenly spaced windows of
    one width (those away from the image's borders), of two slices of
    `running`, which copy nothing (:func:`_regular_run`)."""
    out = np.empty((len(first), *running.shape[1:]), running.dtype)
    lo, hi = _regular_run(first, last)
    if hi > lo:
        step = int(first[lo + 1] - first[lo])
        width, start = int(last[lo] - first[lo]), int(first[lo])
        stop = start + step * (hi - lo)
        above = running[start + width : stop + width : step]
        np.subtract(above, running[start:stop:step], out=out[lo:hi])
    for part in (slice(0, lo), slice(hi, None)):
        np.subtract(running[last[part]], running[first[part]], out=out[part])
    return out


def _regular_run(first, last):
    """The longest range ``lo:hi`` of at least three windows evenly spaced
    (increasing) and of one width, or ``(0, 0)``."""
    if len(first) < 3:
        return 0, 0
    steps, widths = np.diff(first), last - first
    # window i + 2 continues the run of windows i and i + 1
    same = (steps[1:] == steps[:-1]) & (steps[1:] > 0)
    same &= (widths[1:-1] == widths[:-2]) & (widths[2:] == widths[1:-1])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], same.astype(np.int8), [0]])))
    if not len(edges):
        return 0, 0
    starts, stops = edges[::2], edges[1::2]
    best = int(np.argmax(stops - starts))
    return int(starts[best]), int(stops[best]) + 2


def _window_tiles(tiling):
    """Flat tile ids of each window's tiles, ``(windows, max tiles)``.

    Windows with fewer tiles are padded with the id ``T`` (one past the last
    tile), which callers map to an empty tile (or histogram).
    """
    ndim = len(tiling)
    total = math.prod(axis.ntiles for axis in tiling)
    flat, invalid = 0, False
    for d, axis in enumerate(tiling):
        width = int((axis.last - axis.first).max())
        index = axis.first[:, None] + np.arange(width)
        shape = [1] * (2 * ndim)
        shape[d], shape[ndim + d] = index.shape
        flat = flat * axis.ntiles + index.reshape(shape)
        invalid = invalid | (index >= axis.last[:, None]).reshape(shape)
    flat = np.where(invalid, total, flat)
    windows = math.prod(len(axis.rows) for axis in tiling)
    return flat.reshape(windows, -1)


def _fine_shift(nbins):
    """log2 of the fine bins per coarse bin: about the square root of `nbins`."""
    return max(4, math.ceil(math.log2(max(nbins, 2)) / 2))


class _Columns:
    """Histogram columns over the kept values, split where ranks fall.

    The columns partition the offsets ``0 .. nbins - 1`` (values minus the
    block's least kept value) into runs: at first runs of about
    ``sqrt(nbins)`` values, then :meth:`refine` splits the runs some wanted
    rank falls in into single values, and :meth:`narrow` merges those
    below and above the ranks into one column each (a :class:`Band` where
    the columns between are all single values, :meth:`mapping`). One
    object serves all the phases of a block, whose windows' percentiles
    are alike, so after the first phase one histogram usually suffices.

    Parameters
    ----------
    nbins : int
        The number of offsets.
    budget : int
        The most columns a histogram may have (tiles times columns must fit
        the memory budget).
    """

    def __init__(self, nbins, budget, single=False):
        self.nbins, self.budget = nbins, budget
        self.run = 1 if single else 1 << _fine_shift(nbins)  # values a run
        self.edges = np.arange(0, nbins, self.run)
        self.estimated = single  # whether a sample of the block split them
        self.short = False  # whether the last refine ran out of budget

    @property
    def single(self):
        """Whether every column holds a single value."""
        return len(self.edges) == self.nbins

    def table(self):
        """The column of each offset (uint32)."""
        widths = np.diff(self.edges, append=self.nbins)
        return np.repeat(np.arange(len(self.edges), dtype=np.uint32), widths)

    def mapping(self, dtype):
        """What maps offsets of values of `dtype` to columns, for
        :meth:`_PhaseTiles.histograms`: None (single values), a
        :class:`Band` (values of up to 32 bits), or :meth:`table`."""
        if self.single:
            return None
        widths = np.diff(self.edges, append=self.nbins)
        if np.dtype(dtype).itemsize <= 4 and (widths[1:-1] == 1).all():
            base = int(self.edges[1]) - 1 if len(self.edges) > 1 else 0
            return Band(base, len(self.edges) - 1)
        return self.table()

    def refine(self, hit):
        """Split the columns `hit` (indices) into single values, as the budget allows.

        Returns whether any column was split. Columns are split in the order
        given; one that does not fit whole is split in as many equal parts
        as fit (at least two), and :attr:`short` notes that the budget ran
        out. A column wider than a run (merged by :meth:`narrow`) goes back
        to the runs it holds first.
        """
        widths = np.diff(self.edges, append=self.nbins)
        room, added = self.budget - len(self.edges), []
        self.short = int((widths[hit] - 1).sum()) > room
        for column in hit[widths[hit] > self.run]:  # merged: back into runs first
            start = self.edges[column]
            runs = np.arange(start - start % self.run, start + widths[column], self.run)
            added.append(runs[runs > start])
        for column in hit[(widths[hit] > 1) & (widths[hit] <= self.run)]:
            parts = max(2, min(int(widths[column]), room + 1))
            start = self.edges[column]
            added.append(start + np.arange(1, parts) * widths[column] // parts)
            room -= parts - 1
            if room <= 0:
                break
        if added:
            self.edges = np.union1d(self.edges, np.concatenate(added))
        return bool(added)

    def narrow(self, lo, hi, per_tile):
        """Merge the columns below offset `lo` into one, and those above `hi`.

        The block's next tilings then sum fewer columns per window; a rank
        that falls outside ``lo..hi`` after all splits its merged column
        back into runs (:meth:`refine`). Runs within ``lo..hi`` are split
        into single values too, making a :class:`Band`, where that adds at
        most a third of the samples of a tile (`per_tile`) in columns: a
        column costs each tile some three operations in the windows' sums,
        and a band saves each sample about one, a lookup.
        """
        lo, hi = max(int(lo), 0), min(int(hi), self.nbins - 1)
        inside = self.edges[(self.edges > lo) & (self.edges <= hi)]
        added = hi - lo - len(inside)
        if added <= per_tile / 3 and len(self.edges) + added <= self.budget:
            inside = np.arange(lo + 1, hi + 1)
        bounds = [[0], [lo] if lo > 0 else [], inside]
        bounds.append([hi + 1] if hi + 1 < self.nbins else [])
        self.edges = np.concatenate(bounds).astype(self.edges.dtype)


def _thinned(tiling, steps):
    """The tiling of about 1 / :data:`_THIN` of its samples, and its steps.

    Every ``k``-th sample is kept along the leading axes (skipping whole
    rows of the block), ``k`` a power of two at most half the axis's
    smallest used tile, so that every tile keeps samples. Returns None when
    no axis can be thinned.
    """
    axes, steps, left = list(tiling), list(steps), _THIN
    for d, axis in enumerate(tiling[:-1] if len(tiling) > 1 else tiling):
        smallest = np.diff(axis.bounds)[_used_tiles(axis)].min()
        k = 1
        while k * 2 <= left and k * 4 <= smallest:
            k *= 2
        if k > 1:
            # thinned sample j is sample k * j: tile t keeps ceil(bound / k)..
            axes[d] = axis._replace(bounds=-(-axis.bounds // k))
            steps[d] *= k
            left //= k
    return None if left == _THIN else (tuple(axes), tuple(steps))


def _cumulative(samples, tiling, columns):
    """Each window's cumulative counts over `columns`, and its kept count."""
    windows = math.prod(len(axis.rows) for axis in tiling)
    table = columns.mapping(samples.sub.dtype)
    counts = samples.histograms(table, len(columns.edges))
    counts = _window_sums(counts, tiling)
    total = np.int32 if samples.most < 2**31 else np.int64  # window totals
    # the sums are a strided view: cumsum reads them once into C order
    cumulative = np.empty(counts.shape, total)
    np.cumsum(counts, axis=-1, dtype=total, out=cumulative)
    cumulative = cumulative.reshape(windows, -1)
    return cumulative, cumulative[:, -1].astype(np.int64)


def _column_of(cumulative, rank):
    """The column holding each window's value of `rank`: the first whose
    cumulative count exceeds it (the number of columns where none does)."""
    above = cumulative > rank.astype(cumulative.dtype)[:, None]
    # the counts never decrease along a row: the last column tells if any does
    return np.where(above[:, -1], np.argmax(above, axis=1), cumulative.shape[1])


def _hit_columns(cumulative, n, ranks):
    """Each rank's column per window, and those of some window not empty."""
    hits = [_column_of(cumulative, rank) for rank in ranks]
    return hits, np.unique(np.concatenate([h[n > 0] for h in hits]))


def _percentile_select(samples, tiling, statistic, columns, dtype):
    """Kept counts per window and a selector of their order statistics.

    Each pass counts tile histograms over `columns` (a :class:`_Columns`)
    and sums them per window; a rank falls in the column where the
    window's cumulative count exceeds it. Columns holding a rank and more
    than one value are split, and the pass repeated, until every wanted
    rank sits in a single-value column. Where the columns' budget cannot
    hold the splits, each pass splits a few: after :data:`_PASSES` passes
    short of budget (the windows' ranks fall on too many values), None, and
    sorted tiles take over.
    """
    short = 0
    while True:
        cumulative, n = _cumulative(samples, tiling, columns)
        ranks = statistic.ranks(n)
        hits, hit = _hit_columns(cumulative, n, ranks)
        if not columns.refine(hit):
            break
        short += columns.short
        if short >= _PASSES:
            return None
    edges = np.append(columns.edges, 0)  # empty windows: any value
    values = {
        rank.tobytes(): _offsets(edges[h], -samples.low, dtype)
        for rank, h in zip(ranks, hits, strict=True)
    }
    if len(hit) and columns.run > 1:  # the next tilings' ranks fall near these
        lo, hi = int(edges[hit[0]]), int(edges[hit[-1]])
        margin = max(_MARGIN, (hi - lo) // 4)
        columns.narrow(lo - margin, hi + margin, samples.per_tile)
    return n, lambda rank: values[rank.tobytes()]


def _estimate(samples, tiling, statistic, columns, per_tile):
    """Split the columns where a sample of the windows puts their ranks.

    `samples` and `tiling` are a thinned tiling's (:func:`_thinned`): a
    fraction of each window's samples, whose order statistics estimate the
    window's. The columns holding the wanted ranks, give or take three
    standard deviations of a sampled quantile (``1.5 * sqrt(n)`` ranks of
    ``n`` samples), are split at the cost of a fraction of a pass, so the
    exact passes (:func:`_percentile_select`) usually need only one.
    """
    cumulative, n = _cumulative(samples, tiling, columns)
    ranks, kept = statistic.ranks(n), n > 0
    _, hits = _hit_columns(cumulative, n, ranks)
    spread = np.ceil(1.5 * np.sqrt(n)).astype(np.int64) + 1
    last = np.maximum(n - 1, 0)
    marks = np.zeros(len(columns.edges) + 1, dtype=np.intp)
    for rank in ranks:
        lo = _column_of(cumulative, np.clip(rank - spread, 0, last))[kept]
        hi = _column_of(cumulative, np.clip(rank + spread, 0, last))[kept]
        np.add.at(marks, lo, 1)
        np.add.at(marks, hi + 1, -1)
    near = np.setdiff1d(np.flatnonzero(np.cumsum(marks)[:-1] > 0), hits)
    split = np.concatenate([hits, near])
    if not len(split):
        return
    bounds = np.append(columns.edges, columns.nbins)
    lo, hi = int(bounds[split.min()]), int(bounds[split.max() + 1]) - 1
    # the columns holding the estimates first, should the budget run short
    columns.refine(split)
    columns.narrow(lo, hi, per_tile)


def _block_phases(origin, grid, start, stop):
    """The tilings of a block, one per combination of the axes' step phases.

    Returns
    -------
    list of tuple of AxisTiling
        Each a tiling: one :class:`AxisTiling` per axis. Every window of the
        block's centers lies in exactly one of them.
    """
    axes = [
        list(_axis_phases(grid.windows(d, start[d], stop[d]), origin[d]))
        for d in range(grid.ndim)
    ]
    return list(itertools.product(*axes))


def _kept_range(block, mask):
    """The least and greatest kept values of a block, as ints (0, 0 if none)."""
    kept = block if mask is None else block[mask.astype(bool, copy=False)]
    return (int(kept.min()), int(kept.max())) if kept.size else (0, 0)


def tile_reduce(
    block, origin, grid, start, stop, statistic, dtype, mask, histogram, sort=True
):
    """Window statistics of an integer block by tiles, or None.

    Local histograms and percentiles take the tile histograms path;
    percentiles of blocks whose kept values span more than ``_MAX_TABLE``
    values take sorted tiles, unless not `sort`. The whole block is
    declined when the first tile histograms of some tiling would hold more
    entries than the block has voxels (and more than ``_MAX_ENTRIES``):
    then the gathering kernel of :mod:`dask_localstats._kernels` is
    cheaper.

    Parameters
    ----------
    block, origin, grid, start, stop, dtype, mask
        As for :func:`dask_localstats._kernels.reduce_block` (the grid has
        no footprint, the block is of integers).
    statistic : dask_localstats._kernels.Percentile or Histogram
        The statistic.
    histogram : bool
        Whether `statistic` is a Histogram.
    sort : bool
        Whether sorted tiles may be taken (else the block is declined).

    Returns
    -------
    tuple of numpy.ndarray or None
        ``(values, kept counts)`` of the windows of centers ``start:stop``,
        or None when declined.
    """
    # a view of an array in memory, which NumPy reduces and copies row by
    # row, is copied once (what a read from storage would have allocated)
    block = np.ascontiguousarray(block)
    tilings = _block_phases(origin, grid, start, stop)
    budget = max(block.size, _MAX_ENTRIES)
    most = min(grid.full_count, block.size)  # samples a window holds, at most
    low, high = (0, statistic.max_bin - 1) if histogram else _kept_range(block, mask)
    nbins = high - low + 1
    columns = None  # sorted tiles
    tabled = histogram or nbins <= _MAX_TABLE  # else sorted tiles
    if not (tabled or sort):
        return None
    if tabled:
        tiles = max(math.prod(axis.ntiles for axis in tiling) for tiling in tilings)
        first = nbins if histogram else ((nbins - 1) >> _fine_shift(nbins)) + 1
        if tiles * first > budget:
            return None
        if not histogram:
            # where their window sums cost less than an estimate would
            single = tiles * nbins * _SINGLE <= block.size
            columns = _Columns(nbins, budget // tiles, single)
    shape = tuple(b - a for a, b in zip(start, stop, strict=True))
    out = np.zeros(shape + statistic.fshape, dtype=dtype)
    counts = np.zeros(shape, dtype=np.int64)
    for tiling in tilings:
        rows = np.ix_(*(axis.rows for axis in tiling))
        if histogram:
            samples = _PhaseTiles(block, mask, tiling, grid.step, low, most)
            histograms = samples.histograms(None, nbins, statistic.check_range)
            sums = _window_sums(histograms, tiling)
            out[rows] = sums
            counts[rows] = sums.sum(axis=-1)
            continue
        kept = (low, high)
        found = _tiling_percentiles(
            block, mask, tiling, grid.step, statistic, kept, columns, most
        )
        if found is None and not sort:  # the columns' budget is short
            return None
        if found is None:  # sorted tiles, from this tiling on
            columns = None
            found = _tiling_percentiles(
                block, mask, tiling, grid.step, statistic, kept, None, most
            )
        out[rows], counts[rows] = found
    return out, counts


def _tiling_percentiles(
    block, mask, tiling, steps, statistic, kept_range, columns, most
):
    """Percentiles and kept counts of the windows of one tiling.

    Parameters
    ----------
    block, mask : numpy.ndarray
        The block and its mask (or None).
    tiling : tuple of AxisTiling
        The tiling, one per axis.
    steps : tuple of int
        The grid's step per axis.
    statistic : dask_localstats._kernels.Percentile
        The percentiles.
    kept_range : tuple of int
        The least and greatest kept values of the block.
    columns : _Columns or None
        The columns of the tile histograms, shared by the block's tilings;
        None for sorted tiles.
    most : int
        The most samples a window holds.

    Returns
    -------
    values : numpy.ndarray
        ``(*windows, *fshape)``, as ``statistic.combine`` gives them.
    counts : numpy.ndarray
        Kept voxels per window, ``windows``.

    None where the columns' budget is short (see :func:`_percentile_select`).
    """
    low, high = kept_range
    if columns is None:
        tiles = _SortedTiles(block, mask, tiling, steps)
        ids = _window_tiles(tiling)
        n = tiles.kept[ids].sum(axis=1)
        select = tiles.select(ids, low, high)
    else:
        samples = _PhaseTiles(block, mask, tiling, steps, low, most)
        thin = None if columns.estimated else _thinned(tiling, steps)
        if thin is not None:
            sample = _PhaseTiles(block, mask, *thin, low, most)
            _estimate(sample, thin[0], statistic, columns, samples.per_tile)
        columns.estimated = True
        selected = _percentile_select(samples, tiling, statistic, columns, block.dtype)
        if selected is None:
            return None
        n, select = selected
    windows = tuple(len(axis.rows) for axis in tiling)
    values = statistic.combine(select, n).reshape(windows + statistic.fshape)
    return values, n.reshape(windows)


def _moment(n, s1, s2, low, moment):
    """Each window's mean or variance from its exact sums, rounded once.

    The mean is ``(low n + S1) / n``, the variance ``(n S2 - S1^2) / n^2``
    (`n` positive, S1 and S2 the sums of the values offset by `low` and of
    their squares). Where numerator and denominator stay below 2**53 they
    are exact in int64 and in float64, and one IEEE division rounds the
    quotient, as Python's integer division does (the same bits); else the
    integers are Python's, exact however large.

    Examples
    --------
    >>> n, s1, s2 = np.array([3]), np.array([3]), np.array([5])
    >>> _moment(n, s1, s2, 10, "mean"), _moment(n, s1, s2, 10, "var")
    (array([11.]), array([0.66666667]))
    """
    if not n.size:
        return n.astype(np.float64)
    most = int(n.max())
    top = most * max(1, abs(low) + int(np.abs(s1).max()))  # bounds the mean's
    if moment != "mean":
        top = most * max(int(s2.max()), most)  # bounds n S2 (and S1^2), n^2
    if top >= 2**53:
        n, s1, s2 = (x.astype(object) for x in (n, s1, s2))
    quotient = (low * n + s1) / n if moment == "mean" else (n * s2 - s1 * s1) / (n * n)
    return quotient.astype(np.float64, copy=False)


def tile_moments(block, origin, grid, start, stop, moment, mask):
    """Window means, variances or standard deviations of an integer block.

    The moments path. Tile sums of the kept values and of their squares,
    offset by the block's least kept value (:meth:`_PhaseTiles.sums`), are
    added up per window exactly (:func:`_window_sums`). They must stay below
    2**53, else this returns None, as it does for values beyond 2**53 in
    magnitude, which NumPy's float arithmetic would round. The moment then
    follows from those integers with a single rounding (``(n S2 - S1^2) /
    n^2`` for the variance), so it is within float rounding of NumPy's
    two-pass ``numpy.var``.

    Parameters
    ----------
    block, origin, grid, start, stop, mask
        As for :func:`dask_localstats._kernels.reduce_block` (the grid has
        no footprint, the block is of integers).
    moment : {"mean", "var", "std"}
        The moment.

    Returns
    -------
    tuple of numpy.ndarray or None
        ``(values, kept counts)``, values float64 and NaN for empty windows;
        or None when the sums would not be exact.
    """
    low, high = _kept_range(block, mask)
    if grid.full_count * (high - low) ** 2 >= 2**53 or max(-low, high) >= 2**53:
        return None  # inexact sums, or values NumPy would round to floats
    shape = tuple(b - a for a, b in zip(start, stop, strict=True))
    sums = np.zeros((*shape, 3), dtype=np.int64)
    for tiling in _block_phases(origin, grid, start, stop):
        samples = _PhaseTiles(block, mask, tiling, grid.step, low)
        rows = np.ix_(*(axis.rows for axis in tiling))
        sums[rows] = _window_sums(samples.sums(high - low), tiling)
    n, s1, s2 = np.moveaxis(sums, -1, 0)
    empty = n == 0
    n = np.where(empty, 1, n)
    values = _moment(n, s1, s2, low, moment)
    if moment == "std":
        values = np.sqrt(values)
    values[empty] = np.nan
    return values, np.where(empty, 0, n).astype(np.int64)
