"""The ``dask-localstats`` command line: local statistics of stacks on disk.

``dask-localstats percentile IN OUT ...`` and ``dask-localstats histogram IN
OUT ...`` open IN lazily (:func:`dask_localstats.open_source`), build the
lazy result with :func:`dask_localstats.local_percentile` or
:func:`dask_localstats.local_histogram`, and write it to OUT with
:func:`dask_localstats.to_zarr`, which owns everything that protects data:
the refusals, the lock, the record, resuming and the input checks.

This module only maps arguments to those calls and reports. Every failure is
one line, ``dask-localstats: error: ...``, with exit code 2, saying whether
OUT can be resumed; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field

import dask.array as da
import numpy as np
import zarr

from ._api import (
    background_dtype,
    local_histogram,
    local_percentile,
    subtract_background,
)
from ._cluster import connect, job_script
from ._grid import make_grid
from ._io import open_source
from ._ome import axis_names, output_image, read_image, with_voxel_size
from ._options import PROG, build_parser
from ._stored import locate, locations
from ._write import DEFAULT_BATCH_SIZE, to_zarr
from .errors import LocalStatsError

# --- planning ---------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A command's arguments, as the library takes them.

    `options` are the keyword arguments of :func:`local_percentile` or
    :func:`local_histogram` but `mask`; `ome` None means "when IN is
    OME-Zarr"; `subtract` writes IN minus the background.
    """

    statistic: str
    input: str
    output: str
    options: dict
    mask: str | None = None
    level: int = 0
    ome: bool | None = None
    subtract: bool = False
    layout: dict | None = None
    series: str | None = None
    axes: str | None = None
    setup: int = 0
    timepoint: int = 0
    voxel_size: tuple | None = None
    unit: str = "micrometer"
    storage_options: dict | None = None


@dataclass
class Job:
    """What one command writes: the lazy result and how to store it."""

    result: da.Array
    inputs: dict
    provenance: dict
    ome: object = None
    notes: list = field(default_factory=list)


def _sizes(values):
    """A list of sizes from the command line: one value stands for every axis."""
    return values[0] if values and len(values) == 1 else values and tuple(values)


def _shards(values):
    """``--shards``: 'auto', 'none' or a shape."""
    if values in (["auto"], ["none"]):
        return None if values == ["none"] else "auto"
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        msg = f"--shards must be 'auto', 'none' or sizes, got {' '.join(values)}"
        raise ValueError(msg) from None


def _request(args):
    """The :class:`Request` of parsed arguments (the entry point's mapping)."""
    options = dict(
        selem=_sizes(args.selem),
        spacing=_sizes(args.spacing),
        step=_sizes(args.step),
        interpolate=None if args.coarse else args.interpolate,
        align=args.align,
        dtype=args.dtype,
        missing_chunks=args.missing_chunks,
        nan_policy=args.nan_policy,
        min_coverage=args.min_coverage,
        fill=args.fill,
        clip=args.clip,
    )
    if args.command == "histogram":
        options.update(max_bin=args.max_bin, clip_values=args.clip_values)
    else:
        options["percentile"] = _sizes(args.percentile)
    layout = dict(chunks=args.chunks, shards=_shards(args.shards),
                  compressors=args.compression, pyramid=args.pyramid)  # fmt: skip
    return Request(
        args.command, args.input, args.output, options, args.mask, args.level,
        args.ome, getattr(args, "subtract", False), layout, args.series, args.axes,
        args.setup, args.timepoint, args.voxel_size and tuple(args.voxel_size),
        args.unit, dict(args.storage_option or ()) or None,
    )  # fmt: skip


def _statistic(request, options, source, mask):
    """The lazy result, and its trailing axis ``(name, length)`` or None."""
    options = {**options, "mask": mask}
    if request.statistic == "histogram":
        return local_histogram(source, **options), ("bin", options["max_bin"])
    percentile = options["percentile"]
    several = np.ndim(percentile) > 0
    if not request.subtract:
        result = local_percentile(source, **options)
        return result, ("percentile", len(percentile)) if several else None
    if options["interpolate"] is None:
        msg = "--subtract needs the full-resolution background; drop --coarse"
        raise ValueError(msg)
    if several:
        msg = f"--subtract takes one --percentile, got {list(percentile)}"
        raise ValueError(msg)
    dtype = options.pop("dtype")
    background = local_percentile(
        source, dtype=background_dtype(source.dtype), **options
    )
    return subtract_background(source, background, dtype=dtype), None


def _describe(path, array):
    """Resolved path (a glob as given), shape and dtype of an input."""
    if array is None:
        return None
    several = len(getattr(array, "files", ())) > 1
    where = path if several else str(locate(path))
    return {"path": where, "shape": array.shape, "dtype": np.dtype(array.dtype).str}


