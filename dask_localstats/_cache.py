"""A cache of decoded storage chunks, shared by the tasks of one computation.

Processing blocks overlap by the reach of the windows, and a storage chunk
is decoded whole whichever part of it a block needs, so blocks reading a
chunked store directly would decode their boundary chunks several times
(W7's blocks decode 2.25 times the volume of 128^3 chunks). A
:class:`ChunkCache` keeps decoded chunks for the next reads, so each is
decoded about once, in bounded memory.

Which chunks go first when it is full: those no read of the computation
will need again, as soon as their last read is done, then the least
recently used. A computation's reads come in grids of regions (the
blocks of a coarse stage, the chunks of a subtraction reading the image
through the same cache), so :class:`ChunkUses` counts how many reads
each chunk will have from a count per axis, whatever the volume; reads
it did not foresee (a part of the graph computed alone, a retried task)
only leave chunks to the least-recently-used order.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from concurrent.futures import Future

import numpy as np

from ._io import read_region


class ChunkUses:
    """How many reads of a computation will touch each storage chunk.

    Parameters
    ----------
    shape, chunks : tuple of int
        The array's shape and its chunks.

    Notes
    -----
    Each grid of regions (:meth:`add`) reads chunk ``(i, j, ...)`` as many
    times as the product of its regions meeting chunk ``i`` on the first
    axis, ``j`` on the second, and so on; a chunk's uses are the sum over
    the grids.

    Examples
    --------
    >>> uses = ChunkUses((10, 10), (4, 4))
    >>> uses.add([[(0, 5), (3, 10)], [(0, 10)]])  # two blocks, overlapping
    >>> uses[0, 0], uses[1, 2], uses[2, 0]
    (2, 2, 1)
    """

    def __init__(self, shape, chunks):
        self.shape, self.chunks = tuple(shape), tuple(chunks)
        self.grids = []

    def add(self, regions):
        """A grid of reads: its ``(lo, hi)`` ranges along each axis."""
        counts = []
        for ranges, size, chunk in zip(regions, self.shape, self.chunks, strict=True):
            count = np.zeros(-(-size // chunk), np.int64)
            for lo, hi in ranges:
                if hi > lo:
                    count[lo // chunk : (hi - 1) // chunk + 1] += 1
            counts.append(count)
        self.grids.append(counts)

    def __getitem__(self, index):
        return sum(
            math.prod(int(c[i]) for c, i in zip(counts, index, strict=True))
            for counts in self.grids
        )


class ChunkCache:
    """Decoded storage chunks of a chunked array, for the reads to come.

    Parameters
    ----------
    nbytes : int
        Most bytes of decoded chunks to hold, those being decoded
        included: room is made before a run is decoded, the least recently
        used chunks going first, but not those a read is still pasting
        (evicting them would not free their memory). A run there is no
        room for (all held being pinned so) is decoded all the same, for
        the reads that wait for it, and not kept: with many threads the
        runs being decoded can take more than `nbytes` for a while.
        Chunks decoded together (a run along the last axis) share their
        memory, which counts until the last of them goes.
    uses : ChunkUses or None
        The reads to come: a chunk goes as soon as its last is done.

    Notes
    -----
    One cache serves one computation: the engine makes it a task of the
    graph, which dask frees when the last block that reads through it is
    done. A cache sent to another process arrives empty.

    Examples
    --------
    >>> import zarr
    >>> z = zarr.create_array({}, shape=(6, 6), chunks=(4, 4), dtype="u2")
    >>> z[:] = np.arange(36).reshape(6, 6)
    >>> cache = ChunkCache(2**20)
    >>> cache.read(z, (slice(3, 5), slice(0, 6)))[:, :3]
    array([[18, 19, 20],
           [24, 25, 26]], dtype=uint16)
    >>> len(cache)  # the chunks that region touched
    4
    """

    def __init__(self, nbytes, uses=None):
        self.nbytes, self.uses = int(nbytes), uses
        self._reads = collections.Counter()  # of chunks with reads to come
        self._chunks = collections.OrderedDict()
        self._held = 0
        self._pins = collections.Counter()  # of chunks claimed, not yet pasted
        self._pending = {}
        self._lock = threading.Lock()

    def __reduce__(self):
        return type(self), (self.nbytes, self.uses)

    def __len__(self):
        return len(self._chunks)

    def grow(self, nbytes, most):
        """Hold `nbytes` more from now on, up to `most` in all."""
        self.nbytes = max(self.nbytes, min(self.nbytes + int(nbytes), int(most)))

    def read(self, array, slices, out=None):
        """``array[slices]`` (unit steps), pasted together from whole chunks.

        The chunks not held are claimed first, then decoded in runs along
        the last axis, one read each (zarr decodes a read's chunks
        concurrently); a chunk another thread is decoding is waited for.
        Each chunk is pasted as soon as it is at hand, so a read holds the
        region and one run of chunks, whatever the cache keeps. The region
        is pasted into `out` if given (of its shape and the array's dtype).
        """
        shape = tuple(s.stop - s.start for s in slices)
        out = np.empty(shape, array.dtype) if out is None else out

        def paste(chunks):  # holding them no longer than this call
            for index, chunk in chunks:
                dst, src = [], []
                for i, c, s in zip(index, array.chunks, slices, strict=True):
                    lo, hi = max(s.start, i * c), min(s.stop, (i + 1) * c)
                    dst.append(slice(lo - s.start, hi - s.start))
                    src.append(slice(lo - i * c, hi - i * c))
                out[tuple(dst)] = chunk[tuple(src)]
                self._unpin([index])
                unpasted.remove(index)

        ranges = [
            range(s.start // c, -(-s.stop // c))
            for s, c in zip(slices, array.chunks, strict=True)
        ]
        indices = list(itertools.product(*ranges))
        unpasted = set(indices)
        held, waiting, mine = self._claim(indices)
        try:
            paste(held)
            del held  # a chunk evicted meanwhile lets its memory go
            for run in _runs(mine):
                paste(self._decode(array, run).items())
            for index, pending in waiting:
                paste([(index, pending.result())])
        except BaseException as error:
            self._abandon(mine, error)
            raise
        finally:
            self._unpin(unpasted)
        self._done(indices)
        return out

    def chunk(self, array, index):
        """The whole chunk at `index` (chunk coordinates), decoded once.

        The cache's own array, read-only: no copy is made (a step that only
        reads a region of exactly one chunk needs none).
        """
        index = tuple(index)
        held, waiting, mine = self._claim([index])
        try:
            if held:
                chunk = held[0][1]
            elif waiting:
                chunk = waiting[0][1].result()
            else:
                chunk = self._decode(array, mine)[mine[0]]
        finally:
            self._unpin([index])
        view = chunk.view()
        view.flags.writeable = False
        self._done([index])
        return view

    def _abandon(self, indices, error):
        """A read failed: the chunks `indices` it claimed and has not
        decoded fail with `error` for the reads waiting for them."""
        with self._lock:
            for index in indices:
                pending = self._pending.pop(index, None)  # still ours
                if pending is not None:
                    pending.set_exception(error)

    def _unpin(self, indices):
        """A read is done with chunks `indices` (see :meth:`_claim`): they
        are the most recently used."""
        with self._lock:
            for index in indices:
                self._pins[index] -= 1
                if not self._pins[index]:
                    del self._pins[index]
                if index in self._chunks:
                    self._chunks.move_to_end(index)
            self._shrink(self.nbytes)  # what the budget could not let go

    def _done(self, indices):
        """A read of chunks `indices` is done: those no read needs again go."""
        if self.uses is None:
            return
        with self._lock:
            for index in indices:
                self._reads[index] += 1
                if self._reads[index] >= self.uses[index]:
                    del self._reads[index]
                    if index in self._chunks:
                        self._evict(index)

    def _evict(self, index):
        """Let chunk `index` go (holding the lock), and its run's memory
        with the last chunk of the run."""
        _, memory = self._chunks.pop(index)
        memory[1] -= 1
        if not memory[1]:
            self._held -= memory[0]

    def _claim(self, indices):
        """Sort chunk `indices` into those held ``(index, chunk)``, those
        another thread is decoding ``(index, future)``, and those not held,
        claimed for the caller to decode (:meth:`_decode`). All are pinned
        until the caller has pasted them (:meth:`_unpin`): evicting them
        before would not let their memory go."""
        held, waiting, mine = [], [], []
        with self._lock:
            for index in indices:
                self._pins[index] += 1
                if index in self._chunks:
                    held.append((index, self._chunks[index][0]))
                elif index in self._pending:
                    waiting.append((index, self._pending[index]))
                else:
                    mine.append(index)
                    self._pending[index] = Future()
        return held, waiting, mine

    def _decode(self, array, run):
        """Decode chunks consecutive along the last axis, claimed by us."""
        first, last = run[0], run[-1]
        region = tuple(
            slice(i * c, min((j + 1) * c, n))
            for i, j, c, n in zip(first, last, array.chunks, array.shape, strict=True)
        )
        nbytes = array.dtype.itemsize * math.prod(s.stop - s.start for s in region)
        with self._lock:  # room first, counting what other threads decode
            self._held += nbytes
            self._shrink(self.nbytes)
        try:
            data = read_region(array, region)
        except BaseException as error:
            with self._lock:
                self._held -= nbytes
                for index in run:
                    self._pending.pop(index).set_exception(error)
            raise
        step = array.chunks[-1]
        # views of the run (copying them out cost a pass, and twice the
        # run's memory meanwhile): the run's memory is counted until the
        # last of them is evicted
        chunks = {
            index: data[..., k * step : (k + 1) * step] for k, index in enumerate(run)
        }
        memory = [nbytes, len(chunks)]  # bytes, views held
        with self._lock:
            self._shrink(self.nbytes)  # reads may have pasted chunks meanwhile
            kept = self._held <= self.nbytes
            for index, chunk in chunks.items():
                if kept:
                    self._chunks[index] = (chunk, memory)
                self._pending.pop(index).set_result(chunk)
            if not kept:  # for the reads waiting for it only
                self._held -= nbytes
        return chunks

    def _shrink(self, nbytes):
        """Let the least recently used chunks go (holding the lock) until
        those held and being decoded take at most `nbytes`, but not the
        runs a read has still to paste from (pinned)."""
        if self._held <= nbytes:
            return
        pinned = {id(self._chunks[i][1]) for i in self._pins if i in self._chunks}
        for index in [i for i, (_, m) in self._chunks.items() if id(m) not in pinned]:
            if self._held <= nbytes:
                break
            self._evict(index)


def _runs(indices):
    """Split chunk indices (in C order) into runs consecutive on the last axis."""
    runs = []
    for index in indices:
        previous = runs[-1][-1] if runs else None
        if previous and previous[:-1] == index[:-1] and previous[-1] + 1 == index[-1]:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs
