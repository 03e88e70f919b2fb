"""The ``dask-localstats`` command line: local statistics of stacks on disk.

``dask-localstats percentile IN OUT ...`` and ``dask-localstats histogram IN
OUT ...`` read IN lazily (a zarr array or group, an OME-Zarr image, a
multi-page TIFF, or a folder or glob of 2-D TIFF slices, see
:func:`dask_localstats.open_source`), build the lazy result with
:func:`dask_localstats.local_percentile` or
:func:`dask_localstats.local_histogram`, and write it to OUT, a compressed
zarr v3 array (an OME-Zarr 0.5 image when IN is one, or with ``--ome``).

The module stays thin: parsing, checks that protect data, then the library.
Only writing is done here, shaped so that nothing is lost:

- OUT is never IN, never holds IN, and an existing OUT is only replaced with
  ``--overwrite`` (and only when it is a zarr store or an empty folder).
- The output array's chunks are the result's (regular) dask chunks, and one
  task computes and writes one chunk, so every chunk file is written once,
  whole. zarr's local store writes a chunk to a temporary file and renames
  it into place (zarr-python PR #3412, in 3.1.6 as installed here), so a
  process killed with SIGKILL leaves whole chunks and stray ``*.partial``
  files, never a torn chunk; with an older zarr, ``--resume`` decodes the
  chunks it finds and recomputes those that fail. Empty chunks are written
  too (``write_empty_chunks``), so "the chunk file exists" means "the chunk
  is done".
- The array's attributes hold a fingerprint of the parameters, the input
  and the package version, and ``"complete": false`` until the last chunk
  is written. ``--resume`` checks the fingerprint, removes stray temporary
  files, and computes and writes only the chunks whose files are missing;
  the coarse samples a missing chunk needs are recomputed (with
  ``--interpolate`` 2 or more, that is the whole coarse grid).

Errors the user can fix (missing input, bad numbers, refusals) are printed
as one line, ``dask-localstats: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shlex
import shutil
import sys
import textwrap
import time
from pathlib import Path

import dask.array as da
import numpy as np
import zarr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import __version__
from ._api import local_histogram, local_percentile
from ._grid import make_grid
from ._io import _ZARR_METADATA, open_source

PROG = "dask-localstats"
# Test-only knob: seconds to sleep before writing each chunk, so that the
# tests can kill a run in the middle (tests/test_cli.py). Not for users.
TEST_DELAY_ENV = "DASK_LOCALSTATS_TEST_DELAY"
RECORD = "dask_localstats"
OME_VERSION = "0.5"

try:  # recent zarr renames whole chunk files into place (zarr-python #3412)
    from zarr.storage._local import _atomic_write  # noqa: F401

    ATOMIC_CHUNKS = True
except ImportError:  # pragma: no cover - older zarr: check chunks on --resume
    ATOMIC_CHUNKS = False


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _add_geometry(parser, interpolate, dtype):
    parser.add_argument("input", metavar="IN", help="the image: see INPUTS below")
    parser.add_argument("output", metavar="OUT", help="the zarr store to write")
    parser.add_argument(
        "--selem",
        nargs="+",
        type=int,
        required=True,
        metavar="E",
        help="window extent per axis, in voxels (one value: the same on every axis)",
    )
    parser.add_argument(
        "--spacing",
        nargs="+",
        type=int,
        metavar="H",
        help="distance between window centers per axis (default: the extent)",
    )
    parser.add_argument(
        "--step",
        nargs="+",
        type=int,
        metavar="D",
        help="take every D-th voxel of a window per axis (default: 1, all)",
    )
    resample = parser.add_mutually_exclusive_group()
    resample.add_argument(
        "--interpolate",
        type=int,
        default=interpolate,
        metavar="K",
        help="B-spline order 0..5 of the resampling to full resolution "
        f"(0 nearest, 1 linear; default: {interpolate})",
    )
    resample.add_argument(
        "--coarse",
        action="store_true",
        help="write the coarse grid, one value per window center"
        + (" (the default)" if interpolate is None else ""),
    )
    parser.add_argument(
        "--align",
        choices=("corners", "centers"),
        default="corners",
        help="'corners' (ClearMap) stretches the coarse grid over the image; "
        "'centers' puts each sample on its window center (default: corners)",
    )
    parser.add_argument("--dtype", help=f"dtype of the result (default: {dtype})")
    parser.add_argument(
        "--mask",
        metavar="MASK",
        help="only voxels where MASK (same shape as IN, any input kind) is "
        "nonzero are used",
    )


def _add_common(parser):
    group = parser.add_argument_group("input and output")
    group.add_argument(
        "--level",
        type=int,
        default=0,
        help="resolution level of an OME-Zarr image or pyramidal TIFF (default: 0)",
    )
    group.add_argument(
        "--ome",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write OUT as an OME-Zarr 0.5 image (default: when IN is OME-Zarr)",
    )
    existing = group.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (only a zarr store or an empty folder)",
    )
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run into OUT, writing only missing chunks",
    )
    run = parser.add_argument_group("computing")
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on this dask.distributed scheduler (OUT and IN must be "
        "reachable from its workers)",
    )
    where.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="start a local dask.distributed cluster of N worker processes",
    )
    run.add_argument(
        "--memory-limit",
        metavar="BYTES",
        help="memory limit per worker with --workers, e.g. 4GB (default: auto)",
    )
    run.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar or summary"
    )


INPUTS = """\
INPUTS (all read lazily, never loaded whole):
  a zarr v2 or v3 array, a zarr group holding one array, an OME-Zarr image
  (level 0 unless --level), a multi-page TIFF file, or a folder or glob of
  2-D TIFF slices (quote the glob: 'stack/Z*.tif'), stacked in natural order.
