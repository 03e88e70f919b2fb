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

import argparse
import contextlib
import shlex
import sys
import textwrap
import traceback
from dataclasses import dataclass

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize

from . import __version__
from ._api import local_histogram, local_percentile
from ._grid import make_grid
from ._io import open_source
from ._ome import output_image, read_image
from ._stored import MISSING_CHUNKS, locate
from ._write import to_zarr
from .errors import LocalStatsError

PROG = "dask-localstats"

INPUTS = """\
INPUTS (all read lazily, never loaded whole):
  a zarr v2 or v3 array, a zarr group holding one array, an OME-Zarr image
  (level 0 unless --level), a multi-page TIFF file, or a folder or glob of
  2-D TIFF slices (quote the glob: 'stack/Z*.tif'), stacked in natural order.
  Paths may be file:// URLs.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _dtype(text):
    try:
        return np.dtype(text)
    except TypeError:
        msg = f"a NumPy dtype such as uint16 or float32, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _add_geometry(parser, interpolate, dtype):
    parser.add_argument("input", metavar="IN", help="the image: see INPUTS below")
    parser.add_argument("output", metavar="OUT", help="the zarr store to write")
    sizes = dict(nargs="+", type=int)
    parser.add_argument("--selem", required=True, metavar="E", **sizes,
                        help="window extent per axis, in voxels (one value: "
                        "the same on every axis)")  # fmt: skip
    parser.add_argument("--spacing", metavar="H", **sizes,
                        help="distance between window centers per axis "
                        "(default: the extent)")  # fmt: skip
    parser.add_argument("--step", metavar="D", **sizes,
                        help="take every D-th voxel of a window per axis "
                        "(default: 1, all)")  # fmt: skip
    resample = parser.add_mutually_exclusive_group()
    resample.add_argument("--interpolate", type=int, default=interpolate,
                          metavar="K", help="B-spline order 0..5 of the "
                          "resampling to full resolution (0 nearest, 1 linear; "
                          f"default: {interpolate})")  # fmt: skip
    resample.add_argument("--coarse", action="store_true",
                          help="write the coarse grid, one value per window "
                          "center" + (" (the default)" if interpolate is None
                                      else ""))  # fmt: skip
    parser.add_argument("--align", choices=("corners", "centers"),
                        default="corners", help="'corners' (ClearMap) stretches"
                        " the coarse grid over the image; 'centers' puts each "
                        "sample on its window center (default: corners)")  # fmt: skip
    parser.add_argument("--dtype", type=_dtype,
                        help=f"dtype of the result (default: {dtype})")  # fmt: skip
    parser.add_argument("--mask", metavar="MASK", help="only voxels where MASK "
                        "(same shape as IN, any input kind) is nonzero are used")  # fmt: skip


def _add_common(parser):
    group = parser.add_argument_group("input and output")
    group.add_argument("--level", type=int, default=0, help="resolution level "
                       "of an OME-Zarr image or pyramidal TIFF (default: 0)")  # fmt: skip
    group.add_argument("--ome", action=argparse.BooleanOptionalAction,
                       default=None, help="write OUT as an OME-Zarr 0.5 image "
                       "(default: when IN is OME-Zarr)")  # fmt: skip
    group.add_argument("--missing-chunks", choices=MISSING_CHUNKS,
                       default="error", help="chunks absent from a zarr IN or "
                       "MASK: refuse (default), or read them as the fill value "
                       "(sparse stores)")  # fmt: skip
    existing = group.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace OUT "
                          "if it exists (only if it holds nothing but zarr "
                          "entries)")  # fmt: skip
    existing.add_argument("--resume", action="store_true", help="continue an "
                          "interrupted run into OUT, writing only missing "
                          "chunks")  # fmt: skip
    run = parser.add_argument_group("computing")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="run on this "
                       "dask.distributed scheduler (OUT and IN must be "
                       "reachable from its workers)")  # fmt: skip
    where.add_argument("--workers", type=int, metavar="N", help="start a local "
                       "dask.distributed cluster of N worker processes")  # fmt: skip
    run.add_argument("--memory-limit", metavar="BYTES", help="memory limit per "
                     "worker with --workers, e.g. 4GB (default: auto)")  # fmt: skip
    run.add_argument("--quiet", "-q", action="store_true",
                     help="no progress bar or summary")  # fmt: skip
    run.add_argument("--debug", action="store_true",
                     help="show the traceback of an error")  # fmt: skip


def build_parser():
    """The argument parser of the ``dask-localstats`` command.

    Returns
    -------
    argparse.ArgumentParser

    Examples
    --------
    >>> args = build_parser().parse_args(
    ...     ["percentile", "in.zarr", "out.zarr", "--percentile", "0.1", "--selem", "8"]
    ... )
    >>> args.percentile, args.selem, args.interpolate
    ([0.1], [8], 1)
    """
    parser = _Parser(
        prog=PROG,
        description="Local statistics of large images on a sub-grid, "
        "out of core with dask.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    layout = dict(epilog=INPUTS, formatter_class=argparse.RawDescriptionHelpFormatter)
    percentile = commands.add_parser(
        "percentile",
        help="local percentiles (background estimation and removal)",
        description=textwrap.fill(
            "Local percentiles of IN on a grid of windows, resampled to full "
            "resolution (or the coarse grid with --coarse), written to OUT. "
            "With --subtract, OUT is IN minus that background."
        ),
        **layout,
    )
    _add_geometry(percentile, interpolate=1, dtype="IN's")
    percentile.add_argument("--percentile", nargs="+", type=float, required=True,
                            metavar="P", help="fraction(s) in [0, 1]; several add"
                            " a last axis (first with --ome)")  # fmt: skip
    percentile.add_argument("--subtract", action="store_true", help="write IN - "
                            "background (background in float), rounded and "
                            "clipped to the range of IN's dtype (or --dtype)")  # fmt: skip
    _add_common(percentile)
    histogram = commands.add_parser(
        "histogram",
        help="local histograms of an integer image",
        description=textwrap.fill(
            "Counts of each value 0 .. MAX_BIN-1 in every window of IN (the "
            "coarse grid unless --interpolate), written to OUT with a last axis "
            "of length MAX_BIN (the first axis with --ome)."
        ),
        **layout,
    )
    _add_geometry(histogram, interpolate=None, dtype="int64")
    histogram.add_argument("--max-bin", type=int, default=4096, help="number of "
                           "bins; a value outside [0, MAX_BIN) is an error "
                           "(default: 4096)")  # fmt: skip
    _add_common(histogram)
    return parser


# --- planning ---------------------------------------------------------------


@dataclass
class Job:
    """What one command writes: the lazy result and how to store it."""

    result: da.Array
    inputs: dict
    provenance: dict
    ome: object = None


def _sizes(values):
    """A list of sizes from the command line: one value stands for every axis."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _background_dtype(dtype):
    """Float type that holds a percentile of `dtype` values exactly enough."""
    small = dtype.kind in "iub" and dtype.itemsize <= 2
    return np.dtype(np.float32 if small or dtype == np.float32 else np.float64)


