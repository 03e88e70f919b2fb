"""Out-of-core benchmarks W7, W8 and W9 of BENCHMARKS.md.

Run ``python benchmarks/outofcore.py`` (``--sizes 1 8`` GiB for W7,
``--repeat 3``, ``--only W7,W9``, ``--workdir DIR`` where the synthetic
stores go; they are made once and reused; ``--malloc-arena-max 2`` runs both
sides with glibc's per-thread heaps capped, see the README).

- W7: ``v - local_percentile(v, 0.1, selem=(64,)*3, spacing=(32,)*3)``
  stored into a new zstd zarr store, against B4, a plain
  ``da.from_zarr(src).to_zarr(dst)`` copy with the same chunks and codec.
  Each run is a fresh process; wall time and peak RSS are its own.
- W8: the W7 job at 1 GiB on a ``LocalCluster`` of process workers with one
  thread each: 1 worker against 2.
- W9: the lazy W7 pipeline over a 1 TiB zarr array that is created but
  never written: time and memory to build it, then the time to compute one
  256^3 output block and the number of storage chunks it asked for.

The volumes are light-sheet-like (see ``data.py``), written slab by slab.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from data import lightsheet
from run import peak_rss_mib
from zarr.codecs import ZstdCodec

import dask_localstats as dls

CHUNKS = (128, 128, 128)
CROSS_SECTION = (1024, 1024)
KWARGS = dict(selem=(64, 64, 64), spacing=(32, 32, 32))


def make_volume(path, gib):
    """A uint16 zstd zarr volume of `gib` GiB, shape (n, 1024, 1024)."""
    depth = int(gib * 2**30 / 2 / np.prod(CROSS_SECTION))
    shape = (depth, *CROSS_SECTION)
    if path.exists():
        z = zarr.open_array(path, mode="r")
        if z.shape == shape:
            return z
        shutil.rmtree(path)
    z = zarr.create_array(
        path, shape=shape, chunks=CHUNKS, dtype="uint16", compressors=ZstdCodec(level=1)
    )
    for i, start in enumerate(range(0, depth, CHUNKS[0])):
        slab = lightsheet((min(CHUNKS[0], depth - start), *CROSS_SECTION), seed=i)
        z[start : start + len(slab)] = slab
    return z


def job(src, dst):
    """The W7 job: background-subtract `src` into a new zarr store `dst`."""
    z = zarr.open_array(src, mode="r")
    background = dls.local_percentile(z, 0.1, interpolate=1, **KWARGS)
    v = da.from_zarr(z)
    result = v - da.minimum(v, background)  # clipped at 0, still uint16
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


def child(workload, side, src, dst, workers):
    start = time.perf_counter()
    if workload == "W7":
        (job if side == "ours" else copy)(src, dst)
    elif workload == "W8":
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
            ) as cluster,
            Client(cluster),
        ):
            start = time.perf_counter()
            job(src, dst)
    print(json.dumps({"seconds": time.perf_counter() - start, "rss": peak_rss_mib()}))


ENV = dict(os.environ)


def run_child(*args):
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


class _ChunkCounter(logging.Handler):
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
    counter = _ChunkCounter()
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="W7,W8,W9")
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
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.malloc_arena_max:
        ENV["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    if args.child:
        workload, side, src, dst, workers = args.child
        if workload == "W9":
            return w9(Path(src))
        return child(workload, side, src, dst, int(workers))
    args.workdir.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    lines = []
    if "W7" in only:
        for gib in args.sizes:
            src = args.workdir / f"volume-{gib:g}GiB.zarr"
            make_volume(src, gib)
            runs = {"ours": [], "B4": []}
            for _ in range(args.repeat):
                for side in runs:  # alternate, side by side
                    dst = args.workdir / f"out-{side}.zarr"
                    runs[side].append(run_child("W7", side, src, dst, 0))
                    shutil.rmtree(dst, ignore_errors=True)
            ours = statistics.median(r["seconds"] for r in runs["ours"])
            base = statistics.median(r["seconds"] for r in runs["B4"])
            rss = max(r["rss"] for r in runs["ours"])
            base_rss = max(r["rss"] for r in runs["B4"])
            lines.append(
                f"| W7 {gib:g} GiB | {ours:.1f} | B4 copy {base:.1f} | "
                f"{ours / base:.2f}x the copy | <= 1.5x | {rss:.0f} / {base_rss:.0f} |"
            )
            print(lines[-1], flush=True)
    if "W8" in only:
        src = args.workdir / "volume-1GiB.zarr"
        make_volume(src, 1)
        runs = {1: [], 2: []}
        for _ in range(args.repeat):
            for workers in runs:
                dst = args.workdir / "out-w8.zarr"
                runs[workers].append(run_child("W8", "ours", src, dst, workers))
                shutil.rmtree(dst, ignore_errors=True)
        one = statistics.median(r["seconds"] for r in runs[1])
        two = statistics.median(r["seconds"] for r in runs[2])
        lines.append(
            f"| W8 1 GiB | 2 workers {two:.1f} | 1 worker {one:.1f} | "
            f"{one / two:.2f}x faster | >= 1.7x | - |"
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
    header = (
        "| workload | ours (s) | baseline (s) | ratio | target | "
        "peak RSS ours / baseline (MiB) |\n|---|---|---|---|---|---|"
    )
    print("\n" + header + "\n" + "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
