"""The public functions against the brute-force reference of docs/semantics.md."""

from unittest import mock

import dask
import dask.array as da
import numpy as np
import pytest
import reference
import scipy.ndimage as ndi
import zarr
from hypothesis import given
from hypothesis import strategies as st
from strategies import (
    arrays,
    geometries,
    images,
    masks,
    orders,
    percentiles,
    write_zarr,
)
from zarr.storage import LocalStore, LoggingStore

import dask_localstats as dls
from dask_localstats import _engine


def _fail(block):
    """A dask source that fails if read: checks must come before computing."""
    raise AssertionError("the source was read")


def assert_matches(result, expected, interpolated):
    """Coarse results are bit-exact; interpolated ones within float rounding."""
    assert result.shape == expected.shape
    assert result.dtype == expected.dtype
    if not interpolated:
        np.testing.assert_array_equal(result, expected, strict=True)
    elif result.dtype.kind == "f":
        np.testing.assert_allclose(
            result,
            expected,
            rtol=1e-6,
            atol=1e-6 * (np.nanmax(np.abs(expected)) if expected.size else 0),
        )
    else:
        diff = np.abs(result.astype(np.int64) - expected.astype(np.int64))
        assert diff.max(initial=0) <= 1


@given(data=st.data(), geometry=geometries(), percentile=percentiles, order=orders)
def test_percentile_matches_reference(data, geometry, percentile, order):
    shape, selem, spacing, step = geometry
    source = data.draw(images(shape, nans=order is None))
    mask = data.draw(masks(shape))
    dtype = data.draw(st.sampled_from([None, np.float64, np.float32, np.int32]))
    if dtype is np.int32 and source.dtype.kind == "f" and np.isnan(source).any():
        dtype = None
    kwargs = dict(
        selem=selem,
        spacing=spacing,
        step=step,
        interpolate=order,
        mask=mask,
        dtype=dtype,
        return_centers=True,
    )
    original = source.copy()
    result, centers = dls.local_percentile(source, percentile, **kwargs)
    expected, expected_centers = reference.local_percentile(
        source, percentile, **kwargs
    )
    assert_matches(result, expected, order is not None)
    np.testing.assert_array_equal(centers, expected_centers, strict=True)
    np.testing.assert_array_equal(source, original)


@given(data=st.data(), geometry=geometries(), max_bin=st.integers(301, 320))
def test_histogram_matches_reference(data, geometry, max_bin):
    shape, selem, spacing, step = geometry
    source = data.draw(images(shape, dtypes=["uint8", "uint16"]))
    mask = data.draw(masks(shape))
    dtype = data.draw(st.sampled_from([None, np.int32, np.float32]))
    order = data.draw(st.sampled_from([None, None, 0, 1]))
    kwargs = dict(
        selem=selem,
        spacing=spacing,
        step=step,
        mask=mask,
        dtype=dtype,
        interpolate=order,
    )
    result = dls.local_histogram(source, max_bin, **kwargs)
    expected = reference.local_histogram(source, max_bin, **kwargs)
    assert_matches(result, expected, order is not None)


def _summary(kept):
    # order-sensitive (C order of the window) and shape (2,)
    if kept.size == 0:
        return np.zeros(2)
    return np.array([kept.sum(), (kept * np.arange(kept.size)).sum()])


@given(data=st.data(), geometry=geometries(), order=orders)
def test_function_matches_reference(data, geometry, order):
    shape, selem, spacing, step = geometry
    source = data.draw(images(shape, dtypes=["float64", "int16"]))
    mask = data.draw(masks(shape))
    kwargs = dict(
        selem=selem,
        spacing=spacing,
        step=step,
        mask=mask,
        interpolate=order,
        fshape=(2,),
        dtype=np.float64,
    )
    result = dls.apply_local_function(source, _summary, **kwargs)
    expected = reference.apply_local_function(source, _summary, **kwargs)
    assert_matches(result, expected, order is not None)


