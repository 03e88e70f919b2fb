"""Hypothesis strategies and small helpers shared by the test modules."""

import itertools

import numpy as np
import zarr
from hypothesis import strategies as st

MAX_SIZE = {1: 40, 2: 16, 3: 9, 4: 6}
DTYPES = ["uint8", "uint16", "int16", "float32", "float64"]


@st.composite
def geometries(draw, max_ndim=4, footprints=True):
    """Shape, selem, spacing and step of a small sampling problem."""
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.integers(1, MAX_SIZE[ndim])) for _ in range(ndim))
    extent = tuple(draw(st.integers(1, s + 2)) for s in shape)
    spacing = draw(st.one_of(st.none(), st.tuples(*(st.integers(1, s) for s in shape))))
    if spacing is None and any(e > s for e, s in zip(extent, shape, strict=True)):
        spacing = tuple(min(e, s) for e, s in zip(extent, shape, strict=True))
    step = draw(
        st.one_of(
            st.none(),
            st.tuples(*(st.one_of(st.none(), st.integers(1, 3)) for _ in shape)),
        )
    )
    selem = extent
    if footprints and draw(st.booleans()):
        seed = draw(st.integers(0, 2**32 - 1))
        selem = np.random.default_rng(seed).random(extent) < 0.7
    return shape, selem, spacing, step


@st.composite
def images(draw, shape, dtypes=DTYPES, nans=False):
    """A random image of `shape` with one of `dtypes`."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype.kind == "f":
        image = rng.normal(100, 30, shape).astype(dtype)
        # repeated values exercise ties in the order statistics
        image[rng.random(shape) < 0.2] = 50
        if nans:
            image[rng.random(shape) < 0.02] = np.nan
    else:
        high = min(np.iinfo(dtype).max, 300)
        low = max(np.iinfo(dtype).min, -50) if dtype.kind == "i" else 0
        image = rng.integers(low, high, shape, endpoint=True).astype(dtype)
    return image


@st.composite
def masks(draw, shape):
    """None, or a random boolean mask of `shape` (sometimes empty regions)."""
    if draw(st.booleans()):
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.random(shape) < draw(st.sampled_from([0.1, 0.5, 0.9]))


percentiles = st.one_of(
    st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    st.floats(0, 1),
    st.lists(st.floats(0, 1), min_size=1, max_size=3),
)

orders = st.one_of(st.none(), st.integers(0, 5))


@st.composite
def chunkings(draw, shape):
    """A dask chunks tuple for `shape`, sometimes irregular."""
    chunks = []
    for size in shape:
        sizes = []
        left = size
        while left:
            n = draw(st.integers(1, left))
            sizes.append(n)
            left -= n
        chunks.append(tuple(sizes))
    return tuple(chunks)


def write_zarr(path, image, chunks=(4, 8, 9), zarr_format=3):
    """Store `image` as a zarr array at `path`; return the path."""
    z = zarr.create_array(
        path,
        shape=image.shape,
        chunks=chunks,
        dtype=image.dtype,
        zarr_format=zarr_format,
    )
    z[:] = image
    return path


class Counting:
    """A chunked array that records the chunks each read decodes."""

    def __init__(self, array):
        self.array, self.chunks_read = array, []
        self.shape, self.dtype, self.chunks = array.shape, array.dtype, array.chunks

    def __getitem__(self, region):
        ranges = [
            range(s.start // c, -(-s.stop // c))
            for s, c in zip(region, self.chunks, strict=True)
        ]
        self.chunks_read += itertools.product(*ranges)
        return self.array[region]
