"""Scaling benchmarks S1, S2 and W12 of docs/benchmarks.md.

Run ``python benchmarks/scale.py`` (``--repeat 3``, ``--only S1,S2,W12``,
``--workdir DIR`` where the empty stores go). Every volume here is a zarr
array that is created but never written: every chunk is absent and reads
as the fill value, on purpose, for what is measured is what the library
does before and around the computation, at sizes no disk here holds. Each
run is a fresh process; its wall time and peak RSS are its own.

- S1: building the lazy pipelines over 8 TiB: W7's
  (``v - minimum(v, local_percentile(v, 0.1, selem=(64,)*3,
  spacing=(32,)*3))``, chunks 256^3) and ClearMap's light-sheet correction
  (``subtract_background(v, local_percentile(v, 0.25, selem=(1, 200, 200),
  spacing=(1, 25, 25), step=(1, 2, 2), dtype=float32))``, z y x, chunks
  16 x 1024 x 1024): time and memory.
- S2: locality. One 16 x 1024 x 1024 output block of the light-sheet job
  over 1 TiB (512 x 32768 x 32768): time, peak RSS, and the storage chunks
  it asked the store for (a zarr ``LoggingStore``), against the chunks
  within a window of the block.
- W12: the light-sheet job over 100 TiB (3200 x 131072 x 131072), written
  with ``dls.to_zarr`` and the default batch size: the time until its first
  batch starts computing, the client's peak RSS by then, and the tasks of
  that batch; the run is stopped there.
- S3: the nearest fill (``fill="nearest"``) of a coarse grid whose valid
  samples are an ellipsoid (a mask of the tissue; the 62% outside is one
  wide gap), at two sizes: the library's sweeps (``fill_stage``, threads,
  chunks of 32 x 128 x 128) against what a user holding the grid in memory
  would run, ``scipy.ndimage.distance_transform_edt`` with its indices and
  the values gathered from them. The time a sample shows whether the fill
  grows linearly with the grid. Speed only: scipy breaks ties between
  equally near samples its own way (the tests check the values against
  the brute-force reference).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from dask.callbacks import Callback
from outofcore import KWARGS as W7
from outofcore import LIGHTSHEET, ChunkCounter
from run import child_json, environment, peak_rss_mib
from zarr.codecs import ZstdCodec

import dask_localstats as dls

SCALE_CHUNKS = (16, 1024, 1024)
SHAPES = {  # uint16
    "8 TiB cube": ((16384, 16384, 16384), (256, 256, 256)),
    "8 TiB light-sheet": ((4096, 32768, 32768), SCALE_CHUNKS),
    "1 TiB light-sheet": ((512, 32768, 32768), SCALE_CHUNKS),
    "100 TiB light-sheet": ((3200, 131072, 131072), SCALE_CHUNKS),
}


def empty(workdir, name):
    """The never-written zarr array of SHAPES[name], made once."""
    shape, chunks = SHAPES[name]
    path = Path(workdir) / (name.replace(" ", "-") + ".zarr")
    if not path.exists():
        zarr.create_array(
            path, shape=shape, chunks=chunks, dtype="uint16", compressors=ZstdCodec()
        )
    return path


def lightsheet(source):
    background = dls.local_percentile(source, 0.25, missing_chunks="fill", **LIGHTSHEET)
    return dls.subtract_background(source, background)


def cube(source):
    z = zarr.open_array(source, mode="r")
    background = dls.local_percentile(z, 0.1, missing_chunks="fill", **W7)
    return da.from_zarr(z) - da.minimum(da.from_zarr(z), background)


def s1(workdir, pipeline):
    name, build = {
        "W7": ("8 TiB cube", cube),
        "light-sheet": ("8 TiB light-sheet", lightsheet),
    }[pipeline]
    source = empty(workdir, name)
    start = time.perf_counter()
    result = build(source)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss": peak_rss_mib(), "chunks": result.npartitions}


def s2(workdir):
    path = empty(workdir, "1 TiB light-sheet")
    counter = ChunkCounter()
    store = zarr.storage.LoggingStore(
        zarr.storage.LocalStore(path, read_only=True),
        log_level="DEBUG",
        log_handler=counter,
    )
    source = zarr.open_array(store, mode="r")
    start = time.perf_counter()
    block = lightsheet(source).blocks[3, 5, 7].compute()
    seconds = time.perf_counter() - start
    chunks = source.chunks
    # the chunks within a window (200 voxels) of the block, along y and x
    near = [
        1,
        len(
            range((5 * 1024 - 200) // chunks[1], (6 * 1024 + 200 - 1) // chunks[1] + 1)
        ),
        len(
            range((7 * 1024 - 200) // chunks[2], (8 * 1024 + 200 - 1) // chunks[2] + 1)
        ),
    ]
    return {
        "seconds": seconds,
        "rss": peak_rss_mib(),
        "shape": list(block.shape),
        "chunks_read": len(counter.keys),
        "chunks_near": math.prod(near),
        "chunks_in_array": math.prod(
            math.ceil(s / c) for s, c in zip(source.shape, chunks, strict=True)
        ),
    }


class _FirstBatch(Callback):
    """Stops the run when its first batch starts computing."""

    class Started(Exception):
        pass

    def __init__(self, started):
        super().__init__()
        self.started = started

    def _start(self, dsk):
        self.tasks = len(dsk)
        self.seconds = time.perf_counter() - self.started
        self.rss = peak_rss_mib()
        raise self.Started


def w12(workdir):
    started = time.perf_counter()
    source = empty(workdir, "100 TiB light-sheet")
    out = Path(workdir) / "w12-out.zarr"
    shutil.rmtree(out, ignore_errors=True)
    watch = _FirstBatch(started)
    try:
        with watch:
            dls.to_zarr(lightsheet(source), out)
    except _FirstBatch.Started:
        pass
    target = zarr.open_array(out, mode="r")
    units = math.prod(
        math.ceil(s / c)
        for s, c in zip(target.shape, target.shards or target.chunks, strict=True)
    )
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": watch.seconds,
        "rss": watch.rss,
        "tasks": watch.tasks,
        "units": units,
        "unit": list(target.shards or target.chunks),
    }


FILL_GRIDS = {"small": (64, 256, 256), "large": (128, 512, 512)}


def _tissue(shape):
    """A flagged float32 grid valid inside an ellipsoid of its box."""
    from dask_localstats._kernels import flagged_dtype

    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    inside = sum(
        ((a - (n - 1) / 2) / (0.45 * n)) ** 2 for a, n in zip(axes, shape, strict=True)
    )
    flagged = np.empty(shape, flagged_dtype(np.float32))
    flagged["value"] = np.random.default_rng(0).random(shape, np.float32)
    flagged["missing"] = inside > 1
    return flagged


def s3(size, method):
    from scipy import ndimage

    from dask_localstats._engine import fill_stage

    flagged = _tissue(FILL_GRIDS[size])
    start, cpu = time.perf_counter(), time.process_time()
    if method == "sweeps":
        lazy = da.from_array(flagged, chunks=(32, 128, 128))
        filled = fill_stage(lazy, 3, np.float32).compute()
    else:
        nearest = ndimage.distance_transform_edt(
            flagged["missing"], return_distances=False, return_indices=True
        )
        filled = flagged["value"][tuple(nearest)]
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu": time.process_time() - cpu,
        "rss": peak_rss_mib(),
        "samples": flagged.size,
        "gap": float(flagged["missing"].mean()),
        "filled": filled.shape == flagged.shape,
    }


def child(workload, workdir, extra):
    if workload == "S3":
        return s3(*extra.split(":"))
    if workload == "S1":
        return s1(workdir, extra)
    if workload == "S2":
        return s2(workdir)
    return w12(workdir)


def run_child(*args):
    return child_json(__file__, *args)


def row(label, runs, details):
    """A table row: median wall time, worst peak RSS, details of the first run."""
    seconds = statistics.median(r["seconds"] for r in runs)
    rss = max(r["rss"] for r in runs)
    return f"| {label} | {seconds:.2f} s | {rss:.0f} | {details(runs[0])} |"


def _shape(sizes):
    return "x".join(map(str, sizes))


ROWS = {
    "S2": (
        "S2 one 16x1024x1024 block of the 1 TiB light-sheet job",
        lambda r: (
            f"asked for {r['chunks_read']} chunks ({r['chunks_near']} "
            f"within a window of it) of {r['chunks_in_array']}"
        ),
    ),
    "W12": (
        "W12 the light-sheet job over 100 TiB: first batch starts",
        lambda r: (
            f"{r['tasks']} tasks in the first batch; {r['units']} write "
            f"units of {_shape(r['unit'])} in all"
        ),
    ),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="S1,S2,W12,S3")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dls-scale"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    only = args.only.split(",")
    print(environment())
    print("| workload | wall (median) | peak RSS MiB (max) | details |")
    print("|---|---|---|---|")
    if "S1" in only:
        for pipeline in ("W7", "light-sheet"):
            runs = [run_child("S1", args.workdir, pipeline) for _ in range(args.repeat)]
            label = f"S1 build the {pipeline} pipeline over 8 TiB"
            print(row(label, runs, lambda r: f"{r['chunks']} output chunks"))
    for workload in ("S2", "W12"):
        if workload in only:
            label, details = ROWS[workload]
            runs = [run_child(workload, args.workdir, "-") for _ in range(args.repeat)]
            print(row(label, runs, details))
    if "S3" in only:
        s3_rows(args.repeat)


def s3_rows(repeat):
    """S3's rows: each grid, the sweeps and scipy side by side, run by run."""
    for size, shape in FILL_GRIDS.items():
        runs = {"sweeps": [], "scipy": []}
        for _ in range(repeat):
            for method in runs:
                runs[method].append(run_child("S3", "-", f"{size}:{method}"))
        sweeps, scipy_ = (
            statistics.median(r["seconds"] for r in runs[m]) for m in runs
        )
        for method, found in runs.items():
            first = found[0]
            label = (
                f"S3 nearest fill of {_shape(shape)} ({first['gap']:.0%} gap): {method}"
            )
            per = statistics.median(r["seconds"] for r in found) / first["samples"]
            cpu = statistics.median(r["cpu"] / r["seconds"] for r in found)
            print(
                row(
                    label,
                    found,
                    lambda r, per=per, cpu=cpu: (
                        f"{per * 1e9:.0f} ns a sample, CPU/wall {cpu:.2f}"
                    ),
                )
            )
        print(f"| S3 {_shape(shape)}: sweeps / scipy | {sweeps / scipy_:.2f}x | | |")


if __name__ == "__main__":
    main()