@given(data=st.data(), geometry=geometries(max_ndim=3), order=st.integers(0, 5))
def test_centers_alignment_matches_reference(data, geometry, order):
    shape, selem, spacing, step = geometry
    source = data.draw(images(shape, dtypes=["float64"]))
    kwargs = dict(
        selem=selem, spacing=spacing, step=step, interpolate=order, align="centers"
    )
    result = dls.local_percentile(source, 0.3, **kwargs)
    expected = reference.local_percentile(source, 0.3, **kwargs)
    assert_matches(result, expected, True)


def test_scalar_function_default_interpolation_is_quadratic():
    rng = np.random.default_rng(0)
    source = rng.random((30, 40))
    result = dls.apply_local_function(source, np.mean, selem=(10, 10))
    coarse = source.reshape(3, 10, 4, 10).mean(axis=(1, 3))
    np.testing.assert_allclose(result, ndi.zoom(coarse, (10, 10), order=2))


def test_empty_windows_give_zero():
    source = np.full((10, 10), 7.0)
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    result = dls.local_percentile(
        source, 0.5, selem=(5, 5), mask=mask, interpolate=None
    )
    np.testing.assert_array_equal(result, [[7.0, 7.0], [0.0, 0.0]])


def test_nan_propagates_like_numpy():
    source = np.arange(16.0).reshape(4, 4)
    source[0, 0] = np.nan
    result = dls.local_percentile(source, 0.5, selem=(2, 2), interpolate=None)
    assert np.isnan(result[0, 0])
    assert np.isfinite(result.ravel()[1:]).all()


def test_histogram_counts_do_not_wrap():
    source = np.zeros((32, 32), np.uint8)
    result = dls.local_histogram(source, max_bin=2, selem=(32, 32))
    assert result.dtype == np.int64
    assert result[0, 0, 0] == 1024


