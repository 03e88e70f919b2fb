"""Writing results: refusals, the lock, the record, resuming, input checks."""

import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from unittest import mock

import dask
import dask.array as da
import numpy as np
import pytest
import zarr
from dask._task_spec import Task
from dask.callbacks import Callback
from dask.core import flatten
from hypothesis import example, given, settings
from hypothesis import strategies as st
from slowly import kill_when
from strategies import write_zarr

import dask_localstats as dls
from dask_localstats import _engine, _write
from dask_localstats._checkpoint import _load_block, _saved
from dask_localstats._engine import _coarse_block
from dask_localstats._fill import fill_block, reach, sweep
from dask_localstats._graph import cull
from dask_localstats._lock import LOCK
from dask_localstats._ome import OmeImage
from dask_localstats._place import Folder
from dask_localstats._write import _written
from dask_localstats.errors import (
    InputChangedError,
    LockedError,
    RefusedError,
)

TESTS = Path(__file__).resolve().parent


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 1000, (12, 30, 25)).astype(np.uint16)


def files(path):
    """``{relative path: bytes}`` of every file below `path`."""
    return {
        p.relative_to(path): p.read_bytes()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


def background(source):
    return dls.local_percentile(source, 0.5, selem=(6, 8, 5), spacing=(4, 5, 5))


def test_the_output_is_never_an_input_whatever_its_spelling(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    mask = write_zarr(tmp_path / "mask.zarr", image > 100, chunks=(12, 30, 25))
    (tmp_path / "link.zarr").symlink_to(source)
    before = files(tmp_path)
    url = f"file://{source}"
    result = dls.local_percentile(
        dls.open_source(url), 0.5, selem=6, mask=f"file://{mask}/"
    )
    os.chdir(tmp_path)
    for out, match in [
        (source, "is an input or inside it"),
        ("in.zarr", "is an input or inside it"),
        ("in.zarr/", "is an input or inside it"),
        ("./sub/../in.zarr", "is an input or inside it"),
        (url, "is an input or inside it"),
        (tmp_path / "link.zarr", "is an input or inside it"),
        (source / "c" / "new", "is an input or inside it"),
        (mask, "is an input or inside it"),
        (tmp_path, "holds an input"),
    ]:
        with pytest.raises(RefusedError, match=match):
            dls.to_zarr(result, out, overwrite=True)
    with pytest.raises(RefusedError, match=r"mask.zarr is MASK or inside it"):
        dls.to_zarr(result, mask, overwrite=True, inputs={"MASK": mask})
    assert files(tmp_path) == before


def test_overwrite_replaces_only_folders_of_zarr_entries(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    result = background(source)
    thesis = tmp_path / "thesis"
    write_zarr(thesis, image[:2])
    (thesis / "thesis.tex").write_text("four years of work")
    (thesis / "raw").mkdir()
    (thesis / "raw" / "data.bin").write_bytes(b"\x00" * 10)
    stray = tmp_path / "stray.zarr"  # a zarr array with a foreign file in c/
    write_zarr(stray, image[:2])
    (stray / "c" / "notes.txt").write_text("mine")
    linked = tmp_path / "linked.zarr"
    write_zarr(linked, image[:2])
    (linked / "c" / "elsewhere").symlink_to(tmp_path / "in.zarr")
    for out, match in [
        (thesis, r"holds (thesis\.tex|raw/data\.bin), which is not a zarr entry"),
        (stray, r"holds c/notes\.txt, which is not a zarr entry"),
        (linked, r"holds c/elsewhere, which is not a zarr entry"),
        (tmp_path / "in.zarr" / "zarr.json", "is an input"),
    ]:
        before = files(out)
        with pytest.raises(RefusedError, match=match):
            dls.to_zarr(result, out, overwrite=True)
        assert files(out) == before
    inline = da.from_zarr(source, inline_array=True) + 1  # in a blockwise layer
    with pytest.raises(RefusedError, match="is an input or inside it"):
        dls.to_zarr(inline, source, overwrite=True)
    file = tmp_path / "file.zarr"
    file.write_text("a file")
    with pytest.raises(RefusedError, match="is not a folder"):
        dls.to_zarr(result, file, overwrite=True)

    # zarr entries only, but not ours: a group of arrays, a v2 array, a v3
    # array, files merely named like zarr's metadata
    group = zarr.open_group(tmp_path / "group.zarr", mode="w")
    group.create_array("a/b", shape=(3,), dtype="u1")[:] = 1
    write_zarr(tmp_path / "v2.zarr", image[:2], zarr_format=2)
    write_zarr(tmp_path / "v3.zarr", image[:2])
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "zarr.json").write_text("my settings")
    (tmp_path / "named" / ".zattrs").write_text("{}")
    for name in ("group.zarr", "v2.zarr", "v3.zarr", "named"):
        before = files(tmp_path / name)
        with pytest.raises(
            RefusedError, match="a zarr store that dask_localstats did not write"
        ):
            dls.to_zarr(result, tmp_path / name, overwrite=True)
        assert files(tmp_path / name) == before

    # our own output, complete or not, and an empty folder
    ours = dls.to_zarr(result, tmp_path / "ours.zarr")
    ome = dls.to_zarr(result, tmp_path / "ome.zarr", ome=OmeImage.default(3))
    (tmp_path / "empty").mkdir()
    expected = background(image)
    for name in ("ours.zarr", "ome.zarr", "empty"):
        z = dls.to_zarr(result, tmp_path / name, overwrite=True)
        np.testing.assert_array_equal(z[:], expected)
    assert ours.attrs["dask_localstats"]["complete"] and ome.shape == expected.shape


HOLD_LOCK = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                         "started": "2026-01-01T00:00:00"}).encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_stale_lock_reported(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    out = tmp_path / "out.zarr"
    dls.to_zarr(background(source), out)
    z = zarr.open_array(out, mode="r+")
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    lock = out / LOCK
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, lock], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"  # a run holds the lock
        before = files(out)
        for options in (dict(overwrite=True), dict(resume=True)):
            with pytest.raises(LockedError, match=f"another run .pid {holder.pid} on"):
                dls.to_zarr(background(source), out, **options)
        with pytest.raises(RefusedError, match=f"holds the lock of pid {holder.pid}"):
            dls.to_zarr(background(source), out)
        assert files(out) == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the process is gone, its flock with it: the lock is stale, reported,
    # and resume clears it
    with pytest.raises(RefusedError, match=f"holds the lock of pid {holder.pid}"):
        dls.to_zarr(background(source), out)
    dls.to_zarr(background(source), out, resume=True)
    assert not lock.exists()
    assert zarr.open_array(out).attrs["dask_localstats"]["complete"]


