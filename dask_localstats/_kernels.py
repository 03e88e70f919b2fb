"""Statistics over the windows of one in-memory block.

The engine hands a kernel a block of the source that covers the windows of a
rectangular set of centers. Because windows are separable (see
:mod:`dask_localstats._grid`), the centers of one axis fall into a few runs
whose windows have the same length (all interior windows, and each distinct
clipping at the borders). For every combination of per-axis runs, all those
windows are gathered at once into a ``(windows, voxels)`` array, in the C
order of each window: by one copy of a strided view of the block where the
windows of every axis are evenly spaced (:func:`_gatherer`), else by one
broadcast fancy index; the footprint and the mask are gathered the same way
into a validity array. A statistic then
reduces the rows of that array with vectorized NumPy, so there is no Python
loop over windows, and the work is proportional to the voxels the windows
hold. Batches are capped at about :data:`_BATCH` elements to bound memory.

Statistics are small objects following one protocol, :class:`Statistic`:
the shape and default dtype of a sample, a check of the source made before
computing, a reduction of gathered windows, and an optional fast path over a
whole block (``block_reduce``, the tile paths), which the engine tries first:

- :class:`Percentile`: exact order statistics (``np.partition`` when every
  window is complete, a sort with sentinels otherwise), combined with the very
  arithmetic of ``numpy.percentile``'s linear method, so results are
  bit-identical to calling ``numpy.percentile`` on each window. Integers
  take the tile paths instead (below), but for windows that do not overlap
  (ClearMap's default spacing, the window's extent) and whose values span
  too many for histograms: each voxel is read once either way, and one
  ``np.partition`` (linear time) beats sorting the tiles, which here are
  the windows themselves.
- :class:`Histogram`: one ``np.bincount`` per batch on ``row * max_bin +
  value``.
- :class:`Function`: calls a user function once per window on the kept voxels
  (or once per batch of windows, `vectorized`). ``numpy.mean``, ``numpy.var``
  and ``numpy.std`` themselves, on integer sources, are computed from exact
  tile sums instead (:func:`dask_localstats._tiles.tile_moments`).

Percentiles, histograms and those moments of integer sources in box windows
take the tile paths of :mod:`dask_localstats._tiles`, whose work does not
grow with the overlap of the windows.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np

from ._tiles import tile_moments, tile_reduce

_BATCH = 1 << 24


class Statistic:
    """What the engine asks of a statistic: the protocol of all of them.

    A statistic knows the shape and default dtype of one sample, checks a
    source before anything is computed, and reduces windows: the rows of a
    gathered ``(windows, voxels)`` array (:meth:`reduce`, always available),
    or a whole block at once by a faster path where one applies
    (:meth:`block_reduce`).

    Attributes
    ----------
    fshape : tuple of int
        Trailing shape of one sample: ``()`` for a scalar.
    """

    fshape = ()

    def default_dtype(self, source_dtype):
        """The result dtype when the caller gives none."""
        return source_dtype

    def check(self, source_dtype):
        """Raise ``TypeError`` or ``ValueError`` for a source it cannot take."""

    def reduce(self, values, valid):
        """Samples of the rows of `values` (``valid``: kept voxels, or None).

        Returns ``(samples, counts)``: an array of shape
        ``(rows,) + fshape`` and the kept count of each row. `values`, a
        gathered copy, may be reordered within its rows.
        """
        raise NotImplementedError

    def block_reduce(self, block, origin, grid, start, stop, dtype, mask):
        """Samples of centers ``start:stop`` from a block by a fast path.

        Parameters are those of :func:`reduce_block` (with no footprint).
        Returns ``(samples, counts)``, or None where no fast path applies.
        """
        return None


class Percentile(Statistic):
    """Local percentiles, bit-identical to ``numpy.percentile`` per window.

    Parameters
    ----------
    percentile : float or sequence of float
        Fractions in ``[0, 1]``. A sequence adds a trailing axis.
    """

    def __init__(self, percentile):
        self.scalar = np.ndim(percentile) == 0
        items = np.ravel(np.asarray(percentile, dtype=object))
        words = str | bytes | bool | np.bool_ | complex | np.complexfloating
        if any(isinstance(p, words) for p in items):
            msg = f"`percentile` must be made of numbers, got {percentile!r}"
            raise TypeError(msg)
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

    def check(self, source_dtype):
        if source_dtype.kind not in "iuf":
            msg = f"`source` must have a numeric dtype for local_percentile, got {source_dtype}"
            raise TypeError(msg)

    def block_reduce(self, block, origin, grid, start, stop, dtype, mask):
        """Order statistics from sorted tiles or tile histograms (integers).

        Declines (None: windows are gathered and partitioned) for floats, and
        for unmasked windows that do not overlap and whose values are too
        many for histograms (sorting each would cost more than partitioning).
        """
        if block.dtype.kind not in "biu":
            return None
        sort = mask is not None or not disjoint(grid)
        return tile_reduce(
            block, origin, grid, start, stop, self, dtype, mask, False, sort
        )

    def reduce(self, values, valid):
        if valid is None:
            n = np.full(len(values), values.shape[1])
            kth = {0, values.shape[1] - 1}
            for q in self.quantiles():
                previous = math.floor((values.shape[1] - 1) * q)
                kth.update({previous, min(previous + 1, values.shape[1] - 1)})
            values.partition(sorted(kth), axis=1)  # the caller's gathered copy
            ordered = values
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

        return self.combine(select, n, has_nan), n

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


def disjoint(grid):
    """Whether no two windows of `grid` share a voxel."""
    return all(h >= e for h, e in zip(grid.spacing, grid.extent, strict=True))


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


class Histogram(Statistic):
    """Local histograms: counts of each value ``0 .. max_bin - 1``.

    Parameters
    ----------
    max_bin : int
        Number of bins; values must lie in ``[0, max_bin)``.
    clip_values : bool
        Count values below 0 in the first bin and values of `max_bin` or
        more in the last, instead of raising.
    """

    def __init__(self, max_bin, clip_values=False):
        if not isinstance(max_bin, int | np.integer) or isinstance(max_bin, bool):
            msg = f"`max_bin` must be an integer, got {max_bin!r}"
            raise TypeError(msg)
        if max_bin <= 0:
            msg = f"`max_bin` must be positive, got {max_bin!r}"
            raise ValueError(msg)
        self.max_bin = int(max_bin)
        self.clip_values = bool(clip_values)
        self.fshape = (self.max_bin,)

    def __repr__(self):
        return f"Histogram(max_bin={self.max_bin}, clip_values={self.clip_values})"

    def _clipped(self, values):
        """`values` with those outside the bins moved into the end bins."""
        if not self.clip_values or values.size == 0:
            return values
        low, high = values.min(), values.max()
        if low >= 0 and high < self.max_bin:
            return values
        return np.clip(values, 0, self.max_bin - 1).astype(values.dtype, copy=False)

    def default_dtype(self, source_dtype):
        return np.dtype(np.int64)

    def check(self, source_dtype):
        if source_dtype.kind not in "biu":
            msg = f"`source` must have an integer dtype for local_histogram, got {source_dtype}"
            raise TypeError(msg)

    def block_reduce(self, block, origin, grid, start, stop, dtype, mask):
        """Window histograms as sums of tile histograms."""
        block = self._clipped(block)
        return tile_reduce(block, origin, grid, start, stop, self, dtype, mask, True)

    def check_range(self, low, high):
        """Raise if `low` or `high` falls outside ``[0, max_bin)``."""
        if low < 0 or high >= self.max_bin:
            bad = low if low < 0 else high
            msg = (
                f"`source` has the value {bad}, outside [0, max_bin) with "
                f"max_bin={self.max_bin}; give a larger max_bin, or "
                "clip_values=True to count it in the end bins (command line: "
                "--max-bin auto or N, --clip-values)"
            )
            raise ValueError(msg)

    def reduce(self, values, valid):
        values = self._clipped(values)
        kept = values if valid is None else values[valid]
        if kept.size:
            self.check_range(kept.min(), kept.max())
        counts = np.empty((len(values), self.max_bin), dtype=np.int64)
        size = max(1, _BATCH // self.max_bin)  # rows whose counts fit a batch
        for i in range(0, len(values), size):
            part = slice(i, i + size)
            rows = np.arange(len(counts[part]))[:, None] * self.max_bin
            v = values[part].astype(np.intp)
            keys = (rows + v) if valid is None else (rows + v)[valid[part]]
            counts[part] = np.bincount(
                keys.ravel(), minlength=counts[part].size
            ).reshape(counts[part].shape)
        return counts, counts.sum(axis=1)


class Function(Statistic):
    """A user function of the kept voxels of each window.

    Parameters
    ----------
    function : callable
        ``function(kept)`` with ``kept`` a 1-D array returns a scalar, or an
        array of shape `fshape`. With `vectorized`, ``function(windows,
        axis=-1)`` reduces a 2-D array of windows (one per row) at once and
        returns an array of shape ``(rows,) + fshape``.
    fshape : tuple of int or None
        Shape of the function's output; None for a scalar.
    vectorized : bool
        Call the function once per batch of windows of equal kept counts
        (as ``numpy.median`` or ``numpy.std`` allow) instead of once per window.
    """

    def __init__(self, function, fshape=None, vectorized=False):
        if not callable(function):
            msg = f"`function` must be callable, got {function!r}"
            raise TypeError(msg)
        self.function = function
        self.vectorized = bool(vectorized)
        if fshape is None:
            self.fshape = ()
        else:
            fshape = (fshape,) if np.ndim(fshape) == 0 else tuple(fshape)
            if not all(isinstance(f, int | np.integer) and f > 0 for f in fshape):
                msg = f"`fshape` must be a tuple of positive ints, got {fshape!r}"
                raise ValueError(msg)
            self.fshape = tuple(int(f) for f in fshape)

    def __repr__(self):
        return (
            f"Function({self.function!r}, fshape={self.fshape}, "
            f"vectorized={self.vectorized})"
        )

    def check(self, source_dtype):
        """Call the function on a few values: its result must have `fshape`.

        A function that fails on them is left to fail on real windows.
        """
        probe = np.arange(1, 9).astype(source_dtype)
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                if self.vectorized:
                    shape = np.shape(self.function(probe[None], axis=-1))[1:]
                else:
                    shape = np.shape(self.function(probe))
        except Exception:  # the user's function: checked again when computing
            return
        self._check_shape(shape)

    def _check_shape(self, shape):
        if tuple(shape) != self.fshape:
            msg = (
                f"`function` returns results of shape {tuple(shape)}, but "
                f"`fshape` is {self.fshape}; pass fshape={tuple(shape) or None}"
            )
            raise ValueError(msg)

    def reduce(self, values, valid):
        n = np.full(len(values), values.shape[1]) if valid is None else valid.sum(1)
        if not self.vectorized:
            rows = (
                values
                if valid is None
                else (r[v] for r, v in zip(values, valid, strict=True))
            )
            results = [np.asarray(self.function(row)) for row in rows]
            for result in results[:1]:
                self._check_shape(result.shape)
            return np.asarray(results), n
        if valid is None:
            return self._call(values), n
        result = None
        for count in np.unique(n):
            rows = np.flatnonzero(n == count)
            part = self._call(values[rows][valid[rows]].reshape(len(rows), count))
            if result is None:
                result = np.empty((len(values), *self.fshape), part.dtype)
            result[rows] = part
        return result, n

    @property
    def moment(self):
        """'mean', 'var' or 'std' when the function is NumPy's own, else None."""
        return {np.mean: "mean", np.var: "var", np.std: "std"}.get(self.function)

    def block_reduce(self, block, origin, grid, start, stop, dtype, mask):
        """``numpy.mean``, ``var`` and ``std`` of integers from exact tile sums.

        Not ``var`` and ``std`` into integers: cast, their quotient rounded
        once, where NumPy's own arithmetic lands a hair below an integer,
        would be 1 more (a mean's is NumPy's very quotient).
        """
        truncated = np.dtype(dtype).kind != "f" and self.moment != "mean"
        if not self.moment or truncated or self.fshape or block.dtype.kind not in "biu":
            return None
        done = tile_moments(block, origin, grid, start, stop, self.moment, mask)
        return None if done is None else (done[0].astype(dtype), done[1])

    def _call(self, windows):
        result = np.asarray(self.function(windows, axis=-1))
        if result.shape != (len(windows), *self.fshape):
            msg = (
                f"`function` with vectorized=True must return shape "
                f"(windows,) + fshape = {(len(windows), *self.fshape)} for windows "
                f"of shape {windows.shape} and axis=-1, got {result.shape}"
            )
            raise ValueError(msg)
        return result


