"""The chunk cache: each chunk decoded about once, in bounded memory."""

import itertools
import math
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import numpy as np
import pytest
import zarr
from strategies import Counting, write_zarr

from dask_localstats._cache import ChunkCache, ChunkUses


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 500, (17, 30, 25)).astype(np.uint16)


def _write(path, image, chunks=(5, 7, 9)):
    return zarr.open_array(write_zarr(path, image, chunks, 3), mode="r")


def test_chunk_cache_decodes_each_chunk_once_within_its_budget(tmp_path, image):
    z = Counting(_write(tmp_path / "image.zarr", image, chunks=(5, 7, 9)))
    cache = ChunkCache(2**20)
    first = cache.read(z, (slice(2, 12), slice(0, 30), slice(4, 20)))
    again = cache.read(z, (slice(0, 17), slice(5, 9), slice(0, 25)))
    np.testing.assert_array_equal(first, image[2:12, :, 4:20])
    np.testing.assert_array_equal(again, image[:, 5:9])
    # 3 x 5 x 3 chunks, then 4 x 2 x 3 of which 3 x 2 x 3 are held already
    assert len(z.chunks_read) == len(set(z.chunks_read)) == 45 + 6
    small = ChunkCache(2 * 5 * 7 * 9 * image.itemsize)  # two whole chunks
    whole = small.read(z, (slice(0, 17), slice(0, 30), slice(0, 25)))
    np.testing.assert_array_equal(whole, image)
    assert 2 <= len(small) < 60
    # the chunks decoded together (runs of 3 along the last axis) share
    # their memory: it counts, whole, until the last of them is evicted
    runs = {id(memory): memory[0] for _, memory in small._chunks.values()}
    assert small._held == sum(runs.values())
    assert small._held <= small.nbytes or len(runs) == 1
    assert len(pickle.loads(pickle.dumps(cache))) == 0  # arrives empty


def test_chunk_cache_gives_whole_chunks_read_only_and_pastes_into_out(tmp_path, image):
    z = Counting(_write(tmp_path / "image.zarr", image, chunks=(5, 7, 9)))
    cache = ChunkCache(2**20)
    inner, edge = cache.chunk(z, (1, 2, 0)), cache.chunk(z, [3, 4, 2])
    np.testing.assert_array_equal(inner, image[5:10, 14:21, 0:9], strict=True)
    np.testing.assert_array_equal(edge, image[15:, 28:, 18:], strict=True)  # clipped
    with pytest.raises(ValueError, match="read-only"):
        inner[0, 0, 0] = 1
    again = cache.chunk(z, (1, 2, 0))
    assert np.shares_memory(again, inner)  # the cache's own, not a copy
    out = np.zeros((3, 4, 5), image.dtype)
    region = (slice(4, 7), slice(12, 16), slice(5, 10))
    assert cache.read(z, region, out=out) is out
    np.testing.assert_array_equal(out, image[region])
    assert len(z.chunks_read) == len(set(z.chunks_read))  # each decoded once
    assert (1, 2, 0) in z.chunks_read


def test_chunk_cache_makes_room_before_it_decodes(tmp_path, image):
    # a budget of two runs of three chunks (a row of chunks): decoding the
    # third, the cache lets the least recently used run go first, so the
    # chunks held and those being decoded never take more than the budget
    # (they took three runs)
    taken = []

    class Watched(Counting):
        def __getitem__(self, region):
            decoding = math.prod(s.stop - s.start for s in region) * image.itemsize
            runs = {id(memory): memory[0] for _, memory in cache._chunks.values()}
            taken.append(sum(runs.values()) + decoding)
            return super().__getitem__(region)

    z = Watched(_write(tmp_path / "image.zarr", image, chunks=(5, 7, 9)))
    run = 5 * 7 * 25 * image.itemsize
    cache = ChunkCache(2 * run)
    for y in range(0, 30, 7):  # a row of each row of chunks
        got = cache.read(z, (slice(0, 5), slice(y, y + 1), slice(0, 25)))
        np.testing.assert_array_equal(got, image[:5, y : y + 1])
    assert len(taken) == 5 and max(taken) == 2 * run == cache.nbytes
    assert len(cache) == 6 and cache._held == run + 5 * 2 * 25 * image.itemsize
    # a run larger than the budget is handed to its read, not kept
    small = ChunkCache(run - 1)
    got = small.read(z, (slice(0, 5), slice(0, 7), slice(0, 25)))
    np.testing.assert_array_equal(got, image[:5, :7])
    assert len(small) == 0 and small._held == 0