def plan(request):
    """The :class:`Job` of a :class:`Request`: inputs opened, nothing written."""
    storage = request.storage_options
    source = open_source(request.input, "IN", request.level, request.series,
                         request.setup, request.timepoint, storage_options=storage)  # fmt: skip
    mask = None
    if request.mask is not None:
        mask = open_source(request.mask, "--mask", storage_options=storage)
    ome_in = None
    if isinstance(source, zarr.Array):
        ome_in = read_image(request.input, request.level, source.ndim, storage)
    voxel = request.voxel_size or getattr(source, "voxel_size", None)
    unit = request.unit if request.voxel_size else "micrometer"
    ome_in = with_voxel_size(ome_in, source.ndim, voxel, unit)
    axes = axis_names(ome_in, source.ndim)
    options, notes = _in_axis_order(request.options, request.axes, axes, source.shape)
    if options.get("max_bin") == "auto":
        options["max_bin"] = _auto_bins(ome_in, source.dtype)
    _check_recorded_range(options, ome_in, source.dtype)
    result, extra = _statistic(request, options, source, mask)
    grid = make_grid(
        source.shape, options["selem"], options["spacing"], options["step"]
    )
    pyramid = (request.layout or {}).get("pyramid", 1) > 1
    ome = ome_in is not None or pyramid if request.ome is None else request.ome
    image = None
    if ome:
        name = str(locate(request.output)).rsplit("/", 1)[-1]
        coarse = options["interpolate"] is None
        image, position = output_image(ome_in, source.ndim, grid, coarse, extra, name)
        if position is not None:
            result = da.moveaxis(result, -1, position)
    parameters = {**options, "dtype": result.dtype.str, "level": request.level,
                  "subtract": request.subtract, "ome": bool(ome)}  # fmt: skip
    provenance = {
        "statistic": request.statistic,
        "parameters": parameters,
        "input": _describe(request.input, source),
        "mask": _describe(request.mask, mask),
        "grid": {"first": grid.first, "spacing": grid.spacing, "count": grid.counts},
    }
    inputs = {"IN": source} if mask is None else {"IN": source, "MASK": mask}
    return Job(result, inputs, provenance, image, notes)


def _in_axis_order(options, order, axes, shape):
    """`options` with sizes in IN's axis order, and notes for the user."""
    named = " ".join(axes) if axes else f"{len(shape)} axes"
    notes = [f"IN had axes {named}, shape {tuple(shape)}"]
    if order is not None:
        if axes is None or sorted(order) != sorted(axes):
            msg = f"--axes {order!r} must name IN's axes ({named}) in some order"
            raise ValueError(msg)
        permute = [order.index(a) for a in axes]
        options = dict(options)
        for key in ("selem", "spacing", "step"):
            if isinstance(options[key], tuple) and len(options[key]) == len(axes):
                options[key] = tuple(options[key][i] for i in permute)
    selem = options["selem"]
    names = axes or [str(d) for d in range(len(shape))]
    spatial = [d for d, n in enumerate(names) if n not in ("t", "c") and shape[d] > 1]
    if isinstance(selem, tuple) and len(selem) == len(shape) and len(spatial) > 1:
        shortest = min(shape[d] for d in spatial)
        for d in spatial:
            if selem[d] == 1 and shape[d] >= 2 * shortest:
                notes.append(
                    f"warning: --selem is 1 on axis {names[d]} (size {shape[d]}), "
                    f"not on the shortest axis (size {shortest}); sizes are in IN's "
                    "axis order unless --axes says otherwise (ClearMap's: --axes xyz)"
                )
    return options, notes


def _auto_bins(image, dtype):
    """Bins for --max-bin auto: IN's recorded maximum + 1, else its dtype's range."""
    dtype = np.dtype(dtype)
    recorded = None if image is None else image.maximum
    if recorded is not None and not (
        dtype.kind in "iu" and recorded >= np.iinfo(dtype).max
    ):
        return int(recorded) + 1
    if dtype.kind not in "bu":
        msg = f"--max-bin auto needs an unsigned integer IN or a recorded maximum, IN is {dtype}"
        raise ValueError(msg)
    return 2 if dtype.kind == "b" else int(np.iinfo(dtype).max) + 1


def _check_recorded_range(options, image, dtype):
    """Refuse before computing when IN's recorded maximum exceeds the bins.

    A recorded maximum that is the dtype's own (as many writers put in
    ``omero`` windows) says nothing of the data, and is not used.
    """
    maximum = None if image is None else image.maximum
    if maximum is not None and np.dtype(dtype).kind in "iu":
        maximum = None if maximum >= np.iinfo(dtype).max else maximum
    bins = options.get("max_bin")
    if bins is None or maximum is None or options.get("clip_values"):
        return
    if maximum >= bins:
        msg = (
            f"IN records values up to {maximum}, outside [0, {bins}); use "
            "--max-bin auto, a larger --max-bin, or --clip-values"
        )
        raise ValueError(msg)


