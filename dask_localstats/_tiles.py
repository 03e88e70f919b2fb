"""Tiles: the fast path for integer sources and box windows.

In real use windows overlap heavily (ClearMap's light-sheet correction takes
windows of 200 x 200 voxels every 25 voxels, so each voxel lies in 64
windows); gathering every window visits each voxel that many times. Instead,
on each axis the window bounds cut the block into *tiles*, and every window
is a box of whole tiles. With a step, windows whose (clipped) start has the
same phase modulo the step share one subsampled grid, so each phase is tiled
separately; every voxel still falls in exactly one tile.

Percentiles are found in one of two ways, whichever a cost model
(:func:`_sorting_pays`) expects to be cheaper:

- *Sorted tiles*, for few large tiles per window. Each tile's samples are
  sorted once (``ndarray.sort``, which releases the GIL, so threads overlap).
  How many samples of a window lie at or below some value is then a binary
  search per tile, and each wanted order statistic a bisection on the value.
  Work: about one sort of the voxels, whatever the value range.
- *Tile histograms*, for many small tiles per window:

  1. One ``np.bincount`` per row of tiles gives each tile's histogram of the
     values (offset by the block's minimum): work proportional to the voxels.
  2. A window's histogram is the sum of its tiles' histograms: a product
     with one 0/1 "tile range" matrix per axis (BLAS does the sums).
  3. Step 2 is done on coarse bins of about sqrt(range) values; the coarse
     bin holding each wanted rank is found from the cumulative counts, then
     that bin's fine counts are summed over the window's tiles to find the
     exact value.

  Local histograms (:class:`~dask_localstats._kernels.Histogram`) are steps
  1 and 2 with the requested bins. :func:`tile_reduce` declines (returns
  None) when the histograms would dwarf the block, and the gathering kernel
  takes over.

Either way NumPy's interpolation between the two order statistics is then
applied as for the other kernels, so results are bit-identical to
``numpy.percentile``.

Means, variances and standard deviations (``numpy.mean``, ``numpy.var``,
``numpy.std`` given to ``apply_local_function``) add up exact integer sums
of the values and their squares per tile (``np.add.reduceat``), then per
window with the same tile range matrices (:func:`tile_moments`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

_MAX_ENTRIES = 1 << 23


def _axis_phases(windows, origin):
    """Split one axis's windows by step phase; tile each phase.

    Yields ``(rows, phase, bounds, first, last)``: the windows (indices into
    `windows`) of one phase, the tile bounds in subsampled coordinates of
    ``block[phase::step]``, and each window's tile range ``[first, last)``.
    """
    lo, hi, step = windows.lo - origin, windows.hi - origin, windows.step
    phases = lo % step
    for phase in np.unique(phases):
        rows = np.flatnonzero(phases == phase)
        start = (lo[rows] - phase) // step
        stop = (hi[rows] - phase + step - 1) // step
        bounds = np.unique(np.concatenate([start, stop]))
        yield (
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
        return (values.astype(np.intp) - low).astype(dtype)
    difference = values.astype(np.uint64) - np.uint64(low % 2**64)
    return difference.astype(dtype)


def _used_tiles(bounds, first, last):
    """Whether each tile of one axis lies in some window."""
    delta = np.zeros(len(bounds), dtype=np.intp)
    np.add.at(delta, first, 1)
    np.add.at(delta, last, -1)
    return np.cumsum(delta)[:-1] > 0


def _used_samples(bounds, first, last):
    """Samples of one axis lying in a tile of some window, or None for all."""
    used = _used_tiles(bounds, first, last)
    if used.all():
        return None
    return np.repeat(used, np.diff(bounds))


class _PhaseTiles:
    """The samples of one step phase of a block, tile by tile.

    Samples outside every window (gaps between windows) and masked ones are
    left out. Values are offset by `low`.
    """

    def __init__(self, block, mask, phases, steps, low):
        region = tuple(
            slice(p + s * b[0], p + s * b[-1], s)
            for (_, p, b, _, _), s in zip(phases, steps, strict=True)
        )
        self.sub, self.low = block[region], low
        keep = None if mask is None else mask[region].astype(bool, copy=False)
        for d, (_, _, bounds, first, last) in enumerate(phases):
            used = _used_samples(bounds, first, last)
            if used is not None:
                shape = [1] * block.ndim
                shape[d] = len(used)
                used = np.broadcast_to(used.reshape(shape), self.sub.shape)
                keep = used if keep is None else keep & used
        self.keep = keep
        self.shape = tuple(len(b) - 1 for _, _, b, _, _ in phases)
        # flat tile index of each sample along axes 1.. (axis 0 goes row by row)
        inner = np.zeros((1,) * block.ndim, dtype=np.intp)
        for d, (_, _, bounds, _, _) in enumerate(phases[1:], start=1):
            index = np.searchsorted(bounds, np.arange(bounds[0], bounds[-1]), "right")
            shape = [1] * block.ndim
            shape[d] = len(index)
            inner = inner * self.shape[d] + (index - 1).reshape(shape)
        self.inner = inner
        self.bounds0 = phases[0][2] - phases[0][2][0]
        # where the tiles of axes 1.. start, within the samples
        self.starts = [b[:-1] - b[0] for _, _, b, _, _ in phases[1:]]

    def rows(self):
        """Yield ``(tiles, values)`` of the kept samples, row of tiles by row."""
        per_row = math.prod(self.shape[1:])
        for t in range(self.shape[0]):
            part = slice(self.bounds0[t], self.bounds0[t + 1])
            values = _offsets(self.sub[part], self.low)
            tiles = self.inner + t * per_row
            if self.keep is not None:
                keep = self.keep[part]
                values, tiles = values[keep], np.broadcast_to(tiles, keep.shape)[keep]
            yield tiles, values

    def histograms(self, nbins, shift=0, check=None):
        """Histograms ``(*shape, nbins)`` of ``values >> shift`` per tile."""
        per_row = math.prod(self.shape[1:])
        out = np.empty((self.shape[0], per_row * nbins), dtype=np.int64)
        for t, (tiles, values) in enumerate(self.rows()):
            if check is not None and values.size:
                check(values.min() + self.low, values.max() + self.low)
            keys = (tiles - t * per_row) * nbins + (values >> shift)
            out[t] = np.bincount(keys.ravel(), minlength=per_row * nbins)
        return out.reshape((*self.shape, nbins))

    def sums(self):
        """Kept counts and sums of ``values`` and ``values**2`` per tile.

        Returns an int64 array ``(*shape, 3)``. Each row of tiles is summed
        over axis 0, then over the tiles of the other axes (``reduceat``).
        """
        out = np.empty((*self.shape, 3), dtype=np.int64)
        for t in range(self.shape[0]):
            part = slice(self.bounds0[t], self.bounds0[t + 1])
            x = _offsets(self.sub[part], self.low, np.int64)
            if self.keep is None:
                n = np.full(x.shape[1:], len(x))
            else:
                keep = self.keep[part]
                x[~keep] = 0
                n = keep.sum(axis=0)
            for k, total in enumerate((n, x.sum(axis=0), np.square(x).sum(axis=0))):
                for d, starts in enumerate(self.starts):
                    total = np.add.reduceat(total, starts, axis=d)
                out[t, ..., k] = total
        return out

    def pair_histograms(self, lookup, count, shift):
        """Fine histograms ``(count, 2**shift)`` of selected (tile, coarse bin).

        ``lookup[tile, coarse bin]`` numbers the selected pairs, -1 elsewhere.
        """
        fine = 1 << shift
        ncoarse = lookup.shape[1]
        lookup = lookup.ravel()
        size = count * fine + 1  # the last bin takes the samples not selected
        out = np.zeros(size, dtype=np.int64)
        pending, held = [], 0

        def flush():
            out[:] += np.bincount(np.concatenate(pending), minlength=size)
            pending.clear()

        for tiles, values in self.rows():
            pair = lookup.take(tiles * ncoarse + (values >> shift))
            keys = np.where(pair >= 0, pair * fine + (values & (fine - 1)), size - 1)
            pending.append(keys.ravel())
            held += keys.size
            if held >= _MAX_ENTRIES:  # bincount in batches: fewer passes on `out`
                flush()
                held = 0
        if pending:
            flush()
        return out[:-1].reshape(count, fine)


def _size_classes(bounds, first, last):
    """The tiles of one axis that some window uses, grouped by size.

    Yields ``(tiles, size, take)``: the indices of the tiles of one size, the
    size, and what selects their samples along the axis (a slice when the
    tiles are consecutive).
    """
    used = np.flatnonzero(_used_tiles(bounds, first, last))
    sizes = np.diff(bounds)[used]
    for size in np.unique(sizes):
        tiles = used[sizes == size]
        begin = bounds[tiles] - bounds[0]
        if tiles[-1] - tiles[0] == len(tiles) - 1:
            take = slice(begin[0], begin[0] + len(tiles) * size)
        else:
            take = (begin[:, None] + np.arange(size)).ravel()
        yield tiles, int(size), take


class _SortedTiles:
    """The kept samples of one step phase of a block, sorted tile by tile.

    Each tile's samples are copied into one run of a flat buffer and sorted
    there. Tiles of equal shape are
    gathered together: a reshape and a transpose of the block when they are
    consecutive. Masked samples become the dtype's maximum and are counted
    out, so a tile's kept values are the first ``kept[tile]`` of its run.
    """

    def __init__(self, block, mask, phases, steps):
        region = tuple(
            slice(p + s * b[0], p + s * b[-1], s)
            for (_, p, b, _, _), s in zip(phases, steps, strict=True)
        )
        sub = block[region]
        keep = None if mask is None else mask[region].astype(bool, copy=False)
        self.shape = tuple(len(b) - 1 for _, _, b, _, _ in phases)
        total = math.prod(self.shape)
        # one more tile, empty, for the padding of _window_tiles
        self.start = np.zeros(total + 1, dtype=np.intp)
        self.kept = np.zeros(total + 1, dtype=np.intp)
        groups = list(
            itertools.product(
                *(_size_classes(b, first, last) for _, _, b, first, last in phases)
            )
        )
        size = sum(math.prod(len(t) * s for t, s, _ in group) for group in groups)
        self.values = np.empty(size, dtype=block.dtype)
        sentinel = np.iinfo(block.dtype).max
        offset, ndim = 0, block.ndim
        for group in groups:
            index = tuple(take for _, _, take in group)
            counts = tuple(len(t) for t, _, _ in group)
            sizes = tuple(s for _, s, _ in group)
            split = tuple(x for pair in zip(counts, sizes, strict=True) for x in pair)
            order = (*range(0, 2 * ndim, 2), *range(1, 2 * ndim, 2))
            run = math.prod(sizes)
            part = self.values[offset : offset + math.prod(counts) * run]
            part = part.reshape(*counts, *sizes)
            np.copyto(part, _gather(sub, index).reshape(split).transpose(order))
            part = part.reshape(-1, run)
            tiles = np.ravel_multi_index(
                np.ix_(*(t for t, _, _ in group)), self.shape
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


def _window_sums(histograms, phases):
    """Sum tile histograms over each window's box of tiles (float64)."""
    values = histograms.astype(np.float64)
    for d, (_, _, bounds, first, last) in enumerate(phases):
        tiles = np.arange(len(bounds) - 1)
        ranges = ((tiles >= first[:, None]) & (tiles < last[:, None])).astype(
            np.float64
        )
        values = np.moveaxis(np.tensordot(ranges, values, axes=(1, d)), 0, d)
    return values