"""


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
    formatter = argparse.RawDescriptionHelpFormatter

    percentile = commands.add_parser(
        "percentile",
        help="local percentiles (background estimation and removal)",
        description=textwrap.fill(
            "Local percentiles of IN on a grid of windows, resampled to full "
            "resolution (or the coarse grid with --coarse), written to OUT. "
            "With --subtract, OUT is IN minus that background."
        ),
        epilog=INPUTS,
        formatter_class=formatter,
    )
    _add_geometry(percentile, interpolate=1, dtype="IN's")
    percentile.add_argument(
        "--percentile",
        nargs="+",
        type=float,
        required=True,
        metavar="P",
        help="fraction(s) in [0, 1]; several add a last axis (first with --ome)",
    )
    percentile.add_argument(
        "--subtract",
        action="store_true",
        help="write IN - background (background in float), rounded and clipped "
        "to the range of IN's dtype (or --dtype)",
    )
    _add_common(percentile)

    histogram = commands.add_parser(
        "histogram",
        help="local histograms of an integer image",
        description=textwrap.fill(
            "Counts of each value 0 .. MAX_BIN-1 in every window of IN (the "
            "coarse grid unless --interpolate), written to OUT with a last axis "
            "of length MAX_BIN (the first axis with --ome)."
        ),
        epilog=INPUTS,
        formatter_class=formatter,
    )
    _add_geometry(histogram, interpolate=None, dtype="int64")
    histogram.add_argument(
        "--max-bin",
        type=int,
        default=4096,
        help="number of bins; a value outside [0, MAX_BIN) is an error (default: 4096)",
    )
    _add_common(histogram)
    return parser


# --- paths ----------------------------------------------------------------


def _is_url(path):
    return "://" in os.fspath(path)


def _local(path):
    """Absolute path of a local input (globs included); URLs as they are."""
    return os.fspath(path) if _is_url(path) else os.path.abspath(os.fspath(path))


def _roots(path, array):
    """Local paths holding the data of an opened input, for the refusals."""
    if _is_url(path):
        return []
    files = getattr(array, "files", None)  # TIFF stacks and slices
    if files is not None:
        return [Path(os.path.realpath(f)) for f in files]
    return [Path(os.path.realpath(path))]


def _check_not_input(out, inputs):
    """Refuse an OUT that is, is inside, or contains an input."""
    out_real = Path(os.path.realpath(out))
    for label, roots in inputs:
        for root in roots:
            if out_real == root or out_real.is_relative_to(root):
                msg = f"OUT {out!r} is {label} or inside it; refusing to write there"
                raise ValueError(msg)
            if root.is_relative_to(out_real):
                msg = f"OUT {out!r} holds {label} ({root}); refusing to write there"
                raise ValueError(msg)


def _is_zarr_store(path):
    return any((path / name).exists() for name in _ZARR_METADATA)


def _check_output(out, overwrite):
    """Refuse an existing OUT that may not be replaced; True if it is to go."""
    path = Path(out)
    if not path.exists() and not path.is_symlink():
        return False
    if not overwrite:
        msg = (
            f"OUT {out!r} exists; use --overwrite to replace it, or --resume "
            "to continue an interrupted run"
        )
        raise ValueError(msg)
    if not path.is_dir() or path.is_symlink():
        msg = (
            f"OUT {out!r} is not a folder; refusing to replace it even with --overwrite"
        )
        raise ValueError(msg)
    if not _is_zarr_store(path) and any(path.iterdir()):
        msg = (
            f"OUT {out!r} is a folder but not a zarr store; refusing to delete "
            "it even with --overwrite"
        )
        raise ValueError(msg)
    return True


# --- OME-Zarr metadata ------------------------------------------------------

_DEFAULT_AXES = {
    2: "yx",
    3: "zyx",
    4: "czyx",
    5: "tczyx",
}
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


def _transforms(transforms, ndim):
    """Scale and translation of a list of OME coordinate transformations."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for transform in transforms or []:
        if transform.get("type") == "scale" and "scale" in transform:
            scale = scale * np.asarray(transform["scale"], float)
        elif transform.get("type") == "translation" and "translation" in transform:
            translation = translation + np.asarray(transform["translation"], float)
    return scale, translation


