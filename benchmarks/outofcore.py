"""Out-of-core benchmarks W7 to W11 of docs/benchmarks.md.

Run ``python benchmarks/outofcore.py`` (``--sizes 1 8`` GiB for W7 and W10,
``--repeat 3``, ``--only W10,W11``, ``--workdir DIR`` where the synthetic
stores go; they are made once and reused; ``--malloc-arena-max 2`` runs both
sides with glibc's per-thread heaps capped, see the README;
``--tiff-chunks`` the output chunks of W11; ``--only stages`` times W10's
steps one by one in one process, on the first of ``--sizes``; ``--only
resume`` times R1; ``--against DIR`` also runs the job of W7 to W11 with
the library of another checkout, alternating with the others, to compare
two versions in one run).

- W7: ``v - local_percentile(v, 0.1, selem=(64,)*3, spacing=(32,)*3)``
  stored into a new zstd zarr store, against B4, a plain
  ``da.from_zarr(src).to_zarr(dst)`` copy with the same chunks and codec:
  the user's arithmetic ``v - minimum(v, bg)`` (W7), and ``clip(v - bg, 0,
  65535)`` in int32 (W7clip); W7sub gives the same values with the
  library's ``subtract_background(z, bg)``, which reads the image through
  the background's chunk cache (each chunk decoded once for both) and
  subtracts in the resampling's pass. Each run is a fresh process; wall
  time and peak RSS are its own.
- W8: the W7 job at 1 GiB on the library's local cluster
  (``connect(workers=n, threads=1)``: process workers of one thread, whose
  zarr codecs run in one thread too): 1 worker against 2; written by dask's
  ``store``, and by the library's ``to_zarr`` in the same chunks and codec
  ("W8 to_zarr").
- W9: the lazy W7 pipeline over a 1 TiB zarr array that is created but
  never written: time and memory to build it, then the time to compute one
  256^3 output block and the number of storage chunks it asked for.
- W10: ClearMap's light-sheet correction, as the library does it:
  ``dls.to_zarr(dls.subtract_background(src, bg), dst)`` with ``bg`` the
  ``local_percentile(src, 0.25, selem=(1, 200, 200), spacing=(1, 25, 25),
  step=(1, 2, 2), dtype=float32)`` (interpolation order 1), on a uint16 zstd
  zarr volume (z y x) of ``(n, 2048, 2048)`` in 64 x 256 x 256 chunks (1 GiB:
  n = 128; 8 GiB: n = 1024), against B4, ``da.from_zarr(src).to_zarr(dst)``.
  Both sides write the library's default codec (``"auto"``, blosc-zstd
  level 1 with shuffle) in the source's chunks; ours, by default, in shards
  of about 64 MiB (zarr 3.1's sharding codec copies each chunk twice more
  on the way), and once more ("W10 flat", side ``flat``) without shards: the
  copy's very layout.
- W10cluster (``--only W10cluster``, not in the default run): W10's job on
  the library's local cluster of 2 one-thread workers (as W8's), side by
  side with the threaded job; its CPU time counts the workers' too.
- W11: the same job on a folder of 200 uint16 1024 x 1024 TIFF slices
  (``dls.open_source(folder)``), against a plain TIFF -> zarr conversion
  with the same output chunks: ``tifffile.imread`` of each slice, stacked
  with dask, rechunked, ``to_zarr``. ``--tiff-chunks default`` takes the
  library's default output chunks; ``64,256,256`` passes ``chunks=`` to
  ``local_percentile``.

- R1: instant resume. W10's job (first of ``--sizes``) killed with SIGKILL
  once 80% of its output chunks exist, then run again with ``resume=True``:
  the resumed run's wall time against a whole run's, and its result
  compared with the whole run's, array for array.

W10 and W11 also report each side's CPU time (user + system, all threads)
over wall time, CPU seconds per GiB of uint16 input, the hours one TiB
(1024 GiB) would take on this 2-core machine, at the measured wall time,
and how the CPU time splits between dask's worker threads (the statistic,
the resampling, the subtraction: the job's own work), zarr's codec
threads (decoding, encoding), zarr's event loop (every read and write
goes through it) and the rest (:class:`ThreadClock`).

The volumes are light-sheet-like (see ``data.py``), written slab by slab.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from data import lightsheet
from run import child_json, environment, peak_rss_mib
from zarr.codecs import ZstdCodec

import dask_localstats as dls
from dask_localstats._layout import compressors_of

CHUNKS = (128, 128, 128)
CROSS_SECTION = (1024, 1024)
KWARGS = dict(selem=(64, 64, 64), spacing=(32, 32, 32))
# W10 and W11: ClearMap's light-sheet correction, z y x
LIGHTSHEET_CHUNKS = (64, 256, 256)
LIGHTSHEET_SECTION = (2048, 2048)
LIGHTSHEET = dict(
    selem=(1, 200, 200), spacing=(1, 25, 25), step=(1, 2, 2), dtype=np.float32
)
SLICES = 200
SLICE_SHAPE = (1024, 1024)


def make_volume(path, gib, section=CROSS_SECTION, chunks=CHUNKS):
    """A uint16 zstd zarr volume of `gib` GiB, shape ``(n, *section)``."""
    depth = int(gib * 2**30 / 2 / np.prod(section))
    shape = (depth, *section)
    if path.exists():
        z = zarr.open_array(path, mode="r")
        if z.shape == shape and z.chunks == chunks:
            return z
        shutil.rmtree(path)
    z = zarr.create_array(
        path, shape=shape, chunks=chunks, dtype="uint16", compressors=ZstdCodec(level=1)
    )
    for i, start in enumerate(range(0, depth, chunks[0])):
        slab = lightsheet((min(chunks[0], depth - start), *section), seed=i)
        z[start : start + len(slab)] = slab
    return z


def make_slices(folder):
    """`SLICES` uint16 TIFF files ``Z0000.tif``, ... of `SLICE_SHAPE` each."""
    import tifffile

    names = [folder / f"Z{i:04d}.tif" for i in range(SLICES)]
    if all(name.exists() for name in names):
        return names
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    planes = 50
    for i, start in enumerate(range(0, SLICES, planes)):
        slab = lightsheet((min(planes, SLICES - start), *SLICE_SHAPE), seed=i)
        for k, plane in enumerate(slab):
            tifffile.imwrite(names[start + k], plane)
    return names


def parse_chunks(text):
    """``"64,256,256"`` as a tuple of ints; ``"default"`` as None."""
    return None if text == "default" else tuple(int(c) for c in text.split(","))


def lightsheet_job(src, dst, chunks=None, resume=False, shards="auto"):
    """W10 and W11: subtract ClearMap's light-sheet background, as the library does."""
    source = dls.open_source(str(src))
    background = dls.local_percentile(source, 0.25, chunks=chunks, **LIGHTSHEET)
    result = dls.subtract_background(source, background)
    dls.to_zarr(result, dst, resume=resume, shards=shards)


