"""Baseline B1: ClearMap's own ``LocalStatistics`` algorithm, at its fastest.

ClearMap (``ClearMap/ImageProcessing/LocalStatistics.py``) computes a local
statistic with one plain Python loop over the window centers:

1. The centers are ``first + i * spacing`` on each axis, ``i < m = S //
   spacing``, with ``first = (S - (m - 1) * spacing) // 2``.
2. For each center ``c``, the window is the basic slice ``[c - E // 2, c + E
   - E // 2)`` of the extent ``E``, clipped to the image, with the step
   starting at the clipped start; ``.flatten()`` copies its voxels (or a
   mask selects them).
3. The statistic of those voxels fills the center's entry of the coarse grid:
   ``numpy.percentile`` for :func:`local_percentile` (0 for an empty
   window), the counts of the values for :func:`local_histogram`, the user's
   function for :func:`apply_local_function`.
4. Unless ``interpolate`` is falsy, each trailing component of the coarse
   grid is resampled to the image's shape with ``scipy.ndimage.zoom`` and
   scipy's defaults (``mode="constant"``), the interpolate order being the
   spline order.

This module does exactly that, with nothing ClearMap does not have (no
footprints, which no benchmark uses, and no validation), and with the few
liberties that make it faster without changing a value: ``numpy.percentile``
works in place on the flattened copy (``overwrite_input=True``: the copy is
the loop's own, so NumPy's second copy is saved), counts come from one
``numpy.bincount`` instead of ClearMap's ``numpy.unique(...,
return_counts=True)`` (the same counts without a sort), and ``zoom`` writes
straight into the result. Histogram counts are int64 by default, as in
``dask_localstats`` (ClearMap counts in the source's dtype, which overflows
for a uint16 window of more than 65535 voxels).

``tests/reference.py`` is the general brute-force transcription of the
specification that the tests use; ``python benchmarks/clearmap.py`` checks
that both give the same coarse grids on small random inputs, and the same
resampled results away from zoom's boundary artifact (see :func:`check`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def apply_local_function(
    source,
    function,
    selem=(50, 50),
    spacing=None,
    step=None,
    interpolate=2,
    mask=None,
    fshape=None,
    dtype=None,
):
    """ClearMap's loop: `function` of each window's voxels, then zoom.

    Parameters
    ----------
    source : numpy.ndarray
        The image.
    function : callable
        Called with the 1-D array of each window's voxels; returns a scalar,
        or an array of shape `fshape`.
    selem : tuple of int
        Window extent per axis (a box; ClearMap's footprints are not needed
        by the benchmarks and left out).
    spacing : tuple of int, optional
        Distance between window centers; default `selem`.
    step : tuple of int or None, optional
        Subsampling step of the windows per axis; None takes every voxel.
    interpolate : int or None
        Spline order of the resampling to the image's shape; falsy (None or
        0, as in ClearMap) returns the coarse grid.
    mask : numpy.ndarray of bool, optional
        Voxels to use (same shape as `source`).
    fshape : tuple of int, optional
        Shape of the function's value; None for a scalar.
    dtype : numpy.dtype, optional
        Dtype of the result; default the source's.

    Returns
    -------
    numpy.ndarray
        The coarse grid ``(*m, *fshape)``, or its resampling ``(*S,
        *fshape)``.
    """
    shape, ndim = source.shape, source.ndim
    spacing = selem if spacing is None else spacing
    step = (None,) * ndim if step is None else step
    counts = tuple(s // h for s, h in zip(shape, spacing, strict=True))
    # per axis, the window of each center (ClearMap builds the same per center)
    slices = []
    for s, m, h, e, d in zip(shape, counts, spacing, selem, step, strict=True):
        first = (s - (m - 1) * h) // 2
        centers = range(first, first + m * h, h)
        slices.append(
            [slice(max(0, c - e // 2), min(c + e - e // 2, s), d) for c in centers]
        )
    fshape = () if fshape is None else tuple(fshape)
    dtype = source.dtype if dtype is None else dtype
    coarse = np.zeros(counts + fshape, dtype=dtype)
    for index in np.ndindex(*counts):
        window = tuple(axis[i] for axis, i in zip(slices, index, strict=True))
        if mask is None:
            data = source[window].flatten()
        else:
            data = source[window][mask[window]]
        coarse[index] = function(data)
    if not interpolate:
        return coarse
    return resample(coarse, shape, interpolate)


def resample(coarse, shape, order):
    """``scipy.ndimage.zoom`` of each trailing component of `coarse` to `shape`.

    Parameters
    ----------
    coarse : numpy.ndarray
        The coarse grid, its first ``len(shape)`` axes spatial.
    shape : tuple of int
        The image's shape.
    order : int
        Spline order.

    Returns
    -------
    numpy.ndarray
        Shape ``shape + coarse.shape[len(shape):]``, the coarse grid's dtype.
    """
    n = len(shape)
    zoom = tuple(s / m for s, m in zip(shape, coarse.shape[:n], strict=True))
    full = np.empty(tuple(shape) + coarse.shape[n:], dtype=coarse.dtype)
    for j in np.ndindex(coarse.shape[n:]):
        part = (Ellipsis, *j)
        ndimage.zoom(coarse[part], zoom=zoom, output=full[part], order=order)
    return full


def local_percentile(
    source,
    percentile,
    selem=(50, 50),
    spacing=None,
    step=None,
    interpolate=1,
    mask=None,
    dtype=None,
):
    """ClearMap's ``local_percentile``: ``numpy.percentile`` per window.

    Parameters
    ----------
    source : numpy.ndarray
        The image.
    percentile : float or tuple of float
        Fraction(s) in [0, 1]; a tuple or list adds a trailing axis.
    selem, spacing, step, interpolate, mask, dtype
        As for :func:`apply_local_function`.

    Returns
    -------
    numpy.ndarray
        The local percentiles; 0 for an empty window.
    """
    if isinstance(percentile, (tuple, list)):
        q = np.array([100 * p for p in percentile])
        fshape, empty = (len(q),), np.zeros(len(q))
    else:
        q, fshape, empty = 100 * percentile, None, 0

    def function(data):
        if data.size == 0:
            return empty
        return np.percentile(data, q, overwrite_input=True)

    return apply_local_function(
        source, function, selem, spacing, step, interpolate, mask, fshape, dtype
    )


def local_histogram(
    source,
    max_bin=4096,
    selem=(50, 50),
    spacing=None,
    step=None,
    interpolate=None,
    mask=None,
    dtype=np.int64,
):
    """ClearMap's ``local_histogram``: counts of ``0 .. max_bin - 1`` per window.

    Parameters
    ----------
    source : numpy.ndarray
        The image, of non-negative integers below `max_bin`.
    max_bin : int
        Number of bins.
    selem, spacing, step, interpolate, mask
        As for :func:`apply_local_function`.
    dtype : numpy.dtype
        Dtype of the counts (int64 by default, unlike ClearMap).

    Returns
    -------
    numpy.ndarray
        The local histograms, ``(*m, max_bin)``.
    """

    def function(data):
        return np.bincount(data, minlength=max_bin)

    return apply_local_function(
        source, function, selem, spacing, step, interpolate, mask, (max_bin,), dtype
    )


def _random_case(rng):
    """A small random image and window geometry (box windows)."""
    ndim = int(rng.integers(1, 4))
    shape = tuple(int(s) for s in rng.integers(1, (40, 16, 9)[ndim - 1] + 1, ndim))
    selem = tuple(int(rng.integers(1, s + 3)) for s in shape)
    spacing = tuple(
        int(rng.integers(1, min(e, s) + 1)) for e, s in zip(selem, shape, strict=True)
    )
    step = tuple(None if rng.random() < 0.5 else int(rng.integers(1, 4)) for _ in shape)
    image = rng.integers(0, 300, shape, endpoint=True).astype(np.uint16)
    mask = rng.random(shape) < 0.7 if rng.random() < 0.3 else None
    return image, dict(selem=selem, spacing=spacing, step=step, mask=mask)


def check(cases=300, seed=0):
    """Compare with ``tests/reference.py`` on small random inputs.

    Coarse grids (percentiles, one and two of them, histograms, a user
    function) must be identical, values and dtype. Resampled percentiles must
    agree to float rounding, except where ``zoom``'s default
    ``mode="constant"`` returns 0 on an image's last plane (the reference
    resamples with ``mode="mirror"``).

    Parameters
    ----------
    cases : int
        Number of random cases.
    seed : int
        Seed of the cases.

    Returns
    -------
    int
        How many resampled results showed zoom's artifact.
    """
    import reference

    rng = np.random.default_rng(seed)
    artifacts = 0
    for _ in range(cases):
        image, geometry = _random_case(rng)
        p = float(rng.choice([0, 0.1, 0.25, 0.5, 0.975, 1]))
        for ours, theirs in [
            (local_percentile, reference.local_percentile),
            (local_histogram, reference.local_histogram),
        ]:
            args = (p,) if ours is local_percentile else (300 + 1,)
            a = ours(image, *args, **geometry, interpolate=None)
            b = theirs(image, *args, **geometry, interpolate=None)
            np.testing.assert_array_equal(a, b, strict=True)
        a = local_percentile(image, (p, 0.9), **geometry, interpolate=None)
        b = reference.local_percentile(image, (p, 0.9), **geometry, interpolate=None)
        np.testing.assert_array_equal(a, b, strict=True)
        options = dict(geometry, interpolate=None, dtype=float)
        a = apply_local_function(image, _spread, **options)
        b = reference.apply_local_function(image, _spread, **options)
        np.testing.assert_array_equal(a, b, strict=True)
        order = int(rng.integers(1, 6))
        a = local_percentile(image, p, **geometry, interpolate=order, dtype=float)
        b = reference.local_percentile(
            image, p, **geometry, interpolate=order, dtype=float
        )
        artifacts += _compare_resampled(a, b)
    # a known case of the artifact: 8 coarse samples resampled to 26 voxels
    image = rng.integers(1, 300, 26, endpoint=True).astype(np.uint16)
    a = local_percentile(image, 0.5, (3,), interpolate=1, dtype=float)
    b = reference.local_percentile(image, 0.5, (3,), interpolate=1, dtype=float)
    assert _compare_resampled(a, b) and a[-1] == 0 < b[-1]
    return artifacts + 1


def _spread(data):
    """Standard deviation of `data`, 0 when empty (a user function)."""
    return float(np.std(data)) if data.size else 0.0


def _compare_resampled(result, expected):
    """Whether zoom's artifact shows; assert the results agree elsewhere.

    Disagreements must lie on some axis's last plane, where `result` is 0.
    """
    wrong = ~np.isclose(result, expected, rtol=1e-9, atol=1e-9)
    last = np.zeros(result.shape, dtype=bool)
    for d in range(result.ndim):
        last[(slice(None),) * d + (-1,)] = True
    assert (wrong <= last).all() and (result[wrong] == 0).all()
    return bool(wrong.any())


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    found = check()
    print(f"B1 agrees with tests/reference.py; zoom's artifact in {found} cases")