BAD_INPUT = [
    (dict(selem=(5, 5, 5)), ValueError, r"`selem` must have one entry per source"),
    (dict(selem=(0, 5)), ValueError, r"`selem` must be positive on every axis"),
    (dict(selem=(2.5, 5)), TypeError, r"`selem` must be made of integers"),
    (dict(selem=(True, 5)), TypeError, r"`selem` must be made of integers"),
    (dict(selem=2**70), ValueError, r"`selem` must be at most 2\*\*40 on every axis"),
    (dict(step=(1, 10**30)), ValueError, r"`step` must be at most 2\*\*40"),
    (dict(spacing=(-1, 5)), ValueError, r"`spacing` must be positive"),
    (dict(step=(0, None)), ValueError, r"`step` must be positive"),
    (dict(spacing=(50, 5)), ValueError, r"smaller than `spacing` on axis 0: size 20"),
    (dict(mask=np.ones((3, 3), bool)), ValueError, r"`mask` must have the shape"),
    (
        dict(interpolate=6),
        ValueError,
        r"`interpolate` must be None or an int in 0\.\.5, got 6",
    ),
    (dict(interpolate=1.5), TypeError, r"`interpolate` .* got 1\.5"),
    (dict(interpolate=True), TypeError, r"`interpolate` .* got True"),
    (dict(align="middle"), ValueError, r"`align` must be one of .* got 'middle'"),
    (
        dict(selem=np.ones((3, 3), int)),
        TypeError,
        r"`selem` as an array must be boolean",
    ),
    (
        dict(selem=np.ones((3, 3, 3), bool)),
        ValueError,
        r"`selem` must have 2 dimensions",
    ),
    (dict(mask=np.full((20, 30), "a")), TypeError, r"`mask` must be boolean or int"),
    (dict(mask=np.full((20, 30), np.nan)), TypeError, r"got dtype float64; pass `m"),
    (dict(dtype=bool), TypeError, r"`dtype` must be a numeric dtype .* got bool"),
    (dict(dtype=object), TypeError, r"`dtype` must be a numeric dtype .* got object"),
    (dict(dtype="U4"), TypeError, r"`dtype` must be a numeric dtype .* got <U4"),
    (dict(dtype="nonsense"), TypeError, r"`dtype` must be a NumPy dtype"),
    (dict(block_bytes=0), ValueError, r"`block_bytes` must be a positive int .* 0"),
    (dict(block_bytes=-5), ValueError, r"`block_bytes` must be .* got -5"),
    (dict(block_bytes=1.5), TypeError, r"`block_bytes` must be .* got 1\.5"),
    (dict(chunks=0), ValueError, r"`chunks` must be positive sizes, got 0"),
    (dict(chunks=(-3, 5)), ValueError, r"`chunks` must be positive sizes"),
    (dict(chunks=(5, 5, 5)), ValueError, r"`chunks` does not fit the shape"),
    (dict(missing_chunks="zero"), ValueError, r"`missing_chunks` must be one of"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_INPUT)
def test_bad_input_is_rejected_before_computing(kwargs, error, match):
    source = da.zeros((20, 30), np.uint16, chunks=10).map_blocks(_fail, dtype="u2")
    arguments = dict(selem=(5, 5)) | kwargs
    with pytest.raises(error, match=match):
        dls.local_percentile(source, 0.5, **arguments)


@pytest.mark.parametrize(
    ("percentile", "match"),
    [
        (1.5, r"fraction in \[0, 1\], got 1\.5"),
        ([0.1, -0.2], r"got \[0\.1, -0\.2\]"),
        ([[0.1]], r"number or a 1-D sequence"),
    ],
)
def test_bad_percentile(percentile, match):
    with pytest.raises(ValueError, match=match):
        dls.local_percentile(np.zeros((8, 8)), percentile, selem=(4, 4))


@pytest.mark.parametrize(
    "percentile", ["0.5", True, ["0.1", 0.2], np.bool_(False), 0.5 + 0j]
)
def test_percentile_of_strings_or_bools_is_a_type_error(percentile):
    with pytest.raises(TypeError, match=r"`percentile` must be made of numbers"):
        dls.local_percentile(np.zeros((8, 8)), percentile, selem=(4, 4))


def test_dask_source_of_unknown_chunks():
    source = da.from_array(np.arange(64.0).reshape(8, 8), chunks=4)
    source = source[source[:, 0] > 10]
    with pytest.raises(ValueError, match=r"`source` is a dask array of unknown chunk"):
        dls.local_percentile(source, 0.5, selem=(4, 4))
    with pytest.raises(ValueError, match=r"`mask` is a dask array of unknown chunk"):
        dls.local_percentile(np.zeros((6, 8)), 0.5, selem=(3, 4), mask=source > 0)


def test_narrower_result_dtypes_cast_like_numpy_and_warn_when_values_wrap():
    ones = np.ones((32, 32), np.uint8)
    with pytest.warns(
        RuntimeWarning, match=r"`dtype` uint8 cannot hold values .* 1024"
    ):
        counts = dls.local_histogram(ones, 2, selem=32, dtype=np.uint8)
    np.testing.assert_array_equal(counts, np.array([[[0, 1024 % 256]]], np.uint8))
    image = np.arange(64, dtype=np.int32).reshape(8, 8) * 10
    narrow = dls.local_percentile(image, 0.5, selem=4, dtype=np.int16, interpolate=None)
    np.testing.assert_array_equal(
        narrow, dls.local_percentile(image, 0.5, selem=4, interpolate=None)
    )
    assert narrow.dtype == np.int16


def test_histogram_rejects_float_source():
    with pytest.raises(
        TypeError, match=r"integer dtype for local_histogram, got float64"
    ):
        dls.local_histogram(np.zeros((8, 8)), 16, selem=(4, 4))


@pytest.mark.parametrize("dtype", [bool, np.complex64])
def test_percentile_rejects_non_numeric_source(dtype):
    with pytest.raises(TypeError, match=r"numeric dtype for local_percentile, got"):
        dls.local_percentile(np.zeros((8, 8), dtype), 0.5, selem=(4, 4))


@pytest.mark.parametrize(("value", "shown"), [(16, "16"), (-1, "-1")])
def test_histogram_rejects_values_outside_bins(value, shown):
    source = np.zeros((8, 8), np.int16)
    source[3, 3] = value
    with pytest.raises(
        ValueError, match=rf"value {shown}, outside \[0, max_bin\) with max_bin=16"
    ):
        dls.local_histogram(source, 16, selem=(4, 4))


@pytest.mark.parametrize(("max_bin", "error"), [(0, ValueError), (2.0, TypeError)])
def test_histogram_rejects_bad_max_bin(max_bin, error):
    with pytest.raises(error, match=r"`max_bin` must be"):
        dls.local_histogram(np.zeros((8, 8), np.uint8), max_bin, selem=(4, 4))


def test_function_checks():
    with pytest.raises(TypeError, match=r"`function` must be callable, got 3"):
        dls.apply_local_function(np.zeros((8, 8)), 3, selem=(4, 4))
    with pytest.raises(ValueError, match=r"`fshape` must be a tuple of positive ints"):
        dls.apply_local_function(np.zeros((8, 8)), np.sum, selem=(4, 4), fshape=(0,))


def test_zero_dimensional_source():
    with pytest.raises(ValueError, match=r"at least one dimension, got shape \(\)"):
        dls.local_percentile(np.float64(3), 0.5, selem=())


# -- beyond ClearMap: missing data, overshoot, vectorized reductions ----------


def _holes(shape, seed=0):
    rng = np.random.default_rng(seed)
    source = rng.normal(100, 20, shape)
    source[rng.random(shape) < 0.1] = np.nan
    source[: shape[0] // 3] = np.nan  # a slab of missing data
    return source


@given(data=st.data(), geometry=geometries(max_ndim=3), percentile=percentiles)
def test_nan_policy_omit_leaves_nan_out_like_a_mask(data, geometry, percentile):
    shape, selem, spacing, step = geometry
    source = data.draw(images(shape, dtypes=["float32", "float64"], nans=True))
    mask = data.draw(masks(shape))
    kept = ~np.isnan(source) if mask is None else mask & ~np.isnan(source)
    kwargs = dict(selem=selem, spacing=spacing, step=step, interpolate=None)
    result = dls.local_percentile(
        source, percentile, mask=mask, nan_policy="omit", **kwargs
    )
    expected = reference.local_percentile(source, percentile, mask=kept, **kwargs)
    assert_matches(result, expected, False)


def _counts(source, mask, **kwargs):
    return reference.apply_local_function(
        source, np.size, mask=mask, interpolate=None, dtype=np.int64, **kwargs
    )


@pytest.mark.parametrize("fill", ["zero", "nearest"])
def test_min_coverage_marks_windows_missing(fill):
    source = _holes((30, 40))
    kwargs = dict(selem=(6, 8), spacing=(5, 5))
    kept = ~np.isnan(source)
    result = dls.local_percentile(
        source,
        0.5,
        interpolate=None,
        nan_policy="omit",
        min_coverage=0.85,
        fill=fill,
        **kwargs,
    )
    expected = reference.local_percentile(
        source, 0.5, mask=kept, interpolate=None, **kwargs
    )
    missing = _counts(source, kept, **kwargs) < np.ceil(0.85 * 48)
    assert 0 < missing.sum() < missing.size
    np.testing.assert_array_equal(result[~missing], expected[~missing])
    if fill == "zero":
        np.testing.assert_array_equal(result[missing], 0)
    else:
        filled = reference.fill_nearest(expected, missing)
        np.testing.assert_array_equal(result, filled)


def test_fill_nearest_before_interpolation_and_independent_of_chunks():
    source = _holes((40, 48, 6), seed=1)
    kwargs = dict(
        selem=(8, 8, 3),
        spacing=(8, 8, 3),
        nan_policy="omit",
        min_coverage=0.5,
        fill="nearest",
    )
    coarse = dls.local_percentile(source, [0.2, 0.8], interpolate=None, **kwargs)
    assert np.isfinite(coarse).all()
    whole = dls.local_percentile(source, [0.2, 0.8], interpolate=3, **kwargs)
    expected = ndi.zoom(
        coarse[..., 0], np.divide(source.shape, coarse.shape[:3]), order=3
    )
    np.testing.assert_allclose(whole[..., 0], expected, rtol=1e-9)
    lazy = da.from_array(source, chunks=(7, 11, 4))
    chunked = dls.local_percentile(
        lazy, [0.2, 0.8], interpolate=3, block_bytes=2**12, **kwargs
    )
    np.testing.assert_array_equal(chunked.compute(), whole)


def test_fill_nearest_with_nothing_valid_gives_zero():
    source = np.full((10, 10), np.nan)
    result = dls.local_percentile(
        source, 0.5, selem=(5, 5), interpolate=None, nan_policy="omit", fill="nearest"
    )
    np.testing.assert_array_equal(result, 0)


def test_histogram_min_coverage():
    source = np.ones((20, 20), np.uint8)
    mask = np.ones_like(source, bool)
    mask[:10, :10] = False
    result = dls.local_histogram(source, 4, selem=(10, 10), mask=mask, min_coverage=0.5)
    np.testing.assert_array_equal(result[..., 1], [[0, 100], [100, 100]])


def test_clip_keeps_interpolation_within_the_coarse_range():
    rng = np.random.default_rng(2)
    source = rng.random((60, 60)) * (np.arange(60) % 20 < 10)
    kwargs = dict(selem=(10, 10), interpolate=3)
    coarse = dls.local_percentile(source, 0.9, selem=(10, 10), interpolate=None)
    free = dls.local_percentile(source, 0.9, **kwargs)
    clipped = dls.local_percentile(source, 0.9, clip=True, **kwargs)
    assert free.max() > coarse.max() or free.min() < coarse.min()
    np.testing.assert_allclose(clipped, np.clip(free, coarse.min(), coarse.max()))


@pytest.mark.parametrize("with_mask", [False, True])
def test_vectorized_functions_equal_the_per_window_path(with_mask):
    rng = np.random.default_rng(3)
    source = rng.random((50, 60))
    mask = rng.random(source.shape) < 0.7 if with_mask else None
    kwargs = dict(selem=(12, 10), spacing=(5, 6), interpolate=None, mask=mask)
    per_window = dls.apply_local_function(source, np.std, **kwargs)
    vectorized = dls.apply_local_function(source, np.std, vectorized=True, **kwargs)
    np.testing.assert_allclose(vectorized, per_window, rtol=1e-12)
    quartiles = dls.apply_local_function(
        source,
        lambda w, axis: np.percentile(w, [25, 75], axis=axis).T,
        fshape=(2,),
        vectorized=True,
        **kwargs,
    )
    assert quartiles.shape == (*per_window.shape, 2)


@pytest.mark.parametrize("vectorized", [False, True])
def test_function_with_wrong_fshape_is_refused_before_computing(vectorized):
    source = da.zeros((8, 8), chunks=4).map_blocks(_fail, dtype=float)
    with pytest.raises(ValueError, match=r"shape \(\), but `fshape` is \(2,\)"):
        dls.apply_local_function(
            source, np.sum, selem=(4, 4), fshape=(2,), vectorized=vectorized
        )


def test_function_with_wrong_fshape_on_real_windows():
    def quartiles_or_fail(kept):  # fails on the probe: checked on windows
        assert kept.size > 8
        return np.zeros(3)

    with pytest.raises(ValueError, match=r"shape \(3,\), but `fshape` is \(2,\)"):
        dls.apply_local_function(
            np.zeros((8, 8)), quartiles_or_fail, selem=(4, 4), fshape=(2,)
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(nan_policy="raise"),
            ValueError,
            r"`nan_policy` must be one of .* 'raise'",
        ),
        (dict(fill="mean"), ValueError, r"`fill` must be one of .* got 'mean'"),
        (dict(min_coverage=1.5), ValueError, r"`min_coverage` .* got 1\.5"),
        (dict(min_coverage="half"), TypeError, r"`min_coverage` .* got 'half'"),
    ],
)
def test_bad_missing_data_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        dls.local_percentile(np.zeros((8, 8)), 0.5, selem=(4, 4), **kwargs)