def test_resume_writes_only_missing_chunks_and_checks_the_computation(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    out = tmp_path / "out.zarr"
    dls.to_zarr(background(source), out)
    z = zarr.open_array(out, mode="r+")
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    gone = sorted((out / "c").rglob("*"))[-1]
    gone.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "c").rglob("*") if p.is_file()}
    other = dls.local_percentile(source, 0.4, selem=(6, 8, 5), spacing=(4, 5, 5))
    with pytest.raises(RefusedError, match="written by another computation"):
        dls.to_zarr(other, out, resume=True)
    written = dls.to_zarr(background(source), out, resume=True)
    assert written.attrs["dask_localstats"]["written"] == 1
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    np.testing.assert_array_equal(written[:], background(image))
    with pytest.raises(RefusedError, match="is complete; nothing to resume"):
        dls.to_zarr(background(source), out, resume=True)
    with pytest.raises(RefusedError, match="does not exist; nothing to resume"):
        dls.to_zarr(background(source), tmp_path / "new.zarr", resume=True)
    with pytest.raises(ValueError, match="exclude each other"):
        dls.to_zarr(background(source), out, resume=True, overwrite=True)


def _rewrite_chunk(path, key):
    """Rewrite one stored chunk with other values (and a new mtime)."""
    z = zarr.open_array(path, mode="r+")
    index = tuple(int(i) for i in key.split("/")[1:])
    z.set_block_selection(index, z.get_block_selection(index) + 1)
    return key


def test_inputs_changed_since_the_start_are_refused(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)
    out = tmp_path / "out.zarr"
    dls.to_zarr(background(source), out)
    z = zarr.open_array(out, mode="r+")
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    time.sleep(0.01)
    key = _rewrite_chunk(source, "c/1/2/0")
    before = files(out)
    with pytest.raises(InputChangedError, match=f"modified since: {key}"):
        dls.to_zarr(background(source), out, resume=True)
    assert files(out) == before


def test_inputs_changed_during_the_run_leave_the_output_incomplete(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image)

    def meddle(block, block_info=None):
        if block_info[0]["chunk-location"] == (0, 0, 0):
            _rewrite_chunk(source, "c/0/0/0")
        return block

    result = background(source).map_blocks(meddle, dtype=np.uint16)
    with pytest.raises(InputChangedError, match="changed while the output"):
        dls.to_zarr(result, tmp_path / "out.zarr", inputs={"IN": source})
    record = zarr.open_array(tmp_path / "out.zarr").attrs["dask_localstats"]
    assert record["complete"] is False


def test_a_failed_computation_leaves_a_resumable_output(tmp_path, image):
    def fail(block):
        raise RuntimeError("a codec failed")

    source = write_zarr(tmp_path / "in.zarr", image)
    result = background(source).map_blocks(fail, dtype=np.uint16)
    with pytest.raises(RuntimeError, match="a codec failed") as error:
        dls.to_zarr(result, tmp_path / "out.zarr")
    assert "is left incomplete; resume=True (--resume)" in error.value.__notes__[0]
    assert not (tmp_path / "out.zarr" / LOCK).exists()
    dls.to_zarr(background(source), tmp_path / "other.zarr")


def test_ome_output_and_record(tmp_path, image):

    image_meta = OmeImage.default(3, name="bg")
    z = dls.to_zarr(
        da.from_array(image, chunks=(6, 15, 25)),
        tmp_path / "o.zarr",
        ome=image_meta,
        provenance={"what": "copy"},
    )
    group = zarr.open_group(tmp_path / "o.zarr", mode="r")
    assert group.attrs["ome"]["multiscales"][0]["axes"][0]["name"] == "z"
    assert group.attrs["dask_localstats"] == z.attrs["dask_localstats"]
    assert z.metadata.dimension_names == ("z", "y", "x")
    np.testing.assert_array_equal(group["0"][:], image)


def test_written_skips_torn_chunks_and_removes_temporary_files(tmp_path):
    z = zarr.create_array(
        tmp_path / "a.zarr", shape=(4, 4), chunks=(2, 2), dtype="u2", fill_value=0
    )
    z[:] = np.arange(16).reshape(4, 4)
    torn = tmp_path / "a.zarr" / "c" / "1" / "0"
    torn.write_bytes(torn.read_bytes()[:5])
    partial = "0." + "ab" * 16 + ".partial"
    (tmp_path / "a.zarr" / "c" / "0" / partial).write_bytes(b"xx")
    blocks = [(0, 0), (0, 1), (1, 0), (1, 1)]
    done = _written(z, Folder(tmp_path / "a.zarr"), blocks)  # a folder: read back
    assert done == {(0, 0), (0, 1), (1, 1)}
    assert not torn.exists()
    assert not list((tmp_path / "a.zarr").rglob("*.partial"))


class _Deletions(Folder):
    """A folder noting the keys of each deletion, in order."""

    def __init__(self, path):
        super().__init__(path)
        object.__setattr__(self, "deleted", [])

    def delete(self, keys):
        self.deleted.append(list(keys))
        super().delete(keys)


