"""Missing samples of a coarse grid taken from the nearest valid sample.

With ``fill="nearest"`` a missing sample (a window that kept too few
voxels) takes the values of the nearest valid sample of the coarse grid,
by Euclidean distance in grid steps; of several equally near, the first in
C order (the least index on the first axis, then on the next, ...).

Nearest samples
---------------
The nearest valid sample ``q`` of a missing sample ``p`` has a missing
neighbour on each axis along which it lies off ``p``: one step from ``q``
toward ``p`` is nearer to ``p``, so it cannot be valid. Only the valid
samples bordering the missing ones are candidates, then; a k-d tree of
them (:class:`scipy.spatial.cKDTree`) gives each missing sample its
nearest ones, with squared distances compared exactly as integers, and
where the nearest are tied all those at that distance are taken and the
first in C order kept (:func:`nearest`). The answer depends only on the
samples within that distance of ``p``: it is the same in any box of the
grid that holds them.

Block by block
--------------
So a block of the grid can be filled from a box around it alone: the block
grown on every side by a bound on how far any of its missing samples is
from its nearest valid one. For a block with valid samples, the farthest
any of its missing samples is from a valid sample of the block itself (its
*reach*, :func:`reach`, computed with the block) bounds it; for a block
without, the distance to the nearest block that has some, plus both
blocks' half diagonals (:func:`boxes`). A writer computes the reaches with
the blocks, then fills block by block (see
:func:`dask_localstats._checkpoint.settle`).

Axis by axis
------------
Where a gap spans many blocks its blocks' boxes hold much of the grid, and
a lazy result has no reaches to size boxes with; there the fill runs along
one axis at a time, as exact Euclidean distance transforms do (Felzenszwalb
and Huttenlocher's lower envelope of parabolas), in chunks that hold whole
lines along that axis and nothing more (:func:`sweep`). The last axis
first: each sample gets the squared distance to the nearest valid sample
on its line, and that sample's values. Then along each axis before it,
with those distances ``g``: a sample at ``x`` on a line takes, of the
samples ``x'`` of its line, the one least ``(x - x')**2 + g(x')``, and its
values. After the first axis every sample holds the values of its nearest
valid sample of the grid. Each pass keeps, of equal sums, the least
``x'``, which is the first in C order: the nearest samples of a plane
``x'`` are compared by their indices in the plane by the passes before.
The passes compare integers, so the values are those of the boxes above,
to the bit; each costs a few operations a sample (a loop over the line's
positions, vectorized over its chunk's lines), and no task holds more than
a chunk of lines (:func:`dask_localstats._engine.fill_stage`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from ._graph import edges_of, spans

__all__ = [
    "FAR",
    "boxes",
    "fill_block",
    "nearest",
    "reach",
    "sweep",
    "swept_dtype",
    "swept_values",
]


def _next_to_missing(missing):
    """Where a sample has a missing neighbour along an axis."""
    near = np.zeros_like(missing)
    for d in range(missing.ndim):
        lower = (slice(None),) * d + (slice(None, -1),)
        upper = (slice(None),) * d + (slice(1, None),)
        near[lower] |= missing[upper]
        near[upper] |= missing[lower]
    return near


def _border(missing):
    """Indices (C order) of the valid samples next to a missing one along an axis."""
    return np.argwhere(_next_to_missing(missing) & ~missing)


def nearest(missing, points, ties=True):
    """The nearest valid sample of each of `points`, in a boolean grid `missing`.

    Parameters
    ----------
    missing : bool ndarray
        True where a sample is missing.
    points : (k, ndim) int ndarray
        Indices of samples (missing ones).
    ties : bool
        Whether, of equally near samples, to find the first in C order
        (else any of them).

    Returns
    -------
    (k, ndim) int ndarray, or None when no sample is valid

    Examples
    --------
    >>> missing = np.array([[False, True, False], [True, True, True]])
    >>> nearest(missing, np.argwhere(missing)).tolist()
    [[0, 0], [0, 0], [0, 0], [0, 2]]
    """
    border = _border(missing)
    if not len(border):  # all missing (or none, and no points)
        return None
    return border[_nearest_of(border, points, ties)]


def _nearest_of(border, points, ties=True):
    """The index in `border` (candidates, in C order) of each point's nearest."""
    tree = cKDTree(border)
    chosen = np.empty(len(points), np.intp)
    todo = np.arange(len(points))
    k = min(2 if ties else 1, len(border))
    while len(todo):
        _, found = tree.query(points[todo], k=k)
        found = found.reshape(len(todo), k)
        d2 = np.square(border[found] - points[todo, None]).sum(axis=-1)
        least = d2.min(axis=1, keepdims=True)
        # indices of border are in C order: the least tied one is the first
        chosen[todo] = np.where(d2 == least, found, len(border)).min(axis=1)
        if k == len(border) or not ties:
            break
        todo = todo[d2[:, -1] == least[:, 0]]  # more may be tied beyond k
        k = min(4 * k, len(border))
    return chosen