@pytest.mark.parametrize("dtype", [None, np.int16, np.float32, np.uint8, np.int64])
@pytest.mark.parametrize("kind", [np.float32, np.uint16, np.int8, np.uint32])
def test_subtract_background_rounds_half_away_from_zero_and_clips(dtype, kind):
    # integer backgrounds are subtracted in integers, with the same values
    rng = np.random.default_rng(3)
    image = rng.integers(0, 4000, (6, 20, 30)).astype(np.uint16)
    background = rng.integers(-100, 9000, image.shape) / 2  # ties at .5
    if np.dtype(kind).kind in "iu":
        info = np.iinfo(kind)
        background = rng.integers(info.min, min(info.max, 9000), image.shape)
    background = da.from_array(background.astype(kind), chunks=(4, 10, 30))
    got = dls.subtract_background(image, background, dtype=dtype)
    out = np.dtype(image.dtype if dtype is None else dtype)
    expected = reference.subtract_background(image, background.compute(), out)
    assert got.chunks == background.chunks
    np.testing.assert_array_equal(got.compute(), expected, strict=True)


def _float32_backgrounds(shape):
    """float32 backgrounds: ties, their neighbours, negatives, NaN, huge values."""
    near = st.sampled_from([0.5, 1.5, 2.5, 255.5, 65534.5, 65535.5, 2.0**23 + 1])
    nudged = st.tuples(near, st.integers(-2, 2)).map(
        lambda t: float(np.float32(t[0]) + t[1] * np.spacing(np.float32(t[0])))
    )
    anything = st.floats(width=32)
    values = st.one_of(nudged, anything, st.integers(-3, 300).map(lambda i: i / 4))
    return arrays(np.float32, shape, values)


