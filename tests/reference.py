"""Brute-force reference implementation of docs/semantics.md.

A deliberately simple, independent transcription of the contract in
docs/semantics.md: one plain Python loop over every center, one window at a
time, the statistic applied to the kept voxels, then `scipy.ndimage` for the
resampling. NumPy inputs only; no dask and no input validation. The test-suite
checks the real implementation against it voxel for voxel. (The benchmarks'
baseline B1 is not this loop but ClearMap's own, less general and faster one,
`benchmarks/clearmap.py`.)
"""

import itertools

import numpy as np
import scipy.ndimage as ndi


def centers(shape, extent, spacing):
    """Per-axis center positions (docs/semantics.md, the sub-grid), one 1-D int array per axis.

    Only `shape` and `spacing` matter; `extent` is accepted for symmetry.
    """
    result = []
    for size, spc in zip(shape, spacing, strict=True):
        m = size // spc
        first = (size - (m - 1) * spc) // 2
        result.append(first + spc * np.arange(m))
    return result


def _per_axis(value, n, default):
    """None -> `default`; a bare int -> the same on every axis; else a tuple."""
    if value is None:
        return tuple(default)
    if np.ndim(value) == 0:
        return (value,) * n
    return tuple(value)


def _local(
    source,
    statistic,
    fshape,
    dtype,
    selem,
    spacing,
    step,
    interpolate,
    mask,
    return_centers,
    align,
):
    """Apply `statistic(kept)` on every window, then resample (shared driver)."""
    source = np.asarray(source)
    n = source.ndim
    if isinstance(selem, np.ndarray):
        footprint, extent = selem.astype(bool), selem.shape
    else:
        footprint, extent = None, _per_axis(selem, n, None)
    spacing = _per_axis(spacing, n, extent)
    step = [1 if d is None else d for d in _per_axis(step, n, (None,) * n)]
    axes = centers(source.shape, extent, spacing)
    m = tuple(len(a) for a in axes)
    mask = None if mask is None else np.asarray(mask, dtype=bool)

    coarse = np.zeros(m + fshape, dtype=source.dtype if dtype is None else dtype)
    for idx in itertools.product(*(range(k) for k in m)):
        c = [int(axes[d][i]) for d, i in enumerate(idx)]
        starts = [c[d] - extent[d] // 2 for d in range(n)]
        positions = [
            np.arange(
                max(starts[d], 0),
                min(c[d] + extent[d] - extent[d] // 2, source.shape[d]),
                step[d],
            )
            for d in range(n)
        ]
        window = source[np.ix_(*positions)]
        keep = np.ones(window.shape, dtype=bool)
        if footprint is not None:
            keep &= footprint[
                np.ix_(*(p - s for p, s in zip(positions, starts, strict=True)))
            ]
        if mask is not None:
            keep &= mask[np.ix_(*positions)]
        kept = window[keep]
        coarse[idx] = statistic(kept)

    result = (
        coarse
        if interpolate is None
        else _resample(coarse, source.shape, axes, spacing, interpolate, align)
    )
    if return_centers:
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # m + (n,)
        return result, grid.astype(np.int64)
    return result


def _resample(coarse, shape, axes, spacing, order, align):
    """Resample every trailing component of `coarse` to `shape`."""
    n = len(shape)
    m = coarse.shape[:n]
    out = np.empty(tuple(shape) + coarse.shape[n:], dtype=coarse.dtype)
    for j in np.ndindex(coarse.shape[n:]):
        component = coarse[(Ellipsis, *j)]
        if align == "corners":
            # mode="mirror", not zoom's default "constant": both prefilter with
            # mirror boundaries, so the values are the same, except that
            # "constant" maps the last output plane a hair past the grid for
            # some sizes (coarse 8 -> 26 voxels: 25 * (7 / 25) > 7 in floats)
            # and returns its cval 0 there. ClearMap inherits that artifact;
            # the specification (and dask_localstats) does not have it.
            zoom = [s / k for s, k in zip(shape, m, strict=True)]
            value = ndi.zoom(component, zoom=zoom, order=order, mode="mirror")
        else:
            # Coarse sample i sits on its center voxel first + i * spacing;
            # beyond the outermost centers the value is held (clipping).
            coords = np.meshgrid(
                *[
                    np.clip((np.arange(s) - a[0]) / h, 0, len(a) - 1)
                    for s, a, h in zip(shape, axes, spacing, strict=True)
                ],
                indexing="ij",
            )
            # mode="mirror": its prefilter (mirror boundary) is the one zoom's
            # default mode="constant" uses, so inside [0, m - 1] the values are
            # those of zoom; checked to ~1e-15 against zoom at the corner
            # coordinates x * (m - 1) / (S - 1) for orders 0..5, including
            # integer outputs (same rounding). mode="nearest" would not do:
            # scipy pads by edge values before prefiltering, a different spline.
            # Coordinates are clipped, so the out-of-grid extension never matters.
            value = ndi.map_coordinates(
                component,
                np.array(coords),
                order=order,
                mode="mirror",
                output=coarse.dtype,
            )
        assert value.shape == tuple(shape), (value.shape, shape)
        out[(Ellipsis, *j)] = value
    return out


def local_percentile(
    source,
    percentile,
    selem=(50, 50),
    spacing=None,
    step=None,
    interpolate=1,
    mask=None,
    dtype=None,
    return_centers=False,
    *,
    align="corners",
):
    """`numpy.percentile(kept, 100 * p)` per window; 0 for an empty window."""
    scalar = np.ndim(percentile) == 0
    fractions = [percentile] if scalar else list(np.asarray(percentile).ravel())

    def statistic(kept):
        if kept.size == 0:
            values = [0.0] * len(fractions)
        else:
            values = [np.percentile(kept, 100 * float(p)) for p in fractions]
        return values[0] if scalar else np.array(values)

    fshape = () if scalar else (len(fractions),)
    return _local(
        source,
        statistic,
        fshape,
        dtype,
        selem,
        spacing,
        step,
        interpolate,
        mask,
        return_centers,
        align,
    )


def local_histogram(
    source,
    max_bin=4096,
    selem=(50, 50),
    spacing=None,
    step=None,
    interpolate=None,
    mask=None,
    dtype=None,
    return_centers=False,
    *,
    align="corners",
):
    """Counts of each value 0 .. max_bin - 1 among the kept voxels (int64)."""

    def statistic(kept):
        for value in (kept.min(initial=0), kept.max(initial=0)):
            if value < 0 or value >= max_bin:
                raise ValueError(
                    f"local_histogram: source has value {value}, "
                    f"outside [0, max_bin) with max_bin={max_bin}"
                )
        return np.bincount(kept.astype(np.int64), minlength=max_bin)

    return _local(
        source,
        statistic,
        (max_bin,),
        np.int64 if dtype is None else dtype,
        selem,
        spacing,
        step,
        interpolate,
        mask,
        return_centers,
        align,
    )


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
    return_centers=False,
    *,
    align="corners",
):
    """`function(kept)` per window: a scalar, or an array of shape `fshape`."""
    fshape = () if fshape is None else tuple(np.atleast_1d(fshape).tolist())
    return _local(
        source,
        function,
        fshape,
        dtype,
        selem,
        spacing,
        step,
        interpolate,
        mask,
        return_centers,
        align,
    )


def fill_nearest(values, missing):
    """Missing samples (`missing`, the spatial axes) from the nearest valid one.

    For each missing sample, the squared distance to every valid sample; the
    first valid sample in C order at the least distance gives its values
    (docs/semantics.md, `fill`). All 0 if none is valid.
    """
    values = values.copy()
    valid = np.argwhere(~missing)
    if not len(valid):
        values[...] = 0
        return values
    for point in np.argwhere(missing):
        d2 = np.square(valid - point).sum(axis=1)
        values[tuple(point)] = values[tuple(valid[np.argmin(d2)])]
    return values


def subtract_background(image, background, dtype=None):
    """``image - background`` in float64, rounded half away from zero and
    clipped for an integer `dtype` (the image's by default), NaN giving 0
    (docs/semantics.md, `subtract_background`)."""
    dtype = np.dtype(image.dtype if dtype is None else dtype)
    difference = np.asarray(image, np.float64) - np.asarray(background, np.float64)
    if dtype.kind not in "iu":
        return difference.astype(dtype)
    rounded = np.where(
        difference >= 0, np.floor(difference + 0.5), np.ceil(difference - 0.5)
    )
    info = np.iinfo(dtype)
    rounded = np.clip(np.nan_to_num(rounded, nan=0.0), info.min, info.max)
    return rounded.astype(dtype)
