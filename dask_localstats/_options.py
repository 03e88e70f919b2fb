"""The options of the ``dask-localstats`` command line, and their help.

:func:`build_parser` declares the two subcommands, ``percentile`` and
``histogram``, with the sampling geometry, the input and output options and
where to compute; :mod:`dask_localstats._cli` maps what it parses to the
library's keyword arguments.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from . import __version__
from ._cluster import JOBQUEUES
from ._stored import MISSING_CHUNKS
from ._write import DEFAULT_BATCH_SIZE

PROG = "dask-localstats"

INPUTS = """\
INPUTS (all read lazily, never loaded whole):
  a zarr v2 or v3 array, a zarr group holding one array, an OME-Zarr image
  (level 0 unless --level), a multi-page TIFF file, or a folder or glob of
  2-D TIFF slices (quote the glob: 'stack/Z*.tif') of one series (names that
  differ only in the plane number; pick one with --series), in plane order.
  Brackets match literally first ('UltraII[00 x 00]'). HDF5 (the h5 extra): a
  dataset 'file.h5:/path/to/data', a BigDataViewer/BigStitcher 'file.h5' or an
  Imaris 'file.ims' (--setup, --timepoint, --level). Paths may be file:// URLs,
  and zarr stores (IN, MASK and OUT) any fsspec URL: s3://, gs://... (with
  --storage-option).
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _max_bin(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        msg = f"a number of bins or 'auto', got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


def _key_value(text):
    """``KEY=VALUE`` as ``(key, value)``, the value read as JSON if it can be."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        msg = f"expected KEY=VALUE, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


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
    parser.add_argument("--axes", metavar="ORDER", help="the axis order of the "
                        "sizes given, e.g. xyz for ClearMap's (default: IN's, "
                        "z y x for a stack)")  # fmt: skip
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
    parser.add_argument("--dtype", type=np.dtype,
                        help=f"dtype of the result (default: {dtype})")  # fmt: skip
    parser.add_argument("--mask", metavar="MASK", help="only voxels where MASK "
                        "(same shape as IN, any input kind) is nonzero are used")  # fmt: skip
    missing = parser.add_argument_group("missing data")
    missing.add_argument("--nan-policy", choices=("propagate", "omit"),
                         default="propagate", help="'omit' leaves NaN voxels "
                         "out of the windows (default: propagate)")  # fmt: skip
    missing.add_argument("--min-coverage", type=float, default=0.0, metavar="F",
                         help="fraction of a full window's voxels that must be "
                         "kept, else the sample is missing (default: 0)")  # fmt: skip
    missing.add_argument("--fill", choices=("zero", "nearest"), default="zero",
                         help="missing samples are 0 (ClearMap), or the nearest "
                         "valid sample's value: no dip next to masked regions")  # fmt: skip
    missing.add_argument("--clip", action="store_true", help="keep order >= 2 "
                         "interpolation within the coarse grid's range")  # fmt: skip


def _add_common(parser):
    group = parser.add_argument_group("input and output")
    group.add_argument("--level", type=int, default=0, help="resolution level "
                       "of an OME-Zarr image or pyramidal TIFF (default: 0)")  # fmt: skip
    group.add_argument("--series", metavar="LABEL", help="the series of TIFF "
                       "slices to stack (a channel, tile...), see INPUTS")  # fmt: skip
    group.add_argument("--setup", type=int, default=0, help="BigDataViewer "
                       "setup, or Imaris channel, of an HDF5 IN (default: 0)")  # fmt: skip
    group.add_argument("--timepoint", type=int, default=0, help="time point of "
                       "a BigDataViewer or Imaris IN (default: 0)")  # fmt: skip
    group.add_argument("--voxel-size", nargs="+", type=float, metavar="S",
                       help="physical voxel size per axis of IN, for OUT's "
                       "OME-Zarr scale (implies --ome)")  # fmt: skip
    group.add_argument("--unit", default="micrometer", help="unit of "
                       "--voxel-size (default: micrometer)")  # fmt: skip
    group.add_argument("--ome", action=argparse.BooleanOptionalAction,
                       default=None, help="write OUT as an OME-Zarr 0.5 image "
                       "(default: when IN is OME-Zarr)")  # fmt: skip
    sizes = dict(nargs="+", type=int, metavar="N")
    group.add_argument("--chunks", **sizes, help="chunk shape of OUT (default: "
                       "IN's, or the processing blocks with --coarse)")  # fmt: skip
    group.add_argument("--shards", nargs="+", default=["auto"], metavar="N",
                       help="store chunks together in shards of this shape "
                       "(multiples of the chunks); 'auto' (default): about 64 "
                       "MiB each for outputs of 128 MiB or more; 'none'")  # fmt: skip
    group.add_argument("--pyramid", type=int, default=1, metavar="N",
                       help="write N resolution levels, each halving the spatial "
                       "axes longer than 32 voxels (implies --ome; default 1)")  # fmt: skip
    group.add_argument("--compression", default="auto", metavar="SPEC",
                       help="zstd[:LEVEL], blosc-zstd[:LEVEL], blosc-lz4[:LEVEL] "
                       "or none (default: blosc-zstd:1); a crc32c checksum "
                       "follows")  # fmt: skip
    group.add_argument("--missing-chunks", choices=MISSING_CHUNKS,
                       default="error", help="chunks absent from a zarr IN or "
                       "MASK: refuse (default), or read them as the fill value "
                       "(sparse stores)")  # fmt: skip
    group.add_argument("--storage-option", action="append", type=_key_value,
                       metavar="KEY=VALUE", help="an fsspec option of zarr URLs "
                       "(s3://, gs://...) of IN, MASK and OUT, such as "
                       "endpoint_url=http://host:9000 or anon=true; VALUE is "
                       "read as JSON if it can be (repeatable)")  # fmt: skip
    existing = group.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace OUT "
                          "if it exists (only if it holds nothing but zarr "
                          "entries)")  # fmt: skip
    existing.add_argument("--resume", action="store_true", help="continue an "
                          "interrupted run into OUT, writing only missing "
                          "chunks")  # fmt: skip
    _add_computing(parser)


def _add_computing(parser):
    run = parser.add_argument_group("computing")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="run on this "
                       "dask.distributed scheduler (OUT and IN must be "
                       "reachable from its workers)")  # fmt: skip
    where.add_argument("--workers", type=int, metavar="N", help="start a local "
                       "dask.distributed cluster of N worker processes")  # fmt: skip
    where.add_argument("--jobqueue", choices=sorted(JOBQUEUES), help="submit "
                       "worker jobs to this batch system (dask-jobqueue; "
                       "'local' runs them as local processes)")  # fmt: skip
    run.add_argument("--memory-limit", metavar="BYTES", help="memory limit per "
                     "worker with --workers, e.g. 4GB (default: auto)")  # fmt: skip
    run.add_argument("--threads", type=int, metavar="N", help="threads of each "
                     "worker with --workers (default: the cores shared among "
                     "them)")  # fmt: skip
    run.add_argument("--jobs", type=int, default=1, metavar="N", help="number "
                     "of worker jobs with --jobqueue (default 1)")  # fmt: skip
    run.add_argument("--job-option", action="append", type=_key_value,
                     metavar="KEY=VALUE", help="an option of each job with "
                     "--jobqueue: cores=8, memory=32GB, walltime=04:00:00, "
                     "queue=..., account=..., scheduler_options={\"host\": "
                     "\"ib0\"}; VALUE is read as JSON if it can be "
                     "(repeatable)")  # fmt: skip
    run.add_argument("--print-job-script", action="store_true", help="print "
                     "the script of a worker job of --jobqueue, and exit")  # fmt: skip
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                     metavar="TASKS", help="tasks in the graph of one batch: "
                     "OUT is computed in batches of consecutive chunks, each "
                     "submitted when the one before is done, so the graph "
                     "and the memory of a job of any size stay bounded "
                     f"(default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    run.add_argument("--quiet", "-q", action="store_true",
                     help="no progress bar, only the summary line")  # fmt: skip
    run.add_argument("--log-file", metavar="PATH", help="append the progress "
                     "(a line every 10 s) and the summary to this file")  # fmt: skip
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
        description="Local percentiles of IN on a grid of windows, resampled to "
        "full resolution (or the coarse grid with --coarse), written to OUT;\n"
        "with --subtract, OUT is IN minus that background.",
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
        description="Counts of each value 0 .. MAX_BIN-1 in every window of IN "
        "(the coarse grid unless --interpolate),\nwritten to OUT with a last "
        "axis of length MAX_BIN (the first axis with --ome).",
        **layout,
    )
    _add_geometry(histogram, interpolate=None, dtype="int64")
    histogram.add_argument("--max-bin", type=_max_bin, default=4096, help="number "
                           "of bins, or 'auto': IN's recorded maximum + 1, else "
                           "its dtype's range (default: 4096)")  # fmt: skip
    histogram.add_argument("--clip-values", action="store_true", help="count "
                           "values outside [0, MAX_BIN) in the end bins instead "
                           "of refusing them")  # fmt: skip
    _add_common(histogram)
    return parser