def _missing(flagged, ndim):
    """The missing flags of a flagged grid's samples (its spatial axes)."""
    return flagged["missing"].reshape((*flagged.shape[:ndim], -1))[..., 0]


def fill_block(flagged, ndim, block=None):
    """Values of a block of `flagged`, missing ones from the nearest valid sample.

    Parameters
    ----------
    flagged : record ndarray
        Fields ``value`` and ``missing``, spatial axes first; a box of the
        grid that holds, for each missing sample of `block`, the samples
        within its distance to the nearest valid one (all the grid will do).
    ndim : int
        Number of spatial axes.
    block : tuple of slice or None
        The block of `flagged` to fill (unit steps); the whole if None.

    Returns
    -------
    ndarray
        The block's values; all 0 when `flagged` has no valid sample.

    Examples
    --------
    >>> flagged = np.zeros(5, [("value", float), ("missing", bool)])
    >>> flagged["value"] = [5, -1, 7, -1, -1]
    >>> flagged["missing"] = [False, True, False, True, True]
    >>> fill_block(flagged, 1)  # sample 1 is as near to 0 as to 2: 0 wins
    array([5., 5., 7., 7., 7.])
    """
    block = block or (slice(None),) * ndim
    values = flagged["value"][block].copy()
    missing = _missing(flagged, ndim)
    start = [s.indices(n)[0] for s, n in zip(block, missing.shape, strict=True)]
    points = np.argwhere(missing[block]) + start
    if not len(points):
        return values
    found = nearest(missing, points)
    if found is None:  # no valid sample in the grid
        values[...] = 0
    else:
        values[tuple((points - start).T)] = flagged["value"][tuple(found.T)]
    return values


def reach(flagged, ndim):
    """How far a block's missing samples are from its valid ones, squared.

    The greatest squared distance from a missing sample of the block
    `flagged` to the nearest valid sample of the block: ``[0.0]`` with none
    missing, ``[inf]`` with none valid.

    Examples
    --------
    >>> flagged = np.zeros((1, 4), [("value", float), ("missing", bool)])
    >>> flagged["missing"] = [[False, True, True, True]]
    >>> reach(flagged, 2)
    array([9.])
    """
    missing = _missing(flagged, ndim)
    points = np.argwhere(missing)
    if not missing.size:
        return np.full(1, np.inf)
    if not len(points):
        return np.zeros(1)
    found = nearest(missing, points, ties=False)
    if found is None:
        return np.full(1, np.inf)
    return np.array([float(np.square(found - points).sum(axis=1).max())])


# Boxes holding together more than this many times the grid's samples (gaps
# spanning many blocks) are given up for sweeps along each axis.
MAX_SPREAD = 8


def _ceil_sqrt(value):
    root = math.isqrt(int(value))
    return root + (root**2 < value)