@given(data=st.data(), dtype=st.sampled_from([np.uint8, np.uint16]))
def test_a_float32_background_rounds_alike_in_the_image_dtype_and_in_float64(
    data, dtype
):
    # every piece of an array rounds as any other, fast path or not
    from dask_localstats._api import _subtract_float32, _subtract_piece

    shape = (data.draw(st.integers(1, 40)),)
    top = int(np.iinfo(dtype).max)
    image = data.draw(arrays(dtype, shape, st.integers(0, top)))
    background = data.draw(_float32_backgrounds(shape))
    expected = reference.subtract_background(image, background)
    got = _subtract_piece(image, background, np.dtype(dtype)).astype(dtype)
    np.testing.assert_array_equal(got, expected, strict=True)
    fast = _subtract_float32(image, background)
    if fast is not None:
        np.testing.assert_array_equal(fast, expected, strict=True)
    assert (fast is None) == (not background.min() > -0.5)
    if np.isfinite(background).all():  # told the extremes, as by a resampling
        within = (float(background.min()), float(background.max()))
        told = _subtract_float32(image, background, within)
        assert (told is None) == (fast is None)
        if told is not None:
            np.testing.assert_array_equal(told, expected, strict=True)


def test_subtracting_integers_from_1d_images_and_at_the_64_bit_limits():
    # the planes of a 1-D image are scalars; 64-bit integers go through
    # float64, which rounds 2**63 - 1 up: clipped below it, never wrapped
    image = np.array([10, 20, 30, 40], np.uint16)
    got = dls.subtract_background(image, np.array([1, 25, 3, 50], np.uint16))
    np.testing.assert_array_equal(got.compute(), np.array([9, 0, 27, 0], np.uint16))
    lazy = da.from_array(image, chunks=2)
    background = dls.local_percentile(lazy, 0.5, selem=(2,), dtype=np.uint16)
    fused = dls.subtract_background(image, background).compute()
    separate = dls.subtract_background(image, background.compute()).compute()
    np.testing.assert_array_equal(fused, separate, strict=True)
    for dtype in (np.int64, np.uint64):
        top = np.array([np.iinfo(dtype).max, 5], dtype)
        got = dls.subtract_background(top, np.zeros(2, dtype)).compute()
        assert got[0] > np.iinfo(dtype).max // 2 and got[1] == 5


