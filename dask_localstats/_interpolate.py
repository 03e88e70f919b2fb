"""Resampling the coarse grid to full resolution with B-splines.

``scipy.ndimage.zoom(coarse, S / m, order=k)`` evaluates, at coarse
coordinate ``x = i * (m - 1) / (S - 1)`` of every output voxel ``i``, the
B-spline of order ``k`` whose coefficients are the coarse samples
prefiltered with mirror boundaries (for ``k >= 2``). B-splines are separable,
so the value at an output voxel is a tensor product of ``k + 1`` taps per
axis. We split the work the same way:

1. :func:`prefilter` runs scipy's recursive spline filter once, on the whole
   (small) coarse grid. Orders 0 and 1 need no prefilter, so their output
   depends only on nearby coarse samples.
2. :func:`resample_block` evaluates any rectangular block of the output: for
   each axis it builds the taps and weights of the block's coordinates
   (:func:`_taps`) and contracts the coefficients axis after axis, the
   first axis last, a piece of the output at a time so that temporaries
   stay in cache: a slab of planes (first axis), or a band of rows of a
   large plane (the other axes first, on the coarse planes, when the first
   axis expands). Cost: about ``k + 1`` multiply-adds per output voxel for the
   last contraction, much less for the others; taps of weight 0 (order 1
   on an axis of spacing 1) are skipped, and order 1 interpolates
   ``a + w * (b - a)``, the difference of two coarse planes computed once
   for all the output planes between them.

Coordinates come from :func:`coordinates`: ``align="corners"`` is zoom's
(and ClearMap's) convention, the first coarse sample on voxel 0 and the last
on voxel ``S - 1``; ``align="centers"`` puts every coarse sample on its own
center voxel and holds the value beyond the outermost centers.
Integer outputs are rounded half away from zero and clipped, as scipy does;
orders 0 and 1 into an unsigned dtype, whose values are then weighted means
of coefficients of at least 0 and need no clipping, add the half to the
coefficients once instead of to every voxel (a pass fewer). Order 1 into
float32 (backgrounds of 16-bit images) makes its last contraction, the one
that writes every output voxel, in float32: ``a`` and ``b - a`` rounded to
float32 once per pair of coarse values, then ``a + w * (b - a)`` in float32,
two passes over half the bytes (values within two float32 rounding steps
of the float64 interpolation, the same bits for every block and piece).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import ndimage

ALIGNS = ("corners", "centers")


def coordinates(size, count, first, spacing, align, start=0, stop=None):
    """Coarse coordinates of the output voxels ``start:stop`` on one axis."""
    stop = size if stop is None else stop
    x = np.arange(start, stop, dtype=np.float64)
    if align == "centers":
        return np.clip((x - first) / spacing, 0, count - 1)
    zoom = (count - 1) / (size - 1) if size > 1 else 1.0
    return x * zoom


def prefilter(coarse, order, ndim):
    """Spline coefficients of `coarse` along its first `ndim` axes (float64)."""
    coefficients = np.asarray(coarse, dtype=np.float64)
    if order > 1:
        for axis in range(ndim):
            coefficients = ndimage.spline_filter1d(
                coefficients, order, axis=axis, mode="mirror", output=np.float64
            )
    return coefficients


# The B-spline prefilter's pole of largest magnitude, per order: a sample's
# weight in the coefficient k samples away falls off as abs(pole) ** k.
_POLES = {2: 0.17157287525381, 3: 0.26794919243112, 4: 0.36134122590022,
          5: 0.43057534709997}  # fmt: skip


def prefilter_halo(order):
    """Samples a chunk needs on each side to prefilter exactly (orders 2 to 5).

    Beyond them a sample's weight in the chunk's coefficients is below
    2**-60, far under float64 rounding, so prefiltering a chunk with this
    halo (scipy's mirror boundary at the halo's ends, the true one at the
    grid's edges) gives the coefficients of the whole grid.

    Examples
    --------
    >>> [prefilter_halo(order) for order in (2, 3, 4, 5)]
    [24, 32, 41, 50]
    """
    return math.ceil(60 * math.log(2) / -math.log(_POLES[order]))


def _bspline(t, order):
    """The centered B-spline of `order` at `t` (any shape)."""
    if order == 0:
        return (np.abs(t) < 0.5).astype(np.float64)
    total = np.zeros_like(t)
    half = (order + 1) / 2
    for j in range(order + 2):
        term = np.maximum(t + half - j, 0) ** order
        total += (-1) ** j * math.comb(order + 1, j) * term
    return total / math.factorial(order)


def _first_tap(x, order):
    """Unfolded index of the first of the ``order + 1`` taps at `x`."""
    shift = 0 if order % 2 else 0.5
    return np.floor(np.asarray(x) + shift).astype(np.intp) - order // 2


def _mirror(index, count):
    """Fold indices into ``[0, count)`` with scipy's 'mirror' boundary."""
    if count == 1:
        return np.zeros_like(index)
    period = 2 * (count - 1)
    index = np.abs(index) % period
    return np.where(index >= count, period - index, index)


def _taps(x, count, order):
    """Mirror-folded tap indices and weights, both of shape (len(x), order+1)."""
    index = _first_tap(x, order)[:, None] + np.arange(order + 1)
    if order == 0:
        weights = np.ones(index.shape)
    else:
        weights = _bspline(x[:, None] - index, order)
    return _mirror(index, count), weights


def taps_range(x, count, order):
    """The range ``(lo, hi)`` of coarse indices that coordinates `x` need.

    Taps whose weight is 0 for every coordinate (order 1 on coordinates
    that fall on coarse samples) are not needed, as :func:`resample_block`
    skips them.
    """
    index, _ = _needed_taps(np.asarray(x, dtype=np.float64), count, order)
    return int(index.min()), int(index.max()) + 1


def resample_block(
    coefficients, offset, coords, counts, order, dtype, bounds=None, then=None,
    ahead=None, into=None,
):  # fmt: skip
    """Evaluate the spline on the tensor grid of `coords`.

    Parameters
    ----------
    coefficients : ndarray
        Spline coefficients (see :func:`prefilter`) of coarse indices
        ``offset[d]:`` onwards on each spatial axis, followed by any trailing
        (component) axes.
    offset : tuple of int
        Coarse index of ``coefficients[0, ..., 0]``.
    coords : list of 1-D float arrays
        Coarse coordinates of the output voxels, per spatial axis.
    counts : tuple of int
        Size of the full coarse grid per axis (for the mirror boundary).
    order : int
        Spline order, 0 to 5.
    dtype : numpy dtype
        Output dtype.
    bounds : (2, ...) array or None
        Minimum and maximum (per trailing component) to clip values to.
    then : callable or None
        A step fused into the same pass: ``then(where, piece, within)`` maps the
        piece ``out[where]`` of the output, in `dtype`, to the piece
        returned, of dtype ``then.dtype`` (a subtraction from the image, say),
        while it is in cache. ``where`` indexes the output: a slice of its
        planes (first axis), or that and a slice of its rows (second axis).
        ``within`` (a keyword) is ``(low, high)`` where every value lies
        between them but for rounding to `dtype` (orders 0 and 1 of finite
        coefficients), else None.
    ahead : bool or None
        Whether the axes after the first are contracted before the first
        (else after it). It sets the order of the float sums, so a chunked
        result gives it the same for all its chunks (:func:`expands`); None
        takes the faster for this block.
    into : ndarray or None
        Where to write the result (of its shape and dtype), instead of a
        new array: a region of a whole result, which then needs no copy.

    Returns
    -------
    ndarray
        Shape ``tuple(map(len, coords)) + coefficients.shape[len(coords):]``:
        `into` if given.
    """
    values = np.asarray(coefficients, dtype=np.float64)
    taps = [_local_taps(coords, counts, offset, order, d) for d in range(len(coords))]
    # NaN carries through min and max: finite extremes, finite values
    low, high = (values.min(), values.max()) if order <= 1 and values.size else (0, 0)
    inside = order <= 1 and _within(low, high, dtype)  # needs no clipping
    finite = order != 1 or bool(np.isfinite(low) and np.isfinite(high))  # see _mix
    # orders 0 and 1 keep the values within the coefficients' extremes
    exact = order <= 1 and values.size and np.isfinite(low) and np.isfinite(high)
    within = (float(low), float(high)) if exact else None
    # unsigned and inside: every value is a weighted mean of coefficients of
    # at least 0, so the rounding's half can be added to them, once
    half = inside and bounds is None and np.dtype(dtype).kind == "u"
    if half:
        values = values + 0.5
    if ahead is None:
        ahead = expands(len(coords[0]), values.shape[0])
    plane = math.prod(map(len, coords[1:])) * math.prod(values.shape[len(coords) :])
    narrow = order == 1 and np.dtype(dtype) == np.float32 and bounds is None
    if plane < _SMALL:  # the whole block at once
        axes = list(reversed(range(len(coords))))  # the others, then the first
        axes = axes if ahead else axes[-1:] + axes[:-1]
        for axis in axes:
            last = narrow and axis == axes[-1]
            values = _contract(values, axis, *taps[axis], order == 1, finite, last)
        values = cast(_clip(values, bounds), dtype, inside=inside, half=half)
        values = values if then is None else each_slab(then, values, then.dtype)
        if into is None:
            return values
        into[...] = values
        return into
    if ahead:
        for axis in reversed(range(1, len(coords))):
            values = _contract(values, axis, *taps[axis], order == 1, finite)
    shape = (*map(len, coords), *values.shape[len(coords) :])
    out = (
        np.empty(shape, dtype if then is None else then.dtype) if into is None else into
    )
    spline = _Spline(
        order, finite, inside, half, narrow, bounds, np.dtype(dtype), then, within
    )
    return _by_pieces(values, taps, out, ahead, spline)


class _Spline(NamedTuple):
    """What each piece of :func:`resample_block`'s output is made with."""

    order: int
    finite: bool  # every coefficient is finite (see _mix)
    inside: bool  # the values need no clipping to `dtype` (see cast)
    half: bool  # the rounding's half is added to the coefficients (see cast)
    narrow: bool  # the last contraction in float32 (see _lerp32)
    bounds: np.ndarray | None  # (2, ...) extremes to clip the values to
    dtype: np.dtype  # of the values
    then: object  # the step fused after, or None
    within: tuple | None  # (low, high): the values' extremes, if known


def _by_pieces(values, taps, out, ahead, spline):
    """The output of :func:`resample_block`, a piece at a time, into `out`.

    A piece is a slab of planes (first axis), or a band of rows (second
    axis) of one plane where a plane is large, so that the float64
    temporaries stay in cache and only the result is written. When the
    first axis expands (`ahead`: more output planes than twice the coarse
    ones), `values` come contracted on the other axes already, once for
    all the coarse planes, and each output plane is a sum of a few of
    those, a slab of planes at a time (:func:`_expanding`); else (an axis of spacing about 1) each output plane is made
    from the coarse planes it needs: where that is one coarse plane as it
    is, a slab of them at once (fewer NumPy calls), and the second axis is
    contracted band by band. Every voxel gets the same arithmetic.
    """
    lerp, finite, ndim = spline.order == 1, spline.finite, len(taps)
    narrow = spline.narrow
    # float64 planes that need no more steps are summed in place in `out`
    direct = ahead and spline.then is None and spline.bounds is None
    direct = direct and out.dtype == values.dtype
    index, weights = taps[0]
    if ahead and not direct:
        return _expanding(values, taps[0], out, spline, ndim)
    copies = not ahead and index.shape[1] == 1 and bool((weights == 1).all())
    # float32 pieces (narrow): twice the voxels in as many bytes, half the calls
    voxels = _SLAB_VOXELS * (2 if narrow else 1)
    depth = slab_depth(math.prod(out.shape[1:]), voxels) if copies else 1
    bands = _bands(out.shape, voxels) if ndim > 1 else [slice(None)]
    # the second axis's taps of each band, contracted last (not ahead)
    across = (
        [] if ahead or ndim == 1 else [[t[rows] for t in taps[1]] for rows in bands]
    )
    if narrow and across and across[0][0].shape[1] == 2:  # prepared once
        across = [_Lerp32.of(*band, 1, values.ndim) for band in across]
    scratch = np.empty(values.shape[1:], values.dtype)
    # order 1 mixes pairs of planes; in float32 where the first axis is the last
    pairs = _Pairs(narrow and ndim == 1) if lerp else None
    for start in range(0, len(index), depth):
        planes = slice(start, start + depth)
        terms = (values, index[start], weights[start])
        if direct:
            _combine(*terms, out[start], scratch, pairs, finite)
            continue
        if copies:
            slab = np.take(values, index[planes, 0], axis=0)
        else:
            slab = _combine(*terms, None, scratch, pairs, finite)[None]
        for axis in () if ahead else reversed(range(2, ndim)):
            slab = _contract(slab, axis, *taps[axis], lerp, finite)
        for b, rows in enumerate(bands):
            if not across:
                piece = slab[:, rows]
            elif isinstance(across[b], _Lerp32):
                piece = _lerp32(slab, across[b], finite)
            else:
                piece = _contract(slab, 1, *across[b], lerp, finite)
            _finish(piece, (planes, rows) if ndim > 1 else planes, out, spline)
    return out


def _expanding(values, taps, out, spline, ndim):
    """:func:`_by_pieces` where the first axis expands, `values` contracted
    on the other axes: a slab of output planes at once.

    Consecutive output planes between the same coarse planes (taps) are
    mixed from them in one slab of about :data:`_EXPANDING_VOXELS`, each
    plane with its own weights (broadcast), into memory reused from slab
    to slab: fewer and longer NumPy calls than a plane at a time, and no
    fresh memory a plane (W1's chunks: a fifth less time). Each voxel gets
    the arithmetic of a plane made alone.
    """
    index, weights = taps
    depth = max(1, _EXPANDING_VOXELS // max(math.prod(out.shape[1:]), 1))
    mixed = np.float32 if spline.narrow else values.dtype  # see _lerp32
    buffer = np.empty((depth, *values.shape[1:]), mixed)
    # the terms after the first, where taps are summed (not one, nor a pair)
    summed = index.shape[1] > 2 or (index.shape[1] == 2 and spline.order != 1)
    scratch = np.empty_like(buffer) if summed else None
    pairs = _Pairs(spline.narrow) if spline.order == 1 else None  # see _combine
    bands = _bands(out.shape) if ndim > 1 else [slice(None)]
    start = 0
    while start < len(index):
        stop = start + 1  # the planes of one slab share their taps
        while stop < min(start + depth, len(index)) and np.array_equal(
            index[stop], index[start]
        ):
            stop += 1
        k, shape = stop - start, (stop - start,) + (1,) * (values.ndim - 1)
        each = [w.reshape(shape) for w in weights[start:stop].T]  # broadcast
        scratch_k = None if scratch is None else scratch[:k]
        terms = (values, index[start], each, buffer[:k], scratch_k)
        slab = _combine(*terms, pairs, spline.finite)
        planes = slice(start, stop)
        for rows in bands:
            piece, where = (
                (slab[:, rows], (planes, rows)) if ndim > 1 else (slab, planes)
            )
            _finish(piece, where, out, spline)
        start = stop
    return out


def _finish(piece, where, out, spline):
    """A piece of values clipped, cast and passed on, into ``out[where]``."""
    piece = _clip(piece, spline.bounds)
    if spline.then is None:
        cast(piece, spline.dtype, out[where], spline.inside, spline.half)
    else:
        cast_piece = cast(piece, spline.dtype, inside=spline.inside, half=spline.half)
        out[where] = spline.then(where, cast_piece, within=spline.within)


def _bands(shape, voxels=None):
    """Slices of the second axis of `shape` into bands of rows that hold at
    most `voxels` (:data:`_SLAB_VOXELS`) voxels a plane (the whole axis if
    they fit)."""
    row = math.prod(shape[2:])
    step = max(1, (voxels or _SLAB_VOXELS) // max(row, 1))
    return [slice(start, start + step) for start in range(0, shape[1], step)]


# Voxels of a piece of output made at once (1 MiB of float64; twice as
# many in float32, see _by_pieces): its temporaries, and those of a step
# fused after it, stay in cache.
_SLAB_VOXELS = 1 << 17
# Voxels of a slab of output planes mixed at once from the same coarse
# planes (see _expanding).
_EXPANDING_VOXELS = 1 << 18


def slab_depth(plane, voxels=None):
    """Planes of `plane` voxels in a slab of at most `voxels`
    (:data:`_SLAB_VOXELS`), at least one.

    Examples
    --------
    >>> slab_depth(256 * 256), slab_depth(2048 * 2048)
    (2, 1)
    """
    return max(1, (voxels or _SLAB_VOXELS) // max(plane, 1))


def each_slab(step, planes, dtype):
    """``step(where, planes[where])`` for slabs ``where`` of `planes` (a slice
    of the first axis, :func:`slab_depth` planes), as one array.

    Examples
    --------
    >>> each_slab(lambda where, planes: 2 * planes, np.ones((3, 2)), np.int8)
    array([[2, 2],
           [2, 2],
           [2, 2]], dtype=int8)
    """
    out = np.empty(planes.shape, dtype)
    depth = slab_depth(math.prod(planes.shape[1:]))
    for start in range(0, len(planes), depth):
        where = slice(start, start + depth)
        out[where] = step(where, planes[where])
    return out


def expands(size, count):
    """Whether `count` coarse samples resampled to `size` voxels more than double.

    The first axis of :func:`resample_block` is then contracted last
    (``ahead``): the others are contracted once for its few coarse planes.
    """
    return size > 2 * count


def _combine(values, index, weights, out, scratch, pairs=None, finite=True):
    """``sum_j weights[j] * values[index[j]]``, into `out` (None: a new array).

    `weights` are numbers, or arrays that broadcast against a term (the
    weights of each plane of a slab, :func:`_expanding`). `scratch`, of
    the shape of the result, holds each term after the first. With
    `pairs` (order 1: a :class:`_Pairs`, the planes coming in order), two
    taps are mixed by :func:`_mix`, the difference ``b - a`` computed once
    for all the planes between the same two: a pass fewer a plane, and
    ``a`` itself where the weight is 0.
    """
    if len(index) == 1 and np.all(weights[0] == 1):
        if out is None:
            return values[index[0]].copy()
        out[...] = values[index[0]]
        return out
    if pairs is not None and len(index) == 2:
        first, second, difference = pairs.of(values, int(index[0]), int(index[1]))
        if pairs.narrow:
            weights = [_float32(w) for w in weights]
        finite = finite and not pairs.overflow
        with np.errstate(invalid="ignore", over="ignore"):  # where not finite
            return _mix(first, second, *weights, difference, out, finite)
    total = np.multiply(values[index[0]], weights[0], out=out)
    for tap, weight in zip(index[1:], weights[1:], strict=True):
        total += np.multiply(weight, values[tap], out=scratch)
    return total


class _Pairs:
    """The last pair of coarse planes that order 1 mixed (:func:`_combine`).

    Output planes come in order, so those between the same two coarse
    planes ``a`` and ``b`` follow each other: ``b - a`` is computed once
    for them. With `narrow` (the first axis contracted last, into float32)
    ``a``, ``b`` and ``b - a`` are rounded to float32 once, and the planes
    mixed in float32, as :func:`_lerp32` does.
    """

    def __init__(self, narrow=False):
        self.narrow, self.key, self.planes = narrow, None, None
        self.overflow = False  # b - a overflows float32 somewhere

    def of(self, values, a, b):
        """``values[a]``, ``values[b]`` and their difference."""
        if self.key != (a, b):
            with np.errstate(invalid="ignore"):  # inf - inf, where not finite
                planes = (values[a], values[b], values[b] - values[a])
            if self.narrow:
                planes = tuple(_float32(plane) for plane in planes)
                self.overflow = not np.isfinite(planes[2]).all()
            self.key, self.planes = (a, b), planes
        return self.planes


def _float32(values):
    """`values` rounded to float32; those beyond its range become infinite."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype=np.float32)


class _Lerp32(NamedTuple):
    """Order 1's two taps along one axis, prepared once for :func:`_lerp32`
    (for all the slabs of a band of rows, say).

    The second tap follows from the first (the next coarse sample, or the
    one before it past the grid's end, mirrored), so ``b - a`` is taken once
    per coarse sample ``a`` that is some output's first tap.
    """

    axis: int
    coarse: tuple  # the coarse samples that are first taps (an index)
    following: np.ndarray  # the second tap of each of them
    first: np.ndarray  # each output's first tap, among `coarse`
    second: np.ndarray  # each output's second tap
    w0: np.ndarray  # the taps' weights in float32, along `axis`
    w1: np.ndarray

    @classmethod
    def of(cls, index, weights, axis, ndim):
        """The plan for taps `index` and `weights` along `axis` of `ndim`."""
        first, second = index[:, 0], index[:, 1]
        low, high = int(first.min()), int(first.max()) + 1
        following = np.arange(low, high)
        following[first - low] = second
        shape = [1] * ndim
        shape[axis] = len(index)
        w0, w1 = (_float32(w).reshape(shape) for w in weights.T)
        coarse = (slice(None),) * axis + (slice(low, high),)
        return cls(axis, coarse, following, first - low, second, w0, w1)


def _lerp32(values, lerp, finite):
    """Order 1's two taps mixed in float32 along ``lerp.axis`` (a
    :class:`_Lerp32`; the last contraction of a float32 result):
    :func:`_contract`'s ``a + w1 * (b - a)``, with ``a``, ``b`` and ``b -
    a`` rounded to float32 once per coarse sample ``a`` and the weights too.

    Two float32 passes (gathers included) write the output, instead of
    five float64 passes and a cast; the values move by at most two float32
    rounding steps of ``|a| + |b|``. Where ``b - a`` overflows float32 or a
    coefficient is not `finite`, the values that are not finite are
    ``w0 * a + w1 * b`` instead, in float32, as :func:`_mix` does.
    """
    axis = lerp.axis
    starts = values[lerp.coarse]
    with np.errstate(invalid="ignore"):  # inf - inf, where not finite
        steps = _float32(np.take(values, lerp.following, axis=axis) - starts)
    starts = _float32(starts)
    with np.errstate(invalid="ignore", over="ignore"):  # where not finite
        total = np.take(steps, lerp.first, axis=axis)
        total *= lerp.w1
        total += np.take(starts, lerp.first, axis=axis)
        if not (finite and np.isfinite(steps).all()):
            a = np.take(starts, lerp.first, axis=axis)
            b = _float32(np.take(values, lerp.second, axis=axis))
            odd = ~np.isfinite(total)
            total[odd] = (lerp.w0 * a + lerp.w1 * b)[odd]
    return total


def _within(low, high, dtype):
    """Whether coefficients from `low` to `high` lie in the range of `dtype`,
    integers of 32 bits or fewer (exact in float64).

    Orders 0 and 1 weigh coefficients by weights of sum 1, none negative, so
    their values stay within the coefficients' range but for float
    rounding, far below the half a unit that the rounding to integers adds.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or dtype.itemsize > 4:
        return False
    info = np.iinfo(dtype)
    # False for NaN, which the clipping leaves as it is anyway
    return bool(info.min <= low and high <= info.max)


def _clip(values, bounds):
    return (
        values if bounds is None else np.clip(values, bounds[0], bounds[1], out=values)
    )


# Output voxels a plane (components included) below which a block is made
# whole, at once: its few NumPy calls cost less than pieces would.
_SMALL = 4096


def _needed_taps(x, count, order):
    """:func:`_taps` without the taps of weight 0 for every coordinate.

    (Order 1 on coordinates that fall on coarse samples, as on an axis of
    spacing 1, keeps a single tap of weight 1.)
    """
    index, weights = _taps(x, count, order)
    used = (weights != 0).any(axis=0)
    return index[:, used], weights[:, used]


def _local_taps(coords, counts, offset, order, axis):
    """The needed taps of one axis, relative to `offset`."""
    index, weights = _needed_taps(coords[axis], counts[axis], order)
    return index - offset[axis], weights


def _mix(a, b, w0, w1, difference, out, finite):
    """``a + w1 * (b - a)`` (order 1's two taps), `difference` being ``b - a``.

    Into `out` (None: a new array; it may be `difference`). That arithmetic
    gives NaN where `a` or `b` is infinite: in blocks holding a coefficient
    that is not `finite`, those values are the weighted sum ``w0 * a + w1 *
    b`` instead, as every other order gives them.
    """
    total = np.multiply(difference, w1, out=out)
    total += a
    if not finite:
        odd = ~np.isfinite(total)
        total[odd] = (w0 * a + w1 * b)[odd]
    return total


def _contract(values, axis, index, weights, lerp=False, finite=True, narrow=False):
    """Sum of the taps along `axis`: ``sum_j weights[:, j] * values[index[:, j]]``.

    With `lerp` (order 1), two taps are mixed by :func:`_mix`, the very
    arithmetic of :func:`_combine`; with `narrow` too, in float32
    (:func:`_lerp32`).
    """
    if index.shape[1] == 1 and (weights == 1).all():
        return np.take(values, index[:, 0], axis=axis)
    if lerp and narrow and index.shape[1] == 2:
        return _lerp32(values, _Lerp32.of(index, weights, axis, values.ndim), finite)
    shape = [1] * values.ndim
    shape[axis] = len(index)
    if lerp and index.shape[1] == 2:
        a = np.take(values, index[:, 0], axis=axis)
        b = np.take(values, index[:, 1], axis=axis)
        w0, w1 = (w.reshape(shape) for w in weights.T)
        with np.errstate(invalid="ignore"):  # inf - inf, where not finite
            difference = np.subtract(b, a, out=b if finite else None)
            return _mix(a, b, w0, w1, difference, difference, finite)
    result = None
    for j in range(index.shape[1]):
        term = np.take(values, index[:, j], axis=axis)
        term *= weights[:, j].reshape(shape)
        result = term if result is None else np.add(result, term, out=result)
    return result


def cast(values, dtype, out=None, inside=False, half=False):
    """Cast float values to `dtype`, rounding and clipping integers like scipy.

    Integers are rounded half away from zero and clipped to the dtype's
    range, unless `inside`: `values` are known to lie in it, give or take
    float rounding. With `half`, unsigned `values` hold the rounding's half
    already. `values` may be overwritten; the result goes to `out` if
    given (an array of `dtype`, saving a copy).
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if dtype.kind == "i":
            values += np.copysign(0.5, values)
        elif not half:
            values += 0.5
        # the cast truncates toward zero, completing the rounding
        if not inside:
            values = np.clip(values, info.min, info.max, out=values)
    elif dtype.kind == "b":
        values = values != 0
    if out is not None:
        np.copyto(out, values, casting="unsafe")
        return out
    return values.astype(dtype, copy=False)
