"""The ``dask-localstats`` command, driven as a subprocess on small stores.

Independent runs are started together (:func:`run_all`) to keep the file
fast: most of a run's time is importing dask and zarr.
"""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import reference
import tifffile
import zarr
from dask.base import tokenize
from slowly import kill_when
from strategies import write_zarr

import dask_localstats as dls
from dask_localstats._cli import main
from dask_localstats._grid import make_grid
from dask_localstats._lock import LOCK

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GEOMETRY = dict(selem=(6, 8, 5), spacing=(4, 5, 5))
CLI_GEOMETRY = ["--selem", "6", "8", "5", "--spacing", "4", "5", "5"]


SLOWLY = Path(__file__).resolve().parent / "slowly.py"


def command(*args):
    return [sys.executable, "-m", "dask_localstats", *map(str, args)]


def slow_command(delay, *args):
    """The command, with each chunk write of zarr delayed (tests/slowly.py)."""
    return [sys.executable, SLOWLY, str(delay), *map(str, args)]


def run_all(*commands, env=None, cwd=None):
    """Run commands at once; return their CompletedProcess, in order."""
    env = {**os.environ, **(env or {})}
    procs = [
        subprocess.Popen(
            c,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        for c in commands
    ]
    done = []
    for c, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(c, proc.returncode, out, err))
    return done


def run(*args, **kwargs):
    return run_all(command(*args), **kwargs)[0]


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "Warning" not in result.stderr, result.stderr
    return result


