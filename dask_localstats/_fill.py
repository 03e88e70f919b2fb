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
the blocks, then fills block by block; a lazy result fills the whole grid
at once (see :func:`dask_localstats._engine.fill_stage`). Both give the
same values.

Where a gap spans many blocks its blocks' boxes hold much of the grid, so
a writer does not read them: each block of the grid offers its candidates
(:func:`border`: its valid samples next to a missing one, and those on its
faces toward blocks with missing samples, which may border theirs), and a
block is filled from the candidates of the blocks its box meets
(:func:`fill_from`), a surface of the grid rather than a volume.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from ._graph import edges_of

__all__ = [
    "Border",
    "border",
    "boxes",
    "fill_block",
    "fill_from",
    "nearest",
    "reach",
    "spread_boxes",
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
    candidates = _border(missing)
    found = flagged["value"][tuple(candidates.T)]
    return _filled(values, points, start, candidates, found)


def _filled(values, points, start, candidates, found):
    """`values`, a block from `start` on, its missing `points` (grid indices)
    taken from the nearest of `candidates` (in C order; their values
    `found`); all 0 without candidates (no valid sample in the grid)."""
    if not len(candidates):
        values[...] = 0
        return values
    values[tuple((points - start).T)] = found[_nearest_of(candidates, points)]
    return values


class Border(NamedTuple):
    """The candidates one block offers the fill of the others (:func:`border`)."""

    points: np.ndarray  # (k, ndim) grid indices, in C order
    values: np.ndarray  # (k, *components) their values


def border(flagged, ndim, start, open_faces):
    """The valid samples of a block that may be some missing sample's nearest.

    Those next to a missing sample of the block, and those on a face of the
    block whose neighbouring block has missing samples (`open_faces`:
    ``(low, high)`` flags per spatial axis): every valid sample next to a
    missing one of the grid, and then some. `start` is the block's first
    index in the grid.

    Examples
    --------
    >>> flagged = np.zeros(4, [("value", float), ("missing", bool)])
    >>> flagged["value"] = [1, 2, 3, 4]
    >>> flagged["missing"] = [False, False, True, False]
    >>> border(flagged, 1, (10,), [(True, False)])
    Border(points=array([[10],
           [11],
           [13]]), values=array([1., 2., 4.]))
    """
    missing = _missing(flagged, ndim)
    near = _next_to_missing(missing)
    for d, faces in enumerate(open_faces):
        for face, side in zip(faces, (0, -1), strict=True):
            if face and missing.shape[d]:
                near[(slice(None),) * d + (side,)] = True
    points = np.argwhere(near & ~missing)
    values = flagged["value"][tuple(points.T)]
    return Border(points + np.asarray(start, np.intp), values)


def fill_from(flagged, ndim, start, borders):
    """Values of a block, missing ones from the nearest of `borders`.

    Parameters
    ----------
    flagged : record ndarray
        The block (see :func:`fill_block`), whose first index in the grid
        is `start`.
    ndim : int
        Number of spatial axes.
    borders : list of Border
        The :func:`border` of each block of a box around this one that
        holds its missing samples' nearest valid ones (see :func:`boxes`):
        a surface of the grid, not the box's volume.

    Returns
    -------
    ndarray
        The same values as :func:`fill_block` gives the block.
    """
    values = flagged["value"].copy()
    start = np.asarray(start, np.intp)
    points = np.argwhere(_missing(flagged, ndim)) + start
    if not len(points):
        return values
    candidates = np.concatenate([b.points for b in borders])
    order = np.lexsort(candidates.T[::-1])  # C order, for the ties
    found = np.concatenate([b.values for b in borders])[order]
    return _filled(values, points, start, candidates[order], found)


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
# spanning many blocks) are given up for one fill of the whole grid.
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
    around, spread = spread_boxes(reaches, chunks)
    return None if spread > (MAX_SPREAD if most is None else most) else around


def spread_boxes(reaches, chunks):
    """The :func:`boxes`, however much they hold, and how many times the
    grid's samples they hold together."""
    edges = edges_of(chunks)
    shape = [e[-1] for e in edges]
    indices = list(np.ndindex(reaches.shape))
    lo = np.array([[e[i] for e, i in zip(edges, n, strict=True)] for n in indices])
    hi = np.array([[e[i + 1] for e, i in zip(edges, n, strict=True)] for n in indices])
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
    around = {
        index: tuple(zip(low[n].tolist(), high[n].tolist(), strict=True))
        for n, index in enumerate(indices)
    }
    return around, np.prod(high - low, axis=1).sum() / max(math.prod(shape), 1)