def test_subtract_background_checks():
    image = np.zeros((4, 4), np.uint16)
    with pytest.raises(ValueError, match=r"`background` must have the shape"):
        dls.subtract_background(image, np.zeros((4, 5)))
    with pytest.raises(TypeError, match=r"`dtype` must be an integer or float"):
        dls.subtract_background(image, np.zeros((4, 4)), dtype=bool)
    for dtype in (complex, object):
        with pytest.raises(TypeError, match=r"`background` must be of a real number"):
            dls.subtract_background(image, np.zeros((4, 4), dtype))


def test_subtractions_of_different_sources_are_different_computations():
    background = da.full((4, 4), 20.0, chunks=2)
    a, b = np.full((4, 4), 100, np.uint16), np.full((4, 4), 200, np.uint16)
    x, y = dask.compute(
        dls.subtract_background(a, background), dls.subtract_background(b, background)
    )
    assert (x == 80).all() and (y == 180).all()
    lazy = dls.subtract_background(da.from_array(b, chunks=(1, 4)), background)
    assert (lazy.compute() == 180).all()


def logged(tmp_path, image, chunks):
    """A zarr array of `image` in `chunks`, and its store, which counts reads."""
    path = write_zarr(tmp_path / "a.zarr", image, chunks)
    store = LoggingStore(LocalStore(path, read_only=True), log_level="DEBUG")
    return store, zarr.open_array(store, mode="r")