def _ome_input(path, level, ndim):
    """``{"axes", "scale", "translation"}`` of an OME-Zarr IN, else None."""
    try:
        group = zarr.open_group(path, mode="r")
    except Exception:  # not a group (an array, TIFF or anything else)
        return None
    attrs = group.attrs.asdict()
    multiscales = attrs.get("ome", attrs).get("multiscales")
    if not multiscales:
        return None
    image = multiscales[0]
    axes = [a if isinstance(a, dict) else {"name": a} for a in image.get("axes", [])]
    if len(axes) != ndim:
        axes = _default_axes(ndim)
    dataset = image["datasets"][level]
    scale, translation = _transforms(dataset.get("coordinateTransformations"), ndim)
    outer_scale, outer = _transforms(image.get("coordinateTransformations"), ndim)
    return {
        "axes": axes,
        "scale": scale * outer_scale,
        "translation": translation * outer_scale + outer,
    }


def _default_axes(ndim):
    if ndim not in _DEFAULT_AXES:
        msg = f"--ome: OME-Zarr images have 2 to 5 dimensions, IN has {ndim}"
        raise ValueError(msg)
    return [{"name": a, "type": _AXIS_TYPES[a]} for a in _DEFAULT_AXES[ndim]]


def _ome_layout(meta, ndim, grid, coarse, extra):
    """Axes, scale, translation of OUT and where the statistic axis goes.

    `extra` is ``(name, length)`` of the statistic's trailing axis, or None.
    OME-Zarr wants a channel axis before the spatial ones: the trailing axis
    moves there (after a time axis). Returns ``(axes, scale, translation,
    position)`` with `position` the axis index of the statistic, or None.
    """
    if meta is None:
        meta = {
            "axes": _default_axes(ndim),
            "scale": np.ones(ndim),
            "translation": np.zeros(ndim),
        }
    axes = [dict(a) for a in meta["axes"]]
    scale, translation = meta["scale"], meta["translation"]
    if coarse:
        translation = translation + np.asarray(grid.first) * scale
        scale = scale * np.asarray(grid.spacing)
    scale, translation = list(map(float, scale)), list(map(float, translation))
    if extra is None:
        return axes, scale, translation, None
    name, _ = extra
    if len(axes) >= 5 or any(a.get("type") not in ("space", "time") for a in axes):
        names = [a["name"] for a in axes]
        msg = (
            f"--ome: OUT would need a '{name}' axis besides IN's axes {names}, "
            "which OME-Zarr 0.5 does not allow; give one value, or use --no-ome"
        )
        raise ValueError(msg)
    position = sum(a.get("type") == "time" for a in axes)
    axes.insert(position, {"name": name, "type": "channel"})
    scale.insert(position, 1.0)
    translation.insert(position, 0.0)
    return axes, scale, translation, position


def _ome_attrs(axes, scale, translation, name):
    return {
        "version": OME_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": axes,
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": scale},
                            {"type": "translation", "translation": translation},
                        ],
                    }
                ],
            }
        ],
    }


# --- building the result ----------------------------------------------------


def _dtype(value):
    if value is None:
        return None
    try:
        return np.dtype(value)
    except TypeError:
        msg = f"--dtype must be a NumPy dtype such as uint16 or float32, got {value!r}"
        raise ValueError(msg) from None


