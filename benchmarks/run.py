"""Benchmarks W1..W6 of docs/benchmarks.md, each against its baselines.

Run from the repository root::

    python benchmarks/run.py [--quick] [--repeat N] [--only W1,W6]

What is measured
----------------
Every workload is timed on our side ("ours": the public function on a NumPy
array, or for W6 ``dask_localstats._interpolate``) and on each of its
baselines, side by side and alternating (ours, baselines, then the reverse
order on the next repetition), ``--repeat`` times (default 3); the table
shows medians. Each measurement runs in a fresh subprocess
(``run.py --child KEY SIDE``) that imports what its side needs, loads the
cached input volume, touches ``--prefault`` MiB of memory (see
:func:`prefault`), then times the single call with
:func:`time.perf_counter` and reports its peak RSS (``VmHWM``; Linux carries
``ru_maxrss`` over from the parent): interpreter, imports, input and work
memory, the largest over the repetitions. Data generation is excluded:
volumes are made once by :mod:`data` and cached as ``.npy`` files in
``$DASK_LOCALSTATS_BENCH`` (default ``/tmp/dask_localstats_bench``).

Baselines: B1 is ClearMap's own algorithm at its fastest
(:mod:`clearmap`: one basic slice, ``.flatten()`` and ``numpy.percentile``,
``numpy.bincount`` or the user's function per window, then
``scipy.ndimage.zoom`` of each component with scipy's defaults); B2 is ``scipy.ndimage.zoom``; B3 is hand-rolled dask:
``dask.array.coarsen(numpy.median)`` over 50^3 chunks, then ``zoom`` (order
1); B5 is our own per-window path of ``apply_local_function``, calling
``numpy.std`` once per window through a lambda (so no fast path recognizes
it), against which W5.std measures ``vectorized=True`` with ``numpy.std``
itself. W1's shape is not a
multiple of 50, so B3 first crops the volume to the
union of our windows (on axis 0, voxels 14..113) and needs no trimming: its
medians, truncated to uint16 like ours, are then the very same numbers.

The first repetition saves each side's output; "agree" compares ours with
the baseline: exact equality, or for interpolated results equality up to
float rounding (floats within 1e-9 relative; integers within 1, from values
rounding at exactly .5). ``--quick`` divides every size, window and spacing
by 4 for a smoke test (targets are meant for full size). The table is
printed and written to ``benchmarks/results.md`` (``--quick``: to the cache
folder).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path(os.environ.get("DASK_LOCALSTATS_BENCH", "/tmp/dask_localstats_bench"))
QUICK = 4
# what each side imports before its call is timed
IMPORTS = {
    "ours": ["dask_localstats", "dask_localstats._interpolate"],
    "B1": ["clearmap"],
    "B2": ["scipy.ndimage"],
    "B3": ["dask.array", "scipy.ndimage"],
    "B5": ["dask_localstats"],
}


def isodata(values, nbins=256):
    """Isodata (Ridler-Calvard) threshold of a 1-D array.

    Parameters
    ----------
    values : numpy.ndarray
        The samples.
    nbins : int
        Number of histogram bins.

    Returns
    -------
    float
        The smallest bin center ``t`` with ``t = (mean below + mean above) / 2``
        within a bin width, as ``skimage.filters.threshold_isodata`` defines
        it; the mean when there is none.
    """
    values = np.ravel(values)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(values, bins=nbins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    weighted = np.cumsum(counts * centers)
    lower = weighted[:-1] / below[:-1]
    higher = (weighted[-1] - weighted[:-1]) / (below[-1] - below[:-1])
    distance = (lower + higher) / 2 - centers[:-1]
    found = centers[:-1][(distance >= 0) & (distance < centers[1] - centers[0])]
    return float(found[0]) if found.size else float(values.mean())


@dataclass
class Case:
    """One workload: its input, our call and its baselines with targets."""

    key: str
    data: tuple
    func: str | None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    exact: bool = False

    @property
    def call(self):
        if self.func is None:
            shape, order = self.kwargs["shape"], self.kwargs["order"]
            return f"coarse {self.data[1]} to {shape}, order {order}"

        def show(x):
            return getattr(x, "__name__", repr(x))

        args = [show(a) for a in self.args]
        args += [f"{k}={show(v)}" for k, v in self.kwargs.items()]
        return f"{self.func}(v, {', '.join(args)})"


def cases(quick):
    """The workloads, shrunk by `QUICK` per axis when `quick`."""
    k = QUICK if quick else 1

    def size(*sizes):
        return tuple(max(1, s // k) for s in sizes)

    light, coarse = "lightsheet", "coarse"
    return [
        Case(
            "W1",
            (light, size(128, 512, 512), 16),
            "local_percentile",
            (0.5,),
            dict(selem=size(50, 50, 50), interpolate=1),
            {"B1": 12, "B3": 3},
        ),
        Case(
            "W2",
            (light, size(1024, 1024, 16), 16),
            "local_percentile",
            (0.25,),
            dict(
                selem=size(200, 200, 1),
                spacing=size(25, 25, 1),
                step=(2, 2, 1),
                interpolate=1,
                dtype=float,
            ),
            {"B1": 15},
        ),
        Case(
            "W3",
            (light, size(1024, 1024, 40), 16),
            "local_percentile",
            ((0.4, 0.975),),
            dict(selem=size(200, 200, 5), spacing=size(50, 50, 5), interpolate=1),
            {"B1": 30},
        ),
        Case(
            "W4",
            (light, size(128, 512, 512), 12),
            "local_histogram",
            (),
            dict(max_bin=4096, selem=size(50, 50, 50)),
            {"B1": 20},
            exact=True,
        ),
        Case(
            "W5",
            (light, size(1024, 1024, 12), 16),
            "apply_local_function",
            (isodata,),
            dict(selem=size(250, 250, 3), spacing=size(50, 50, 3), dtype=float),
            {"B1": 1.7},
        ),
        Case(
            "W5.std",
            (light, size(1024, 1024, 12), 16),
            "apply_local_function",
            (np.std,),
            dict(
                selem=size(250, 250, 3),
                spacing=size(50, 50, 3),
                dtype=float,
                vectorized=True,
            ),
            {"B5": 20},
        ),
        Case(  # many small windows: where per-window calls dominate
            "W5.std-small",
            (light, size(1024, 1024, 12), 16),
            "apply_local_function",
            (np.std,),
            dict(
                selem=size(8, 8, 3),
                spacing=size(8, 8, 3),
                interpolate=None,
                dtype=float,
                vectorized=True,
            ),
            {"B5": 20},
        ),
        Case(
            "W6.1",
            (coarse, (3, 11, 11)),
            None,
            (),
            dict(shape=size(128, 512, 512), order=1),
            {"B2": 20},
        ),
        Case(
            "W6.3",
            (coarse, (3, 11, 11)),
            None,
            (),
            dict(shape=size(128, 512, 512), order=3),
            {"B2": 100},
        ),
    ]


def load(data):
    """The input of a case, generated once and cached as ``.npy``."""
    kind, shape, *rest = data
    name = "-".join([kind, "x".join(map(str, shape)), *map(str, rest)]) + ".npy"
    path = CACHE / name
    if not path.exists():
        from data import coarse_grid, lightsheet

        CACHE.mkdir(parents=True, exist_ok=True)
        array = lightsheet(shape, bits=rest[0]) if rest else coarse_grid(shape)
        np.save(path.with_suffix(".tmp.npy"), array)
        path.with_suffix(".tmp.npy").rename(path)
    return np.load(path)


def spline(coarse, shape, order):
    """W6, ours: prefilter once, then one separable resampling block."""
    from dask_localstats._interpolate import coordinates, prefilter, resample_block

    coefficients = prefilter(coarse, order, coarse.ndim)
    coords = [
        coordinates(s, m, 0, 1, "corners")
        for s, m in zip(shape, coarse.shape, strict=True)
    ]
    zeros = (0,) * coarse.ndim
    return resample_block(
        coefficients, zeros, coords, coarse.shape, order, coarse.dtype
    )


def zoom(coarse, shape, order):
    """W6, B2: ``scipy.ndimage.zoom`` to `shape`."""
    from scipy import ndimage

    return ndimage.zoom(coarse, np.divide(shape, coarse.shape), order=order)


def coarsen_zoom(v, percentile, selem, interpolate):
    """W1, B3: dask ``coarsen`` with a median on our windows, then zoom."""
    import dask.array as da
    from scipy import ndimage

    assert percentile == 0.5
    counts = [s // e for s, e in zip(v.shape, selem, strict=True)]
    starts = [
        (s - (m - 1) * e) // 2 - e // 2
        for s, m, e in zip(v.shape, counts, selem, strict=True)
    ]
    crop = v[
        tuple(
            slice(a, a + m * e) for a, m, e in zip(starts, counts, selem, strict=True)
        )
    ]
    x = da.from_array(crop, chunks=selem)
    medians = da.coarsen(np.median, x, dict(enumerate(selem)))
    coarse = medians.compute(scheduler="threads").astype(v.dtype)
    return ndimage.zoom(coarse, np.divide(v.shape, counts), order=interpolate)


def side_function(case, side):
    """The callable ``f(v)`` of one side of a case, its imports done."""
    for name in IMPORTS[side]:
        importlib.import_module(name)
    if case.func is None:
        shape, order = case.kwargs["shape"], case.kwargs["order"]
        f = spline if side == "ours" else zoom
        return lambda v: f(v, shape, order)
    if side == "B3":
        return lambda v: coarsen_zoom(v, *case.args, **case.kwargs)
    if side == "B5":  # our own per-window path, one call of the function each
        import dask_localstats

        (function,) = case.args
        kwargs = {k: v for k, v in case.kwargs.items() if k != "vectorized"}
        return lambda v: dask_localstats.apply_local_function(
            v, lambda kept: function(kept), **kwargs
        )
    if side == "ours":
        import dask_localstats as module
    else:
        import clearmap as module
    function = getattr(module, case.func)
    return lambda v: function(v, *case.args, **case.kwargs)


def output_path(case, side, quick):
    return CACHE / f"out-{case.key}-{side}{'-quick' if quick else ''}.npy"


def child_json(script, *args, env=None):
    """Run `script` ``--child ARGS`` in a fresh process; its last line, as JSON."""
    out = subprocess.run(
        [sys.executable, str(script), "--child", *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mib():
    """This process's peak RSS in MiB.

    ``VmHWM`` of ``/proc/self/status``: unlike ``ru_maxrss``, which Linux
    carries over ``execve`` from the parent, it covers this process only.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prefault(mib):
    """Touch and free `mib` MiB, then reset the peak RSS to the current RSS.

    In this virtual machine, memory the process has not touched recently can
    cost about 2 s per GiB on first touch (the host backs it lazily); touching
    it first keeps that out of the timings of both sides alike.
    """
    if mib:
        np.ones(mib << 20, dtype=np.uint8)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass


def child(case, side, quick, save, mib):
    """Time one call in this (fresh) process; print JSON on the last line."""
    function = side_function(case, side)
    v = load(case.data)
    prefault(mib)
    start = time.perf_counter()
    result = function(v)
    seconds = time.perf_counter() - start
    rss = peak_rss_mib()
    if save:
        np.save(output_path(case, side, quick), np.asarray(result))
    print(json.dumps({"seconds": seconds, "rss_mib": rss}))


def measure(case, side, quick, save, mib):
    """Run one measurement in a subprocess: a dict, or the error text."""
    command = [sys.executable, __file__, "--child", case.key, side]
    command += ["--prefault", str(mib)]
    command += ["--quick"] * quick + ["--save"] * save
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        return lines[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(case, side, quick):
    """Compare the saved outputs of ours and of a baseline, in words."""
    try:
        ours = np.load(output_path(case, "ours", quick))
        base = np.load(output_path(case, side, quick))
    except OSError:
        return "n/a (no output)"
    if ours.shape != base.shape:
        return f"NO: shape {ours.shape} vs {base.shape}"
    if np.array_equal(ours, base):
        return "yes, exact"
    diff = np.abs(ours.astype(np.float64) - base.astype(np.float64))
    worst, count = float(np.nanmax(diff)), int(np.count_nonzero(diff))
    where = tuple(int(i) for i in np.unravel_index(np.nanargmax(diff), diff.shape))
    if not case.exact:
        if ours.dtype.kind in "iu" and worst <= 1:
            return f"yes, ±1 at {count} voxels (rounding)"
        if worst <= 1e-9 * max(1.0, float(np.abs(base).max())):
            return f"yes, max abs diff {worst:.1e}"
    return f"NO: max abs diff {worst:.4g} at {count} voxels, worst at {where}"


def table(rows):
    header = [
        "workload",
        "call",
        "ours (s)",
        "baseline (s)",
        "ratio",
        "target",
        "met?",
        "peak RSS ours / baseline (MiB)",
        "agree",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def summary(runs):
    """Median seconds and max RSS of the successful runs, or the error."""
    good = [r for r in runs if isinstance(r, dict)]
    if len(good) < len(runs):
        return None, None, next(r for r in runs if not isinstance(r, dict))
    median = statistics.median(r["seconds"] for r in good)
    return median, max(r["rss_mib"] for r in good), None


def environment():
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout
    except OSError:
        commit = "?"
    versions = ", ".join(f"{p} {version(p)}" for p in ("numpy", "scipy", "dask"))
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; "
        f"machine: {os.cpu_count()} CPUs (nproc), {platform.machine()}, "
        f"{platform.system()} {platform.release()}; python "
        f"{platform.python_version()}, {versions}; load average "
        f"{os.getloadavg()[0]:.2f} at the start; dask_localstats "
        f"{version('dask-localstats')} at {commit.strip() or '?'}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes / 4")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", help="comma-separated ids, e.g. W1,W6")
    parser.add_argument(
        "--prefault",
        type=int,
        default=1536,
        metavar="MIB",
        help="memory each child touches before timing (default 1536; 0: none)",
    )
    parser.add_argument("--output", type=Path, help="Markdown file for the table")
    parser.add_argument(
        "--child", nargs=2, metavar=("KEY", "SIDE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--save", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    chosen = cases(options.quick)
    if options.child:
        key, side = options.child
        case = next(c for c in chosen if c.key == key)
        return child(case, side, options.quick, options.save, options.prefault)
    if options.only:
        wanted = options.only.split(",")
        chosen = [c for c in chosen if c.key.split(".")[0] in wanted or c.key in wanted]
    rows, raw, started = [], [], environment()
    for case in chosen:
        load(case.data)
        sides = ["ours", *case.baselines]
        runs = {side: [] for side in sides}
        for rep in range(options.repeat):
            for side in sides if rep % 2 == 0 else sides[::-1]:
                run = measure(case, side, options.quick, rep == 0, options.prefault)
                runs[side].append(run)
                print(
                    f"{case.key} {side} #{rep + 1}: {run}", file=sys.stderr, flush=True
                )
        ours, ours_rss, ours_error = summary(runs["ours"])
        for side, target in case.baselines.items():
            base, base_rss, base_error = summary(runs[side])
            error = ours_error or base_error
            ratio = None if error else base / ours
            rows.append(
                [
                    f"{case.key} vs {side}",
                    f"`{case.call}`",
                    "error" if ours_error else f"{ours:.3f}",
                    "error" if base_error else f"{base:.3f}",
                    "-" if ratio is None else f"{ratio:.1f}x",
                    f">= {target}x",
                    "-" if ratio is None else ("yes" if ratio >= target else "NO"),
                    f"{ours_rss or 0:.0f} / {base_rss or 0:.0f}",
                    f"error: {error}"
                    if error
                    else agreement(case, side, options.quick),
                ]
            )
        for side, values in runs.items():
            times = [
                f"{r['seconds']:.3f}" if isinstance(r, dict) else "error"
                for r in values
            ]
            raw.append(f"- {case.key} {side}: {', '.join(times)} s")
    text = table(rows)
    print(text)
    quick = " (--quick: sizes / 4, targets are for full size)" * options.quick
    output = options.output or (
        CACHE / "results-quick.md" if options.quick else HERE / "results.md"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        f"# Benchmark results{quick}\n\n{started}\n\n"
        f"`python benchmarks/run.py {' '.join(argv or sys.argv[1:])}`: median of "
        f"{options.repeat} runs, each in a fresh process; ratio = baseline / "
        f"ours.\n\n{text}\n\nEvery run (s):\n\n" + "\n".join(raw) + "\n"
    )
    print(f"written to {output}", file=sys.stderr)
    return None


if __name__ == "__main__":
    sys.exit(main())