@dataclass(frozen=True)
class Missing:
    """Which samples are missing, and what replaces them.

    Attributes
    ----------
    omit_nan : bool
        Leave NaN voxels out of the windows, like masked ones.
    min_count : int
        A window with fewer kept voxels than this is missing; empty windows
        always are.
    fill : {'zero', 'nearest'}
        Missing samples become 0, or the value of the nearest valid sample
        (see :mod:`dask_localstats._fill`; the kernel only flags them).
    """

    omit_nan: bool = False
    min_count: int = 0
    fill: str = "zero"

    @property
    def flags(self):
        """Whether samples are checked for missing at all."""
        return self.min_count > 0 or self.fill == "nearest"

    def apply(self, out, counts):
        """`out` with missing samples zeroed, or flagged in a record array."""
        if not self.flags:
            return out
        missing = counts < max(self.min_count, 1)
        if self.fill == "zero":
            out[missing] = 0
            return out
        flagged = np.empty(out.shape, flagged_dtype(out.dtype))
        flagged["value"] = out
        flagged["missing"] = missing.reshape(
            missing.shape + (1,) * (out.ndim - missing.ndim)
        )
        return flagged


KEEP_ALL = Missing()


def flagged_dtype(dtype):
    """Record dtype of a sample and its missing flag."""
    return np.dtype([("value", dtype), ("missing", bool)])