def _subtract(source, background, dtype):
    """``source - background`` rounded and clipped to `dtype`, lazily."""
    if dtype.kind not in "iuf":
        msg = f"--subtract needs a numeric output dtype, got {dtype}"
        raise ValueError(msg)
    name = "localstats-input-" + tokenize(background.name, "source")
    image = da.from_array(source, chunks=background.chunks, name=name, asarray=True)
    difference = image.astype(np.float64) - background.astype(np.float64)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        difference = da.clip(da.rint(difference), info.min, info.max)
    return difference.astype(dtype)


def _statistic(args, source, dtype, common):
    """The lazy result, its trailing axis ``(name, length)`` or None."""
    if args.command == "histogram":
        result = local_histogram(source, args.max_bin, dtype=dtype, **common)
        return result, ("bin", args.max_bin)
    several = len(args.percentile) > 1
    percentile = args.percentile if several else args.percentile[0]
    if not args.subtract:
        result = local_percentile(source, percentile, dtype=dtype, **common)
        return result, ("percentile", len(percentile)) if several else None
    if common["interpolate"] is None:
        msg = "--subtract needs the full-resolution background; drop --coarse"
        raise ValueError(msg)
    if several:
        msg = f"--subtract takes one --percentile, got {args.percentile}"
        raise ValueError(msg)
    background_dtype = _background_dtype(np.dtype(source.dtype))
    background = local_percentile(source, percentile, dtype=background_dtype, **common)
    dtype = np.dtype(source.dtype) if dtype is None else np.dtype(dtype)
    return _subtract(source, background, dtype), None


def _describe(path, array):
    if array is None:
        return None
    where = getattr(array, "files", None)
    return {
        "path": path if where and len(where) > 1 else str(locate(path)),
        "shape": list(array.shape),
        "dtype": np.dtype(array.dtype).str,
    }