def test_overwrite_deletes_the_record_last(tmp_path, image):
    result = background(image)
    dls.to_zarr(result, tmp_path / "out.zarr", ome=OmeImage.default(3))
    place = _Deletions(tmp_path / "out.zarr")
    _write._clear(place)
    *chunks, metadata = [keys for keys in place.deleted if keys]
    assert all(key.rpartition("/")[2] != "zarr.json" for keys in chunks for key in keys)
    assert metadata == ["0/zarr.json", "zarr.json"]  # the group's, the record: last
    assert [p.name for p in (tmp_path / "out.zarr").rglob("*")] == []


@pytest.mark.parametrize(
    ("shards", "compressors"), [(None, "auto"), ((4, 6, 6), "auto"), (None, "none")]
)
def test_resume_computes_damaged_chunks_again(tmp_path, image, shards, compressors):
    result = background(write_zarr(tmp_path / "in.zarr", image))
    out = tmp_path / "out.zarr"
    options = dict(chunks=(2, 3, 3), shards=shards, compressors=compressors)
    dls.to_zarr(result, out, **options)
    z = zarr.open_array(out, mode="r+")
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    files = sorted(p for p in (out / "c").rglob("*") if p.is_file())
    files[0].write_bytes(b"")  # renamed, never written: zarr reads fill values
    files[1].write_bytes(files[1].read_bytes()[:7])  # written in part
    files[2].unlink()
    # whole in length, but not in content: they decode without a checksum
    stored = files[3].read_bytes()
    files[3].write_bytes(stored[:-12] + bytes(12))  # its end never written
    stored = bytearray(files[4].read_bytes())
    stored[len(stored) // 2] ^= 1
    files[4].write_bytes(bytes(stored))  # a bit flipped
    resumed = dls.to_zarr(result, out, resume=True, **options)
    assert resumed.attrs["dask_localstats"]["written"] == 5
    np.testing.assert_array_equal(resumed[:], background(image))
    assert resumed.compressors[-1].to_dict() == {"name": "crc32c"}


RESUMABLE = """
import sys
sys.path.insert(0, {tests!r})
from slowly import slow_writes
import dask_localstats as dls

slow_writes({delay})
source = dls.open_source({source!r})
bg = dls.local_percentile(source, 0.3, selem=(4, 8, 8), spacing=(2, 4, 4))
dls.to_zarr(bg, {out!r}, resume={resume})
"""


def _python(tmp_path, out, delay=0.0, resume=False):
    code = RESUMABLE.format(
        tests=str(TESTS), delay=delay, source=str(tmp_path / "in.zarr"),
        out=str(out), resume=resume,
    )  # fmt: skip
    env = {**os.environ, "DASK_NUM_WORKERS": "1"}
    return [sys.executable, "-c", textwrap.dedent(code)], env


@pytest.mark.thorough
def test_python_resume_after_sigkill_is_byte_identical(tmp_path):
    image = np.random.default_rng(1).integers(0, 4000, (8, 32, 32), np.uint16)
    write_zarr(tmp_path / "in.zarr", image, chunks=(4, 8, 8))
    out = tmp_path / "out.zarr"
    argv, env = _python(tmp_path, out, delay=0.15)
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
    kill_when(proc, lambda: len(list((out / "c").rglob("*"))) >= 8)
    assert (out / LOCK).exists()  # left behind, stale
    for path, resume in [(out, True), (tmp_path / "fresh.zarr", False)]:
        argv, env = _python(tmp_path, path, resume=resume)
        subprocess.run(argv, env=env, check=True)
    resumed, fresh = (zarr.open_array(p) for p in (out, tmp_path / "fresh.zarr"))
    record = resumed.attrs["dask_localstats"]
    assert record["complete"] is True
    assert 0 < record.pop("written") < 32
    assert fresh.attrs["dask_localstats"].pop("written") == 32
    assert record == fresh.attrs["dask_localstats"]  # the same fingerprint
    chunks = files(out)
    del chunks[Path("zarr.json")]
    assert chunks.items() <= files(tmp_path / "fresh.zarr").items()


@pytest.mark.parametrize(
    ("spec", "codec"),
    [
        ("zstd:5", "ZstdCodec"),
        ("blosc-lz4", "BloscCodec"),
        ("blosc-zstd:3", "Blosc"),
        (zarr.codecs.ZstdCodec(level=2), "ZstdCodec"),  # one codec, as zarr takes it
        ([zarr.codecs.ZstdCodec(level=2)], "ZstdCodec"),
    ],
    ids=["zstd", "blosc-lz4", "blosc-zstd", "a-codec", "codecs"],
)
def test_shards_and_codecs(tmp_path, spec, codec):
    image = np.arange(32 * 64 * 60, dtype=np.uint16).reshape(32, 64, 60)
    lazy = da.from_array(image, chunks=(8, 16, 16))
    z = dls.to_zarr(lazy, tmp_path / "s.zarr", shards=(16, 32, 32), compressors=spec)
    assert (z.chunks, z.shards) == ((8, 16, 16), (16, 32, 32))
    assert type(z.compressors[0]).__name__.startswith(codec)
    shards = [p for p in (tmp_path / "s.zarr" / "c").rglob("*") if p.is_file()]
    assert len(shards) == 2 * 2 * 2  # one object a shard, not a chunk
    np.testing.assert_array_equal(z[:], image, strict=True)
    # resume counts shards: one removed, one recomputed
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    shards[0].unlink()
    again = dls.to_zarr(
        lazy, tmp_path / "s.zarr", shards=(16, 32, 32), compressors=spec, resume=True
    )
    assert again.attrs["dask_localstats"]["written"] == 1
    np.testing.assert_array_equal(again[:], image, strict=True)
    with pytest.raises(RefusedError, match="written by another computation"):
        dls.to_zarr(lazy, tmp_path / "s.zarr", chunks=(8, 8, 8), resume=True)


def test_a_shard_of_a_resampling_is_computed_chunk_by_chunk_into_one_array(
    tmp_path, image
):
    source = write_zarr(tmp_path / "in.zarr", image, chunks=(4, 10, 5))
    kwargs = dict(selem=(3, 9, 7), spacing=(2, 5, 5), dtype=np.float32)
    result = dls.subtract_background(
        source, dls.local_percentile(source, 0.3, **kwargs)
    )
    expected = result.compute()
    # 12 shards: units enough for 2 threads, not for 8; where the result's
    # chunks tile a shard and units are enough, its write task computes them
    # itself; else they are tasks (assembled)
    cases = [((8, 20, 10), 2, True), ((8, 15, 10), 2, False), ((8, 20, 10), 8, False)]
    for k, (shards, threads, pieces) in enumerate(cases):
        spy = mock.patch.object(_write, "_compute", wraps=_write._compute)
        with spy as computed, dask.config.set(num_workers=threads):
            z = dls.to_zarr(
                result, tmp_path / f"{k}.zarr", chunks=(4, 5, 5), shards=shards
            )
        np.testing.assert_array_equal(z[:], expected, strict=True)
        calls = computed.call_args_list
        keys = [key for call in calls for key in call.args[0][0].dask]
        assert any(key[0] == result.name for key in keys) is not pieces
    # several percentiles (a trailing axis), resumed after a lost shard
    both = dls.local_percentile(source, (0.2, 0.7), **kwargs)
    z = dls.to_zarr(both, tmp_path / "both.zarr", shards=(8, 20, 10, 2))
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    next(p for p in (tmp_path / "both.zarr" / "c").rglob("*") if p.is_file()).unlink()
    z = dls.to_zarr(both, tmp_path / "both.zarr", shards=(8, 20, 10, 2), resume=True)
    assert z.attrs["dask_localstats"]["written"] == 1
    np.testing.assert_array_equal(z[:], both.compute(), strict=True)


def test_a_unit_is_made_in_one_task_with_the_chunks_only_it_needs(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image, chunks=(4, 10, 5))
    v = da.from_zarr(source)
    background = dls.local_percentile(source, 0.3, selem=(3, 9, 7), spacing=(2, 5, 5))
    result = v - da.minimum(v, background)  # a user's arithmetic on the background
    expected = result.compute()
    steps = {result.name, background.name}
    # 12 shards: units enough for 2 threads, not for 8, which compute the
    # chunks side by side before their shard's task
    for threads, alone in ((2, True), (8, False)):
        graphs = _Graphs()
        with graphs, dask.config.set(num_workers=threads):
            z = dls.to_zarr(result, tmp_path / f"{threads}.zarr", shards=(8, 20, 10))
        np.testing.assert_array_equal(z[:], expected, strict=True)
        assert any(name.startswith("localstats-coarse") for name in graphs.names)
        assert not graphs.names & steps if alone else graphs.names & steps


def test_large_outputs_are_sharded_by_default(tmp_path):
    from dask_localstats._layout import SHARD_BYTES, layout_of

    # a terabyte of 64 x 256 x 256 chunks: 131072 files, in shards 16384
    layout = layout_of(da.zeros((8192,) * 3, dtype="u2", chunks=(64, 256, 256)),
                       None, "auto", "auto")  # fmt: skip
    assert layout.chunks == (64, 256, 256)
    assert math.prod(layout.shards) * 2 == SHARD_BYTES
    assert 2**40 // (math.prod(layout.shards) * 2) == 16384
    # 256 MiB of TIFF-like chunks of 4 slices: shards of 32 slices
    slices = da.zeros((128, 1024, 1024), dtype="u2", chunks=(4, 1024, 1024))
    assert layout_of(slices, None, "auto", "auto").shards == (32, 1024, 1024)
    # below two shards' worth, or when asked, none
    small = da.zeros((32, 1024, 1024), dtype="u2", chunks=(4, 1024, 1024))
    assert layout_of(small, None, "auto", "auto").shards is None
    assert layout_of(slices, None, None, "auto").shards is None


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(shards=(16, 30)), r"`shards` \(16, 30\) must be multiples of `chunks`"),
        (dict(chunks=(0, 4)), r"`chunks` must be 2 positive ints, got \(0, 4\)"),
        (dict(shards=(8,)), r"`shards` must be 2 positive ints"),
        (dict(compressors="gzip"), r"`compression` must be one of .*'gzip'"),
        (dict(compressors="zstd:x"), r"`compression` must be one of .*'zstd:x'"),
        (dict(compressors="blosc-lz4:99"), r"levels 0\.\.22"),
        (dict(compressors="blosc-zstd:12"), r"0\.\.9 for blosc"),
    ],
)
def test_bad_layouts_are_refused_before_anything_is_written(tmp_path, options, match):
    lazy = da.zeros((16, 16), chunks=8, dtype="u2")
    with pytest.raises(ValueError, match=match):
        dls.to_zarr(lazy, tmp_path / "x.zarr", **options)
    assert not (tmp_path / "x.zarr").exists()