# --- running ------------------------------------------------------------------


def run(request, argv, *, overwrite=False, resume=False, cluster=None, quiet=False,
        log=None, batch_size=DEFAULT_BATCH_SIZE):  # fmt: skip
    """Plan a request, write its result, report; see :func:`main`.

    Parameters
    ----------
    request : Request
    argv : list of str
        The command line, recorded in OUT's attributes.
    overwrite, resume : bool
        As in :func:`dask_localstats.to_zarr`.
    cluster : dict or None
        Keyword arguments of :func:`dask_localstats._cluster.connect`.
    quiet : bool
        No progress bar; the summary line only.
    log : str or None
        A file to append the progress, as lines, and the summary to; never
        an input nor inside OUT.
    batch_size : int
        As in :func:`dask_localstats.to_zarr`.
    """
    started = time.monotonic()
    job = plan(request)
    with _log(log, job.inputs, request.output) as log:
        for note in job.notes[1:]:  # warnings, before computing
            print(f"{PROG}: {note}", file=sys.stderr)
        with connect(**(cluster or {})) as client:
            if client is not None and not quiet:
                print(f"{PROG}: dashboard at {client.dashboard_link}", file=sys.stderr)
            written = to_zarr(
                job.result,
                request.output,
                inputs=job.inputs,
                provenance=job.provenance,
                attributes={"command": shlex.join([PROG, *argv])},
                ome=job.ome,
                progress=log or not quiet,
                overwrite=overwrite,
                resume=resume,
                storage_options=request.storage_options,
                batch_size=batch_size,
                **(request.layout or {}),
            )
        summary = _summary(request, written, job, time.monotonic() - started)
        for out in (sys.stderr, log) if log else (sys.stderr,):
            print(f"{PROG}: {summary}", file=out, flush=True)


def _summary(request, written, job, seconds):
    """What a run did: statistic, parameters, output, time and throughput."""
    options = request.options
    what = request.statistic + ("" if not request.subtract else " --subtract")
    value = options.get("percentile", options.get("max_bin"))
    geometry = ", ".join(
        f"{k} {options[k]}" for k in ("selem", "spacing", "step") if options[k]
    )
    count = f"{written.attrs['dask_localstats']['written']} of {written.nchunks} chunks"
    rate = math.prod(written.shape) / seconds / 1e6 if seconds else 0
    return (
        f"{what} {value} ({geometry}): wrote {request.output} (shape {written.shape}, "
        f"{written.dtype}), {count} computed in {seconds:.1f} s ({rate:.1f} Mvoxel/s); "
        f"{job.notes[0]}"
    )


@contextlib.contextmanager
def _log(path, inputs, output):
    """The log file opened for appending, once it is known not to be data."""
    if path is None:
        yield None
        return
    where = locate(path)
    if locate(output).contains(where):
        msg = f"--log-file {path!r} is inside OUT; give a path outside it"
        raise ValueError(msg)
    for label, source in inputs.items():
        if any(place.overlaps(where) for place in locations(source)):
            msg = (
                f"--log-file {path!r} is {label} or inside it; refusing to append to it"
            )
            raise ValueError(msg)
    with open(path, "a") as log:
        yield log


_EXPECTED = LocalStatsError | ValueError | TypeError | OSError | MemoryError


def _one_line(error, debug):
    """An error's message and notes on one line; unexpected ones say so."""
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, _EXPECTED):
        text = f"{type(error).__name__}: {text}"
        text += "" if debug else " (unexpected: --debug shows the traceback)"
    return "; ".join([text, *getattr(error, "__notes__", [])])


def main(argv=None):
    """Entry point of the ``dask-localstats`` console script.

    Parameters
    ----------
    argv : list of str or None
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 2 for any error (one line on stderr),
        130 when interrupted.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    cluster = dict(scheduler=args.scheduler, workers=args.workers,
                   memory_limit=args.memory_limit, threads=args.threads,
                   jobqueue=args.jobqueue, jobs=args.jobs,
                   job_options=dict(args.job_option or ()))  # fmt: skip
    try:
        if args.print_job_script:
            print(job_script(args.jobqueue, cluster["job_options"]))
            return 0
        run(_request(args), argv, overwrite=args.overwrite, resume=args.resume,
            cluster=cluster, quiet=args.quiet, log=args.log_file,
            batch_size=args.batch_size)  # fmt: skip
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as error:  # every failure: one line, exit 2
        if args.debug:
            traceback.print_exc()
        else:  # zarr's reads of a failed region's other chunks run on zarr's
            # own event loop, which cannot be asked to finish them: asyncio
            # would report each at exit, after the one line below
            logging.getLogger("asyncio").disabled = True
        print(f"{PROG}: error: {_one_line(error, args.debug)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