def test_chunk_cache_makes_room_for_the_runs_other_threads_decode(tmp_path, image):
    # a budget of two runs (rows of chunks), one held: two threads then
    # decode a run each at once, and the second to claim its run lets the
    # held one go
    together = threading.Barrier(2, timeout=30)
    held = []

    class Together(Counting):
        def __getitem__(self, region):
            if len(self.chunks_read) >= 3:  # the first run is held
                together.wait()  # both runs are being decoded
                runs = {id(m): m[0] for _, m in cache._chunks.values()}
                held.append(sum(runs.values()))
            return super().__getitem__(region)

    z = Together(_write(tmp_path / "image.zarr", image, chunks=(5, 7, 9)))
    run = 5 * 7 * 25 * image.itemsize
    cache = ChunkCache(2 * run)
    rows = [(slice(0, 5), slice(y, y + 1), slice(0, 25)) for y in (0, 7, 14)]
    cache.read(z, rows[0])
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda region: cache.read(z, region), rows[1:]))
    np.testing.assert_array_equal(got[1], image[:5, 14:15])
    assert held == [0, 0]  # not one run more than the budget


def test_chunk_cache_keeps_a_run_until_the_reads_waiting_for_it_pasted_it(
    tmp_path, image
):
    # rows of chunks a, c, b (runs of three), a budget of two: one thread
    # decodes a while another waits for it (and decodes c first): when b
    # then needs room, a is not let go (the waiting read still has to paste
    # it, and would keep its memory) and b, no room made, is not kept
    gates = {y: threading.Event() for y in (0, 1)}  # chunk rows a and c

    class Gated(Counting):
        def __getitem__(self, region):
            gate = gates.get(region[1].start // 7)
            if gate is not None:
                assert gate.wait(30)
            return super().__getitem__(region)

    z = Gated(_write(tmp_path / "image.zarr", image, chunks=(5, 7, 9)))
    cache = ChunkCache(2 * 5 * 7 * 25 * image.itemsize)
    a, b = [(slice(0, 5), slice(y, y + 7), slice(0, 25)) for y in (0, 14)]
    a_and_c = (slice(0, 5), slice(0, 14), slice(0, 25))

    def claimed(reads):  # until `reads` reads have claimed the first chunk
        for _ in range(3000):
            if cache._pins[0, 0, 0] == reads:
                return
            time.sleep(0.01)
        raise TimeoutError

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cache.read, z, a)
        claimed(1)
        both = pool.submit(cache.read, z, a_and_c)  # waits for a, decodes c
        claimed(2)
        gates[0].set()
        first.result(timeout=30)
        cache.read(z, b)
        gates[1].set()
        got = both.result(timeout=30)
    np.testing.assert_array_equal(got, image[:5, :14])
    assert {index[1] for index in cache._chunks} == {0, 1}  # a and c, not b
    assert z.chunks_read.count((0, 0, 0)) == 1


def test_chunk_cache_read_errors_propagate_and_are_not_cached(tmp_path, image):
    z = Counting(_write(tmp_path / "image.zarr", image))
    cache = ChunkCache(2**20)
    broken = mock.patch.object(Counting, "__getitem__", side_effect=OSError("gone"))
    with broken, pytest.raises(OSError, match="gone"):
        cache.read(z, (slice(0, 3), slice(0, 3), slice(0, 3)))
    assert len(cache) == 0
    np.testing.assert_array_equal(
        cache.read(z, (slice(0, 3), slice(0, 3), slice(0, 3))), image[:3, :3, :3]
    )