def refused(result, match):
    """One line on stderr, matching `match`, exit code 2, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dask-localstats: error: "), lines
    assert "Traceback" not in result.stderr
    assert match in lines[0], (match, lines[0])


def record(path):
    node = zarr.open(path, mode="r")
    array = node["0"] if isinstance(node, zarr.Group) else node
    return array.attrs["dask_localstats"]


def chunk_files(path):
    """``{path: (inode, mtime)}`` of the files of a store but its metadata."""
    files = {}
    for p in sorted(Path(path).rglob("*")):
        try:  # a run may be renaming files meanwhile
            if p.is_file() and p.name not in ("zarr.json", LOCK):
                files[p] = (p.stat().st_ino, p.stat().st_mtime_ns)
        except FileNotFoundError:
            continue
    return files


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, (12, 30, 25)).astype(np.uint16)


def test_percentile_matches_the_library_and_records_the_run(tmp_path, image):
    v2 = write_zarr(tmp_path / "v2.zarr", image, zarr_format=2)
    v3 = write_zarr(tmp_path / "v3.zarr", image)
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    write_zarr(tmp_path / "group.zarr" / "only", image)  # a group of one array
    full, coarse = tmp_path / "full.zarr", tmp_path / "coarse.zarr"
    args = ["--percentile", "0.1", "0.5", "--coarse", "--step", "2", "1", "1"]
    results = run_all(
        command("percentile", v2, full, "--percentile", "0.2", *CLI_GEOMETRY),
        command("percentile", v3, coarse, *args, *CLI_GEOMETRY, "--align", "centers"),
        command("percentile", tmp_path / "group.zarr", tmp_path / "g.zarr",
                "--percentile", "0.2", *CLI_GEOMETRY),
    )  # fmt: skip
    for result in results:
        ok(result)
    out = zarr.open_array(full, mode="r")
    expected = dls.local_percentile(image, 0.2, **GEOMETRY)
    np.testing.assert_array_equal(out[:], expected, strict=True)
    got = zarr.open_array(tmp_path / "g.zarr", mode="r")[:]
    np.testing.assert_array_equal(got, expected, strict=True)
    assert out.metadata.zarr_format == 3
    assert out.compressors[0].cname.value == "zstd"  # blosc-zstd, by default
    assert out.chunks == (4, 8, 9)  # the input's
    assert out.attrs["command"].startswith("dask-localstats percentile ")
    rec = record(full)
    assert rec["version"] == dls.__version__
    assert rec["complete"] is True
    assert rec["provenance"]["parameters"]["percentile"] == 0.2
    assert rec["provenance"]["parameters"]["selem"] == [6, 8, 5]
    assert rec["provenance"]["input"]["path"] == str(v2)
    assert set(rec["inputs"]) == {"IN"}
    assert rec["inputs"]["IN"]["entries"] == len(chunk_files(v2))  # v2: .zarray
    grid = make_grid(image.shape, (6, 8, 5), (4, 5, 5))
    assert rec["provenance"]["grid"] == {
        "first": list(grid.first),
        "spacing": [4, 5, 5],
        "count": list(grid.counts),
    }
    assert "1 of" not in results[0].stderr  # every chunk was computed

    expected = dls.local_percentile(
        image, [0.1, 0.5], step=(2, 1, 1), interpolate=None, **GEOMETRY
    )
    got = zarr.open_array(coarse, mode="r")[:]
    np.testing.assert_array_equal(got, expected, strict=True)
    assert record(coarse)["provenance"]["parameters"]["interpolate"] is None


def test_subtract_is_clipped_to_the_input_dtype(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    ok(run("percentile", source, tmp_path / "out.zarr", "--percentile", "0.6",
           "--subtract", "--interpolate", "3", "--batch-size", "30",
           *CLI_GEOMETRY))  # fmt: skip
    background = dls.local_percentile(
        image, 0.6, interpolate=3, dtype=np.float32, **GEOMETRY
    )
    expected = reference.subtract_background(image, background)
    assert (image < background - 0.5).any()  # the clipping matters
    got = zarr.open_array(tmp_path / "out.zarr", mode="r")[:]
    np.testing.assert_array_equal(got, expected, strict=True)


def test_histogram_and_masks(tmp_path, image):
    image = image % 64
    source = write_zarr(tmp_path / "in.zarr", image)
    mask = image > 20
    write_zarr(tmp_path / "mask.zarr", mask, chunks=(5, 5, 5))
    tifffile.imwrite(tmp_path / "mask.tif", mask.astype(np.uint8))
    hist, perc = tmp_path / "hist.zarr", tmp_path / "perc.zarr"
    results = run_all(
        command("histogram", source, hist, "--max-bin", "64", "--mask",
                tmp_path / "mask.zarr", "--selem", "6", "10", "5"),
        command("percentile", source, perc, "--percentile", "0.5", "--mask",
                tmp_path / "mask.tif", "--dtype", "float32", *CLI_GEOMETRY),
    )  # fmt: skip
    for result in results:
        ok(result)
    expected = dls.local_histogram(image, 64, selem=(6, 10, 5), mask=mask)
    got = zarr.open_array(hist, mode="r")[:]
    np.testing.assert_array_equal(got, expected, strict=True)
    expected = dls.local_percentile(image, 0.5, mask=mask, dtype=np.float32, **GEOMETRY)
    got = zarr.open_array(perc, mode="r")[:]
    np.testing.assert_array_equal(got, expected, strict=True)


def test_tiff_stack_folder_and_glob(tmp_path, image):
    tifffile.imwrite(tmp_path / "stack.tif", image)
    (tmp_path / "slices").mkdir()
    for z, plane in enumerate(image):
        tifffile.imwrite(tmp_path / "slices" / f"Z{z:04d}.tif", plane)
    args = ["--percentile", "0.3", *CLI_GEOMETRY]
    results = run_all(
        command("percentile", tmp_path / "stack.tif", tmp_path / "a.zarr", *args),
        command("percentile", tmp_path / "slices", tmp_path / "b.zarr", *args),
        command("percentile", "slices/Z*.tif", "c.zarr", *args, "--subtract"),
        cwd=tmp_path,
    )
    for result in results:
        ok(result)
    expected = dls.local_percentile(image, 0.3, **GEOMETRY)
    for name in "ab":
        got = zarr.open_array(tmp_path / f"{name}.zarr", mode="r")[:]
        np.testing.assert_array_equal(got, expected, strict=True)
    # slices: chunks of whole planes, several deep (not one file a slice)
    assert zarr.open_array(tmp_path / "b.zarr").chunks == image.shape
    background = dls.local_percentile(image, 0.3, dtype=np.float32, **GEOMETRY)
    subtracted = reference.subtract_background(image, background)
    got = zarr.open_array(tmp_path / "c.zarr", mode="r")[:]
    np.testing.assert_array_equal(got, subtracted, strict=True)
    assert record(tmp_path / "c.zarr")["provenance"]["input"]["path"] == "slices/Z*.tif"
    assert record(tmp_path / "c.zarr")["inputs"]["IN"]["entries"] == len(image)


def test_tiff_sources_are_small_lazy_and_sliceable(tmp_path, image):
    (tmp_path / "slices").mkdir()
    for z, plane in enumerate(image):  # natural order: Z2 before Z10
        tifffile.imwrite(tmp_path / "slices" / f"Z{z}.tif", plane)
    tifffile.imwrite(tmp_path / "stack.tif", image, tile=(16, 16))
    for path in [tmp_path / "slices", tmp_path / "stack.tif"]:
        source = dls.open_source(path)
        assert not isinstance(source, np.ndarray)
        assert (source.shape, source.dtype, source.ndim) == (image.shape, "u2", 3)
        assert len(pickle.dumps(source)) < 2000  # names, no data
        assert tokenize(source) == tokenize(pickle.loads(pickle.dumps(source)))
        for key in [np.s_[2:5, 3:9, 1:4], np.s_[..., 1], np.s_[3], np.s_[4:4]]:
            np.testing.assert_array_equal(source[key], image[key], strict=True)
    tifffile.imwrite(tmp_path / "slices" / "Z99.tif", image[0, :5])
    source = dls.open_source(tmp_path / "slices")
    with pytest.raises(ValueError, match=r"Z99\.tif' has shape \(5, 25\)"):
        source[-1]
    with pytest.raises(ValueError, match=r"slices must be 2-D images"):
        dls.open_source(tmp_path / "stack.tif*")
    with pytest.raises(ValueError, match=r"`level` must be in \[0, 1\)"):
        dls.open_source(tmp_path / "stack.tif", level=1)


def write_ome(path, image, version="0.5"):
    """A two-level OME-Zarr image with physical scale and translation."""
    group = zarr.open_group(path, mode="w")
    group.create_array("0", shape=image.shape, dtype=image.dtype)[:] = image
    half = image[::2, ::2, ::2]
    group.create_array("1", shape=half.shape, dtype=half.dtype)[:] = half
    datasets = [
        {
            "path": str(level),
            "coordinateTransformations": [
                {"type": "scale", "scale": [2.0 * 2**level, 0.5 * 2**level, 0.5]},
                {"type": "translation", "translation": [10.0 + level, 0.0, 0.0]},
            ],
        }
        for level in (0, 1)
    ]
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    multiscales = [{"version": version, "axes": axes, "datasets": datasets}]
    if version == "0.5":
        group.attrs["ome"] = {"version": version, "multiscales": multiscales}
    else:
        group.attrs["multiscales"] = multiscales
    return path


def ome_image(path):
    group = zarr.open_group(path, mode="r")
    multiscale = group.attrs["ome"]["multiscales"][0]
    assert group.attrs["ome"]["version"] == "0.5"
    (dataset,) = multiscale["datasets"]
    scale, translation = dataset["coordinateTransformations"]
    axes = [a["name"] for a in multiscale["axes"]]
    assert list(group[dataset["path"]].metadata.dimension_names) == axes
    return group[dataset["path"]][:], axes, scale["scale"], translation["translation"]


def test_ome_zarr_in_gives_ome_zarr_out(tmp_path, image):
    v05 = write_ome(tmp_path / "in05.zarr", image)
    v04 = write_ome(tmp_path / "in04.zarr", image, version="0.4")
    results = run_all(
        command("percentile", v05, tmp_path / "coarse.zarr", "--percentile", "0.5",
                "--coarse", "--level", "1", "--selem", "4", "6", "4",
                "--spacing", "2", "4", "3"),
        command("percentile", v04, tmp_path / "full.zarr", "--percentile", "0.5",
                *CLI_GEOMETRY),
        command("histogram", image_path := write_zarr(tmp_path / "p.zarr", image),
                tmp_path / "hist.zarr", "--max-bin", "1000", "--ome",
                *CLI_GEOMETRY),
        command("percentile", v05, tmp_path / "plain.zarr", "--percentile", "0.5",
                "--no-ome", *CLI_GEOMETRY),
    )  # fmt: skip
    for result in results:
        ok(result)
    assert image_path.exists()

    half = image[::2, ::2, ::2]
    data, axes, scale, translation = ome_image(tmp_path / "coarse.zarr")
    kwargs = dict(selem=(4, 6, 4), spacing=(2, 4, 3), interpolate=None)
    np.testing.assert_array_equal(data, dls.local_percentile(half, 0.5, **kwargs))
    first = make_grid(half.shape, (4, 6, 4), (2, 4, 3)).first
    assert axes == ["z", "y", "x"]
    assert scale == [4.0 * 2, 1.0 * 4, 0.5 * 3]
    assert translation == [11.0 + 4.0 * first[0], first[1] * 1.0, first[2] * 0.5]

    data, axes, scale, translation = ome_image(tmp_path / "full.zarr")
    np.testing.assert_array_equal(data, dls.local_percentile(image, 0.5, **GEOMETRY))
    assert (scale, translation) == ([2.0, 0.5, 0.5], [10.0, 0.0, 0.0])

    # plain input, --ome: unit scale; the bins become the (first) channel axis
    data, axes, scale, translation = ome_image(tmp_path / "hist.zarr")
    expected = dls.local_histogram(image, 1000, **GEOMETRY)
    np.testing.assert_array_equal(data, np.moveaxis(expected, -1, 0), strict=True)
    assert axes == ["bin", "z", "y", "x"]
    assert scale == [1.0, 4.0, 5.0, 5.0]
    grid = make_grid(image.shape, (6, 8, 5), (4, 5, 5))
    assert translation == [0.0, *map(float, grid.first)]

    plain = zarr.open(tmp_path / "plain.zarr", mode="r")
    assert isinstance(plain, zarr.Array)


def test_refusals_leave_everything_untouched(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    tifffile.imwrite(tmp_path / "stack.tif", image)
    done = tmp_path / "done.zarr"
    args = ["--percentile", "0.5", *CLI_GEOMETRY]
    assert main(["percentile", str(source), str(done), *args, "--quiet"]) == 0
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("keep me")
    # an interrupted run: complete is still false
    interrupted = tmp_path / "interrupted.zarr"
    shutil.copytree(done, interrupted)
    z = zarr.open_array(interrupted, mode="r+")
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    ome = write_ome(tmp_path / "ome.zarr", image)
    (tmp_path / "slices").mkdir()
    for z, plane in enumerate(image):
        tifffile.imwrite(tmp_path / "slices" / f"Z{z:03d}.tif", plane)
    foreign = write_zarr(tmp_path / "foreign.zarr", image)
    before = {p: chunk_files(p) for p in (source, done, interrupted, ome, foreign)}
    cases = [
        (["percentile", source, source, *args], "is IN or inside it"),
        (["percentile", ome, ome / "1", *args, "--overwrite"], "is IN or inside it"),
        (["percentile", ome, ome / "new", *args], "is IN or inside it"),
        (["percentile", tmp_path / "slices", tmp_path / "slices" / "out.zarr", *args],
         "is IN or inside it"),
        (["percentile", source, foreign, *args, "--overwrite"],
         "a zarr store that dask_localstats did not write"),
        (["percentile", tmp_path / "stack.tif", tmp_path / "stack.tif", *args],
         "is IN or inside it"),
        (["percentile", source, tmp_path, *args, "--overwrite"], "holds IN"),
        (["percentile", source, done, *args], "exists; pass overwrite=True (--overwrite)"),
        (["percentile", source, tmp_path / "folder", *args, "--overwrite"],
         "holds notes.txt, which is not a zarr entry"),
        (["percentile", source, tmp_path / "new.zarr", *args, "--resume"],
         "does not exist"),
        (["percentile", source, done, *args, "--resume"], "is complete"),
        (["percentile", source, interrupted, "--percentile", "0.4",
          *CLI_GEOMETRY, "--resume"], "percentile: 0.5 then, 0.4 now"),
        (["percentile", source, interrupted, *args, "--coarse", "--resume"],
         "parameters interpolate: 1 then, None now"),
        (["percentile", source, interrupted, *args, "--compression", "zstd:3",
          "--resume"], "output compressors: [{'name': 'blosc'"),
        (["percentile", source, interrupted, *args, "--ome", "--resume"],
         "output ome: None then, {"),
        (["percentile", source, done, *args, "--mask", done, "--overwrite"],
         "is MASK or inside it"),
    ]  # fmt: skip
    results = run_all(*(command(*c) for c, _ in cases))
    for result, (_, match) in zip(results, cases, strict=True):
        refused(result, match)
    assert before == {
        p: chunk_files(p) for p in (source, done, interrupted, ome, foreign)
    }
    assert (tmp_path / "folder" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "new.zarr").exists()
    assert (
        not (ome / "new").exists() and not (tmp_path / "slices" / "out.zarr").exists()
    )

    # the same parameters resume: every chunk is there, none is recomputed;
    # and --overwrite replaces a finished output
    resumed, overwritten = run_all(
        command("percentile", source, interrupted, *args, "--resume"),
        command("percentile", source, done, "--percentile", "0.9", *CLI_GEOMETRY,
                "--overwrite", "--quiet"),
    )  # fmt: skip
    assert "0 of 36 chunks computed" in ok(resumed).stderr
    assert record(interrupted)["complete"] is True
    assert before[interrupted] == chunk_files(interrupted)
    ok(overwritten)
    assert record(done)["provenance"]["parameters"]["percentile"] == 0.9


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, image, capsys):
    source = write_zarr(tmp_path / "in.zarr", image)
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "out.zarr"
    p = ["--percentile", "0.5"]
    # as a subprocess: one of each kind the issue names ...
    cases = [
        (["percentile", tmp_path / "missing.zarr", out, *p, "--selem", "4"],
         "no zarr array or group"),
        (["percentile", tmp_path / "notes.txt", out, *p, "--selem", "4"],
         "notes.txt"),
        (["percentile", source, out, *p, "--selem", "4", "4"],
         "one entry per source dimension (3)"),
        (["percentile", source, out, *p, "--selem", "4", "0", "4"], "positive"),
        (["percentile", source, out, *p, "--selem", "four"], "invalid int value"),
        (["histogram", source, tmp_path / "h.zarr", "--max-bin", "10", "--selem",
          "4"], "(command line: --max-bin auto or N, --clip-values); the output"),
    ]  # fmt: skip
    results = run_all(*(command(*c) for c, _ in cases))
    for result, (_, match) in zip(results, cases, strict=True):
        refused(result, match)
    # ... and more, in process (each subprocess costs half a second of imports)
    cases = [
        ([tmp_path / "missing.tif", out, *p, "--selem", "4"], "no such file"),
        (["nothing/*.tif", out, *p, "--selem", "4"], "no file matches"),
        ([source, out, "--percentile", "25", "--selem", "4"], "[0, 1], got 25.0"),
        ([source, out, *p, "--selem", "4", "--spacing", "20"],
         "smaller than `spacing` on axis 0"),
        ([source, out, *p, "--selem", "4", "--interpolate", "7"], "0..5, got 7"),
        ([source, out, *p, "--selem", "4", "--dtype", "uint99"], "--dtype"),
        ([source, out, *p, "--selem", "4", "--level", "1"], "`level`"),
        ([source, out, *p, "--selem", "4", "--workers", "0"], "--workers"),
        ([source, out, *p, "--selem", "4", "--memory-limit", "1GB"],
         "`memory_limit` (--memory-limit) applies to `workers` (--workers)"),
        ([source, out, *p, "--selem", "4", "--workers", "1", "--memory-limit",
          "lots"], "(--memory-limit) must be a size"),
        ([source, out, *p, "--selem", "4", "--threads", "2"],
         "`threads` (--threads) applies to `workers` (--workers)"),
        ([source, out, *p, "--selem", "4", "--scheduler", "tcp://127.0.0.1:9",
          "--threads", "2"], "`threads` (--threads) applies to `workers`"),
        ([source, out, *p, "--selem", "4", "--workers", "1", "--threads", "0"],
         "`threads` (--threads) must be a positive number, got 0"),
        ([source, out, "--percentile", "0.1", "0.2", "--subtract", "--selem", "4"],
         "one --percentile"),
        ([source, out, *p, "--selem", "4", "--subtract", "--coarse"],
         "drop --coarse"),
        ([source, out, *p], "--selem"),
        ([source, out, *p, "--selem", "4", "--batch-size", "0"],
         "`batch_size` must be at least 1 (tasks a batch), got 0"),
        ([source, "s3://bucket/out.zarr", *p, "--selem", "4"], "cannot be reached"),
    ]  # fmt: skip
    for argv, match in cases:
        try:
            code = main(["percentile", *map(str, argv)])
        except SystemExit as exit:  # argparse's errors
            code = exit.code
        err = capsys.readouterr().err
        refused(subprocess.CompletedProcess(argv, code, "", err), match)
    assert not out.exists()


def interrupted_run(tmp_path, seed):
    """A run of 32 chunks killed (SIGKILL) after 4: image, source, OUT, args."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 4000, (8, 32, 32)).astype(np.uint16)
    source = write_zarr(tmp_path / "in.zarr", image, chunks=(4, 8, 8))
    out = tmp_path / "out.zarr"
    args = ["percentile", source, out, "--percentile", "0.3", "--selem", "4", "8",
            "8", "--spacing", "2", "4", "4", "--quiet"]  # fmt: skip
    # one thread, a pause before each of the 32 chunks: slow enough to kill
    env = {**os.environ, "DASK_NUM_WORKERS": "1"}
    proc = subprocess.Popen(slow_command(0.15, *args), env=env, stderr=subprocess.PIPE)
    kill_when(
        proc,
        lambda: len([p for p in chunk_files(out) if ".partial" not in p.name]) >= 4,
    )
    assert proc.returncode == -signal.SIGKILL
    return image, source, out, args