def test_resume_reads_the_stored_coarse_blocks_instead_of_the_source(tmp_path, image):
    from strategies import Counting

    source = Counting(zarr.open_array(write_zarr(tmp_path / "in.zarr", image)))
    lazy = da.from_array(source, chunks=source.chunks)
    result = dls.local_percentile(
        lazy, 0.3, selem=(6, 8, 5), spacing=(4, 5, 5), block_bytes=4000
    )
    out = tmp_path / "out.zarr"
    dls.to_zarr(result, out)
    full = len(source.chunks_read)
    checkpoint = next((out / ".dask_localstats").iterdir())  # one coarse grid
    blocks = sorted(checkpoint.glob("*.npy"))
    assert len(blocks) > 4  # blocks of a few centers
    stamps = {p: p.stat().st_mtime_ns for p in blocks}
    expected = dls.local_percentile(image, 0.3, selem=(6, 8, 5), spacing=(4, 5, 5))

    def interrupt(lose_blocks):
        z = zarr.open_array(out, mode="r+")
        z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
        for chunk in [p for p in sorted((out / "c").rglob("*")) if p.is_file()][-10:]:
            chunk.unlink(missing_ok=True)
        for block in blocks[:lose_blocks]:
            block.unlink()
        source.chunks_read.clear()

    interrupt(0)  # every coarse block stored: nothing of the coarse stage recomputed
    resumed = dls.to_zarr(result, out, resume=True)
    assert source.chunks_read == []
    assert stamps == {p: p.stat().st_mtime_ns for p in blocks}
    np.testing.assert_array_equal(resumed[:], expected, strict=True)
    interrupt(2)  # two blocks lost: only those are recomputed
    resumed = dls.to_zarr(result, out, resume=True)
    assert 0 < len(source.chunks_read) < full
    np.testing.assert_array_equal(resumed[:], expected, strict=True)
    # a damaged block (cut short, its end zeroed) or one of another shape
    # is refused, named
    other = np.zeros(np.load(blocks[1]).shape[:-1])  # numpy reads a block
    stored = blocks[0].read_bytes()
    key = blocks[0].relative_to(out).as_posix()
    for damage, match in [
        (lambda: blocks[0].write_bytes(stored[:90]), "its checksum does not"),
        (lambda: blocks[0].write_bytes(stored[:-9] + bytes(9)), "its checksum"),
        (
            lambda: _saved(other, Folder(out), key),
            r"shape \(.*\) and dtype float64, not",
        ),
    ]:
        interrupt(0)
        damage()
        with pytest.raises(
            RefusedError, match=rf"block .*{blocks[0].name} is damaged \({match}"
        ):
            dls.to_zarr(result, out, resume=True)
        blocks[0].unlink()  # as the message says: then computed again
        np.testing.assert_array_equal(
            dls.to_zarr(result, out, resume=True)[:], expected
        )
    # the store, checkpoints included, is the library's own: overwrite replaces it
    dls.to_zarr(result, out, overwrite=True)


