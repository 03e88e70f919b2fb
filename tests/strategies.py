"""Hypothesis strategies and small helpers shared by the test modules.

Arrays are drawn with `hypothesis.extra.numpy`, element by element, so a
failing example shrinks to a small image of simple values.
"""

import itertools

import numpy as np
import zarr
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

MAX_SIZE = {1: 40, 2: 16, 3: 9, 4: 6}
DTYPES = ["uint8", "uint16", "int16", "float32", "float64"]


@st.composite
def arrays(draw, dtype, shape, elements):
    """An array of `elements`: dense, or one fill value with a few others.

    Dense arrays draw every element; the others repeat one value, which
    makes ties and empty regions likely. Failures shrink towards the latter.
    """
    dense = draw(st.booleans())
    fill = st.nothing() if dense else elements
    return draw(hnp.arrays(dtype, shape, elements=elements, fill=fill))


def booleans(shape):
    """A boolean array of `shape`: masks, footprints."""
    return arrays(np.bool_, shape, st.booleans())


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
        selem = draw(booleans(extent))
    return shape, selem, spacing, step


def values(dtype, nans=False):
    """Elements of an image: bounded, with repeated values likely."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        # a few fixed values make ties in the order statistics likely
        elements = st.one_of(
            st.sampled_from([50.0, 100.0]),
            st.floats(-50, 250, width=8 * dtype.itemsize),
        )
        return st.one_of(elements, st.just(np.nan)) if nans else elements
    info = np.iinfo(dtype)
    return st.integers(max(info.min, -50), min(info.max, 300))


@st.composite
def images(draw, shape, dtypes=DTYPES, nans=False):
    """An image of `shape` with one of `dtypes` (NaN among floats if `nans`)."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    return draw(arrays(dtype, shape, values(dtype, nans)))


@st.composite
def masks(draw, shape):
    """None, or a boolean mask of `shape` (sometimes with empty regions)."""
    if draw(st.booleans()):
        return None
    return draw(booleans(shape))


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
    """Store `image` as a zarr array at `path`, every chunk; return the path.

    (zarr leaves out chunks of fill values, which the library then refuses
    as missing: a chunk of one voxel is 0 in one image of 50 drawn in 0..49.)
    """
    z = zarr.create_array(
        path,
        shape=image.shape,
        chunks=chunks,
        dtype=image.dtype,
        zarr_format=zarr_format,
        config={"write_empty_chunks": True},
    )
    z[:] = image
    return path


class Counting:
    """A chunked array that records the chunks each read decodes.

    Wraps a zarr array, or a NumPy array given the `chunks` of its storage.
    """

    def __init__(self, array, chunks=None):
        self.array, self.chunks_read = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.chunks = array.chunks if chunks is None else chunks

    def __getitem__(self, region):
        ranges = [
            range(s.start // c, -(-s.stop // c))
            for s, c in zip(region, self.chunks, strict=True)
        ]
        self.chunks_read += itertools.product(*ranges)
        return self.array[region]


def faults_of_an_array_made_again(nbytes=1 << 20):
    """Pages the system faults in when this thread makes, writes and frees an
    array of `nbytes`, then makes and writes another: none where the C
    library kept the freed memory for the next array (Linux only)."""
    import resource

    np.ones(nbytes, np.uint8)  # made, written and freed
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    np.ones(nbytes, np.uint8)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