def _window_tiles(phases):
    """Flat tile ids of each window's tiles, ``(windows, max tiles)``.

    Windows with fewer tiles are padded with the id ``T`` (one past the last
    tile), which callers map to an empty histogram.
    """
    ndim = len(phases)
    tiles = [len(b) - 1 for _, _, b, _, _ in phases]
    total = math.prod(tiles)
    flat, invalid = 0, False
    for d, (_, _, _, first, last) in enumerate(phases):
        width = int((last - first).max())
        index = first[:, None] + np.arange(width)
        shape = [1] * (2 * ndim)
        shape[d], shape[ndim + d] = index.shape
        flat = flat * tiles[d] + index.reshape(shape)
        invalid = invalid | (index >= last[:, None]).reshape(shape)
    flat = np.where(invalid, total, flat)
    windows = math.prod(len(r) for r, _, _, _, _ in phases)
    return flat.reshape(windows, -1)


def _sorting_pays(phases, searches):
    """Whether sorted tiles beat tile histograms for one phase.

    Sorting costs about one pass over the samples; each of the `searches`
    steps of bisection then probes every tile of every window about
    log2(tile size) times. Histograms cost about two passes whatever the
    windows. The factor 4 was measured on ClearMap's workloads.
    """
    windows = math.prod(len(r) for r, _, _, _, _ in phases)
    per_window = math.prod(int((last - first).max()) for _, _, _, first, last in phases)
    sizes = [np.diff(b) for _, _, b, _, _ in phases]
    samples = math.prod(int(s.sum()) for s in sizes)
    depth = math.prod(int(s.max()) for s in sizes).bit_length()
    return windows * per_window * searches * depth <= 4 * samples