def subtracted(image, **kwargs):
    """`image` less its 25th percentile background, computed in memory."""
    background = dls.local_percentile(image, 0.25, **kwargs)
    return dls.subtract_background(image, background).compute()


@pytest.mark.parametrize("write", [False, True])
def test_a_stored_source_is_decoded_once_for_background_and_subtraction(
    tmp_path, write
):
    image = np.random.default_rng(5).integers(0, 900, (6, 40, 36), np.uint16)
    store, z = logged(tmp_path, image, (3, 10, 9))
    kwargs = dict(selem=(1, 12, 10), spacing=(1, 4, 4), dtype=np.float32)
    with mock.patch.object(_engine, "CACHE_BLOCKS", 100):  # holds every chunk
        background = dls.local_percentile(z, 0.25, block_bytes=3000, **kwargs)
    got = dls.subtract_background(z, background)
    store.counter.clear()
    if write:
        dls.to_zarr(got, tmp_path / "out.zarr")
        got = zarr.open_array(tmp_path / "out.zarr")
    else:
        got = got.compute()
    assert store.counter["get"] == 2 * 4 * 4  # each chunk once
    np.testing.assert_array_equal(got[...], subtracted(image, **kwargs), strict=True)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_a_subtraction_reads_its_image_after_the_blocks_it_waits_for(
    tmp_path, scheduler
):
    # a cache of a few blocks' chunks: each output chunk reads its image
    # inside its own task, right after the coarse blocks it needs have
    # decoded it, not in a task of its own that would run before them
    image = np.random.default_rng(6).integers(0, 900, (16, 128, 128), np.uint16)
    store, z = logged(tmp_path, image, (8, 16, 16))
    kwargs = dict(selem=(1, 12, 12), spacing=(1, 4, 4), dtype=np.float32)
    background = dls.local_percentile(z, 0.25, block_bytes=20000, **kwargs)
    got = dls.subtract_background(z, background)
    layers = [name.split("-")[1] for name in got.dask.layers]
    assert "read" not in layers  # no task of its own
    store.counter.clear()
    got = got.compute(scheduler=scheduler, num_workers=2)  # more overflow it
    # each of the 128 chunks about once (reads of their own: 200 times)
    assert store.counter["get"] <= 1.2 * 128
    np.testing.assert_array_equal(got, subtracted(image, **kwargs), strict=True)