def reduce_block(
    block, origin, grid, start, stop, statistic, dtype, mask=None, missing=KEEP_ALL
):
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
    statistic : Statistic
        What to compute on each window.
    dtype : numpy dtype
        Output dtype; values are cast as by NumPy assignment.
    mask : bool ndarray or None
        Mask of the same region as `block`.
    missing : Missing
        Handling of NaN voxels and of windows with too few kept voxels.

    Returns
    -------
    ndarray
        Shape ``stop - start + statistic.fshape``; a record array with fields
        ``value`` and ``missing`` when missing samples are to be filled later.
    """
    done = None
    if grid.footprint is None:
        done = statistic.block_reduce(block, origin, grid, start, stop, dtype, mask)
    if done is not None:
        return missing.apply(*done)
    ndim = grid.ndim
    shape = tuple(b - a for a, b in zip(start, stop, strict=True))
    out = np.zeros(shape + statistic.fshape, dtype=dtype)
    counts = np.zeros(shape, dtype=np.int64)
    omit_nan = missing.omit_nan and block.dtype.kind == "f"
    axes = [list(grid.windows(d, start[d], stop[d]).groups()) for d in range(ndim)]
    for combo in itertools.product(*axes):
        for part in _batches(combo, math.prod(p.shape[1] for _, p, _ in combo)):
            rows = [r for r, _, _ in part]
            positions = [p - o for (_, p, _), o in zip(part, origin, strict=True)]
            gather = _gatherer(positions)
            values = gather(block)
            valid = None
            if grid.footprint is not None:
                valid = grid.footprint[_broadcast([f for _, _, f in part])]
            if mask is not None:
                kept = gather(mask).astype(bool, copy=False)
                valid = kept if valid is None else valid & kept
            if omit_nan:
                kept = ~np.isnan(values)
                valid = kept if valid is None else valid & kept
            sizes = tuple(len(r) for r in rows)
            values = values.reshape(math.prod(sizes), -1)
            if valid is not None:
                valid = valid.reshape(values.shape)
            result, n = statistic.reduce(values, valid)
            out[np.ix_(*rows)] = result.reshape(sizes + statistic.fshape)
            counts[np.ix_(*rows)] = n.reshape(sizes)
    return missing.apply(out, counts)


def _gatherer(positions):
    """What takes an array to its windows at `positions`, ``(g0, ..., L0, ...)``.

    `positions` holds, per axis, the indices ``(g, L)`` of `g` windows of `L`
    voxels each. Where every axis's windows are evenly spaced, with evenly
    spaced voxels, the windows are one copy of a strided view of the array
    (a sliding window view, sliced); else one broadcast fancy index. Both
    give the same array; the plan is made once for a block and its mask.
    """
    windows, picks = [], []
    for p in positions:
        g, length = p.shape
        step = int(p[0, 1] - p[0, 0]) if length > 1 else 1
        stride = int(p[1, 0] - p[0, 0]) if g > 1 else 1
        expected = p[0, 0] + stride * np.arange(g)[:, None] + step * np.arange(length)
        if stride < 1 or step < 1 or not np.array_equal(p, expected):
            index = _broadcast(positions)
            return lambda array: array[index]
        width = (length - 1) * step + 1
        start = int(p[0, 0])
        windows.append(width)
        picks.append(
            (
                slice(start, start + stride * (g - 1) + 1, stride),
                slice(None, None, step),
            )
        )
    index = tuple(a for a, _ in picks) + tuple(b for _, b in picks)
    view = np.lib.stride_tricks.sliding_window_view
    return lambda array: view(array, windows)[index].copy()


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