def _sizes(values):
    """A CLI list of sizes: one value stands for every axis."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _background_dtype(dtype):
    """Float type that holds a percentile of `dtype` values exactly enough."""
    small = dtype.kind in "iub" and dtype.itemsize <= 2
    return np.dtype(np.float32 if small or dtype == np.float32 else np.float64)


def _subtract(source, background, name, dtype):
    """``source - background`` rounded and clipped to `dtype`, lazily."""
    if dtype.kind not in "iuf":
        msg = f"--subtract needs a numeric output dtype, got {dtype}"
        raise ValueError(msg)
    image = da.from_array(source, chunks=background.chunks, name=name, asarray=True)
    difference = image.astype(np.float64) - background.astype(np.float64)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        difference = da.clip(da.rint(difference), info.min, info.max)
    return difference.astype(dtype)


def _regular(array):
    """`array` rechunked, if needed, to chunks of one size (the last smaller)."""
    sizes = tuple(c[0] for c in array.chunks)
    if array.chunks != da.core.normalize_chunks(sizes, array.shape):
        array = array.rechunk(sizes)
    return array


def _describe(path, array):
    if array is None:
        return None
    chunks = getattr(array, "chunks", None)
    if chunks is not None and chunks and isinstance(chunks[0], tuple):
        chunks = [c[0] for c in chunks]
    return {
        "path": path,
        "shape": list(array.shape),
        "dtype": np.dtype(array.dtype).str,
        "chunks": None if chunks is None else [int(c) for c in chunks],
    }


def _statistic(args, source, in_path, dtype, common):
    """The lazy result of the command, its trailing axis and its parameters.

    Returns ``(result, extra, parameters)``: `extra` is ``(name, length)``
    of the statistic's trailing axis, or None.
    """
    if args.command == "histogram":
        result = local_histogram(source, args.max_bin, dtype=dtype, **common)
        return result, ("bin", args.max_bin), {"max_bin": args.max_bin}
    several = len(args.percentile) > 1
    percentile = args.percentile if several else args.percentile[0]
    parameters = {"percentile": percentile, "subtract": args.subtract}
    extra = ("percentile", len(percentile)) if several else None
    if not args.subtract:
        result = local_percentile(source, percentile, dtype=dtype, **common)
        return result, extra, parameters
    if common["interpolate"] is None:
        msg = "--subtract needs the full-resolution background; drop --coarse"
        raise ValueError(msg)
    if several:
        msg = f"--subtract takes one --percentile, got {args.percentile}"
        raise ValueError(msg)
    background_dtype = _background_dtype(np.dtype(source.dtype))
    background = local_percentile(source, percentile, dtype=background_dtype, **common)
    name = "localstats-input-" + tokenize(in_path, _describe(in_path, source))
    dtype = np.dtype(source.dtype) if dtype is None else dtype
    return _subtract(source, background, name, dtype), None, parameters


def _plan(args):
    """Open the inputs and build the lazy result; nothing is written.

    Returns a dict with the result (dask array), the output's layout and
    the record to store in its attributes.
    """
    in_path = _local(args.input)
    source, _ = open_source(in_path, "IN", level=args.level)
    if source.ndim == 0:
        msg = f"IN must be an image, got shape {source.shape}"
        raise ValueError(msg)
    mask = mask_path = None
    if args.mask is not None:
        mask_path = _local(args.mask)
        mask, _ = open_source(mask_path, "--mask")
    inputs = [("IN", _roots(in_path, source))]
    if mask is not None:
        inputs.append(("MASK", _roots(mask_path, mask)))
    _check_not_input(args.output, inputs)

    interpolate = None if args.coarse else args.interpolate
    selem, spacing, step = _sizes(args.selem), _sizes(args.spacing), _sizes(args.step)
    dtype = _dtype(args.dtype)
    common = dict(
        selem=selem,
        spacing=spacing,
        step=step,
        interpolate=interpolate,
        mask=mask,
        align=args.align,
    )
    parameters = {
        "selem": args.selem,
        "spacing": args.spacing,
        "step": args.step,
        "interpolate": interpolate,
        "align": args.align,
        "level": args.level,
    }
    result, extra, more = _statistic(args, source, in_path, dtype, common)
    parameters.update(more)
    grid = make_grid(source.shape, selem, spacing, step)
    parameters["dtype"] = result.dtype.str

    ome_in = None
    if isinstance(source, zarr.Array):
        ome_in = _ome_input(in_path, args.level, source.ndim)
    ome = ome_in is not None if args.ome is None else args.ome
    parameters["ome"] = ome
    attrs = None
    if ome:
        axes, scale, translation, position = _ome_layout(
            ome_in, source.ndim, grid, interpolate is None, extra
        )
        if position is not None:
            result = da.moveaxis(result, -1, position)
        name = Path(args.output).name
        attrs = _ome_attrs(axes, scale, translation, name)
    result = _regular(result)

    fingerprinted = {
        "version": __version__,
        "statistic": args.command,
        "parameters": parameters,
        "input": _describe(in_path, source),
        "mask": _describe(mask_path, mask),
    }
    fingerprinted = json.loads(json.dumps(fingerprinted))  # tuples to lists
    fingerprint = hashlib.sha256(
        json.dumps(fingerprinted, sort_keys=True).encode()
    ).hexdigest()
    record = {
        **fingerprinted,
        "command": shlex.join([PROG, *args.argv]),
        "grid": {
            "first": list(grid.first),
            "spacing": list(grid.spacing),
            "count": list(grid.counts),
        },
        "fingerprint": fingerprint,
        "complete": False,
    }
    return {
        "result": result,
        "ome": attrs,
        "axes": None if attrs is None else [a["name"] for a in axes],
        "record": json.loads(json.dumps(record)),
    }


# --- writing ------------------------------------------------------------------


def _write_chunk(target, block, region):
    """Write one whole chunk; a task of the write graph."""
    delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)
    target[region] = block
    return np.ones(1, dtype=bool)


def _chunk_dir(target):
    return Path(target.store_path.store.root) / target.store_path.path


def _blocks(result):
    return list(itertools.product(*(range(len(c)) for c in result.chunks)))


def _regions(result):
    bounds = [np.cumsum((0, *c)) for c in result.chunks]
    for index in _blocks(result):
        yield (
            index,
            tuple(
                slice(int(b[i]), int(b[i + 1]))
                for b, i in zip(bounds, index, strict=True)
            ),
        )


def _written(target, blocks, check=not ATOMIC_CHUNKS):
    """The blocks whose chunk files exist (and, with `check`, decode).

    Stray temporary files of interrupted writes are removed first. With
    `check` (zarr versions whose local store writes in place), a chunk that
    does not decode is deleted and counted as missing.
    """
    root = _chunk_dir(target)
    for partial in root.rglob("*.partial"):
        partial.unlink(missing_ok=True)
    done = set()
    for index in blocks:
        path = root / target.metadata.encode_chunk_key(index)
        if not path.is_file():
            continue
        if check:
            try:
                target.get_block_selection(index)
            except Exception:  # a torn chunk: recompute it
                path.unlink()
                continue
        done.add(index)
    return done


def _write_graph(result, target, todo):
    """A dask array whose computation writes the chunks `todo` of `result`."""
    name = "localstats-write-" + tokenize(result.name, str(_chunk_dir(target)), todo)
    layer = {
        (name, i): (_write_chunk, target, (result.name, *index), region)
        for i, (index, region) in enumerate(todo)
    }
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[result])
    chunks = ((1,) * len(todo),)
    return da.Array(graph, name, chunks, dtype=bool, meta=np.empty((0,), bool))


def _open_output(out, plan):
    """The output array of a previous run at `out`, checked for --resume."""
    if not Path(out).exists():
        msg = f"--resume: OUT {out!r} does not exist; nothing to resume (run without --resume)"
        raise ValueError(msg)
    try:
        node = zarr.open(store=os.path.abspath(out), mode="r+")
        target = node["0"] if isinstance(node, zarr.Group) else node
        previous = target.attrs[RECORD]
    except Exception:  # anything unreadable: not ours to continue
        msg = (
            f"--resume: OUT {out!r} is not an output of {PROG}; "
            "use --overwrite to replace it"
        )
        raise ValueError(msg) from None
    record = plan["record"]
    if previous.get("fingerprint") != record["fingerprint"]:
        changes = _differences(previous, record)
        msg = (
            f"--resume: OUT {out!r} was written with other parameters or input "
            f"({changes}); rerun the same command, or use --overwrite to start again"
        )
        raise ValueError(msg)
    if previous.get("complete"):
        msg = (
            f"--resume: OUT {out!r} is complete; nothing to resume "
            "(use --overwrite to compute it again)"
        )
        raise ValueError(msg)
    result = plan["result"]
    chunks = tuple(c[0] for c in result.chunks)
    if (target.shape, target.dtype, target.chunks) != (
        result.shape,
        result.dtype,
        chunks,
    ):
        msg = (
            f"--resume: OUT {out!r} has another shape, dtype or chunks; use --overwrite"
        )
        raise ValueError(msg)
    return node, target


def _differences(previous, record):
    """Short text of what differs between two records' fingerprinted parts."""
    changes = []
    for key in ("version", "statistic", "parameters", "input", "mask"):
        old, new = previous.get(key), record.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            for k in sorted(set(old) | set(new)):
                if old.get(k) != new.get(k):
                    changes.append(
                        f"{key} {k}: {old.get(k)!r} then, {new.get(k)!r} now"
                    )
        elif old != new:
            changes.append(f"{key}: {old!r} then, {new!r} now")
    return "; ".join(changes) or "fingerprint differs"