def _fine_shift(nbins):
    """log2 of the fine bins per coarse bin: about the square root of `nbins`."""
    return max(4, math.ceil(math.log2(max(nbins, 2)) / 2))


def _percentile_select(samples, phases, nbins, statistic, dtype):
    """Kept counts per window and a selector of their order statistics.

    Coarse histograms locate the coarse bin of every rank the percentiles
    need; fine histograms are then counted only for the (tile, coarse bin)
    pairs those ranks fall in.
    """
    shift = _fine_shift(nbins)
    ncoarse = ((nbins - 1) >> shift) + 1
    coarse = samples.histograms(ncoarse, shift)
    cumulative = np.cumsum(
        _window_sums(coarse, phases).reshape(-1, ncoarse).astype(np.int64), axis=1
    )
    n = cumulative[:, -1]
    tiles = _window_tiles(phases)
    total = math.prod(samples.shape)

    def locate(rank):
        bin_ = np.minimum((cumulative <= rank[:, None]).sum(axis=1), ncoarse - 1)
        rows = np.arange(len(rank))
        return bin_, rank - np.where(bin_ > 0, cumulative[rows, bin_ - 1], 0)

    pairs = [tiles * ncoarse + locate(rank)[0][:, None] for rank in statistic.ranks(n)]
    wanted = np.unique(np.concatenate([p.ravel() for p in pairs]))
    wanted = wanted[wanted < total * ncoarse]  # not the padding tile
    lookup = np.full((total + 1) * ncoarse, -1, dtype=np.intp)
    lookup[wanted] = np.arange(len(wanted))
    fine = samples.pair_histograms(lookup.reshape(-1, ncoarse), len(wanted), shift)
    fine = np.concatenate([fine, np.zeros((1, fine.shape[1]), fine.dtype)])
    fine = fine.astype(np.int32)  # halves the traffic of the gathers below

    cache = {}

    def select(rank):
        bin_, residual = locate(rank)
        key = bin_.tobytes()
        if key not in cache:  # the ranks below and above often share a bin
            counts = fine[lookup[tiles * ncoarse + bin_[:, None]]].sum(axis=1)
            cache.clear()
            cache[key] = np.cumsum(counts, axis=1)
        position = (cache[key] <= residual[:, None]).sum(axis=1)
        offset = (bin_ << shift) + np.minimum(position, (1 << shift) - 1)
        return _offsets(offset, -samples.low, dtype)

    return n, select