def boxes(reaches, chunks, most=None):
    """The box each block of a grid is filled from.

    Parameters
    ----------
    reaches : ndarray
        Each block's :func:`reach`, on the grid of blocks.
    chunks : tuple of tuple of int
        The blocks' sizes along each spatial axis.
    most : float or None
        How many times the grid's samples the boxes may hold together
        (default :data:`MAX_SPREAD`).

    Returns
    -------
    dict or None
        ``{block index: ((lo, hi) per axis)}``: the block grown on every
        side by a bound on the distance from its missing samples to their
        nearest valid ones, within the grid. None when the boxes would
        hold more than `most` (default :data:`MAX_SPREAD`) times the
        grid's samples.

    Examples
    --------
    >>> boxes(np.array([0.0, 4.0, np.inf]), ((3, 3, 3),))
    {(0,): ((0, 3),), (1,): ((1, 8),), (2,): ((0, 9),)}
    """
    edges = edges_of(chunks)
    shape = [e[-1] for e in edges]
    indices = list(np.ndindex(reaches.shape))
    span = np.array([spans(edges, n) for n in indices]).reshape(-1, len(edges), 2)
    lo, hi = span[..., 0], span[..., 1]
    flat = reaches.ravel()
    grow = np.zeros(len(flat), np.int64)
    valid = np.isfinite(flat)
    grow[valid] = [_ceil_sqrt(r) for r in flat[valid]]
    if valid.any() and not valid.all():
        # a block without valid samples: each of its samples is at most its
        # half diagonal from its center, which is some distance from the
        # center of the nearest block that has valid samples
        centers = (lo + hi - 1) / 2
        half = np.sqrt(np.square((hi - lo - 1) / 2).sum(axis=1))
        distance, near = cKDTree(centers[valid]).query(centers[~valid])
        bound = distance + half[~valid] + half[valid][near]
        grow[~valid] = np.ceil(bound).astype(np.int64) + 1
    low = np.maximum(lo - grow[:, None], 0)
    high = np.minimum(hi + grow[:, None], shape)
    spread = np.prod(high - low, axis=1).sum() / max(math.prod(shape), 1)
    if spread > (MAX_SPREAD if most is None else most):
        return None
    return {
        index: tuple(zip(low[n].tolist(), high[n].tolist(), strict=True))
        for n, index in enumerate(indices)
    }


# The squared distance of a sample with no valid sample in its part of the
# grid yet; sums of real ones stay far below it, and its own never grow.
FAR = np.iinfo(np.int64).max // 4


def swept_dtype(dtype, fshape=()):
    """The record of a :func:`sweep`'s samples: the values of the nearest
    valid sample found (its components, `fshape`) and the squared distance
    to it.

    Examples
    --------
    >>> swept_dtype(np.float32, (2,))
    dtype([('value', '<f4', (2,)), ('distance', '<i8')])
    """
    return np.dtype([("value", dtype, tuple(fshape)), ("distance", np.int64)])


def sweep(block, ndim, axis):
    """One pass of the nearest fill, along `axis` of a block of whole lines.

    Parameters
    ----------
    block : record ndarray
        A block of the grid holding whole lines along `axis`: flagged
        (fields ``value`` and ``missing``, spatial axes then component
        axes) before the first pass, else the result of the pass along the
        axis after `axis` (of :func:`swept_dtype`, spatial axes only).
    ndim : int
        Number of spatial axes.
    axis : int
        The axis to sweep along.

    Returns
    -------
    record ndarray of :func:`swept_dtype`, of the spatial axes
        Each sample with the values of its nearest valid sample among those
        of the lines through it along `axis` and the axes after, and the
        squared distance to it (:data:`FAR` where there is none).

    Examples
    --------
    >>> flagged = np.zeros(4, [("value", float), ("missing", bool)])
    >>> flagged["value"] = [5, -1, 7, -1]
    >>> flagged["missing"] = [False, True, False, True]
    >>> swept = sweep(flagged, 1, 0)
    >>> swept["value"].tolist(), swept["distance"].tolist()
    ([5.0, 5.0, 7.0, 7.0], [0, 1, 0, 1])
    """
    values = block["value"]
    if "missing" in block.dtype.names:  # the first sweep: to the nearest valid
        lines = np.moveaxis(_missing(block, ndim), axis, -1)
        along = _along_valid
    else:
        lines = np.moveaxis(block["distance"], axis, -1)
        along = _along
    source, distance = along(lines.reshape(-1, lines.shape[-1]))
    source = np.moveaxis(source.reshape(lines.shape), -1, axis)
    fshape = values.shape[ndim:]
    out = np.empty(source.shape, swept_dtype(values.dtype, fshape))
    index = source.reshape(source.shape + (1,) * len(fshape))
    out["value"] = np.take_along_axis(values, index, axis=axis)
    out["distance"] = np.moveaxis(distance.reshape(lines.shape), -1, axis)
    return out


def swept_values(block):
    """The values of a block swept along every axis.

    Parameters
    ----------
    block : record ndarray of :func:`swept_dtype`
        A block of the last :func:`sweep`.

    Returns
    -------
    ndarray
        Its values (spatial axes, then components): 0 where no sample of
        the grid is valid, as :func:`fill_block` gives.
    """
    values = block["value"].copy()
    if block.size and block["distance"].flat[0] >= FAR:  # then all of them
        values[...] = 0
    return values