def _create_output(out, plan):
    result, record = plan["result"], plan["record"]
    path = os.path.abspath(out)
    options = dict(
        shape=result.shape,
        chunks=tuple(c[0] for c in result.chunks),
        dtype=result.dtype,
        compressors="auto",
        fill_value=0,
        attributes={RECORD: record},
        config={"write_empty_chunks": True},
    )
    if plan["ome"] is None:
        target = zarr.create_array(path, zarr_format=3, **options)
        return target, target
    group = zarr.create_group(
        path, zarr_format=3, attributes={"ome": plan["ome"], RECORD: record}
    )
    target = group.create_array("0", dimension_names=plan["axes"], **options)
    return group, target


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
    options = {"memory_limit": args.memory_limit or "auto"}
    with (
        LocalCluster(
            n_workers=args.workers,
            processes=True,
            dashboard_address=":0",
            **options,
        ) as cluster,
        Client(cluster) as client,
    ):
        if not args.quiet:
            print(f"{PROG}: dashboard at {client.dashboard_link}", file=sys.stderr)
        yield client


def _compute(writes, client, quiet):
    if client is None:
        from dask.diagnostics import ProgressBar

        bar = contextlib.nullcontext() if quiet else ProgressBar(1.0, out=sys.stderr)
        with bar:
            writes.compute(scheduler="threads")
        return
    future = client.compute(writes)
    if not quiet:
        from distributed import progress

        with contextlib.redirect_stdout(sys.stderr):
            progress(future)
        print(file=sys.stderr)
    future.result()


