"""L1: output layouts of the real job, measured (docs/benchmarks.md).

Run ``python benchmarks/layout.py`` (``--repeat 3``, ``--workdir DIR`` as
for ``outofcore.py``, whose 1 GiB W10 volume it reuses or makes). For each
layout (chunks, shards, codec), W10's job (``dls.to_zarr(
dls.subtract_background(v, bg), out, ...)``, ClearMap's light-sheet
background) runs in a fresh process, each layout in turn, `repeat` times;
the table gives the median wall and CPU time, the peak RSS, the bytes and
the files written, and the files and hours one TiB of such a volume would
take on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

from outofcore import (
    LIGHTSHEET,
    LIGHTSHEET_CHUNKS,
    LIGHTSHEET_SECTION,
    make_volume,
)
from run import child_json, environment, peak_rss_mib

import dask_localstats as dls

CHUNKS = LIGHTSHEET_CHUNKS
LAYOUTS = {  # label: (chunks, shards, compressors)
    "chunks 64x256x256, no shards, zstd (zarr's default, level 3)": (
        CHUNKS,
        None,
        "zstd",
    ),
    "chunks 64x256x256, no shards, zstd:1": (CHUNKS, None, "zstd:1"),
    "chunks 64x256x256, no shards, blosc-zstd:3 (shuffle)": (
        CHUNKS,
        None,
        "blosc-zstd:3",
    ),
    "chunks 64x256x256, no shards, blosc-zstd:1 (shuffle)": (
        CHUNKS,
        None,
        "blosc-zstd:1",
    ),
    "chunks 64x256x256, no shards, blosc-lz4": (CHUNKS, None, "blosc-lz4"),
    "chunks 64x256x256, no shards, none": (CHUNKS, None, "none"),
    "shards auto (64 MiB: 128x512x512), zstd": (CHUNKS, "auto", "zstd"),
    "shards 128x512x1024 (128 MiB), zstd": (CHUNKS, (128, 512, 1024), "zstd"),
    "shards 64x2048x2048 (512 MiB), zstd": (CHUNKS, (64, 2048, 2048), "zstd"),
}


def job(src, dst, label):
    """W10's job written in the layout `label`; prints one JSON line."""
    chunks, shards, compressors = LAYOUTS[label]
    started = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    source = dls.open_source(str(src))
    background = dls.local_percentile(source, 0.25, **LIGHTSHEET)
    dls.to_zarr(
        dls.subtract_background(source, background),
        dst,
        chunks=chunks,
        shards=shards,
        compressors=compressors,
    )
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    files = [f for f in Path(dst).rglob("*") if f.is_file() and "c" in f.parts]
    print(
        json.dumps(
            dict(
                seconds=time.perf_counter() - started,
                cpu=cpu,
                rss=peak_rss_mib(),
                files=len(files),
                bytes=sum(f.stat().st_size for f in files),
            )
        )
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "dls-outofcore",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return job(*args.child)
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = args.workdir / "lightsheet-1GiB.zarr"
    z = make_volume(src, 1, LIGHTSHEET_SECTION, LIGHTSHEET_CHUNKS)
    gib = z.nbytes / 2**30
    print(environment(), flush=True)
    print(
        "\n| layout | wall (s) | CPU (s) | peak RSS (MiB) | written (MiB) | "
        "files | files per TiB | h per TiB |\n|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    runs = {label: [] for label in LAYOUTS}
    dst = args.workdir / "layout-out.zarr"
    for _ in range(args.repeat):
        for label in LAYOUTS:
            shutil.rmtree(dst, ignore_errors=True)
            runs[label].append(child_json(__file__, src, dst, label))
    shutil.rmtree(dst, ignore_errors=True)
    for label, results in runs.items():
        wall = statistics.median(r["seconds"] for r in results)
        cpu = statistics.median(r["cpu"] for r in results)
        last = results[-1]
        print(
            f"| {label} | {wall:.1f} | {cpu:.1f} | {max(r['rss'] for r in results):.0f}"
            f" | {last['bytes'] / 2**20:.0f} | {last['files']} | "
            f"{last['files'] * 1024 / gib:.0f} | {wall / gib * 1024 / 3600:.1f} |",
            flush=True,
        )
    return None


if __name__ == "__main__":
    sys.exit(main())