def test_subtracting_an_unknown_background():
    image = np.full((2, 2), 50, np.int32)
    background = np.array([[np.nan, 10.0], [20.0, np.nan]])
    got = dls.subtract_background(image, background).compute()
    np.testing.assert_array_equal(
        got, np.array([[0, 40], [30, 0]], np.int32), strict=True
    )
    as_float = dls.subtract_background(image, background, dtype=np.float32).compute()
    assert np.isnan(as_float[0, 0]) and as_float[0, 1] == 40
    # planes of no voxels
    empty = dls.subtract_background(np.zeros((2, 0, 3), np.uint16), np.zeros((2, 0, 3)))
    assert empty.compute().shape == (2, 0, 3)


@given(
    geometry=geometries(max_ndim=3, footprints=False),
    order=st.integers(0, 3),
    dtype=st.sampled_from([None, np.int16, np.float32]),
    data=st.data(),
)
def test_a_resampled_background_is_subtracted_in_the_same_pass(
    geometry, order, dtype, data
):
    shape, selem, spacing, step = geometry
    image = data.draw(images(shape, dtypes=[np.uint16, np.uint8]))
    chunks = tuple(data.draw(st.integers(1, s)) for s in shape)
    background = dls.local_percentile(
        da.from_array(image, chunks=chunks), 0.3, selem=selem, spacing=spacing,
        step=step, interpolate=order, dtype=np.float32,
    )  # fmt: skip
    got = dls.subtract_background(image, background, dtype=dtype)
    assert not any(name.startswith("localstats-resample") for name in got.dask.layers)
    separate = dls.subtract_background(image, background.compute(), dtype=dtype)
    np.testing.assert_array_equal(got.compute(), separate.compute(), strict=True)


def test_in_memory_results_are_computed_with_the_objects_before_frozen():
    import gc
    import threading

    counts = []

    def mean(values):  # probed first, in this thread, at the graph's making
        if threading.current_thread() is not threading.main_thread():
            counts.append(gc.get_freeze_count())
        return values.mean()

    image = np.arange(512.0).reshape(8, 8, 8)
    result = dls.apply_local_function(image, mean, selem=4, interpolate=None)
    assert result.shape == (2, 2, 2) and counts and min(counts) > 0
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("voxels", [70, 2**17])  # bands of a row, slabs of planes
def test_a_subtraction_fused_piece_by_piece_equals_it_apart(voxels):
    from dask_localstats import _interpolate

    image = np.random.default_rng(6).integers(0, 900, (5, 90, 70), np.uint16)
    kwargs = dict(selem=(1, 20, 20), spacing=(1, 8, 8), dtype=np.float32)
    with mock.patch.object(_interpolate, "_SLAB_VOXELS", voxels):
        fused = dls.subtract_background(
            image, dls.local_percentile(da.from_array(image), 0.25, **kwargs)
        )
        assert not any(n.startswith("localstats-resample") for n in fused.dask.layers)
        fused = fused.compute()
    resampled = dls.local_percentile(image, 0.25, **kwargs)
    apart = dls.subtract_background(image, resampled).compute()
    np.testing.assert_array_equal(fused, apart, strict=True)