def lightsheet_copy(src, dst):
    """B4 for W10: a plain dask copy, the same codec and chunks."""
    source = da.from_zarr(zarr.open_array(src, mode="r"))
    source.to_zarr(dst, compressors=compressors_of("auto"))


def tiff_copy(folder, dst, chunks):
    """The W11 baseline: TIFF slices -> zarr, plainly, in `chunks`."""
    import dask
    import tifffile

    files = sorted(Path(folder).glob("*.tif"))
    with tifffile.TiffFile(files[0]) as tif:
        shape, dtype = tif.pages[0].shape, tif.pages[0].dtype
    planes = [
        da.from_delayed(dask.delayed(tifffile.imread)(f), shape, dtype) for f in files
    ]
    da.stack(planes).rechunk(chunks).to_zarr(dst, compressors=compressors_of("auto"))


def output_chunks(folder, chunks):
    """The chunks W11's job writes (the library's default for None)."""
    source = dls.open_source(str(folder))
    background = dls.local_percentile(source, 0.25, chunks=chunks, **LIGHTSHEET)
    result = dls.subtract_background(source, background)
    return tuple(c[0] for c in result.chunks)


def cpu_seconds():
    """User and system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# Python thread names (their start) by what the threads run
THREAD_KINDS = {
    "ThreadPoolExecutor": "dask",  # the workers of dask's threaded scheduler
    "asyncio": "codecs",  # zarr's codec threads (its event loop's executor)
    "zarr_pool": "codecs",
    "zarr_io": "zarr loop",  # zarr's event loop: every read and write
}
KINDS = ("dask", "codecs", "zarr loop", "other")  # the cost table's order


def thread_seconds():
    """CPU seconds (user and system) of each live thread: ``{tid: (kind, s)}``.

    Linux's per-thread times (``/proc/self/task``), each thread sorted by
    its Python name into :data:`THREAD_KINDS`, else "other" (the main
    thread, threads of C libraries); empty where ``/proc`` is missing.
    """
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/self/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                name = names.get(int(tid), "")
                kind = next(
                    (k for p, k in THREAD_KINDS.items() if name.startswith(p)), "other"
                )
                times[tid] = kind, (int(fields[11]) + int(fields[12])) / tick
    return times


class ThreadClock:
    """The CPU time each kind of thread spends while it runs, threads that
    end meanwhile included: :func:`thread_seconds` read every `interval`
    seconds by a thread of its own (its reads count as "other")."""

    def __init__(self, interval=0.1):
        self.interval, self.first = interval, thread_seconds()
        self.last, self._stop = dict(self.first), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            self._read()

    def _read(self):
        """The threads' times now; a thread keeps the kind it was first
        given (an ending thread has left Python's list, not yet Linux's)."""
        for tid, (kind, seconds) in thread_seconds().items():
            known = self.last.get(tid, ("other",))[0]
            self.last[tid] = (known if kind == "other" else kind), seconds

    def stop(self):
        """Seconds per kind of :data:`KINDS` since the clock started."""
        self._stop.set()
        self._thread.join()
        self._read()
        spent = dict.fromkeys(KINDS, 0.0)
        for tid, (kind, seconds) in self.last.items():
            spent[kind] += seconds - self.first.get(tid, (kind, 0.0))[1]
        return spent


def job(src, dst, pipeline="minimum", writer="store"):
    """The W7 job: background-subtract `src` into a new zarr store `dst`.

    The user's arithmetic: ``v - minimum(v, bg)`` (W7), or ``clip(v - bg,
    0, 65535)`` in int32 (W7clip), or ``subtract_background(z, bg)``, the
    same values by the library (W7sub). Written by dask's ``store``, or
    with `writer` ``"to_zarr"`` by the library's, in the same chunks and
    codec.
    """
    z = zarr.open_array(src, mode="r")
    background = dls.local_percentile(z, 0.1, interpolate=1, **KWARGS)
    v = da.from_zarr(z)
    if pipeline == "minimum":
        result = v - da.minimum(v, background)  # clipped at 0, still uint16
    elif pipeline == "subtract":  # the same values, by the library
        result = dls.subtract_background(z, background)
    else:
        difference = v.astype(np.int32) - background.astype(np.int32)
        result = da.clip(difference, 0, 65535).astype(np.uint16)
    if writer == "to_zarr":
        dls.to_zarr(result, dst, chunks=z.chunks, shards=None, compressors="zstd:1")
        return
    target = zarr.create_array(
        dst,
        shape=z.shape,
        chunks=z.chunks,
        dtype=result.dtype,
        compressors=ZstdCodec(level=1),
        overwrite=True,
    )
    result.store(target, lock=False)


def copy(src, dst):
    """B4: a plain dask copy with the same chunks and codec."""
    z = zarr.open_array(src, mode="r")
    da.from_zarr(z).to_zarr(dst, overwrite=True, compressors=ZstdCodec(level=1))


def workers_cpu(client):
    """CPU seconds (user and system) the workers of `client` have spent, in all."""
    return sum(client.run(cpu_seconds).values())


def child(workload, side, src, dst, extra):
    clock = ThreadClock()
    start, cpu, workers = time.perf_counter(), cpu_seconds(), 0.0
    if workload in ("W7", "W7clip", "W7sub"):
        copy(src, dst) if side == "B4" else job(src, dst, extra)
    elif workload == "W8" or side == "cluster":  # the library's local cluster
        from dask_localstats._cluster import connect

        with connect(workers=int(extra), threads=1) as client:  # one thread a worker
            start, cpu = time.perf_counter(), cpu_seconds()
            workers = -workers_cpu(client)
            if workload == "W8":
                job(src, dst, writer=side)
            else:
                lightsheet_job(src, dst)
            workers += workers_cpu(client)
    elif workload == "W10" and side == "B4":
        lightsheet_copy(src, dst)
    elif workload == "W10":  # ours, or flat: without shards, as the copy
        lightsheet_job(src, dst, shards=None if side == "flat" else "auto")
    elif workload == "R1":
        lightsheet_job(src, dst, resume=side == "resume")
    elif workload == "W11" and side in ("ours", "against"):
        lightsheet_job(src, dst, parse_chunks(extra))
    elif workload == "W11":
        tiff_copy(src, dst, parse_chunks(extra))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu + workers
    library = str(Path(dls.__file__).parent.parent)  # the checkout it ran
    result = {"seconds": seconds, "cpu": cpu, "rss": peak_rss_mib(), "library": library}
    print(json.dumps(result | {"threads": clock.stop()}))


ENV = dict(os.environ)
AGAINST = {}  # the side "against": the environment of its children (--against)


def run_child(*args, env=ENV):
    return child_json(__file__, *args, env=env)


def report(lines, costs, rows, cost_rows):
    """Add a workload's rows to the main and cost tables, and print them."""
    lines += rows
    costs += cost_rows
    print(*rows, *cost_rows, sep="\n", flush=True)