@pytest.mark.thorough
def test_sigkill_then_resume_finishes_without_recomputing(tmp_path):
    image, _, out, args = interrupted_run(tmp_path, 1)
    assert record(out)["complete"] is False
    before = chunk_files(out)
    chunks = {p for p in before if ".partial" not in p.name}
    assert 4 <= len(chunks) < 32

    resumed, fresh = run_all(
        command(*args, "--resume"),
        command(*args[:2], tmp_path / "fresh.zarr", *args[3:]),
    )
    ok(resumed)
    ok(fresh)
    after = chunk_files(out)
    assert all(after[p] == before[p] for p in chunks)  # not rewritten
    assert not any(".partial" in p.name for p in after)
    assert record(out)["complete"] is True
    expected = dls.local_percentile(image, 0.3, selem=(4, 8, 8), spacing=(2, 4, 4))
    np.testing.assert_array_equal(zarr.open_array(out, mode="r")[:], expected)
    # identical to an uninterrupted run, chunk file by chunk file
    for path in after:
        twin = tmp_path / "fresh.zarr" / path.relative_to(out)
        assert path.read_bytes() == twin.read_bytes()
    assert record(out)["fingerprint"] == record(tmp_path / "fresh.zarr")["fingerprint"]


@pytest.mark.thorough
def test_local_cluster(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    out = tmp_path / "out.zarr"
    result = run("percentile", source, out, "--percentile", "0.5", *CLI_GEOMETRY,
                 "--workers", "2", "--memory-limit", "1GB")  # fmt: skip
    assert "dashboard at" in ok(result).stderr
    assert "| background 100% write 100% |" in result.stderr  # the same bar
    expected = dls.local_percentile(image, 0.5, **GEOMETRY)
    np.testing.assert_array_equal(zarr.open_array(out, mode="r")[:], expected)


def test_readme_quick_start(tmp_path):
    example = [sys.executable, EXAMPLES / "make_example.py", "example.zarr"]
    made = run_all(example, cwd=tmp_path)[0]
    assert made.returncode == 0, made.stderr
    result = run("percentile", "example.zarr", "corrected.zarr", "--percentile",
                 "0.1", "--selem", "32", "64", "64", "--spacing", "16", "32", "32",
                 "--subtract", cwd=tmp_path)  # fmt: skip
    ok(result)
    volume = zarr.open_array(tmp_path / "example.zarr", mode="r")
    out = zarr.open_array(tmp_path / "corrected.zarr", mode="r")
    assert (volume.shape, volume.dtype) == ((64, 256, 256), np.uint16)
    assert (out.shape, out.dtype) == (volume.shape, volume.dtype)
    # the background, bright on the left and dim on the right, is gone
    for band in (slice(0, 32), slice(112, 144), slice(224, 256)):
        raw = np.percentile(volume[:, :, band], 10)
        assert raw > 500
        assert np.percentile(out[:, :, band], 10) < 0.1 * raw


def test_console_script_and_help():
    script = shutil.which("dask-localstats")
    if script is None:
        pytest.skip("the console script is not installed")
    result = run_all([script, "--version"], [script, "percentile", "--help"])
    assert result[0].stdout.strip() == dls.__version__
    for option in ["--percentile", "--subtract", "--resume", "--scheduler"]:
        assert option in result[1].stdout


def test_urls_symlinks_and_masks_never_become_the_output(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    mask = write_zarr(tmp_path / "m.zarr", image > 100, chunks=(12, 30, 25))
    (tmp_path / "link.zarr").symlink_to(source)
    thesis = write_zarr(tmp_path / "thesis", image[:2])
    (thesis / "thesis.tex").write_text("four years of work")
    (thesis / "raw").mkdir()
    (thesis / "raw" / "data.bin").write_bytes(b"\x00" * 10)
    args = ["--percentile", "0.5", *CLI_GEOMETRY, "--overwrite"]
    cases = [
        ([f"file://{source}", "in.zarr", *args], "is IN or inside it"),
        (["in.zarr", f"file://{source}/", *args], "is IN or inside it"),
        (["in.zarr", "link.zarr", *args], "is IN or inside it"),
        (["in.zarr", "m.zarr", "--mask", f"file://{mask}", *args],
         "is MASK or inside it"),
        (["in.zarr", "thesis", *args], "which is not a zarr entry"),
    ]  # fmt: skip
    before = chunk_files(tmp_path)
    results = run_all(*(command("percentile", *c) for c, _ in cases), cwd=tmp_path)
    for result, (_, match) in zip(results, cases, strict=True):
        refused(result, match)
    assert chunk_files(tmp_path) == before


@pytest.mark.thorough
def test_resume_refuses_a_changed_input_even_restored(tmp_path):
    image, source, out, args = interrupted_run(tmp_path, 2)
    chunk = source / "c" / "1" / "2" / "3"
    data, info = chunk.read_bytes(), chunk.stat()
    z = zarr.open_array(source, mode="r+")
    z[4:8, 16:24, 24:32] = 1  # the chunk c/1/2/3, rewritten
    before = chunk_files(out)
    refused(run(*args, "--resume"), "IN ")
    refused(run(*args, "--resume"), "modified since: c/1/2/3")
    assert chunk_files(out) == before
    chunk.write_bytes(data)  # restored, modification time included: the
    os.utime(chunk, ns=(info.st_atime_ns, info.st_mtime_ns))  # change time tells
    refused(run(*args, "--resume"), "modified since: c/1/2/3")
    ok(run(*args, "--overwrite"))
    expected = dls.local_percentile(image, 0.3, selem=(4, 8, 8), spacing=(2, 4, 4))
    np.testing.assert_array_equal(zarr.open_array(out)[:], expected, strict=True)


@pytest.mark.thorough
def test_one_writer_at_a_time(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    out = tmp_path / "out.zarr"
    args = ["percentile", source, out, *CLI_GEOMETRY, "--quiet"]
    env = {**os.environ, "DASK_NUM_WORKERS": "1"}
    first = subprocess.Popen(
        slow_command(0.1, *args, "--percentile", "0.2"),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out / LOCK).exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    second = run(*args, "--percentile", "0.9", "--overwrite")
    refused(second, f"is being written by another run (pid {first.pid} on")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    expected = dls.local_percentile(image, 0.2, **GEOMETRY)
    np.testing.assert_array_equal(zarr.open_array(out)[:], expected, strict=True)
    assert not (out / LOCK).exists()


def test_damaged_inputs_and_budgets_are_one_line(tmp_path, image):
    args = ["--percentile", "0.5", *CLI_GEOMETRY]
    torn = write_zarr(tmp_path / "torn.zarr", image)
    chunk = torn / "c" / "1" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    holes = write_zarr(tmp_path / "holes.zarr", image)
    (holes / "c" / "0" / "1" / "2").unlink()
    results = run_all(
        command("percentile", torn, tmp_path / "a.zarr", *args),
        command("percentile", torn, tmp_path / "b.zarr", *args, "--debug"),
        command("percentile", holes, tmp_path / "c.zarr", *args),
        command("percentile", holes, tmp_path / "d.zarr", *args, "--quiet",
                "--missing-chunks", "fill"),
        command("histogram", holes, tmp_path / "e.zarr", "--max-bin", 2**24,
                "--selem", "4", "--missing-chunks", "fill"),
    )  # fmt: skip
    refused(results[0], f"chunk 'c/1/2/0' of {torn} cannot be read")
    refused(results[0], f"the output {tmp_path / 'a.zarr'} is left incomplete; ")
    assert record(tmp_path / "a.zarr")["complete"] is False
    assert not (tmp_path / "a.zarr" / LOCK).exists()
    assert "Traceback" in results[1].stderr
    assert results[1].stderr.splitlines()[-1].startswith("dask-localstats: error: ")
    refused(results[2], f"{holes} lacks 1 of its 36 chunks (c/0/1/2)")
    assert not (tmp_path / "c.zarr").exists()
    ok(results[3])
    filled = image.copy()
    filled[0:4, 8:16, 18:27] = 0
    expected = dls.local_percentile(filled, 0.5, **GEOMETRY)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "d.zarr")[:], expected)
    refused(results[4], "more than `block_bytes`=67108864")
    assert not (tmp_path / "e.zarr").exists()


def test_output_layout_options(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    out = tmp_path / "out.zarr"
    ok(run("percentile", source, out, "--percentile", "0.5", *CLI_GEOMETRY,
           "--chunks", "4", "10", "5", "--shards", "8", "30", "25",
           "--compression", "blosc-zstd:3", "--quiet"))  # fmt: skip
    z = zarr.open_array(out, mode="r")
    assert (z.chunks, z.shards) == ((4, 10, 5), (8, 30, 25))
    assert z.compressors[0].cname.value == "zstd"
    expected = dls.local_percentile(image, 0.5, **GEOMETRY)
    np.testing.assert_array_equal(z[:], expected, strict=True)
    refused(run("percentile", source, tmp_path / "x.zarr", "--percentile", "0.5",
                *CLI_GEOMETRY, "--compression", "lzma"), "`compression` must be one of")  # fmt: skip
    refused(run("percentile", source, tmp_path / "x.zarr", "--percentile", "0.5",
                *CLI_GEOMETRY, "--shards", "big"), "--shards must be 'auto', 'none'")  # fmt: skip


def test_missing_data_options_and_axis_order(tmp_path, image):
    mask = image > 300
    image = image.astype(np.float32)
    image[2, 3:9, 4:10] = np.nan
    source = write_zarr(tmp_path / "in.zarr", image)
    write_zarr(tmp_path / "mask.zarr", mask)
    options = ["--percentile", "0.5", "--selem", "5", "8", "6", "--spacing", "5",
               "5", "4", "--axes", "xyz", "--quiet"]  # fmt: skip
    args = ["--mask", tmp_path / "mask.zarr", "--nan-policy", "omit",
            "--min-coverage", "0.3", "--fill", "nearest", "--interpolate", "3",
            "--clip"]  # fmt: skip
    results = run_all(
        command("percentile", source, tmp_path / "a.zarr", *options, *args),
        command("percentile", source, tmp_path / "b.zarr", "--percentile", "0.5",
                "--selem", "8", "8", "1", "--quiet"),
    )  # fmt: skip
    ok(results[0])
    expected = dls.local_percentile(
        image, 0.5, selem=(6, 8, 5), spacing=(4, 5, 5), mask=mask,
        nan_policy="omit", min_coverage=0.3, fill="nearest", interpolate=3, clip=True,
    )  # fmt: skip
    got = zarr.open_array(tmp_path / "a.zarr")[:]
    np.testing.assert_array_equal(got, expected, strict=True)
    warning = "warning: --selem is 1 on axis x (size 25), not on the shortest axis"
    assert warning in results[1].stderr
    assert results[1].returncode == 0
    refused(run("percentile", source, tmp_path / "c.zarr", *options[:-3], "--axes",
                "xyt"), "--axes 'xyt' must name IN's axes (z y x) in some order")  # fmt: skip


def test_histogram_bins_from_the_recorded_range(tmp_path, image):
    small = (image % 64).astype(np.uint8)
    plain = write_zarr(tmp_path / "plain.zarr", small)
    recorded = write_ome(tmp_path / "ome.zarr", small)
    group = zarr.open_group(recorded, mode="r+")
    ome = group.attrs["ome"]
    ome["omero"] = {"channels": [{"window": {"min": 0, "max": 63}}]}
    group.attrs["ome"] = ome
    geometry = ["--selem", "6", "10", "5", "--quiet"]
    results = run_all(
        command("histogram", plain, tmp_path / "a.zarr", "--max-bin", "auto", *geometry),
        command("histogram", recorded, tmp_path / "b.zarr", "--max-bin", "auto", *geometry),
        command("histogram", recorded, tmp_path / "c.zarr", "--max-bin", "32", *geometry),
        command("histogram", plain, tmp_path / "d.zarr", "--max-bin", "32",
                "--clip-values", *geometry),
    )  # fmt: skip
    for result in (results[0], results[1], results[3]):
        ok(result)
    assert zarr.open_array(tmp_path / "a.zarr").shape[-1] == 256  # uint8's range
    assert zarr.open(tmp_path / "b.zarr")["0"].shape[0] == 64  # recorded, 0..63
    refused(results[2], "IN records values up to 63, outside [0, 32)")
    assert not (tmp_path / "c.zarr").exists()
    expected = dls.local_histogram(small, 32, selem=(6, 10, 5), clip_values=True)
    got = zarr.open_array(tmp_path / "d.zarr")[:]
    np.testing.assert_array_equal(got, expected, strict=True)
    assert got[..., -1].sum() == (small >= 31).sum()


def test_summary_line_and_log_file(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    log = tmp_path / "job.log"
    args = ["--percentile", "0.25", *CLI_GEOMETRY]
    quiet, logged = run_all(
        command("percentile", source, tmp_path / "a.zarr", *args, "--quiet"),
        command("percentile", source, tmp_path / "b.zarr", *args, "--log-file", log),
    )
    summary = ok(quiet).stderr.strip()
    assert summary.count("\n") == 0  # no bar: the summary line only
    assert summary.startswith("dask-localstats: percentile 0.25 (selem (6, 8, 5), ")
    assert "36 of 36 chunks computed in " in summary and "Mvoxel/s" in summary
    lines = log.read_text().splitlines()
    assert lines[-2].startswith("[##############################] 100% | background")
    assert lines[-1].startswith("dask-localstats: percentile 0.25")
    assert ok(logged).stderr.strip() == lines[-1]  # the bar went to the log


def test_bigstitcher_style_ome_zarr(tmp_path):
    """A 5-D (t c z y x) OME-Zarr 0.5 image, as BigStitcher exports one."""
    rng = np.random.default_rng(4)
    image = rng.integers(0, 4000, (1, 2, 10, 32, 40)).astype(np.uint16)
    fused = tmp_path / "fused.ome.zarr"
    group = zarr.open_group(fused, mode="w")
    group.create_array("s0", shape=image.shape, chunks=(1, 1, 5, 16, 20),
                       dtype=image.dtype, dimension_names=list("tczyx"))[:] = image  # fmt: skip
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"
    ]
    scale = {"type": "scale", "scale": [1.0, 1.0, 2.0, 0.4, 0.4]}
    datasets = [{"path": "s0", "coordinateTransformations": [scale]}]
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": axes, "datasets": datasets}],
    }
    out = tmp_path / "flat.ome.zarr"
    result = ok(run("percentile", fused, out, "--percentile", "0.25", "--selem", "1",
                    "1", "1", "16", "16", "--spacing", "1", "1", "1", "8", "8",
                    "--subtract"))  # fmt: skip
    assert "IN had axes t c z y x" in result.stderr
    assert "warning" not in result.stderr  # windows of 1 on t, c and z: no swap
    flat = zarr.open_group(out, mode="r")
    assert flat.attrs["ome"]["multiscales"][0]["axes"] == axes
    background = dls.local_percentile(
        image, 0.25, selem=(1, 1, 1, 16, 16), spacing=(1, 1, 1, 8, 8),
        dtype=np.float32,
    )  # fmt: skip
    expected = reference.subtract_background(image, background)
    np.testing.assert_array_equal(flat["0"][:], expected, strict=True)


def test_voxel_size_gives_tiff_inputs_a_scale(tmp_path, image):
    tifffile.imwrite(tmp_path / "stack.tif", image)
    args = ["--percentile", "0.5", *CLI_GEOMETRY, "--quiet"]
    good, wrong = run_all(
        command("percentile", tmp_path / "stack.tif", tmp_path / "a.zarr", *args,
                "--voxel-size", "2", "0.5", "0.5", "--unit", "micrometer"),
        command("percentile", tmp_path / "stack.tif", tmp_path / "b.zarr", *args,
                "--voxel-size", "2", "0.5"),
    )  # fmt: skip
    ok(good)
    data, axes, scale, _ = ome_image(tmp_path / "a.zarr")
    assert axes == ["z", "y", "x"] and scale == [2.0, 0.5, 0.5]
    units = zarr.open_group(tmp_path / "a.zarr").attrs["ome"]["multiscales"][0]["axes"]
    assert {a["unit"] for a in units} == {"micrometer"}
    np.testing.assert_array_equal(data, dls.local_percentile(image, 0.5, **GEOMETRY))
    refused(wrong, "--voxel-size needs 3 sizes (one per axis of IN), got [2.0, 0.5]")


def test_pyramid_on_the_command_line(tmp_path):
    image = np.random.default_rng(6).integers(0, 4000, (8, 96, 80)).astype(np.uint16)
    source = write_zarr(tmp_path / "in.zarr", image, chunks=(8, 32, 32))
    out = tmp_path / "flat.ome.zarr"
    ok(run("percentile", source, out, "--percentile", "0.3", "--selem", "1", "16",
           "16", "--spacing", "1", "8", "8", "--subtract", "--pyramid", "3",
           "--voxel-size", "3", "0.5", "0.5", "--quiet"))  # fmt: skip
    group = zarr.open_group(out, mode="r")
    assert [group[k].shape for k in "012"] == [(8, 96, 80), (8, 48, 40), (8, 24, 20)]
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert datasets[2]["coordinateTransformations"][0]["scale"] == [3.0, 2.0, 2.0]


def test_the_log_file_is_never_an_input(tmp_path, image):
    tifffile.imwrite(tmp_path / "stack.tif", image)
    before = (tmp_path / "stack.tif").read_bytes()
    result = run("percentile", tmp_path / "stack.tif", tmp_path / "o.zarr",
                 "--percentile", "0.5", *CLI_GEOMETRY, "--log-file",
                 tmp_path / "stack.tif")  # fmt: skip
    refused(result, "--log-file")
    assert (tmp_path / "stack.tif").read_bytes() == before