def _block_means(image, axes):
    """The 2-block means of `image` on `axes`, an odd axis's last voxel alone."""
    out = image.astype(np.float64)
    for d in axes:
        if out.shape[d] % 2:
            out = np.concatenate([out, np.take(out, [-1], axis=d)], axis=d)
        shape = list(out.shape)
        shape[d : d + 1] = [shape[d] // 2, 2]
        out = out.reshape(shape).mean(axis=d + 1)
    return np.round(out).astype(image.dtype)


def test_pyramid_levels_are_valid_ome_zarr(tmp_path):

    image = np.random.default_rng(5).integers(0, 4000, (40, 100, 90), np.uint16)
    meta = OmeImage.default(3, name="flat")
    meta = OmeImage(meta.axes, [2.0, 0.5, 0.5], [10.0, 0.0, 0.0], "flat")
    lazy = da.from_array(image, chunks=(10, 25, 30))
    out = tmp_path / "pyr.ome.zarr"
    dls.to_zarr(lazy, out, ome=meta, pyramid=4)
    group = zarr.open_group(out, mode="r")
    level1 = _block_means(image, [0, 1, 2])
    level2 = _block_means(level1, [1, 2])  # z (20 slices) is kept from here on
    for k, expected in enumerate([image, level1, level2]):
        np.testing.assert_array_equal(group[str(k)][:], expected, strict=True)
        assert group[str(k)].chunks == (10, 25, 30)
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0", "1", "2"]  # none left above 32
    scales = [d["coordinateTransformations"][0]["scale"] for d in datasets]
    shifts = [d["coordinateTransformations"][1]["translation"] for d in datasets]
    assert scales == [[2.0, 0.5, 0.5], [4.0, 1.0, 1.0], [4.0, 2.0, 2.0]]
    assert shifts == [[10.0, 0.0, 0.0], [11.0, 0.25, 0.25], [11.0, 0.75, 0.75]]

    # the metadata validates against OME-Zarr 0.5, and ome-zarr-py reads it
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(group)
    node = next(iter(Reader(parse_url(str(out)))()))
    assert [level.shape for level in node.data[:3]] == [
        (40, 100, 90), (20, 50, 45), (20, 25, 23)
    ]  # fmt: skip


# napari's own modules warn of pydantic's deprecations when imported
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_napari_reads_the_pyramid_as_one_multiscale_layer(tmp_path):

    napari_get_reader = pytest.importorskip("napari_ome_zarr").napari_get_reader
    image = np.random.default_rng(5).integers(0, 4000, (40, 100, 90), np.uint16)
    meta = OmeImage.default(3, name="flat")
    meta = OmeImage(meta.axes, [2.0, 0.5, 0.5], [10.0, 0.0, 0.0], "flat")
    out = str(tmp_path / "pyr.ome.zarr")
    dls.to_zarr(da.from_array(image, chunks=(10, 25, 30)), out, ome=meta, pyramid=4)
    [(data, options, kind)] = napari_get_reader(out)(out)
    assert kind == "image" and options["scale"] == [2.0, 0.5, 0.5]
    assert [level.shape for level in data] == [
        (40, 100, 90),
        (20, 50, 45),
        (20, 25, 23),
    ]
    np.testing.assert_array_equal(np.asarray(data[0]), image)


def test_pyramid_needs_an_ome_output(tmp_path):
    with pytest.raises(ValueError, match=r"`pyramid` needs an OME-Zarr output"):
        dls.to_zarr(da.zeros((4, 4)), tmp_path / "x.zarr", pyramid=2)
    with pytest.raises(ValueError, match=r"`pyramid` must be a number of levels"):
        dls.to_zarr(da.zeros((4, 4)), tmp_path / "x.zarr", pyramid=0)


def test_resumed_chunks_of_fill_values_are_written_too(tmp_path):
    from dask_localstats._stored import absent_chunks

    zeros = da.zeros((8, 8), chunks=4, dtype="u2")
    z = dls.to_zarr(zeros, tmp_path / "z.zarr")
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    (tmp_path / "z.zarr" / "c" / "1" / "1").unlink()
    resumed = dls.to_zarr(zeros, tmp_path / "z.zarr", resume=True)
    assert absent_chunks(resumed) == []  # "the chunk exists" means "it is done"


@pytest.fixture
def bind_mount(tmp_path):
    """`tmp_path/src` mounted again at `tmp_path/mnt` (needs root)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", tmp_path / "src", tmp_path / "mnt"], capture_output=True
    )
    if mounted.returncode:
        pytest.skip("bind mounts need root")
    yield tmp_path / "src", tmp_path / "mnt"
    subprocess.run(["umount", tmp_path / "mnt"], check=True)


def test_a_second_mount_of_an_input_is_the_input(bind_mount, image):
    src, mnt = bind_mount
    source = write_zarr(src / "raw.zarr", image)
    before = files(src)
    result = background(source)
    for out, match in [
        (mnt / "raw.zarr", "is an input or inside it"),
        (mnt / "raw.zarr" / "c" / "x", "is an input or inside it"),
        (mnt, "holds an input"),
    ]:
        with pytest.raises(RefusedError, match=match):
            dls.to_zarr(result, out, overwrite=True)
    assert files(src) == before


def test_output_urls_and_dot_dot_go_where_the_system_would_write(tmp_path):
    (tmp_path / "d1" / "real").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "d1" / "real")
    lazy = da.ones((4, 4), chunks=2, dtype="u1")
    dls.to_zarr(lazy, f"file://localhost{tmp_path}/a%20b.zarr")
    assert (tmp_path / "a b.zarr" / "zarr.json").exists()
    dls.to_zarr(lazy, tmp_path / "link" / ".." / "c.zarr")
    assert (tmp_path / "d1" / "c.zarr" / "zarr.json").exists()  # real/.. is d1
    with pytest.raises(ValueError, match=r"`store` must be on this machine"):
        dls.to_zarr(lazy, "file://elsewhere/data/x.zarr")


class _Graphs(Callback):
    """dask's local callbacks: the size of each graph run, the names of the
    tasks run, the coarse blocks made, the stored blocks read and the blocks
    filled."""

    def __init__(self):
        super().__init__()
        self.sizes, self.coarse, self.loads, self.fills = [], [], [], []
        self.reaches, self.sweeps, self.names = [], [], set()

    def _start(self, dsk):
        self.sizes.append(len(dsk))

    def _pretask(self, key, dsk, state):
        self.names.add(key[0] if isinstance(key, tuple) else key)
        self.coarse += [key] * _calls(dsk[key], _coarse_block)
        self.loads += [key] * _calls(dsk[key], _load_block)
        self.fills += [key] * _calls(dsk[key], fill_block)
        self.sweeps += [key] * _calls(dsk[key], sweep)
        self.reaches += [key] * _calls(dsk[key], reach)


def _calls(node, func):
    """How many calls of `func` a task makes (fused tasks hold several)."""
    if isinstance(node, dict):  # the graph of fused tasks
        return sum(_calls(n, func) for n in node.values())
    if not isinstance(node, Task):
        return 0
    inner = node.args + tuple(node.kwargs.values())
    return (node.func is func) + sum(_calls(n, func) for n in inner)


@settings(max_examples=min(settings.default.max_examples // 2, 40))
@given(
    shape=st.tuples(*(st.integers(4, 24),) * 3),
    chunks=st.tuples(*(st.integers(2, 9),) * 3),
    batch_size=st.integers(1, 300),
    order=st.sampled_from([0, 1, 3]),
)
@example(shape=(5, 16, 11), chunks=(2, 2, 2), batch_size=1, order=1)  # fused keys
def test_batches_bound_the_graphs_and_give_the_same_result(
    shape, chunks, batch_size, order
):
    image = np.random.default_rng(3).integers(0, 50, shape).astype(np.uint16)
    options = dict(selem=(5, 6, 4), spacing=(3, 4, 2), interpolate=order)
    expected = dls.local_percentile(image, 0.4, **options, chunks=chunks)
    with tempfile.TemporaryDirectory() as folder:
        source = write_zarr(Path(folder) / "in.zarr", image, chunks=chunks)
        result = dls.local_percentile(source, 0.4, **options, block_bytes=2000)
        graphs = _Graphs()
        with graphs:
            out = dls.to_zarr(result, Path(folder) / "out.zarr", batch_size=batch_size)
        np.testing.assert_array_equal(out[:], expected, strict=True)
        assert out.attrs["dask_localstats"]["complete"]
        coarse = next(v for v in result.dask.layers if "coarse" in v)
        blocks = result.dask.layers[coarse].numblocks
        # each coarse block computed once, in the first batch that needs it
        assert len(graphs.coarse) == len(set(graphs.coarse))
        assert len(graphs.coarse) == math.prod(blocks)
        assert out.attrs["dask_localstats"]["written"] == result.npartitions
        # a batch holds at most batch_size tasks, or a single chunk's (with
        # the saves of its coarse blocks), and the tasks dask adds to gather
        # the results of its writes and saves
        alone = max(
            2 * len(cull(result.dask, [k])) for k in flatten(result.__dask_keys__())
        )
        assert max(graphs.sizes) <= max(batch_size, alone) + 2
        if batch_size < result.npartitions:
            assert len(graphs.sizes) > 1


def test_a_batched_run_resumes_batch_by_batch(tmp_path, image):
    source = write_zarr(tmp_path / "in.zarr", image, chunks=(4, 5, 5))
    result = dls.local_percentile(
        source, 0.5, selem=(6, 8, 5), spacing=(4, 5, 5), block_bytes=3000
    )
    expected = dls.local_percentile(image, 0.5, selem=(6, 8, 5), spacing=(4, 5, 5))
    failing = {"left": 1}

    class Failing(Callback):  # the run stops in its second batch
        def _start(self, dsk):
            failing["left"] -= 1
            if failing["left"] < 0:
                raise RuntimeError("the node went down")

    out = tmp_path / "out.zarr"
    with Failing(), pytest.raises(RuntimeError, match="the node went down"):
        dls.to_zarr(result, out, batch_size=20)
    stored = {p for p in (out / "c").rglob("*") if p.is_file()}
    assert stored  # a batch written
    blocks = {
        p: p.stat().st_mtime_ns for p in (out / ".dask_localstats").rglob("*.npy")
    }
    assert blocks
    graphs = _Graphs()
    with graphs:
        resumed = dls.to_zarr(result, out, resume=True, batch_size=20)
    np.testing.assert_array_equal(resumed[:], expected, strict=True)
    assert resumed.attrs["dask_localstats"]["written"] == result.npartitions - len(
        stored
    )
    # the blocks stored by the first run are read, not computed (and stored) again
    assert blocks == {p: p.stat().st_mtime_ns for p in blocks}
    after = set((out / ".dask_localstats").rglob("*.npy"))
    assert graphs.coarse and len(after) == len(blocks) + len(graphs.coarse)


def test_batch_size_is_checked(tmp_path, image):
    with pytest.raises(ValueError, match=r"`batch_size` must be at least 1.* got 0"):
        dls.to_zarr(image, tmp_path / "out.zarr", batch_size=0)
    with pytest.raises(TypeError, match=r"`batch_size` must be an int.* got 2\.5"):
        dls.to_zarr(image, tmp_path / "out.zarr", batch_size=2.5)
    assert not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize(("fill", "dtype"), [("nearest", None), ("zero", np.uint8)])
def test_batches_compute_each_coarse_block_once(tmp_path, fill, dtype):
    """Also when the grid is filled whole, or narrowed after the kernel."""
    image = np.random.default_rng(5).integers(0, 250, (64, 64)).astype(np.uint16)
    options = dict(selem=(8, 8), fill=fill, dtype=dtype, chunks=(8, 8))
    result = dls.local_percentile(
        da.from_array(image, chunks=16), 0.5, block_bytes=2048, **options
    )
    graphs = _Graphs()
    with graphs:
        out = dls.to_zarr(result, tmp_path / "out.zarr", batch_size=40)
    assert len(graphs.sizes) > 2
    coarse = next(v for v in result.dask.layers if v.startswith("localstats-coarse"))
    assert len(graphs.coarse) == math.prod(result.dask.layers[coarse].numblocks)
    expected = dls.local_percentile(image, 0.5, **options)
    np.testing.assert_array_equal(out[:], expected, strict=True)


@pytest.mark.parametrize("gap", [(1000, 1400), (256, 3840)])
def test_a_fill_resumes_from_its_stored_blocks_and_gives_up_wide_boxes(tmp_path, gap):
    # a gap of a few coarse blocks is filled block by block from boxes of
    # the grid; one of 14 of the 16 blocks, whose boxes would hold much of
    # the grid, is swept (one axis: one chunk of whole lines); either
    # resumes without filling
    image = np.random.default_rng(8).integers(0, 250, 4096).astype(np.uint16)
    mask = np.ones(image.shape, bool)
    mask[slice(*gap)] = False
    options = dict(selem=8, interpolate=1, fill="nearest", mask=mask)
    result = dls.local_percentile(
        da.from_array(image, chunks=512), 0.5, block_bytes=2048, chunks=64, **options
    )
    out = tmp_path / "out.zarr"
    graphs = _Graphs()
    with graphs:
        dls.to_zarr(result, out, batch_size=40)
    blocks = math.prod(result.dask.layers[_coarse_name(result)].numblocks)
    wide = gap[1] - gap[0] > 1000
    filled = (len(graphs.fills), len(graphs.sweeps))
    assert filled == ((0, 1) if wide else (blocks, 0))
    z = zarr.open_array(out, mode="r+")
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    for chunk in [p for p in sorted((out / "c").rglob("*")) if p.is_file()][-3:]:
        chunk.unlink()
    resumed = _Graphs()
    with resumed:
        written = dls.to_zarr(result, out, resume=True)
    assert resumed.fills == resumed.sweeps == resumed.reaches == resumed.coarse == []
    expected = dls.local_percentile(image, 0.5, **options)
    np.testing.assert_array_equal(written[:], expected, strict=True)


def test_a_wide_gap_is_swept_in_batches_each_line_once(tmp_path):
    # a 2-D grid mostly masked: swept along x, then y, a line of tiles a
    # task, in batches of a few tasks; each line of each sweep swept once
    image = np.random.default_rng(9).integers(0, 250, (96, 96)).astype(np.uint16)
    mask = np.zeros(image.shape, bool)
    mask[70:90, 5:20] = True
    options = dict(selem=6, interpolate=1, fill="nearest", mask=mask)
    expected = dls.local_percentile(image, 0.5, **options)
    with mock.patch.object(_engine, "SWEEP_BYTES", 600):
        result = dls.local_percentile(
            da.from_array(image, chunks=24), 0.5, block_bytes=1024, **options
        )
        graphs = _Graphs()
        with graphs:
            out = dls.to_zarr(result, tmp_path / "out.zarr", batch_size=30)
    np.testing.assert_array_equal(out[:], expected, strict=True)
    layers = result.dask.layers
    lines = sum(math.prod(layers[k].numblocks) for k in layers if k.endswith("-lines"))
    assert lines > 4 and sorted(graphs.sweeps) == sorted(set(graphs.sweeps))
    assert len(graphs.sweeps) == lines and not graphs.fills
    # the sweeps' tiles deleted once the filled grid is stored: its folder
    # and the flagged grid's are left
    assert len(list((tmp_path / "out.zarr" / ".dask_localstats").iterdir())) == 2


def _coarse_name(result):
    return next(v for v in result.dask.layers if v.startswith("localstats-coarse"))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (dict(clip=True), {}),
        (dict(fill="nearest"), {}),
        (dict(fill="nearest"), dict(fill="nearest", selem=(6, 6))),
    ],
)
def test_a_result_of_several_settled_grids(tmp_path, first, second):
    image = np.random.default_rng(9).integers(0, 250, (64, 64)).astype(np.uint16)
    mask = np.ones(image.shape, bool)
    mask[20:40] = False
    lazy = da.from_array(image, chunks=16)

    def background(options):
        options = dict(selem=(8, 8), mask=mask, interpolate=3, chunks=16) | options
        return dls.local_percentile(lazy, 0.5, block_bytes=2048, **options)

    result = background(first) - background(second)
    out = dls.to_zarr(result, tmp_path / "out.zarr", batch_size=40)
    np.testing.assert_array_equal(out[:], result.compute(), strict=True)


@pytest.mark.parametrize(
    ("clip", "fill", "percentile"),
    [
        (True, "zero", 0.5),
        (False, "nearest", 0.5),
        (True, "nearest", 0.5),
        (True, "zero", [0.1, 0.9]),  # extremes per component
    ],
)
def test_grids_read_whole_are_settled_once_before_the_batches(
    tmp_path, clip, fill, percentile
):
    # the extremes a clip keeps to, and a fill, read every coarse block: done
    # once, before the batches, instead of in each batch. 1-D, so that the
    # prefilter's halo (32 samples) spans a few of the 16 coarse blocks only
    image = np.random.default_rng(8).integers(0, 250, 4096).astype(np.uint16)
    mask = np.ones(image.shape, bool)
    mask[1000:1400] = False  # samples to fill
    options = dict(selem=8, interpolate=3, clip=clip, fill=fill, mask=mask)
    lazy = da.from_array(image, chunks=512)
    result = dls.local_percentile(
        lazy, percentile, block_bytes=2048, chunks=64, **options
    )
    graphs = _Graphs()
    with graphs:
        out = dls.to_zarr(result, tmp_path / "out.zarr", batch_size=40)
    expected = dls.local_percentile(image, percentile, **options)
    np.testing.assert_array_equal(out[:], expected, strict=True)
    coarse = next(v for v in result.dask.layers if v.startswith("localstats-coarse"))
    blocks = math.prod(result.dask.layers[coarse].numblocks)
    assert len(graphs.sizes) > 3
    assert len(graphs.coarse) == blocks  # each once
    # each block filled once, from a box around it, in batches
    assert len(graphs.fills) == len(set(graphs.fills)) == blocks * (fill == "nearest")
    # a stored block is read by the batches whose prefilter chunks (64
    # samples, 2 blocks) and their halo (32 samples a side) reach it, and by
    # the pass gathering the extremes, not by every batch (16 blocks: 1008
    # reads over 64 batches when each batch read them all)
    assert len(graphs.loads) <= 8 * blocks
    # resuming the last output chunk reads the extremes stored, not the
    # blocks they were gathered from: only the blocks its prefilter chunk
    # and halo reach (6 of 16; 22 reads when the extremes were gathered)
    z = zarr.open_array(tmp_path / "out.zarr", mode="r+")
    z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
    last = max(p for p in (tmp_path / "out.zarr" / "c").rglob("*") if p.is_file())
    last.unlink()
    resumed = _Graphs()
    with resumed:
        out = dls.to_zarr(result, tmp_path / "out.zarr", resume=True)
    np.testing.assert_array_equal(out[:], expected, strict=True)
    assert resumed.coarse == [] and 0 < len(resumed.loads) < blocks / 2
    if clip:  # a damaged file of extremes: gathered again, the same result
        (stored,) = (tmp_path / "out.zarr").rglob("extremes.npy")
        stored.write_bytes(stored.read_bytes()[:40])
        z.attrs["dask_localstats"] = {**z.attrs["dask_localstats"], "complete": False}
        last.unlink()
        out = dls.to_zarr(result, tmp_path / "out.zarr", resume=True)
        np.testing.assert_array_equal(out[:], expected, strict=True)
        assert np.load(stored).shape == (2, *np.shape(percentile)[:1])


def test_a_write_runs_with_the_objects_before_it_frozen(tmp_path):
    import gc

    counts = []

    def record(block):  # dask calls it on tiny blocks too, to infer the dtype
        if block.size > 1:
            counts.append(gc.get_freeze_count())
        return block

    image = da.from_array(np.arange(512, dtype=np.uint16).reshape(8, 8, 8), chunks=4)
    dls.to_zarr(image.map_blocks(record), tmp_path / "out.zarr")
    assert len(counts) >= 8 and min(counts) > 0
    assert gc.get_freeze_count() == 0


def test_a_local_write_does_not_import_dask_distributed(tmp_path):
    # importing it, to look for a client, costs 0.2 s of a short write
    pytest.importorskip("distributed")
    code = """
        import sys
        import numpy as np
        import dask_localstats as dls

        dls.to_zarr(np.arange(64, dtype=np.uint16).reshape(4, 4, 4), sys.argv[1])
        assert "distributed" not in sys.modules, "dask.distributed was imported"
    """
    argv = [sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "out.zarr")]
    subprocess.run(argv, check=True)
