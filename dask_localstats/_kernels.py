"""Statistics over the windows of one in-memory block.

The engine hands a kernel a block of the source that covers the windows of a
rectangular set of centers. Because windows are separable (see
:mod:`dask_localstats._grid`), the centers of one axis fall into a few runs
whose windows have the same length (all interior windows, and each distinct
clipping at the borders). For every combination of per-axis runs, all those
windows are gathered at once with one broadcast fancy index into a
``(windows, voxels)`` array, in the C order of each window; the footprint and
the mask are gathered the same way into a validity array. A statistic then
reduces the rows of that array with vectorized NumPy, so there is no Python
loop over windows, and the work is proportional to the voxels the windows
hold. Batches are capped at about :data:`_BATCH` elements to bound memory.

Statistics are small objects that know their output shape and dtype:

- :class:`Percentile`: exact order statistics (``np.partition`` when every
  window is complete, a sort with sentinels otherwise), combined with the very
  arithmetic of ``numpy.percentile``'s linear method, so results are
  bit-identical to calling ``numpy.percentile`` on each window.
- :class:`Histogram`: one ``np.bincount`` per batch on ``row * max_bin +
  value``.
- :class:`Function`: calls a user function once per window on the kept voxels.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ._tiles import tile_reduce

_BATCH = 1 << 24


class Percentile:
    """Local percentiles, bit-identical to ``numpy.percentile`` per window.

    Parameters
    ----------
    percentile : float or sequence of float
        Fractions in ``[0, 1]``. A sequence adds a trailing axis.
    """

    def __init__(self, percentile):
        self.scalar = np.ndim(percentile) == 0
        if np.ndim(percentile) > 1 or np.size(percentile) == 0:
            msg = f"`percentile` must be a number or a 1-D sequence, got {percentile!r}"
            raise ValueError(msg)
        try:
            values = [float(p) for p in np.atleast_1d(percentile)]
        except (TypeError, ValueError):
            msg = f"`percentile` must be made of numbers, got {percentile!r}"
            raise TypeError(msg) from None
        if not all(0 <= p <= 1 for p in values):
            msg = f"`percentile` must be a fraction in [0, 1], got {percentile!r}"
            raise ValueError(msg)
        self.percentiles = values
        self.fshape = () if self.scalar else (len(values),)

    def __repr__(self):
        p = self.percentiles[0] if self.scalar else self.percentiles
        return f"Percentile({p!r})"

    def default_dtype(self, source_dtype):
        return source_dtype

    def reduce(self, values, valid):
        if valid is None:
            n = np.full(len(values), values.shape[1])
            kth = {0, values.shape[1] - 1}
            for q in self.quantiles():
                previous = math.floor((values.shape[1] - 1) * q)
                kth.update({previous, min(previous + 1, values.shape[1] - 1)})
            ordered = np.partition(values, sorted(kth), axis=1)
            has_nan = np.isnan(ordered[:, -1]) if values.dtype.kind == "f" else None
        else:
            n = valid.sum(axis=1)
            if values.dtype.kind == "f":
                has_nan = (np.isnan(values) & valid).any(axis=1)
                sentinel = np.inf
            else:
                has_nan = None
                sentinel = np.iinfo(values.dtype).max
            ordered = np.sort(np.where(valid, values, sentinel), axis=1)

        def select(rank):
            return np.take_along_axis(ordered, rank[:, None], axis=1)[:, 0]

        return self.combine(select, n, has_nan)

    def quantiles(self):
        """The quantiles ``numpy.percentile(a, 100 * p)`` uses, with its rounding."""
        return [float(np.true_divide(100 * p, 100)) for p in self.percentiles]

    def ranks(self, n):
        """Every rank ``combine`` will ask `select` for, given the counts `n`."""
        return [r for q in self.quantiles() for r in _positions(n, q)[:2]]

    def combine(self, select, n, has_nan=None):
        """Percentiles of rows from their order statistics.

        Parameters
        ----------
        select : callable
            ``select(rank)`` returns, for each row, its value of rank
            ``rank[row]`` (0-based, in increasing order), in the source dtype.
        n : (rows,) int array
            Number of kept values per row.
        has_nan : (rows,) bool array or None
            Rows holding a NaN, whose result is NaN.

        Notes
        -----
        The expressions and their dtypes follow NumPy's ``_quantile`` and
        ``_lerp`` with a Python-float quantile (weak promotion), including the
        clamping of the top index to the last element, so results are
        bit-identical to ``numpy.percentile``.
        """
        results = []
        for q in self.quantiles():
            lo, hi, gamma = _positions(n, q)
            a, b = select(lo), select(hi)
            ftype = np.result_type(a.dtype, 1.0)
            with np.errstate(invalid="ignore"):  # inf - inf, as in numpy.percentile
                diff = b - a
                result = a + diff * gamma.astype(ftype)
                upper = gamma >= 0.5
                result[upper] = (b - diff * (1 - gamma).astype(ftype))[upper]
            results.append(result)
        result = results[0] if self.scalar else np.stack(results, axis=-1)
        if has_nan is not None:
            result[has_nan] = np.nan
        result[n == 0] = 0
        return result


def _positions(n, q):
    """Ranks below and above quantile `q` of rows of `n` values, and the weight.

    NumPy's ``_quantile`` for the linear method, with its clamping of the top
    index to the last element (and its weight computed from index -1 there).
    """
    virtual = (n - 1) * q
    previous = np.floor(virtual)
    above = virtual >= n - 1
    gamma = virtual - np.where(above, -1, previous)
    last = np.maximum(n - 1, 0)
    lo = np.where(above, last, np.maximum(previous, 0)).astype(np.intp)
    hi = np.where(above, last, np.minimum(previous + 1, last)).astype(np.intp)
    return lo, hi, gamma


class Histogram:
    """Local histograms: counts of each value ``0 .. max_bin - 1``.

    Parameters
    ----------
    max_bin : int
        Number of bins; values must lie in ``[0, max_bin)``.
    """

    def __init__(self, max_bin):
        if not isinstance(max_bin, int | np.integer) or isinstance(max_bin, bool):
            msg = f"`max_bin` must be an integer, got {max_bin!r}"
            raise TypeError(msg)
        if max_bin <= 0:
            msg = f"`max_bin` must be positive, got {max_bin!r}"
            raise ValueError(msg)
        self.max_bin = int(max_bin)
        self.fshape = (self.max_bin,)

    def __repr__(self):
        return f"Histogram(max_bin={self.max_bin})"

    def default_dtype(self, source_dtype):
        return np.dtype(np.int64)

    def check_source(self, dtype):
        if dtype.kind not in "biu":
            msg = (
                f"`source` must have an integer dtype for local_histogram, got {dtype}"
            )
            raise TypeError(msg)

    def check_range(self, low, high):
        """Raise if `low` or `high` falls outside ``[0, max_bin)``."""
        if low < 0 or high >= self.max_bin:
            bad = low if low < 0 else high
            msg = (
                f"`source` has the value {bad}, outside [0, max_bin) "
                f"with max_bin={self.max_bin}"
            )
            raise ValueError(msg)

    def reduce(self, values, valid):
        kept = values if valid is None else values[valid]
        if kept.size:
            self.check_range(kept.min(), kept.max())
        rows = np.arange(len(values))[:, None] * self.max_bin
        keys = (
            (rows + values.astype(np.intp)) if valid is None else (rows + values)[valid]
        )
        counts = np.bincount(keys.ravel(), minlength=len(values) * self.max_bin)
        return counts.reshape(len(values), self.max_bin)


class Function:
    """A user function called on the kept voxels of each window.

    Parameters
    ----------
    function : callable
        ``function(kept)`` with ``kept`` a 1-D array returns a scalar, or an
        array of shape `fshape`.
    fshape : tuple of int or None
        Shape of the function's output; None for a scalar.
    """

    def __init__(self, function, fshape=None):
        if not callable(function):
            msg = f"`function` must be callable, got {function!r}"
            raise TypeError(msg)
        self.function = function
        if fshape is None:
            self.fshape = ()
        else:
            fshape = (fshape,) if np.ndim(fshape) == 0 else tuple(fshape)
            if not all(isinstance(f, int | np.integer) and f > 0 for f in fshape):
                msg = f"`fshape` must be a tuple of positive ints, got {fshape!r}"
                raise ValueError(msg)
            self.fshape = tuple(int(f) for f in fshape)

    def __repr__(self):
        return f"Function({self.function!r}, fshape={self.fshape})"

    def default_dtype(self, source_dtype):
        return source_dtype

    def reduce(self, values, valid):
        rows = (
            values
            if valid is None
            else (row[v] for row, v in zip(values, valid, strict=False))
        )
        return np.asarray([self.function(row) for row in rows])


def reduce_block(block, origin, grid, start, stop, statistic, dtype, mask=None):
    """Compute the samples of centers ``start:stop`` from an in-memory block.

    Parameters
    ----------
    block : ndarray
        Source values of the region starting at `origin`; it must cover the
        windows of the requested centers.
    origin : tuple of int
        Source coordinates of ``block[0, ..., 0]``.
    grid : Grid
        Sampling geometry.
    start, stop : tuple of int
        Range of center indices per axis.
    statistic : Percentile, Histogram or Function
        What to compute on each window.
    dtype : numpy dtype
        Output dtype; values are cast as by NumPy assignment.
    mask : bool ndarray or None
        Mask of the same region as `block`.

    Returns
    -------
    ndarray
        Shape ``stop - start + statistic.fshape``.
    """
    tiled = isinstance(statistic, Percentile | Histogram)
    if tiled and grid.footprint is None and block.dtype.kind in "biu":
        histogram = isinstance(statistic, Histogram)
        out = tile_reduce(
            block, origin, grid, start, stop, statistic, dtype, mask, histogram
        )
        if out is not None:
            return out
    ndim = grid.ndim
    shape = tuple(b - a for a, b in zip(start, stop, strict=True))
    out = np.zeros(shape + statistic.fshape, dtype=dtype)
    axes = [list(grid.windows(d, start[d], stop[d]).groups()) for d in range(ndim)]
    for combo in itertools.product(*axes):
        for part in _batches(combo, math.prod(p.shape[1] for _, p, _ in combo)):
            rows = [r for r, _, _ in part]
            index = _broadcast(
                [p - o for (_, p, _), o in zip(part, origin, strict=True)]
            )
            values = block[index]
            valid = None
            if grid.footprint is not None:
                valid = grid.footprint[_broadcast([f for _, _, f in part])]
            if mask is not None:
                kept = mask[index].astype(bool, copy=False)
                valid = kept if valid is None else valid & kept
            count = math.prod(len(r) for r in rows)
            values = values.reshape(count, -1)
            if valid is not None:
                valid = valid.reshape(count, -1)
            result = statistic.reduce(values, valid)
            out[np.ix_(*rows)] = result.reshape(
                tuple(len(r) for r in rows) + statistic.fshape
            )
    return out


def _broadcast(per_axis):
    """Index arrays of shape (g0, ..., g{n-1}, L0, ..., L{n-1}) from (g_d, L_d)."""
    ndim = len(per_axis)
    index = []
    for d, a in enumerate(per_axis):
        shape = [1] * (2 * ndim)
        shape[d], shape[ndim + d] = a.shape
        index.append(a.reshape(shape))
    return tuple(index)


def _batches(combo, length):
    """Split a combination of axis runs along axis 0 into bounded batches."""
    rows0, positions0, offsets0 = combo[0]
    others = math.prod(len(r) for r, _, _ in combo[1:]) * length
    size = max(1, _BATCH // max(others, 1))
    for i in range(0, len(rows0), size):
        sl = slice(i, i + size)
        yield ((rows0[sl], positions0[sl], offsets0[sl]), *combo[1:])