def _along_valid(missing):
    """For lines `missing` (``(m, n)`` bool): for each ``x`` the nearest ``x'``
    not missing (the lesser of two as near) and the squared distance to it
    (:data:`FAR` on lines all missing)."""
    n = missing.shape[1]
    x = np.arange(n)
    before = np.maximum.accumulate(np.where(missing, -1, x), axis=1)
    after = np.minimum.accumulate(np.where(missing, n, x)[:, ::-1], axis=1)[:, ::-1]
    later = (after < n) & (after - x < x - before)
    source = np.where((before < 0) | later, after, before)
    none = source >= n  # nothing before nor after
    source = np.where(none, x, source)
    return source, np.where(none, FAR, np.square(x - source))


def _along(g):
    """The nearest of each line's samples, by squared distance plus `g`.

    For lines `g` (``(m, n)`` int64, :data:`FAR` where a sample is no
    candidate): for each ``x`` the least ``x'`` minimizing
    ``(x - x')**2 + g[x']``, and that minimum. Lines all 0 (valid) or all
    FAR are kept as they are; the others get the lower envelope of their
    parabolas, built for all of them at once, one ``x'`` at a time.
    """
    m, n = g.shape
    source = np.broadcast_to(np.arange(n), (m, n)).copy()
    distance = g.copy()
    far = g >= FAR
    lines = np.flatnonzero(~(far.all(axis=1) | (g == 0).all(axis=1)))
    if not len(lines):
        return source, distance
    mixed = g[lines]
    apex, count = _envelope(mixed)
    # x is nearest the last apex whose interval starts before x: after
    # boundary ``whole + part``, with ``0 <= part < 1``, from ``whole + 1``
    start = np.clip(apex.whole + 1, 0, n)
    offsets = np.arange(len(lines))[:, None] * (n + 1)
    kept = np.arange(n)[None, :] < count[:, None]
    kept[:, 0] = False  # the first apex's interval starts at -inf
    keys = (start + offsets)[kept]
    firsts = np.cumsum(np.r_[0, kept.sum(axis=1)[:-1]])
    queries = offsets + np.arange(n)
    k = np.searchsorted(keys, queries, side="right") - firsts[:, None]
    chosen = np.take_along_axis(apex.at, k, axis=1)
    source[lines] = chosen
    gathered = np.take_along_axis(mixed, chosen, axis=1)
    distance[lines] = np.square(np.arange(n) - chosen) + gathered
    return source, distance


class _Apexes(NamedTuple):
    """The lower envelope of lines of parabolas: apex ``at[j]`` is lowest from
    ``whole[j] + rest[j] / over[j]`` (exclusive, ``j >= 1``, ``0 <= rest <
    over``) to the next one's start."""

    at: np.ndarray
    whole: np.ndarray
    rest: np.ndarray
    over: np.ndarray


def _envelope(g):
    """The lower envelope of the parabolas ``(x - q)**2 + g[q]`` of each line
    of `g` (``(m, n)``; ``q`` where ``g < FAR``), and the apexes of each.

    An apex is dropped where the next one's parabola meets the one before
    at or before its own interval starts: ties go to the earlier apex.
    Where two parabolas meet is a fraction ``num / den``, kept as its
    floor and remainder: compared exactly, and without products larger
    than the denominators' (no overflow for any grid that fits a disk).
    """
    m, n = g.shape
    at = np.zeros((m, n), np.intp)
    whole, rest, over = (np.zeros((m, n), np.int64) for _ in range(3))
    over += 1
    top = np.full(m, -1)
    for q in range(n):
        todo = np.flatnonzero(g[:, q] < FAR)
        fresh = top[todo] < 0  # the line's first candidate
        top[todo[fresh]], at[todo[fresh], 0] = 0, q
        todo = todo[~fresh]
        while len(todo):
            k = top[todo]
            v = at[todo, k]
            den = 2 * (q - v)
            meet, part = np.divmod(g[todo, q] + q * q - g[todo, v] - v * v, den)
            ahead = whole[todo, k]
            drop = (k > 0) & (
                (meet < ahead)
                | ((meet == ahead) & (part * over[todo, k] <= rest[todo, k] * den))
            )
            keep, j = todo[~drop], top[todo[~drop]] + 1
            top[keep] = j
            at[keep, j], whole[keep, j] = q, meet[~drop]
            rest[keep, j], over[keep, j] = part[~drop], den[~drop]
            todo = todo[drop]
            top[todo] -= 1
    return _Apexes(at, whole, rest, over), top + 1