def plan(args):
    """Open the inputs and build the lazy result of a command; nothing is written.

    Returns
    -------
    Job
    """
    source = open_source(args.input, "IN", level=args.level)[0]
    mask = None if args.mask is None else open_source(args.mask, "--mask")[0]
    interpolate = None if args.coarse else args.interpolate
    selem, spacing, step = _sizes(args.selem), _sizes(args.spacing), _sizes(args.step)
    common = dict(selem=selem, spacing=spacing, step=step, interpolate=interpolate,
                  mask=mask, align=args.align, missing_chunks=args.missing_chunks)  # fmt: skip
    result, extra = _statistic(args, source, args.dtype, common)
    grid = make_grid(source.shape, selem, spacing, step)
    parameters = {k: v for k, v in vars(args).items() if k in _FINGERPRINTED}
    parameters.update(interpolate=interpolate, dtype=result.dtype.str)
    if "percentile" in parameters:  # one value: a number, as the library takes it
        parameters["percentile"] = _sizes(parameters["percentile"])
    ome_in = (
        read_image(args.input, args.level, source.ndim)
        if isinstance(source, zarr.Array)
        else None
    )
    ome = ome_in is not None if args.ome is None else args.ome
    image = None
    if ome:
        name = str(locate(args.output)).rsplit("/", 1)[-1]
        image, position = output_image(
            ome_in, source.ndim, grid, interpolate is None, extra, name
        )
        if position is not None:
            result = da.moveaxis(result, -1, position)
    provenance = {
        "statistic": args.command,
        "parameters": {**parameters, "ome": bool(ome)},
        "input": _describe(args.input, source),
        "mask": _describe(args.mask, mask),
        "grid": {
            "first": list(grid.first),
            "spacing": list(grid.spacing),
            "count": list(grid.counts),
        },
    }
    inputs = {"IN": source} if mask is None else {"IN": source, "MASK": mask}
    return Job(result, inputs, provenance, image)


_FINGERPRINTED = ("selem", "spacing", "step", "align", "level", "percentile",
                  "subtract", "max_bin")  # fmt: skip


# --- running ------------------------------------------------------------------


@contextlib.contextmanager
def _client(args):
    """A dask.distributed client for --scheduler or --workers, else None."""
    if args.scheduler is None and args.workers is None:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - the `distributed` extra is missing
        msg = (
            "--scheduler and --workers need: pip install 'dask-localstats[distributed]'"
        )
        raise ValueError(msg) from None
    if args.scheduler is not None:
        try:
            client = Client(args.scheduler)
        except OSError as error:
            msg = f"--scheduler: cannot connect to {args.scheduler!r}: {error}"
            raise ValueError(msg) from None
        with client:
            yield client
        return
    cluster = LocalCluster(n_workers=args.workers, processes=True,
                           dashboard_address=":0",
                           memory_limit=args.memory_limit or "auto")  # fmt: skip
    with cluster, Client(cluster) as client:
        if not args.quiet:
            print(f"{PROG}: dashboard at {client.dashboard_link}", file=sys.stderr)
        yield client


def _check_run_options(args):
    if args.workers is not None and args.workers < 1:
        msg = f"--workers must be a positive number of processes, got {args.workers}"
        raise ValueError(msg)
    if args.memory_limit is None or args.memory_limit == "auto":
        return
    if args.workers is None:
        msg = "--memory-limit applies to --workers"
        raise ValueError(msg)
    from dask.utils import parse_bytes

    try:
        parse_bytes(args.memory_limit)
    except (ValueError, TypeError):
        msg = f"--memory-limit must be a size such as 4GB or 'auto', got {args.memory_limit!r}"
        raise ValueError(msg) from None


def run(args, argv):
    """Run a parsed command; see :func:`main`."""
    _check_run_options(args)
    job = plan(args)
    with _client(args):
        written = to_zarr(
            job.result,
            args.output,
            overwrite=args.overwrite,
            resume=args.resume,
            inputs=job.inputs,
            provenance=job.provenance,
            attributes={"command": shlex.join([PROG, *argv])},
            ome=job.ome,
            progress=not args.quiet,
        )
    if not args.quiet:
        record = written.attrs["dask_localstats"]
        print(
            f"{PROG}: wrote {args.output} (shape {written.shape}, {written.dtype}): "
            f"{record['written']} of {written.nchunks} chunks computed",
            file=sys.stderr,
        )


def _one_line(error):
    """The message of an error on one line, with its notes."""
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, LocalStatsError | ValueError | TypeError | OSError):
        text = f"{type(error).__name__}: {text}"
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
    try:
        run(args, argv)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    except Exception as error:  # every failure: one line, exit 2
        if args.debug:
            traceback.print_exc()
        known = isinstance(
            error, LocalStatsError | ValueError | TypeError | OSError | MemoryError
        )
        hint = (
            "" if known or args.debug else " (unexpected: --debug shows the traceback)"
        )
        print(f"{PROG}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
