"""The chunked engine: builds the dask graphs of the two stages.

Stage 1, coarse samples. The grid of centers is cut into rectangular
*processing blocks* of centers, sized so that the source region their windows
cover (the block's centers plus the window's overhang, the "overlap") fits a
memory budget (:func:`plan_blocks`). Each block is one task: it reads its
region, and the kernels of :mod:`dask_localstats._kernels` reduce it to that
block of the coarse grid. Where the source is an array that can be sliced
(a NumPy or zarr array) the task reads its region itself, so the graph holds
only a reference to the array (a zarr array opens its store inside the task)
and no volume data. Stored arrays are read through one
:class:`~dask_localstats._cache.ChunkCache` per computation (a task of the
graph, freed with it), so the chunks that neighbouring regions share are
decoded about once. A dask array source is assembled from the chunks that
intersect the region. Centers are owned by exactly one block and every
window is read whole, so the coarse grid does not depend on the chunking.

Stage 2, full resolution. Each output chunk is one task that evaluates the
B-spline (:mod:`dask_localstats._interpolate`) from the few coarse
coefficients under it. For orders 0 and 1 the coefficients are the coarse
samples themselves, so an output chunk depends only on the coarse blocks
near it and, through them, on the source region near it. Higher orders
prefilter the coarse grid chunk by chunk, each chunk with a halo beyond
which the prefilter's weights are below float64 rounding
(:func:`~dask_localstats._interpolate.prefilter_halo`), so the grid is never
held whole.

A step that needs the image beside its resampled background (a
subtraction) reads it through the coarse stage's chunk cache
(:func:`read_through`), inside the output chunk's own task (:func:`fused`),
which runs right after the coarse blocks it waits for: the chunks they
decoded around it are still held, so each stored chunk is decoded about
once for both stages. The cache then grows with each chunk
read through it, from :data:`CACHE_BLOCKS` block budgets up to
:data:`SHARED_CACHE_BLOCKS`, about a band of blocks and the output chunks
under it.

The coarse grid a resampling layer reads is remembered (:data:`CHECKPOINTS`),
so that a writer can store it once and build the full resolution from the
stored grid, which makes resuming an interrupted write nearly instant.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import itertools
import math
import operator
import os
import threading
import uuid
import weakref
from typing import NamedTuple

import dask.array as da
import numpy as np
from dask._task_spec import DataNode, List, Task, TaskRef
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from ._cache import ChunkCache, ChunkUses
from ._fill import fill_block, sweep, swept_dtype, swept_values
from ._graph import BlockLayer, edges_of, note, spans
from ._interpolate import (
    coordinates,
    expands,
    prefilter,
    prefilter_halo,
    resample_block,
    taps_range,
)
from ._io import read_region
from ._kernels import KEEP_ALL, disjoint, flagged_dtype, reduce_block
from .errors import MemoryBudgetError

DEFAULT_BLOCK_BYTES = 64 * 2**20


def checkpoint_of(layer):
    """The coarse grid (dask array) a resampling layer reads, or None.

    Writers store it once and resume from it (:mod:`dask_localstats._write`).
    """
    return note(layer, "coarse")


def extremes_of(grid, ndim):
    """Minimum and maximum of `grid` (NumPy or dask) over its `ndim` spatial
    axes, per component: ``(2, *fshape)`` float64."""
    axes = tuple(range(ndim))
    stack = da.stack if isinstance(grid, da.Array) else np.stack
    return stack([grid.min(axis=axes), grid.max(axis=axes)]).astype(np.float64)


def clip_of(layer):
    """The extremes a resampling layer keeps its values within, or None.

    A dask array ``(2, *fshape)`` of float64 (:func:`extremes_of`), which
    every output block reads; a writer gathers them from the grid's blocks
    before its first batch and puts the value in their place
    (:func:`dask_localstats._checkpoint.settle`).
    """
    return note(layer, "extremes")


class Fill(NamedTuple):
    """What a grid filled by :func:`fill_stage` fills."""

    flagged: da.Array  # the coarse grid, its samples flagged where missing
    ndim: int  # its spatial axes
    sweeps: tuple = ()  # the sweeps along each axis it is cut from, in order


def fill_of(grid):
    """The :class:`Fill` that makes `grid` (a dask array), or None."""
    return note(grid.dask.layers.get(grid.name), "fill")


# Blocks a grid of windows that do not overlap is cut into at least (see
# plan_blocks). A constant, not the number of cores, so that the coarse
# grid's dask name, under which a writer checkpoints it, is the same on
# every machine.
MIN_BLOCKS = 4
# Decoded storage chunks kept for the neighbouring blocks, in block budgets:
# enough for a row of blocks to find the chunks the row before decoded where
# blocks are thinner than a row of chunks (two budgets decoded the chunks
# of 64^3 windows every 32 voxels, in 128^3 chunks, about twice each);
# and while a subtraction reads its image through them too (read_through).
CACHE_BLOCKS = 4
SHARED_CACHE_BLOCKS = 6
# Output chunks when the source imposes none: small enough for the allocator
# to recycle their float64 temporaries instead of faulting in fresh pages.
OUTPUT_CHUNK_BYTES = 16 * 2**20
PLANE_BYTES = 2**19  # a plane of an output chunk, see auto_chunks


def _halve_to_fit(counts, extent, nbytes, cost=None):
    """Halve the counts of the longest axes until their cost fits `nbytes`.

    ``extent(counts)`` gives the extent per axis covered by `counts` items;
    the cost is the product of the extents, or ``cost(counts)`` if given.
    """
    cost = cost or (lambda counts: math.prod(extent(counts)))
    counts = list(counts)
    while cost(counts) > nbytes:
        sizes = extent(counts)
        axes = [d for d in range(len(counts)) if counts[d] > 1]
        if not axes:
            break
        d = max(axes, key=lambda d: sizes[d])
        counts[d] = -(-counts[d] // 2)
    return tuple(counts)


def plan_blocks(
    grid, itemsize, block_bytes=DEFAULT_BLOCK_BYTES, per_center=0, storage=None
):
    """Number of centers per processing block on each axis.

    Starting from the whole grid, halves one axis at a time until the block
    fits in `block_bytes`: the source region it reads (`itemsize` bytes a
    voxel) and `per_center` bytes for each of its centers (the statistic's
    output and its temporaries, large for histograms of many bins). The
    axis halved is the one that adds the least to the voxels all blocks
    read (windows overhanging a block are read by its neighbours too, so
    axes whose windows are short go first), keeping each block's region at
    least one `storage` chunk long on every axis while another axis can
    be halved (a chunk a region cuts is decoded whole, for each region).
    Halving leaves up to half of the budget unused on each axis: the
    counts are then moved to those near them (:func:`_near_counts`) that
    fit and read the fewest voxels (ClearMap's light-sheet windows: 13%
    fewer). Then, where windows do not overlap (blocks share no voxel,
    and their windows are gathered and partitioned, which releases the
    GIL), halving goes on while there are fewer than :data:`MIN_BLOCKS`
    blocks and a block reads more than a quarter of the budget, to keep
    the threads busy.

    Raises
    ------
    MemoryBudgetError
        When a block of one center does not fit.
    """

    def extent_of(d, k):  # voxels read along d by a block of k centers
        return min((k - 1) * grid.spacing[d] + grid.extent[d], grid.shape[d])

    def extent(counts):
        return [extent_of(d, k) for d, k in enumerate(counts)]

    def cost(counts):
        return math.prod(extent(counts)) * itemsize + math.prod(counts) * per_center

    def halved(counts, d):
        return [-(-k // 2) if i == d else k for i, k in enumerate(counts)]

    def per_axis(counts):  # blocks along each axis
        return [-(-m // k) for m, k in zip(grid.counts, counts, strict=True)]

    def read(counts):  # voxels read by all blocks
        pairs = zip(per_axis(counts), extent(counts), strict=True)
        return math.prod(b * e for b, e in pairs)

    def split(counts):  # halve the best axis, or None if no axis can be
        axes = [d for d in range(grid.ndim) if counts[d] > 1]
        if not axes:
            return None
        whole = [d for d in axes if extent(halved(counts, d))[d] >= least[d]]
        sizes = extent(counts)
        d = min(whole or axes, key=lambda d: (read(halved(counts, d)), -sizes[d]))
        return halved(counts, d)

    def threads_idle(counts):  # disjoint windows: cut more for the threads
        few = math.prod(per_axis(counts)) < MIN_BLOCKS
        return disjoint(grid) and few and cost(counts) > block_bytes // 4

    def closer(counts):  # blocks filling the budget more closely
        points = max(2, round(_PLANS ** (1 / grid.ndim)))  # per axis
        options = [
            sorted({k, *_near_counts(m, k, points)})
            for m, k in zip(grid.counts, counts, strict=True)
        ]
        for d, ks in enumerate(options):  # no axis cut below `least` further
            options[d] = [
                k for k in ks if k >= counts[d] or extent_of(d, k) >= least[d]
            ]
        fits = (c for c in itertools.product(*options) if cost(c) <= block_bytes)
        return min(fits, key=lambda c: (read(c), math.prod(per_axis(c))))

    least = storage or [0] * grid.ndim  # a region at least a chunk long
    counts = list(grid.counts)
    while cost(counts) > block_bytes and (smaller := split(counts)):
        counts = smaller
    if cost(counts) <= block_bytes:
        counts = list(closer(counts))
    while threads_idle(counts) and (smaller := split(counts)):
        counts = smaller
    if cost(counts) > block_bytes:
        msg = (
            f"one window (extent {grid.extent}, {math.prod(grid.extent) * itemsize} "
            f"bytes read) and its result ({per_center} bytes) need "
            f"{cost(counts)} bytes, more than `block_bytes`={block_bytes}; raise "
            "`block_bytes`, or use smaller windows or fewer bins"
        )
        raise MemoryBudgetError(msg)
    return tuple(counts)


# Plans :func:`plan_blocks` compares near the halving's, at most.
_PLANS = 2000


def _near_counts(m, k, points=12):
    """Even block sizes of `m` centers near `k`: between half and twice as
    many blocks, about `points` of them spaced evenly on a log scale.

    Examples
    --------
    >>> _near_counts(82, 21)
    [11, 12, 14, 17, 21, 28, 41]
    """
    blocks = -(-m // k)
    lo, hi = max(1, blocks // 2), min(m, 2 * blocks)
    tried = {round(lo * (hi / lo) ** (i / (points - 1))) for i in range(points)}
    return sorted({-(-m // b) for b in tried | {blocks}})


def auto_chunks(shape, itemsize, nbytes=OUTPUT_CHUNK_BYTES):
    """Regular chunks of at most `nbytes`, of planes that fit in cache.

    A resampling makes its chunk a plane (first axis) at a time: the plane,
    cut on its longest axes, holds at most :data:`PLANE_BYTES` (its float64
    temporaries stay in cache, and each holds enough values that the calls
    cost little); then the first axis is cut, then the others again.
    """
    sizes = shape
    if len(shape) > 1:
        plane = _halve_to_fit(shape[1:], list, max(PLANE_BYTES // itemsize, 1))
        depth = max(nbytes // (itemsize * math.prod(plane)), 1)
        sizes = (min(shape[0], depth), *plane)
    sizes = _halve_to_fit(sizes, list, max(nbytes // itemsize, 1))
    return tuple(_split(s, c) for s, c in zip(shape, sizes, strict=True))


def _storage_chunks(source):
    """Regular chunk shape of a zarr or dask source, or None."""
    chunks = getattr(source, "chunks", None)
    if chunks is None:
        return None
    if isinstance(source, da.Array):
        return tuple(c[0] for c in chunks)
    return tuple(chunks)


def align_blocks(grid, per_block, storage=None):
    """Center counts of the processing blocks along each axis.

    Blocks hold `per_block` centers; where the source is stored in chunks,
    the blocks are shifted so that their regions touch as few storage chunks
    as possible (each chunk a region touches is decoded whole).
    """
    out = []
    for d, (m, k) in enumerate(zip(grid.counts, per_block, strict=True)):
        options = [_split(m, k, shift) for shift in range(k if storage else 1)]

        def touched(sizes, d=d):
            bounds = edges_of([sizes])[0]
            regions = [grid.region(d, a, b) for a, b in itertools.pairwise(bounds)]
            return sum(
                (hi - 1) // storage[d] - lo // storage[d] + 1 for lo, hi in regions
            )

        out.append(min(options, key=touched) if storage else options[0])
    return tuple(out)


def _split(total, size, shift=0):
    if shift:
        return (min(shift, total), *_split(total - min(shift, total), size))
    return tuple(min(size, total - i) for i in range(0, total, size))


def _read(array, slices, cache=None):
    if cache is None:
        return read_region(array, slices)
    out = SPARES.take(tuple(s.stop - s.start for s in slices), array.dtype)
    return cache.read(array, slices, out=out)


class Spares:
    """Memory of finished blocks, for the next blocks to paste into.

    A coarse block's source region (:func:`_read`) and a written shard
    (:mod:`~dask_localstats._write`) take up to a block budget each;
    freshly allocated, their pages are faulted in and zeroed by the
    system, which costs more than pasting chunks into them. A task gives
    its array back when done (:meth:`give`), and the next takes it: only
    what was taken here is accepted, and only when the task's result does
    not share its memory. At most `most` arrays wait, the largest: a
    computation of the library's own (:func:`computing`) lets them go when
    it ends; after a lazy result computed otherwise (``.compute()``, a
    dask.distributed worker's tasks) they wait for the next blocks.

    Examples
    --------
    >>> spares = Spares(most=1)
    >>> region = spares.take((2, 3), np.uint16)
    >>> spares.give(region, result=np.zeros(1))
    >>> np.shares_memory(spares.take((3,), np.uint16), region)
    True
    """

    def __init__(self, most=2):
        self.most = most
        self._free = []
        self._lent = weakref.WeakValueDictionary()  # id -> array
        self._lock = threading.Lock()

    def take(self, shape, dtype):
        """An uninitialized array of `shape` and `dtype`, in spare memory
        if some is large enough (the smallest such)."""
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        with self._lock:  # the smallest that fits (they are sorted by size)
            fits = (i for i, b in enumerate(self._free) if b.nbytes >= nbytes)
            first = next(fits, None)
            buffer = None if first is None else self._free.pop(first)
        if buffer is None:
            buffer = np.empty(nbytes, np.uint8)
        with self._lock:
            self._lent[id(buffer)] = buffer
        return buffer[:nbytes].view(dtype).reshape(shape)

    def give(self, array, result):
        """`array` is no longer needed: keep its memory if it was taken here."""
        base = array.base
        with self._lock:
            if base is None or self._lent.get(id(base)) is not base:
                return
            del self._lent[id(base)]
            if np.may_share_memory(base, result):
                return
            self._free.append(base)
            self._free.sort(key=lambda b: b.nbytes)
            del self._free[: -self.most]

    def clear(self):
        """Let the memory waiting go."""
        with self._lock:
            self._free.clear()


SPARES = Spares()


def _read_shared(array, slices, cache, most):
    """``array[slices]`` through `cache`, which grows by as much, up to `most`.

    The chunks a subtraction reads were decoded by the coarse blocks
    around them, a band of blocks earlier: the cache grows with the reads
    that need it to hold them, so a small computation keeps a small cache.
    A region of exactly one chunk is that chunk itself, read-only (not a
    copy): the subtraction only reads it.
    """
    region = array.dtype.itemsize * math.prod(s.stop - s.start for s in slices)
    cache.grow(region, most)
    index = _chunk_at(array, slices)
    if index is not None:
        return cache.chunk(array, index)
    return cache.read(array, slices)


def _chunk_at(array, slices):
    """The index of the storage chunk `slices` covers exactly, or None."""
    index = tuple(s.start // c for s, c in zip(slices, array.chunks, strict=True))
    exact = all(
        s.start == i * c and s.stop == min((i + 1) * c, n) and s.stop > s.start
        for s, i, c, n in zip(slices, index, array.chunks, array.shape, strict=True)
    )
    return index if exact else None


def _assemble(shape, dtype, places, chunks):
    """A region pasted together from pieces of `chunks`, ``(dst, src)`` `places`."""
    if len(chunks) == 1:
        piece = chunks[0][places[0][1]]
        if piece.shape == tuple(shape):
            return piece
    out = np.empty(shape, dtype=dtype)
    for (dst, src), chunk in zip(places, chunks, strict=True):
        out[dst] = chunk[src]
    return out


def _pieces(bounds, lo, hi):
    """Chunks of one axis meeting ``[lo, hi)``: (index, src slice, dst slice)."""
    first = bisect.bisect_right(bounds, lo) - 1
    return [
        (
            i,
            slice(max(lo, bounds[i]) - bounds[i], min(hi, bounds[i + 1]) - bounds[i]),
            slice(max(lo, bounds[i]) - lo, min(hi, bounds[i + 1]) - lo),
        )
        for i in range(first, bisect.bisect_left(bounds, hi))
    ]


def region_task(array, region, cache=None):
    """A task (inline, without key) producing ``array[region]``.

    `region` is a (lo, hi) pair per axis. `array` is either a dask array,
    whose intersecting chunks become dependencies, or the key of a task
    holding a sliceable array, read through the
    :class:`~dask_localstats._cache.ChunkCache` of key `cache` if given. Axes
    of the dask array beyond `region` must be single chunks; they are taken
    whole.
    """
    slices = tuple(slice(lo, hi) for lo, hi in region)
    if not isinstance(array, da.Array):
        return Task(None, _read, TaskRef(array), slices, cache and TaskRef(cache))
    bounds = edges_of(array.chunks)
    per_axis = [_pieces(b, lo, hi) for b, (lo, hi) in zip(bounds, region, strict=False)]
    extra = (0,) * (array.ndim - len(region))
    combos = list(itertools.product(*per_axis))
    # where each piece goes and comes from: constants, which dask then need
    # not search for references (as it would, parsed beside the chunks)
    places = [
        (tuple(d for _, _, d in combo), tuple(s for _, s, _ in combo))
        for combo in combos
    ]
    chunks = [TaskRef((array.name, *(i for i, _, _ in c), *extra)) for c in combos]
    shape = tuple(hi - lo for lo, hi in region) + array.shape[len(region) :]
    return Task(None, _assemble, shape, array.dtype, places, List(*chunks))


@functools.cache
def _glibc():
    """The C library if it is glibc (it has ``malloc_trim`` and ``mallopt``), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    glibc = all(hasattr(libc, name) for name in ("malloc_trim", "mallopt"))
    return libc if glibc else None


# glibc raises its mmap threshold up to this (the most it allows on 64-bit
# systems) as large blocks are freed, and its trim threshold to twice it
HEAP_MMAP_THRESHOLD = 32 * 2**20


def keep_freed_memory():
    """Have glibc keep freed memory for the next arrays, as it ends up doing
    by itself; whether it could (False: not glibc).

    dask.distributed starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``
    (``distributed.nanny.pre-spawn-environ``), which also fixes glibc's mmap
    threshold at 128 KiB: every array of 128 KiB or more is then mapped
    afresh, and the system faults in and zeroes its pages when it is first
    written. The kernels' temporaries are of that size; a tile kernel's
    block took 2 to 3 times as long in such a worker. This sets the two
    thresholds where glibc's own adjustment leads (``mallopt``): arrays up
    to :data:`HEAP_MMAP_THRESHOLD` come from memory already faulted in,
    and the heaps are trimmed by :func:`_coarse_block` as they grow.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mapped = libc.mallopt(m_mmap_threshold, HEAP_MMAP_THRESHOLD)
    return bool(mapped and libc.mallopt(m_trim_threshold, 2 * HEAP_MMAP_THRESHOLD))


@functools.cache
def _trim_tools():
    """glibc's ``malloc_trim`` and a reader of this process's RSS, or None."""
    libc = _glibc()
    if libc is None:
        return None
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as statm:
            statm.read()
    except (OSError, ValueError):
        return None

    def rss():
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    return libc.malloc_trim, rss


_TRIMMED = {"rss": 0}


def _coarse_block(*args):
    """:func:`reduce_block`, then its region is spare (:class:`Spares`) and
    freed memory goes back to the system.

    A block's temporaries are large and made in several threads (ours and
    zarr's); glibc keeps much of what they free in per-thread heaps, which
    over a long run adds up (W7: +27% peak RSS at 8 GiB against 1 GiB).
    Whenever the RSS has grown by a block budget since the last trim, the
    heaps are trimmed, as dask.distributed's workers can be told to do;
    trimming after every block would cost time, for pages freed to the
    system must be faulted in again.
    """
    result = reduce_block(*args)
    SPARES.give(args[0], result)
    tools = _trim_tools()
    if tools is not None:
        trim, rss = tools
        if rss() > _TRIMMED["rss"] + DEFAULT_BLOCK_BYTES:
            trim(0)
            _TRIMMED["rss"] = rss()
    return result


class _Computations:
    """Counts the local computations running (:func:`computing`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.froze = False  # whether the first of them froze the objects

    @contextlib.contextmanager
    def running_one(self):
        with self.lock:
            if not self.running:
                self.froze = not gc.get_freeze_count()
                if self.froze:
                    gc.freeze()
            self.running += 1
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
                if not self.running:
                    SPARES.clear()
                    if self.froze:
                        gc.unfreeze()


_COMPUTATIONS = _Computations()


def computing():
    """The context of a local computation: objects that exist on entry are
    left out of Python's garbage collections (``gc.freeze``), and the
    blocks' spare memory (:data:`SPARES`) is let go at the end.

    A computation makes many objects (dask's tasks, NumPy arrays), so
    Python collects often, and each full collection walks every object of
    the process, those of the imported modules too, holding the GIL: the
    computation's own objects are then all it walks. Computations running
    at once share one freeze, undone when the last ends (which also lets
    the spare memory go); where the caller froze objects first, nothing is
    frozen. Unreachable objects frozen with the rest are freed after the
    computation, not during it; objects the caller freezes meanwhile are
    unfrozen with ours.
    """
    return _COMPUTATIONS.running_one()


def _component_bytes(fshape, dtype):
    """Bytes a sample of `fshape` components takes, with its temporaries.

    The kernels count, sum and cast in 64-bit types, and hold a sample's
    result and its window sums at once, hence twice 8 bytes a component.
    """
    return 2 * math.prod(fshape) * max(np.dtype(dtype).itemsize, 8)


def identity(array):
    """What names `array` in a task key: hashing NumPy data would cost a pass."""
    return uuid.uuid4().hex if isinstance(array, np.ndarray) else array


class Reader(NamedTuple):
    """How a coarse stage reads a stored source: the keys of its graph."""

    source: object  # the array itself
    key: str  # the task holding it
    cache: str  # the task holding its ChunkCache
    layer: str  # the coarse stage's layer, which holds both tasks
    block_bytes: int  # the coarse stage's budget of a block
    uses: ChunkUses  # the reads its cache is told of, more to add


class _Input(NamedTuple):
    """Graph pieces to read an input array (see :func:`_input`)."""

    ref: object  # the dask array, or the key of the task holding the array
    cache: str | None  # the key of the task holding its ChunkCache
    shared: dict  # tasks the blocks read: the array and its cache
    deps: list  # dask arrays the graph depends on
    uses: ChunkUses | None  # the reads its cache is told of


def _input(array, name, cache_bytes, regions):
    """How a stage's blocks read `array`; one stored in chunks, through a
    chunk cache of `cache_bytes`, told of the blocks' `regions` (their
    ``(lo, hi)`` ranges along each axis)."""
    if isinstance(array, da.Array):
        return _Input(array, None, {}, [array], None)
    key, cache, uses = f"source-{name}", None, None
    shared = {key: DataNode(key, array)}
    if storage := _storage_chunks(array):
        cache, uses = f"cache-{name}", ChunkUses(array.shape, storage)
        uses.add(regions)
        shared[cache] = Task(cache, ChunkCache, cache_bytes, uses)
    return _Input(key, cache, shared, [], uses)


def read_through(graph, source, chunks):
    """`source` in `chunks`, read through the chunk cache of a coarse stage.

    Where a coarse stage of `graph` (a HighLevelGraph) reads `source`
    itself (the same array object) through a chunk cache, the chunks of
    the result are read through that cache too: a step that needs the
    image beside its background (a subtraction) then finds most chunks
    decoded already. :func:`fused` reads these blocks inside its own tasks
    (the layer's ``inline`` note) and leaves this layer out of its graph.
    Returns None when no coarse stage reads `source` so.
    """
    readers = (note(layer, "reader") for layer in graph.layers.values())
    reader = next((r for r in readers if r and r.source is source), None)
    if reader is None:
        return None
    name = "localstats-read-" + tokenize(reader.key, chunks)
    edges = edges_of(chunks)
    nbytes = SHARED_CACHE_BLOCKS * reader.block_bytes
    # the cache holds each chunk for these reads too (a graph computing
    # only the coarse stage leaves those chunks to its LRU order)
    reader.uses.add([list(itertools.pairwise(e)) for e in edges])

    def block(key, index):
        slices = tuple(slice(*s) for s in spans(edges, index))
        cache = TaskRef(reader.cache)
        return Task(key, _read_shared, TaskRef(reader.key), slices, cache, nbytes)

    layer = BlockLayer(name, [len(c) for c in chunks], block)
    layer.notes["inline"] = block  # see fused
    layers = dict(graph.layers) | {name: layer}
    dependencies = dict(graph.dependencies) | {name: {reader.layer}}
    meta = np.empty((0,) * len(chunks), source.dtype)
    graph = HighLevelGraph(layers, dependencies)
    return da.Array(graph, name, chunks, dtype=source.dtype, meta=meta)


def coarse_stage(
    source, grid, statistic, dtype, mask=None, block_bytes=None, missing=KEEP_ALL
):
    """The coarse grid as a lazy dask array, one task per processing block.

    Parameters
    ----------
    source, mask : ndarray, zarr array or dask array
        Same shape; `mask` may be None.
    grid : Grid
    statistic : Percentile, Histogram or Function
    dtype : numpy dtype
        Output dtype.
    block_bytes : int or None
        Memory budget of one block's source region.
    missing : Missing
        Handling of NaN voxels and under-covered windows; with
        ``fill='nearest'`` the gaps are filled by :func:`fill_stage`.

    Returns
    -------
    dask array of shape ``grid.counts + statistic.fshape``
    """
    block_bytes = block_bytes or DEFAULT_BLOCK_BYTES
    chunks = _coarse_blocks(source, grid, statistic, dtype, mask, block_bytes)
    name = _coarse_name(source, grid, statistic, dtype, mask, chunks, missing)
    cache_bytes = CACHE_BLOCKS * block_bytes
    bounds = edges_of(chunks)
    # each block's source range along each axis (the chunk caches count
    # their reads from these too)
    regions = [
        [grid.region(d, a, b) for a, b in itertools.pairwise(edges)]
        for d, edges in enumerate(bounds)
    ]
    image = _input(source, name, cache_bytes, regions)
    kept = None if mask is None else _input(mask, f"mask-{name}", cache_bytes, regions)
    inputs = [image] if kept is None else [image, kept]
    shared = {k: v for i in inputs for k, v in i.shared.items()}

    def block(key, index):
        span = spans(bounds, index)
        start, stop = zip(*span, strict=True)
        # `index` also counts the statistic's component axes: zip stops before them
        region = [ranges[i] for ranges, i in zip(regions, index, strict=False)]
        origin = tuple(lo for lo, _ in region)
        mask_task = kept and region_task(kept.ref, region, kept.cache)
        return Task(
            key,
            _coarse_block,
            region_task(image.ref, region, image.cache),
            origin,
            grid,
            start,
            stop,
            statistic,
            dtype,
            mask_task,
            missing,
        )

    numblocks = [len(c) for c in chunks] + [1] * len(statistic.fshape)
    layer = BlockLayer(name, numblocks, block, shared)
    if image.cache:
        layer.notes["reader"] = Reader(
            source, image.ref, image.cache, name, block_bytes, image.uses
        )
    chunks += tuple((f,) for f in statistic.fshape)
    deps = [d for i in inputs for d in i.deps]
    graph = HighLevelGraph.from_collections(name, layer, dependencies=deps)
    if missing.fill != "nearest":
        meta = np.empty((0,) * len(chunks), dtype)
        return da.Array(graph, name, chunks, dtype=dtype, meta=meta)
    flagged = flagged_dtype(dtype)
    meta = np.empty((0,) * len(chunks), flagged)
    coarse = da.Array(graph, name, chunks, dtype=flagged, meta=meta)
    # the fill reads other blocks: writers store these too (see
    # checkpoint_of), so that it reads them instead of computing
    layer.notes["coarse"] = coarse
    return fill_stage(coarse, grid.ndim, dtype)


def _coarse_name(source, grid, statistic, dtype, mask, chunks, missing):
    """The dask name of a coarse stage: a token of all it depends on."""
    token = tokenize(
        identity(source),
        grid.shape,
        grid.extent,
        grid.spacing,
        grid.step,
        grid.footprint,
        statistic,
        dtype,
        identity(mask),
        chunks,
        missing,
    )
    return f"localstats-coarse-{token}"


def _coarse_blocks(source, grid, statistic, dtype, mask, block_bytes):
    """The centers of a coarse stage's processing blocks, as dask chunks of
    the grid: planned within `block_bytes` (:func:`plan_blocks`) and
    aligned to the source's storage chunks (:func:`align_blocks`)."""
    itemsize = np.dtype(source.dtype).itemsize
    itemsize += 0 if mask is None else np.dtype(mask.dtype).itemsize
    per_center = _component_bytes(statistic.fshape, dtype)
    storage = _storage_chunks(source)
    per_block = plan_blocks(grid, itemsize, block_bytes, per_center, storage)
    return align_blocks(grid, per_block, storage)


def fill_stage(flagged, ndim, dtype, boxes=None, name=None):
    """The grid `flagged` with its missing samples filled, a task a block.

    Parameters
    ----------
    flagged : dask array
        The coarse grid, of :func:`~dask_localstats._kernels.flagged_dtype`
        records, spatial axes then whole component axes.
    ndim : int
        Number of spatial axes.
    dtype : dtype
        The values' dtype.
    boxes : dict or None
        ``{block index: ((lo, hi) per spatial axis)}`` (see
        :func:`dask_localstats._fill.boxes`): each block filled from its box
        alone. Without, the grid is swept along each axis in turn, the last
        first (:func:`_sweeps`), and each block is assembled from its tiles
        of the last sweep: the same values, and no task holds more than a
        line of tiles (about :data:`SWEEP_BYTES`).
    name : str or None
        The result's name (a writer gives a grid's blocks boxes under the
        grid's name).

    Returns
    -------
    dask array
        The values, chunked like `flagged`; its layer notes the
        :class:`Fill`.
    """
    name = name or "localstats-filled-" + tokenize(flagged.name)
    edges = edges_of(flagged.chunks)
    sweeps = () if boxes is not None else _sweeps(flagged, ndim, name)

    def block(key, index):
        spatial = spans(edges, index[:ndim])
        if boxes is None:
            return Task(key, swept_values, region_task(sweeps[-1], spatial))
        box = boxes[index[:ndim]]
        inner = tuple(
            slice(a - lo, b - lo) for (a, b), (lo, _) in zip(spatial, box, strict=True)
        )
        return Task(key, fill_block, region_task(flagged, box), ndim, inner)

    layer = BlockLayer(name, flagged.numblocks, block)
    layer.notes["fill"] = Fill(flagged, ndim, sweeps)
    after = sweeps[-1:] or [flagged]
    graph = HighLevelGraph.from_collections(name, layer, dependencies=after)
    meta = np.empty((0,) * flagged.ndim, dtype)
    return da.Array(graph, name, flagged.chunks, dtype=dtype, meta=meta)


# Memory of a task sweeping a line of tiles, as far as one line allows: its
# records and the envelope's temporaries (SWEEP_WORK bytes a sample).
SWEEP_BYTES = DEFAULT_BLOCK_BYTES
SWEEP_WORK = 128


def _sweeps(flagged, ndim, name):
    """The sweeps of the nearest fill of `flagged`, the last axis first.

    The grid's blocks are cut into tiles (:func:`sweep_tiles`); a sweep
    along an axis is a task a line of tiles along it, which reads those
    tiles of the sweep before (of the grid, for the first) and gives its
    own, so a task holds a line of tiles. Returns the sweeps, dask arrays
    of the spatial axes chunked in tiles, of
    :func:`~dask_localstats._fill.swept_dtype` records; their names hold
    the tiles'.
    """
    record = swept_dtype(flagged.dtype["value"], flagged.shape[ndim:])
    per_sample = record.itemsize + SWEEP_WORK
    tiles = sweep_tiles(flagged.chunks[:ndim], per_sample, SWEEP_BYTES)
    name = f"{name}-{tokenize(tiles)}"
    current, sweeps = flagged, []
    if tiles != flagged.chunks[:ndim]:
        current = _tiled(flagged, ndim, tiles, f"{name}-tiles")
    for axis in reversed(range(ndim)):
        current = _swept(current, ndim, axis, f"{name}-sweep{axis}", record)
        sweeps.append(current)
    return tuple(sweeps)


def _tiled(flagged, ndim, tiles, name):
    """`flagged` in `tiles` (which cut its blocks), each tile a copy of a
    part of one block, so that it does not hold the block."""
    edges = edges_of(tiles)

    def tile(key, index):
        return Task(key, np.copy, region_task(flagged, spans(edges, index)))

    numblocks = [len(t) for t in tiles] + [1] * (flagged.ndim - ndim)
    layer = BlockLayer(name, numblocks, tile)
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[flagged])
    return da.Array(graph, name, tiles + flagged.chunks[ndim:], meta=flagged._meta)


def _swept(before, ndim, axis, name, record):
    """The sweep along `axis` of `before` (chunked in tiles): a task a line
    of tiles, and a tile of the result cut from its line's."""
    tiles = before.chunks[:ndim]
    edges = edges_of(tiles)
    lines = f"{name}-lines"

    def line(key, index):
        region = spans(edges, index)
        region[axis] = (0, before.shape[axis])
        return Task(key, sweep, region_task(before, region), ndim, axis)

    def tile(key, index):
        cut = [slice(None)] * ndim
        cut[axis] = slice(*spans(edges, index)[axis])
        at = (lines, *index[:axis], 0, *index[axis + 1 :])
        return Task(key, operator.getitem, TaskRef(at), tuple(cut))

    numblocks = [len(c) for c in tiles]
    across = [1 if d == axis else n for d, n in enumerate(numblocks)]
    layers = {
        **before.dask.layers,
        lines: BlockLayer(lines, across, line),
        name: BlockLayer(name, numblocks, tile),
    }
    dependencies = {**before.dask.dependencies, lines: {before.name}, name: {lines}}
    graph = HighLevelGraph(layers, dependencies)
    return da.Array(graph, name, tiles, meta=np.empty((0,) * ndim, record))


def sweep_tiles(chunks, itemsize, most):
    """Tiles of a grid of blocks for its sweeps.

    Parameters
    ----------
    chunks : tuple of tuple of int
        The grid's blocks along each spatial axis.
    itemsize : int
        Bytes a sample needs in a sweep.
    most : int
        Bytes a line of tiles may need.

    Returns
    -------
    tuple of tuple of int
        The blocks (without empty ones) halved, along the axis of the
        largest tiles across the worst line, until a line of tiles along
        any axis needs at most `most` bytes (or the worst is one tile wide).

    Examples
    --------
    >>> sweep_tiles(((4, 4), (6,)), 8, 256)  # a line along 0: 8 x 6 samples
    ((4, 4), (3, 3))
    """
    sizes = [[n for n in c if n] or [0] for c in chunks]
    lengths = [sum(c) for c in chunks]

    def across(d):  # the bytes of a line of tiles along d
        widths = [max(s, default=0) for e, s in enumerate(sizes) if e != d]
        return lengths[d] * math.prod(widths) * itemsize

    while True:
        worst = max(range(len(sizes)), key=across)
        wide = [e for e in range(len(sizes)) if e != worst and max(sizes[e]) > 1]
        if across(worst) <= most or not wide:
            return tuple(map(tuple, sizes))
        e = max(wide, key=lambda e: max(sizes[e]))
        sizes[e] = [p for c in sizes[e] for p in (c - c // 2, c // 2) if p]


def _axis_coordinates(grid, align, axis, start, stop):
    """Coarse coordinates of the output voxels ``start:stop`` of `axis`."""
    return coordinates(
        grid.shape[axis],
        grid.counts[axis],
        grid.first[axis],
        grid.spacing[axis],
        align,
        start,
        stop,
    )


def _block_coordinates(grid, align, start, stop):
    """Coarse coordinates of the output voxels ``start:stop``, per axis."""
    return [
        _axis_coordinates(grid, align, d, a, b)
        for d, (a, b) in enumerate(zip(start, stop, strict=True))
    ]


def _resample(
    coefficients, offset, grid, order, align, start, stop, dtype, bounds, part,
    then=None, into=None,
):  # fmt: skip
    """One output chunk: components `part` (a slice of the first trailing axis).

    `then` is a step fused into the same pass, piece by piece, and `into`
    where to write the chunk (see
    :func:`~dask_localstats._interpolate.resample_block`).
    """
    coords = _block_coordinates(grid, align, start, stop)
    if part is not None:
        coefficients = coefficients[(slice(None),) * grid.ndim + (part,)]
        bounds = None if bounds is None else bounds[:, part]
    ahead = expands(grid.shape[0], grid.counts[0])  # the same for every chunk
    return resample_block(
        coefficients, offset, coords, grid.counts, order, dtype, bounds, then, ahead,
        into,
    )  # fmt: skip


def fused(resampled, name, then, operands, dtype):
    """`resampled` (from :func:`resample_stage`) and a step, in one task a chunk.

    Each chunk's task resamples it a piece at a time and passes each piece,
    while it is in cache, to ``then(*blocks)`` (``blocks``: that chunk of
    each of the dask arrays `operands`, chunked like `resampled`): a
    callable ``(where, piece) -> piece`` whose ``dtype`` is `dtype` (see
    :func:`~dask_localstats._interpolate.resample_block`). An operand read
    through a coarse stage's chunk cache (:func:`read_through`) is read
    inside the chunk's task, after the coarse blocks that task waits for,
    which have just decoded its chunks (a task of its own would be ready
    at once, and would run before them). Returns None when `resampled` is
    not a resampling stage.
    """
    layer = resampled.dask.layers.get(resampled.name)
    resample = note(layer, "resample")
    if resample is None or any(a.chunks != resampled.chunks for a in operands):
        return None

    inline = [note(a.dask.layers.get(a.name), "inline") for a in operands]

    def block(key, index, deferred=False):
        blocks = [
            make(None, index) if make else TaskRef((a.name, *index))
            for a, make in zip(operands, inline, strict=True)
        ]
        return resample(key, index, Task(None, then, *blocks), deferred=deferred)

    graph = _restaged(resampled, name, block, operands, inline)
    graph.layers[name].notes.update(
        coarse=checkpoint_of(layer),
        extremes=clip_of(layer),
        pieces=functools.partial(block, None, deferred=True),
    )
    meta = np.empty((0,) * resampled.ndim, dtype)
    return da.Array(graph, name, resampled.chunks, dtype=dtype, meta=meta)


def _restaged(resampled, name, block, operands=(), inline=()):
    """The graph of `resampled` with its resampling layer replaced by one of
    tasks ``block(key, index)`` named `name`, which also reads `operands`
    (those flagged in `inline` inside its tasks: it reads what they read)."""
    old = resampled.name
    layers = {k: v for k, v in resampled.dask.layers.items() if k != old}
    dependencies = {k: v for k, v in resampled.dask.dependencies.items() if k != old}
    after = set(resampled.dask.dependencies[old])
    for a, inside in itertools.zip_longest(operands, inline):
        # the layer replaced, and an operand read inside `block`: left out
        skip = {old, a.name} if inside else {old}
        layers.update((k, v) for k, v in a.dask.layers.items() if k not in skip)
        deps = a.dask.dependencies
        dependencies.update((k, v) for k, v in deps.items() if k not in skip)
        after |= deps[a.name] if inside else {a.name}
    layers[name] = BlockLayer(name, resampled.dask.layers[old].numblocks, block)
    dependencies[name] = after
    return HighLevelGraph(layers, dependencies)


def resampled_into(resampled, out):
    """A graph computing `resampled` (see :func:`resample_stage`) into `out`.

    Each task writes its chunk into its region of the NumPy array `out`
    (of the shape and dtype of `resampled`), so the whole result is not
    copied from the chunks. Returns the graph and its keys (their results
    are the regions), or None when `resampled` is not a resampling stage.
    Only for schedulers sharing `out`'s memory: dask's threaded or
    synchronous ones.
    """
    layer = resampled.dask.layers.get(resampled.name)
    resample = note(layer, "resample")
    if resample is None or (out.shape, out.dtype) != (resampled.shape, resampled.dtype):
        return None
    name = "localstats-into-" + tokenize(resampled.name, identity(out))
    edges = edges_of(resampled.chunks)

    def block(key, index):
        region = tuple(slice(*s) for s in spans(edges, index))
        return resample(key, index, into=out[region])

    keys = [(name, *i) for i in np.ndindex(*layer.numblocks)]
    return _restaged(resampled, name, block), keys


def component_chunks(fshape, spatial, dtype, nbytes):
    """Chunks of the trailing axes so an output chunk fits `nbytes`.

    Only the first trailing axis is split, down to one component a chunk;
    `spatial` is the largest number of voxels of a spatial chunk (the
    spatial chunks are the caller's).
    """
    if not fshape:
        return ()
    per_component = spatial * _component_bytes(fshape[1:], dtype)
    size = max(1, min(fshape[0], nbytes // per_component))
    return (_split(fshape[0], size), *((f,) for f in fshape[1:]))


def _coefficients(coarse, order, ndim):
    """The spline coefficients of the coarse grid, chunk by chunk.

    Each chunk is prefiltered with a halo of :func:`prefilter_halo`
    samples along the spatial axes (the whole axis where it is shorter), so
    no task holds the whole grid and the coefficients are those of the
    whole grid, within float rounding. The chunks depend on the grid's
    shape alone (:func:`_prefilter_chunks`), not on the coarse blocks, so
    a result's coefficients are the same bits whatever `block_bytes`.
    """
    halo = prefilter_halo(order)
    chunks = _prefilter_chunks(coarse.shape, ndim, halo)
    depth = {d: 0 if len(c) == 1 else halo for d, c in enumerate(chunks)}
    return da.map_overlap(
        functools.partial(prefilter, order=order, ndim=ndim),
        coarse.rechunk(chunks),
        depth=depth,
        boundary="none",
        dtype=np.float64,
        meta=np.empty((0,) * coarse.ndim, np.float64),
    )


def _prefilter_chunks(shape, ndim, halo):
    """Chunks of a coarse grid for its prefilter, from its shape alone.

    Spatial axes of at most ``4 * halo`` samples are whole; the others are
    cut in chunks of ``2 * halo`` samples (a last one shorter than the halo
    joins the one before it): small, so that a batch of the output
    prefilters only the coarse samples near it, with their halo.
    """
    side = 2 * halo
    chunks = []
    for d, n in enumerate(shape):
        if d >= ndim or n <= 4 * halo:
            chunks.append((n,))
            continue
        sizes = list(_split(n, side))
        if len(sizes) > 1 and sizes[-1] < halo:
            sizes[-2:] = [sizes[-2] + sizes[-1]]
        chunks.append(tuple(sizes))
    return tuple(chunks)


def resample_stage(coarse, grid, order, align, chunks, clip=False, block_bytes=None):
    """Lazy full-resolution B-spline resampling of the coarse grid.

    Parameters
    ----------
    coarse : dask array
        Output of :func:`coarse_stage`.
    grid : Grid
    order : int
        Spline order, 0 to 5.
    align : {'corners', 'centers'}
    chunks : tuple of tuple of int
        Chunks of the spatial axes of the output.
    clip : bool
        Keep values within the coarse grid's minimum and maximum (per
        component); only orders 2 and up can overshoot them.
    block_bytes : int or None
        Memory budget of one output chunk: the first trailing axis (bins,
        percentiles) is split so that a chunk fits.

    Returns
    -------
    dask array of shape ``grid.shape + fshape`` and the dtype of `coarse`
    """
    ndim, fshape = grid.ndim, coarse.shape[grid.ndim :]
    coefficients = _coefficients(coarse, order, ndim) if order > 1 else coarse
    dependencies, limits, extremes = [coefficients], None, None
    if clip and order > 1:
        extremes = extremes_of(coarse, ndim).rechunk(-1)
        dependencies.append(extremes)
        limits = (extremes.name, *(0,) * extremes.ndim)
    token = tokenize(
        coefficients, grid.shape, grid.spacing, order, align, chunks, limits
    )
    name = f"localstats-resample-{token}"
    spatial = math.prod(max(c) for c in chunks)
    fchunks = component_chunks(
        fshape, spatial, coarse.dtype, block_bytes or DEFAULT_BLOCK_BYTES
    )
    parts = [None]
    if fshape:
        bounds = edges_of(fchunks[:1])[0]
        parts = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        parts = [None] if len(parts) == 1 else parts
    edges = edges_of(chunks)

    ranges = {}  # (axis, lo, hi): the coarse range that voxels lo:hi read

    def needs(axis, lo, hi):
        # chunks in a row share theirs: computed once for all of them (a
        # dict, not functools.cache: the layer is pickled to a cluster)
        if (axis, lo, hi) not in ranges:
            x = _axis_coordinates(grid, align, axis, lo, hi)
            ranges[axis, lo, hi] = taps_range(x, grid.counts[axis], order)
        return ranges[axis, lo, hi]

    def block(key, index, then=None, into=None, deferred=False):
        span = spans(edges, index[:ndim])
        start, stop = zip(*span, strict=True)
        region = [needs(d, lo, hi) for d, (lo, hi) in enumerate(span)]
        offset = tuple(lo for lo, _ in region)
        part = parts[index[ndim]] if fshape else None
        call = (functools.partial, _resample) if deferred else (_resample,)
        return Task(
            key,
            *call,
            region_task(coefficients, region),
            offset,
            grid,
            order,
            align,
            start,
            stop,
            coarse.dtype,
            limits and TaskRef(limits),
            part,
            then=then,
            into=into,
        )

    out_chunks = tuple(chunks) + tuple(fchunks)
    layer = BlockLayer(name, [len(c) for c in out_chunks], block)
    # block maker with a fused step or a destination (fused, resampled_into);
    # a chunk's computation to call with its destination (the writer's
    # pieces, also on fused layers); the grid a writer stores
    # (checkpoint_of); the extremes clipped to
    layer.notes.update(
        resample=block,
        pieces=functools.partial(block, None, deferred=True),
        coarse=coarse,
        extremes=extremes,
    )
    graph = HighLevelGraph.from_collections(name, layer, dependencies=dependencies)
    meta = np.empty((0,) * len(out_chunks), coarse.dtype)
    return da.Array(graph, name, out_chunks, dtype=coarse.dtype, meta=meta)