def against(extras):
    """`extras` and, with ``--against``, the side "against": the job of
    "ours" with the library of the other checkout."""
    return extras | ({"against": extras["ours"]} if AGAINST else {})


def against_lines(label, runs):
    """Rows of the main table: ours against the other checkout's library
    (none without ``--against``)."""
    if "against" not in runs:
        return []
    sides = ("ours", "against")
    ours, other = (statistics.median(r["seconds"] for r in runs[s]) for s in sides)
    rss, other_rss = (max(r["rss"] for r in runs[s]) for s in sides)
    where = runs["against"][0]["library"]
    return [
        f"| {label}, this library against {where}'s | {ours:.1f} | {other:.1f} | "
        f"{ours / other:.2f}x its time | - | {rss:.0f} / {other_rss:.0f} |"
    ]


def chunk_files(store):
    """How many chunk files a zarr v3 store holds, and how many it will hold."""
    meta = json.loads((store / "zarr.json").read_text())
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    total = math.prod(-(-n // c) for n, c in zip(meta["shape"], chunks, strict=True))
    return len(chunk_paths(store)), total


def chunk_paths(store):
    """The chunk files of a zarr v3 store (under ``c/``), sorted."""
    return sorted(f for f in (store / "c").rglob("*") if f.is_file())


def killed_at(src, dst, fraction):
    """Run R1's job in a child and SIGKILL it once `fraction` of its chunks exist."""
    command = [sys.executable, __file__, "--child", "R1", "whole", src, dst, "-"]
    proc = subprocess.Popen(command, env=ENV, stderr=subprocess.DEVNULL)
    while True:
        assert proc.poll() is None, "R1: the job ended before it was killed"
        if (dst / "c").exists():
            done, total = chunk_files(dst)
            if done >= fraction * total:
                break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    return chunk_files(dst)


def r1(src, repeat, workdir):
    """R1's table row: resumed and whole runs, medians of `repeat`."""
    whole, resumed, same = [], [], True
    reference = workdir / "r1-whole.zarr"
    for _ in range(repeat):
        shutil.rmtree(reference, ignore_errors=True)
        whole.append(run_child("R1", "whole", src, reference, "-"))
        dst = workdir / "r1-resumed.zarr"
        shutil.rmtree(dst, ignore_errors=True)
        done, total = killed_at(src, dst, 0.8)
        resumed.append(run_child("R1", "resume", src, dst, "-"))
        a, b = zarr.open_array(reference, mode="r"), zarr.open_array(dst, mode="r")
        same &= bool(np.array_equal(a[...], b[...]))
        shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(reference, ignore_errors=True)
    full = statistics.median(r["seconds"] for r in whole)
    rest = statistics.median(r["seconds"] for r in resumed)
    return (
        f"| R1 resume after a kill at {done} of {total} chunks | {rest:.1f} | "
        f"whole run {full:.1f} | {rest / full:.2f} of the whole run | "
        f"<= 0.33 | {'identical' if same else 'DIFFERENT'} |"
    )


class ChunkCounter(logging.Handler):
    """Collects the chunk keys a LoggingStore is asked for."""

    def __init__(self):
        super().__init__()
        self.keys = set()

    def emit(self, record):
        match = re.search(r"Calling \w+\.get\((c/[^)]*)\)", record.getMessage())
        if match:
            self.keys.add(match.group(1))


def w9(path):
    """Build the 1 TiB pipeline; compute one 256^3 block; count chunk reads."""
    shape = (8192, 8192, 8192)
    zarr.create_array(
        path,
        shape=shape,
        chunks=(256, 256, 256),
        dtype="uint16",
        compressors=ZstdCodec(level=1),
        overwrite=True,
    )

    def pipeline(z):  # never written: every chunk absent, on purpose
        background = dls.local_percentile(z, 0.1, missing_chunks="fill", **KWARGS)
        return da.from_zarr(z) - background

    start = time.perf_counter()
    result = pipeline(zarr.open_array(path, mode="r"))
    built = time.perf_counter() - start
    rss = peak_rss_mib()
    start = time.perf_counter()
    block = result.blocks[10, 11, 12].compute()
    seconds = time.perf_counter() - start
    # the same block again, through a store that logs which chunks it is asked for
    counter = ChunkCounter()
    store = zarr.storage.LoggingStore(
        zarr.storage.LocalStore(path, read_only=True),
        log_level="DEBUG",
        log_handler=counter,
    )
    pipeline(zarr.open_array(store, mode="r")).blocks[10, 11, 12].compute()
    print(
        json.dumps(
            {
                "build_s": built,
                "build_rss_mib": rss,
                "block_s": seconds,
                "block_shape": block.shape,
                "chunk_gets": len(counter.keys),
                "chunks_in_array": int(np.prod([s // 256 for s in shape])),
            }
        )
    )


def timed(function, *args, **kwargs):
    """``(result, wall seconds, CPU seconds)`` of one call."""
    start, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start, cpu_seconds() - cpu


def touched(shape, dtype):
    """A new array, written once: first-touch page faults are not timed."""
    out = np.empty(shape, dtype)
    out.fill(0)
    return out


class Steps:
    """Steps timed in one process (:func:`stages`, :func:`w7_floors`), each
    printed as a JSON row when done, for :func:`steps_of` to read."""

    def __init__(self, gib):
        self.gib, self.rows = gib, []

    def row(self, step, wall, cpu, note=""):
        """Record one step: its wall and CPU seconds, and a note."""
        self.rows.append(dict(step=step, wall=wall, cpu=cpu, gib=self.gib, note=note))
        print(json.dumps(self.rows[-1]), flush=True)


def stages(src, workdir):
    """W10's steps one by one, in this process; one JSON row per step.

    Each step is timed alone (wall and CPU time of all threads), with the
    default threaded scheduler where it is a dask computation, on the
    volume at `src`; the in-memory arrays in between are allocated and
    touched before timing. Floors: zstd decoding and encoding of the
    volume's chunks in one thread (numcodecs, as zarr calls it), and NumPy
    passes over memory.
    """
    import numcodecs

    from dask_localstats._engine import resample_stage
    from dask_localstats._grid import make_grid

    z = zarr.open_array(src, mode="r")
    gib = z.nbytes / 2**30
    chunks = da.core.normalize_chunks(z.chunks, z.shape)
    steps = Steps(gib)
    row, rows = steps.row, steps.rows

    # the job as a whole, in this process
    dst = workdir / "stages-out.zarr"
    shutil.rmtree(dst, ignore_errors=True)
    _, wall, cpu = timed(lightsheet_job, src, dst)
    row("whole job (to_zarr of subtract_background)", wall, cpu)
    shutil.rmtree(dst, ignore_errors=True)
    # read: files into memory, zstd decoding in one thread, zarr threaded
    files = chunk_paths(Path(src))
    raw, wall, cpu = timed(_read_all, files)
    packed = sum(map(len, raw)) / z.nbytes
    row("read the chunk files (page cache)", wall, cpu, f"ratio {packed:.2f}")
    _, wall, cpu = timed(_code_all, numcodecs.Zstd().decode, raw)
    row("zstd decode, 1 thread (numcodecs)", wall, cpu)
    del raw
    v = touched(z.shape, z.dtype)
    _, wall, cpu = timed(da.from_zarr(z).store, v, lock=False)
    row("read + decode, zarr via dask (threaded)", wall, cpu)
    # the coarse stage: from the store, and from memory
    kwargs = dict(interpolate=None, **LIGHTSHEET)
    stored = dls.local_percentile(z, 0.25, **kwargs)
    _, wall, cpu = timed(stored.compute)
    row("coarse stage from the zarr store (threaded)", wall, cpu)
    coarse, wall, cpu = timed(dls.local_percentile, v, 0.25, **kwargs)
    row("coarse stage from memory (threaded)", wall, cpu, f"grid {coarse.shape}")
    # resampling to full resolution, float32
    grid = make_grid(
        z.shape, LIGHTSHEET["selem"], LIGHTSHEET["spacing"], LIGHTSHEET["step"]
    )
    lazy = resample_stage(
        da.from_array(coarse, chunks=coarse.shape), grid, 1, "corners", chunks
    )
    bg = touched(z.shape, np.float32)
    _, wall, cpu = timed(lazy.store, bg, lock=False)
    row("resample, order 1, to float32 (threaded)", wall, cpu)
    # the subtraction, rounded and clipped
    lazy = dls.subtract_background(v, da.from_array(bg, chunks=chunks))
    out = touched(z.shape, z.dtype)
    _, wall, cpu = timed(lazy.store, out, lock=False)
    row("subtract_background, uint16 (threaded)", wall, cpu)
    del bg
    # encoding and writing
    blocks = [np.ascontiguousarray(out[region]) for region in _regions(chunks)]
    for level in (0, 1):
        encoded, wall, cpu = timed(
            _code_all, numcodecs.Zstd(level=level).encode, blocks
        )
        packed = sum(map(len, encoded)) / z.nbytes
        row(f"zstd encode level {level}, 1 thread", wall, cpu, f"ratio {packed:.2f}")
    del blocks, encoded
    _, wall, cpu = timed(dls.to_zarr, da.from_array(out, chunks=chunks), dst)
    row("dls.to_zarr of the result (threaded)", wall, cpu)
    shutil.rmtree(dst, ignore_errors=True)
    _, wall, cpu = timed(da.from_array(out, chunks=chunks).to_zarr, str(dst))
    row("da.to_zarr of the result (threaded)", wall, cpu)
    shutil.rmtree(dst, ignore_errors=True)
    # memory passes
    _, wall, cpu = timed(np.copyto, out, v)
    row("NumPy copy of the uint16 volume, 1 thread", wall, cpu)
    f32 = touched(z.shape, np.float32)
    _, wall, cpu = timed(np.add, f32, 1, out=f32)
    row("NumPy float32 pass in place, 1 thread", wall, cpu)
    return rows


def w7_floors(src, workdir):
    """What W7's user pipelines must spend beyond their copy; JSON rows.

    In this process, on W7's volume at `src`: B4 itself (the copy), then a
    lower bound of each thing W7 adds, timed alone in one thread: the
    user's own read of the source (``da.from_zarr(z)``, which the
    background's stage cannot share) as reading the chunk files and zstd
    decoding them (numcodecs; zarr adds its own work), counting every
    voxel once (``np.bincount`` of its values as they are, 64 Ki at a time:
    no keys, no windows, less than any histogram kernel does) and the
    user's arithmetic ``v - minimum(v, bg)`` on each chunk in place, and a
    float32 multiply-add and a cast to uint16 for each voxel of the
    background (the least an interpolation to full resolution does). Their
    sum over the copy's CPU time is the least W7's can be over B4's, at
    equal CPU / wall.
    """
    import numcodecs

    z = zarr.open_array(src, mode="r")
    gib = z.nbytes / 2**30
    steps = Steps(gib)
    row, rows = steps.row, steps.rows

    dst = workdir / "floors-out.zarr"
    _, wall, cpu = timed(copy, src, dst)
    shutil.rmtree(dst, ignore_errors=True)
    row("B4: the copy (threaded)", wall, cpu)
    files = chunk_paths(Path(src))
    raw, wall, cpu = timed(_read_all, files)
    row("+ the user's read: the chunk files (page cache)", wall, cpu)
    decoded, wall, cpu = timed(_code_all, numcodecs.Zstd().decode, raw)
    row("+ the user's read: zstd decoding them", wall, cpu)
    chunks = [np.frombuffer(b, z.dtype).reshape(CHUNKS) for b in decoded]
    del raw, decoded
    flat = [c.reshape(-1) for c in chunks]
    pieces = [f[i : i + 65536] for f in flat for i in range(0, f.size, 65536)]
    _, wall, cpu = timed(_code_all, np.bincount, pieces)
    row("+ counting each voxel once (np.bincount)", wall, cpu)
    background = np.full(CHUNKS, 1000, z.dtype)
    scratch = touched(CHUNKS, z.dtype)

    def arithmetic(c):
        return np.subtract(c, np.minimum(c, background, out=scratch), out=scratch)

    _, wall, cpu = timed(_code_all, arithmetic, chunks)
    row("+ the user's arithmetic v - minimum(v, bg), in place", wall, cpu)
    weights, values = (touched(CHUNKS, np.float32) for _ in range(2))

    def resampling(_):
        np.multiply(values, weights, out=values)
        np.add(values, weights, out=values)
        return np.copyto(scratch, values, casting="unsafe")

    _, wall, cpu = timed(_code_all, resampling, chunks)
    row("+ resampling: a multiply-add and a cast a voxel, in place", wall, cpu)
    least = sum(r["cpu"] for r in rows)
    note = f"{least / rows[0]['cpu']:.2f}x the copy's CPU time"
    row("the least W7 can cost", math.nan, least, note)
    return rows


def _read_all(files):
    return [f.read_bytes() for f in files]


def _code_all(code, items):
    return [code(item) for item in items]


def _regions(chunks):
    """Slices of each block of dask `chunks`, in C order."""
    bounds = [np.cumsum((0, *c)) for c in chunks]
    for index in itertools.product(*(range(len(c)) for c in chunks)):
        yield tuple(slice(b[i], b[i + 1]) for b, i in zip(bounds, index, strict=True))


def side_by_side(workload, src, extras, repeat, workdir):
    """`repeat` fresh runs of each side (``extras``: side -> extra), alternating."""
    runs = {side: [] for side in extras}
    for _ in range(repeat):
        for side, extra in extras.items():
            dst = workdir / f"out-{side}.zarr"
            env = AGAINST if side == "against" else ENV
            runs[side].append(run_child(workload, side, src, dst, extra, env=env))
            shutil.rmtree(dst, ignore_errors=True)
    return runs


def ratio_line(label, runs, baseline, target):
    """A row of the main table: medians, the ratio and the worst peak RSS."""
    ours = statistics.median(r["seconds"] for r in runs["ours"])
    base = statistics.median(r["seconds"] for r in runs["B4"])
    rss = max(r["rss"] for r in runs["ours"])
    base_rss = max(r["rss"] for r in runs["B4"])
    return (
        f"| {label} | {ours:.1f} | {baseline} {base:.1f} | "
        f"{ours / base:.2f}x the copy | {target} | {rss:.0f} / {base_rss:.0f} |"
    )


def cluster_line(label, runs, gib):
    """A row of the main table: W10 on a local cluster against its threads."""
    cluster = statistics.median(r["seconds"] for r in runs["cluster"])
    ours = statistics.median(r["seconds"] for r in runs["ours"])
    return (
        f"| {label} | {cluster:.1f} | 2 threads {ours:.1f} | "
        f"{cluster / ours:.2f}x the threads' time, {2 * cluster / gib:.1f} "
        f"core-s a GiB | - | - |"
    )


def cost_lines(label, runs, gib):
    """Rows of the cost table: CPU time, CPU per GiB, hours per TiB and the
    CPU time of each kind of thread (medians)."""
    lines = []
    for side, side_runs in runs.items():
        wall = statistics.median(r["seconds"] for r in side_runs)
        cpu = statistics.median(r["cpu"] for r in side_runs)
        every = ", ".join(f"{r['seconds']:.1f}/{r['cpu']:.1f}" for r in side_runs)
        threads = " / ".join(
            f"{statistics.median(r['threads'][k] for r in side_runs):.1f}"
            for k in KINDS
        )
        lines.append(
            f"| {label} | {side} | {wall:.1f} | {cpu:.1f} | {cpu / wall:.2f} | "
            f"{cpu / gib:.1f} | {wall / gib * 1024 / 3600:.1f} | {threads} | {every} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="W7,W7clip,W7sub,W8,W9,W10,W11")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "dls-outofcore",
    )
    parser.add_argument(
        "--malloc-arena-max",
        type=int,
        help="MALLOC_ARENA_MAX for every child (both sides): glibc's limit on "
        "per-thread heaps, which otherwise hold freed memory in long runs",
    )
    parser.add_argument(
        "--tiff-chunks",
        nargs="+",
        default=["default", "64,256,256"],
        help="W11's output chunks: 'default' (the library's) or z,y,x",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="a checkout of this project (a git worktree of another commit, "
        "say): W7 to W11 also run their job with its library, side 'against'",
    )
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.malloc_arena_max:
        ENV["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    if args.against:
        paths = [str(args.against.resolve()), ENV.get("PYTHONPATH", "")]
        AGAINST.update(ENV, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    if args.child:
        workload, side, src, dst, extra = args.child
        if workload == "W9":
            return w9(Path(src))
        if workload == "stages":
            stages(Path(src), Path(dst))
            return None
        if workload == "floors":
            w7_floors(Path(src), Path(dst))
            return None
        return child(workload, side, src, dst, extra)
    args.workdir.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    lines, costs = [], []
    print(environment(), flush=True)
    pipelines = (("W7", "minimum"), ("W7clip", "clip"), ("W7sub", "subtract"))
    for workload, pipeline in pipelines:
        if workload not in only:
            continue
        for gib in args.sizes:
            src = args.workdir / f"volume-{gib:g}GiB.zarr"
            make_volume(src, gib)
            extras = against({"ours": pipeline, "B4": 0})
            runs = side_by_side(workload, src, extras, args.repeat, args.workdir)
            label = f"{workload} {gib:g} GiB"
            rows = [ratio_line(label, runs, "B4 copy", "<= 1.3x")]
            rows += against_lines(label, runs)
            report(lines, costs, rows, cost_lines(label, runs, gib))
    if "W8" in only:
        src = args.workdir / "volume-1GiB.zarr"
        make_volume(src, 1)
        writers = ("store", "to_zarr")
        runs = {(w, n): [] for w in writers for n in (1, 2)}
        for _ in range(args.repeat):
            for writer, workers in runs:
                dst = args.workdir / "out-w8.zarr"
                run = run_child("W8", writer, src, dst, workers)
                runs[writer, workers].append(run)
                shutil.rmtree(dst, ignore_errors=True)
        for writer in writers:
            one, two = (
                statistics.median(r["seconds"] for r in runs[writer, n]) for n in (1, 2)
            )
            label = "W8 1 GiB" + (" to_zarr" if writer == "to_zarr" else "")
            every = ", ".join(
                f"{a['seconds']:.1f}/{b['seconds']:.1f}"
                for a, b in zip(runs[writer, 2], runs[writer, 1], strict=True)
            )
            lines.append(
                f"| {label} | 2 workers {two:.1f} | 1 worker {one:.1f} | "
                f"{one / two:.2f}x faster (every run, 2/1: {every}) | >= 1.8x | - |"
            )
            print(lines[-1], flush=True)
    if "W9" in only:
        result = run_child("W9", "ours", args.workdir / "tera.zarr", "-", 0)
        lines.append(
            f"| W9 1 TiB | build {result['build_s']:.1f} s, "
            f"{result['build_rss_mib']:.0f} MiB | one 256^3 block "
            f"{result['block_s']:.1f} s | {result['chunk_gets']} of "
            f"{result['chunks_in_array']} chunks asked for | <= 10 s, <= 1 GiB | - |"
        )
        print(lines[-1], flush=True)
        shutil.rmtree(args.workdir / "tera.zarr", ignore_errors=True)
    if "W10" in only:
        for gib in args.sizes:
            src = args.workdir / f"lightsheet-{gib:g}GiB.zarr"
            z = make_volume(src, gib, LIGHTSHEET_SECTION, LIGHTSHEET_CHUNKS)
            extras = against({"ours": "-", "flat": "-", "B4": "-"})
            runs = side_by_side("W10", src, extras, args.repeat, args.workdir)
            label = f"W10 {gib:g} GiB {'x'.join(map(str, z.shape))}"
            target = "<= 1.5x, <= 1.5 GiB"
            flat = {"ours": runs["flat"], "B4": runs["B4"]}
            rows = [
                ratio_line(label, runs, "B4 copy", target),
                ratio_line(f"{label} flat", flat, "B4 copy", target),
                *against_lines(label, runs),
            ]
            report(lines, costs, rows, cost_lines(label, runs, z.nbytes / 2**30))
    if "W10cluster" in only:
        for gib in args.sizes:
            src = args.workdir / f"lightsheet-{gib:g}GiB.zarr"
            z = make_volume(src, gib, LIGHTSHEET_SECTION, LIGHTSHEET_CHUNKS)
            extras = {"cluster": "2", "ours": "-"}
            runs = side_by_side("W10", src, extras, args.repeat, args.workdir)
            label = f"W10 {gib:g} GiB on 2 workers"
            gib_of = z.nbytes / 2**30
            rows = [cluster_line(label, runs, gib_of)]
            report(lines, costs, rows, cost_lines(label, runs, gib_of))
    if "resume" in only:
        gib = args.sizes[0]
        src = args.workdir / f"lightsheet-{gib:g}GiB.zarr"
        make_volume(src, gib, LIGHTSHEET_SECTION, LIGHTSHEET_CHUNKS)
        lines.append(r1(src, args.repeat, args.workdir))
        print(lines[-1], flush=True)
    if "W11" in only:
        folder = args.workdir / f"slices-{SLICES}"
        make_slices(folder)
        gib = SLICES * math.prod(SLICE_SHAPE) * 2 / 2**30
        for text in args.tiff_chunks:
            chunks = output_chunks(folder, parse_chunks(text))
            shown = "x".join(map(str, chunks))
            extras = against({"ours": text, "B4": ",".join(map(str, chunks))})
            runs = side_by_side("W11", folder, extras, args.repeat, args.workdir)
            label = f"W11 {SLICES} TIFF slices, chunks {shown} ({text})"
            rows = [ratio_line(label, runs, "TIFF -> zarr", "<= 1.5x")]
            rows += against_lines(label, runs)
            report(lines, costs, rows, cost_lines(label, runs, gib))
    steps = {}
    if "stages" in only:
        src = args.workdir / f"lightsheet-{args.sizes[0]:g}GiB.zarr"
        make_volume(src, args.sizes[0], LIGHTSHEET_SECTION, LIGHTSHEET_CHUNKS)
        steps["W10's steps"] = steps_of("stages", src, args.workdir)
    if "floors" in only:
        src = args.workdir / f"volume-{args.sizes[0]:g}GiB.zarr"
        make_volume(src, args.sizes[0])
        steps["W7's floors"] = steps_of("floors", src, args.workdir)
    header = (
        "| workload | ours (s) | baseline (s) | ratio | target | "
        "peak RSS ours / baseline (MiB) |\n|---|---|---|---|---|---|"
    )
    print("\n" + header + "\n" + "\n".join(lines))
    if costs:
        header = (
            "| workload | side | wall (s) | CPU (s) | CPU / wall | CPU s per GiB | "
            "h per TiB on 2 cores | CPU (s) of threads: dask / zarr codecs / "
            "zarr loop / other | every run, wall/CPU (s) |\n"
            "|---|---|---|---|---|---|---|---|---|"
        )
        print("\n" + header + "\n" + "\n".join(costs))
    for title, rows in steps.items():
        print(
            f"\n{title}, {rows[0]['gib']:g} GiB, one process\n\n"
            "| step | wall (s) | CPU (s) | CPU / wall | CPU s per GiB | note |\n"
            "|---|---|---|---|---|---|"
        )
        for step in rows:
            busy = step["cpu"] / step["wall"]
            print(
                f"| {step['step']} | {step['wall']:.2f} | {step['cpu']:.2f} | "
                f"{busy:.2f} | {step['cpu'] / step['gib']:.2f} | {step['note']} |"
            )


def steps_of(kind, src, workdir):
    """The JSON rows a child printing steps (``stages``, ``floors``) gives."""
    command = [sys.executable, __file__, "--child", kind, "-", src, workdir, "-"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]


if __name__ == "__main__":
    sys.exit(main())