def test_a_failed_read_fails_the_reads_waiting_for_its_other_chunks(tmp_path, image):
    # a read claims two runs and fails on the first: a read waiting for a
    # chunk of its second run gets the error (it waited forever, and a
    # write with it)
    gate = threading.Event()

    class Damaged(Counting):
        def __getitem__(self, region):
            if region[1].start == 0:  # the first row of chunks
                assert gate.wait(30)
                raise OSError("chunk 0 is damaged")
            return super().__getitem__(region)

    z = Damaged(_write(tmp_path / "image.zarr", image, chunks=(5, 7, 9)))
    cache = ChunkCache(2**20)
    errors = []

    def read(region):  # in a thread that cannot keep the test from ending
        try:
            cache.read(z, region)
        except OSError as error:
            errors.append(error)

    reads = [
        threading.Thread(target=read, args=(region,), daemon=True)
        for region in [
            (slice(0, 5), slice(0, 14), slice(0, 25)),  # the two runs
            (slice(0, 5), slice(7, 14), slice(0, 9)),  # waits for the second
        ]
    ]
    for thread, pins in zip(reads, (1, 2), strict=True):
        thread.start()
        while cache._pins[0, 1, 0] < pins:
            time.sleep(0.01)
    gate.set()
    for thread in reads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in reads)
    assert [str(e) for e in errors] == ["chunk 0 is damaged"] * 2
    assert not cache._pending and not cache._pins and cache._held == 0
    np.testing.assert_array_equal(
        cache.read(z, (slice(0, 5), slice(7, 14), slice(0, 9))), image[:5, 7:14, :9]
    )


def test_chunk_uses_count_the_reads_of_each_grid_of_regions():
    rng = np.random.default_rng(1)
    shape, chunks = (23, 17), (5, 4)
    uses = ChunkUses(shape, chunks)
    grids = []
    for _ in range(2):  # two grids of overlapping, empty or clipped ranges
        grid = [
            sorted(map(tuple, np.sort(rng.integers(0, s + 1, (3, 2))))) for s in shape
        ]
        uses.add(grid)
        grids.append(grid)
    expected = {}
    for grid in grids:  # every region of each grid, chunk by chunk
        for region in itertools.product(*grid):
            touched = [
                range(lo // c, -(-hi // c))
                for (lo, hi), c in zip(region, chunks, strict=True)
            ]
            for index in itertools.product(*touched):
                expected[index] = expected.get(index, 0) + 1
    for index in itertools.product(
        *(range(-(-s // c)) for s, c in zip(shape, chunks, strict=True))
    ):
        assert uses[index] == expected.get(index, 0), index


def test_chunk_cache_lets_go_of_chunks_no_read_needs_again(tmp_path):
    # rows as chunks, a budget of two: least-recently-used alone keeps
    # chunk 0 (read twice, done) over chunk 1 (still to be read) and
    # decodes chunk 1 again; told of the reads, it lets chunk 0 go
    image = np.arange(6 * 4, dtype=np.uint16).reshape(6, 4)
    reads = [(0, 2), (0, 1), (2, 3), (1, 2)]
    decoded = {}
    for told in (False, True):
        z = Counting(_write(tmp_path / f"{told}.zarr", image, chunks=(1, 4)))
        uses = ChunkUses(image.shape, (1, 4))
        uses.add([[(0, 2), (2, 3)], [(0, 4)]])  # rows 0 and 1 twice, 2 once
        uses.add([[(0, 1), (1, 2)], [(0, 4)]])
        cache = ChunkCache(2 * 4 * image.itemsize, uses if told else None)
        for lo, hi in reads:
            got = cache.read(z, (slice(lo, hi), slice(0, 4)))
            np.testing.assert_array_equal(got, image[lo:hi])
        decoded[told] = sorted(z.chunks_read)
        assert len(cache) == (0 if told else 2)  # every read done: all gone
    assert decoded == {
        False: [(0, 0), (1, 0), (1, 0), (2, 0)],
        True: [(0, 0), (1, 0), (2, 0)],
    }
    clone = pickle.loads(pickle.dumps(cache))  # arrives empty, told of the reads
    assert len(clone) == 0 and clone.uses[0, 0] == 2