def _block_phases(origin, grid, start, stop):
    """The tiled step phases of a block: one ``_axis_phases`` item per axis."""
    axes = [
        list(_axis_phases(grid.windows(d, start[d], stop[d]), origin[d]))
        for d in range(grid.ndim)
    ]
    return list(itertools.product(*axes))


def _kept_range(block, mask):
    """The least and greatest kept values of a block, as ints (0, 0 if none)."""
    kept = block if mask is None else block[mask.astype(bool, copy=False)]
    return (int(kept.min()), int(kept.max())) if kept.size else (0, 0)


def tile_reduce(block, origin, grid, start, stop, statistic, dtype, mask, histogram):
    """Window statistics of an integer block by tiles, or None.

    Parameters are those of :func:`dask_localstats._kernels.reduce_block`
    (the grid has no footprint); `histogram` tells whether `statistic` is a
    :class:`~dask_localstats._kernels.Histogram` (else a Percentile).
    Returns ``(samples, kept counts)``, or None when the histograms would be
    too large to pay off.
    """
    phases_list = _block_phases(origin, grid, start, stop)
    if histogram:
        low, nbins = 0, statistic.max_bin
        sort = [False] * len(phases_list)
    else:
        low, high = _kept_range(block, mask)
        nbins = high - low + 1
        searches = len(statistic.quantiles()) * nbins.bit_length()
        sort = [_sorting_pays(phases, searches) for phases in phases_list]
        nbins = ((nbins - 1) >> _fine_shift(nbins)) + 1  # coarse bins first
    most = max(
        (
            math.prod(len(p[2]) - 1 for p in phases)
            for phases, sorted_ in zip(phases_list, sort, strict=True)
            if not sorted_
        ),
        default=0,
    )
    if most * nbins > max(block.size, _MAX_ENTRIES):
        return None
    check = statistic.check_range if histogram else None
    shape = tuple(b - a for a, b in zip(start, stop, strict=True))
    out = np.zeros(shape + statistic.fshape, dtype=dtype)
    counts = np.zeros(shape, dtype=np.int64)
    for phases, sorted_ in zip(phases_list, sort, strict=True):
        rows = np.ix_(*(r for r, _, _, _, _ in phases))
        windows = tuple(len(r) for r, _, _, _, _ in phases)
        if histogram:
            samples = _PhaseTiles(block, mask, phases, grid.step, low)
            sums = _window_sums(samples.histograms(nbins, check=check), phases)
            out[rows] = sums
            counts[rows] = sums.sum(axis=-1)
            continue
        if sorted_:
            tiles = _SortedTiles(block, mask, phases, grid.step)
            ids = _window_tiles(phases)
            n = tiles.kept[ids].sum(axis=1)
            select = tiles.select(ids, low, high)
        else:
            samples = _PhaseTiles(block, mask, phases, grid.step, low)
            n, select = _percentile_select(
                samples, phases, high - low + 1, statistic, block.dtype
            )
        out[rows] = statistic.combine(select, n).reshape(windows + statistic.fshape)
        counts[rows] = n.reshape(windows)
    return out, counts