def _check_run_options(args):
    if args.workers is not None and args.workers < 1:
        msg = f"--workers must be a positive number of processes, got {args.workers}"
        raise ValueError(msg)
    if args.memory_limit is not None:
        if args.workers is None:
            msg = "--memory-limit applies to --workers"
            raise ValueError(msg)
        if args.memory_limit != "auto":
            from dask.utils import parse_bytes

            try:
                parse_bytes(args.memory_limit)
            except (ValueError, TypeError):
                msg = (
                    "--memory-limit must be a size such as 4GB or 'auto', "
                    f"got {args.memory_limit!r}"
                )
                raise ValueError(msg) from None
    if _is_url(args.output):
        msg = f"OUT must be a local path, got {args.output!r}"
        raise ValueError(msg)


def run(args):
    """Run a parsed command; see :func:`main`.

    Parameters
    ----------
    args : argparse.Namespace
        From :func:`build_parser`, with ``args.argv`` the raw arguments.
    """
    _check_run_options(args)
    plan = _plan(args)
    out = args.output
    if args.resume:
        node, target = _open_output(out, plan)
    else:
        replace = _check_output(out, args.overwrite)
    result = plan["result"]
    regions = list(_regions(result))
    with _client(args) as client:  # a cluster that fails to start touches nothing
        if not args.resume:
            if replace:
                shutil.rmtree(out)
            node, target = _create_output(out, plan)
        done = _written(target, [i for i, _ in regions]) if args.resume else set()
        todo = [(index, region) for index, region in regions if index not in done]
        if todo:
            try:
                _compute(_write_graph(result, target, todo), client, args.quiet)
            except (ValueError, TypeError, OSError) as error:
                msg = f"{error}; OUT {out!r} is left incomplete (see --resume)"
                raise ValueError(msg) from error
    record = {**plan["record"], "complete": True}
    target.attrs[RECORD] = record
    if node is not target:
        node.attrs[RECORD] = record
    if not args.quiet:
        print(
            f"{PROG}: wrote {out} (shape {result.shape}, {result.dtype}): "
            f"{len(todo)} of {len(regions)} chunks computed",
            file=sys.stderr,
        )


def main(argv=None):
    """Entry point of the ``dask-localstats`` console script.

    Parameters
    ----------
    argv : list of str or None
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success, 2 for a bad argument, input or refusal,
        130 when interrupted.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        run(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