def tile_moments(block, origin, grid, start, stop, moment, mask):
    """Window means, variances or standard deviations of an integer block.

    Tile sums of the values and of their squares, offset by the block's
    minimum, are added up per window exactly (they stay below 2**53, else
    this returns None, as it does for values that NumPy's float arithmetic
    would round, beyond 2**53 in magnitude); the moment then follows from those integers with a
    single rounding (``(n S2 - S1^2) / n^2`` for the variance), so it is
    within float rounding of NumPy's two-pass ``numpy.var``.

    Returns ``(values, kept counts)`` with NaN for empty windows, or None.
    """
    low, high = _kept_range(block, mask)
    if grid.full_count * (high - low) ** 2 >= 2**53 or max(-low, high) >= 2**53:
        return None  # inexact sums, or values NumPy would round to floats
    shape = tuple(b - a for a, b in zip(start, stop, strict=True))
    sums = np.zeros((*shape, 3), dtype=np.int64)
    for phases in _block_phases(origin, grid, start, stop):
        samples = _PhaseTiles(block, mask, phases, grid.step, low)
        rows = np.ix_(*(r for r, _, _, _, _ in phases))
        sums[rows] = _window_sums(samples.sums(), phases)
    n, s1, s2 = (
        np.asarray(x, np.int64).astype(object) for x in np.moveaxis(sums, -1, 0)
    )
    empty = n == 0
    n = np.where(empty, 1, n)
    exact = (low * n + s1) / n if moment == "mean" else (n * s2 - s1 * s1) / (n * n)
    values = exact.astype(np.float64)
    if moment == "std":
        values = np.sqrt(values)
    values[empty] = np.nan
    return values, np.where(empty, 0, n).astype(np.int64)
