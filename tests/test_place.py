"""Outputs in local folders and object stores (an S3 server on the loopback)."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from slowly import kill_when

import dask_localstats as dls
from dask_localstats._lock import LOCK
from dask_localstats._place import Folder, Prefix, place_of
from dask_localstats.errors import LockedError, RefusedError, StorageError

TESTS = os.path.dirname(__file__)
GEOMETRY = dict(selem=(4, 8, 8), spacing=(2, 4, 4))


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with a bucket; its storage options."""
    moto = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "test", "secret": "test", "endpoint_url": f"http://{host}:{port}"}
    boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    ).create_bucket(Bucket="bucket")
    yield options
    server.stop()


@pytest.fixture
def image():
    rng = np.random.default_rng(3)
    return rng.integers(0, 1000, (16, 24, 24), dtype=np.uint16)


def put(url, array, options, chunks=(8, 12, 12)):
    store = zarr.storage.FsspecStore.from_url(url, storage_options=options)
    z = zarr.create_array(store, shape=array.shape, chunks=chunks, dtype=array.dtype)
    z[:] = array
    return z


def test_places_of_paths_urls_and_stores(tmp_path):
    assert place_of(tmp_path / "a.zarr") == Folder(tmp_path / "a.zarr")
    assert place_of(f"file://{tmp_path}/a.zarr") == Folder(tmp_path / "a.zarr")
    local = zarr.storage.FsspecStore.from_url(f"file://{tmp_path}/a.zarr")
    assert place_of(local) == Folder(tmp_path / "a.zarr")  # locked as a path is
    remote = place_of("s3://bucket/out.zarr/", {"anon": True})
    assert remote == Prefix("s3://bucket/out.zarr", (("anon", True),))
    with pytest.raises(ValueError, match="must be on this machine"):
        place_of("file://elsewhere/a.zarr")
    with pytest.raises(TypeError, match="`store` must be a path"):
        place_of(3)


@pytest.mark.parametrize("kind", ["folder", "memory"])
def test_a_place_writes_whole_files_and_creates_only_once(tmp_path, kind):
    place = Folder(tmp_path / "p") if kind == "folder" else Prefix("memory://p/q")
    assert not place.exists()
    place.make()
    place.write("a/b", b"1")
    place.create("c", b"2")
    with pytest.raises(FileExistsError):
        place.create("c", b"3")
    assert place.read("c") == b"2" and place.exists() and place.is_folder()
    assert sorted(place.files()[0]) == ["a/b", "c"]
    place.delete(["a/b", "c"])
    assert place.files() == ([], None)


def test_a_symlink_in_a_folder_is_foreign(tmp_path):
    place = Folder(tmp_path)
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert place.files()[1] == "link"


def test_an_unreachable_store_is_one_clear_error():
    place = Prefix("s3://bucket/x.zarr", (("endpoint_url", "http://127.0.0.1:9"),))
    with pytest.raises(StorageError, match=r"s3://bucket/x.zarr cannot be reached"):
        place.exists()


def test_a_job_from_and_to_an_object_store(s3, image):
    put("s3://bucket/job/in.zarr", image, s3)
    background = dls.local_percentile(
        "s3://bucket/job/in.zarr", 0.5, storage_options=s3, **GEOMETRY
    )
    written = dls.to_zarr(background, "s3://bucket/job/out.zarr", storage_options=s3)
    expected = dls.local_percentile(image, 0.5, **GEOMETRY)
    np.testing.assert_array_equal(written[:], expected)
    record = written.attrs["dask_localstats"]
    assert record["complete"] and "s3://bucket/job/in.zarr" in str(record["inputs"])
    keys, _ = place_of("s3://bucket/job/out.zarr", s3).files()
    assert any(k.startswith(".dask_localstats/coarse-") for k in keys)  # checkpoint
    assert LOCK not in keys


def test_object_store_refusals(s3, image):
    put("s3://bucket/refused/in.zarr", image, s3)
    source = dls.open_source("s3://bucket/refused/in.zarr", storage_options=s3)
    result = dls.local_percentile(source, 0.5, **GEOMETRY)
    out = "s3://bucket/refused/out.zarr"
    dls.to_zarr(result, out, storage_options=s3)
    with pytest.raises(RefusedError, match="exists; pass overwrite"):
        dls.to_zarr(result, out, storage_options=s3)
    with pytest.raises(RefusedError, match="is an input or inside it"):
        dls.to_zarr(result, "s3://bucket/refused/in.zarr/x", storage_options=s3)
    place = place_of(out, s3)
    place.write("notes.txt", b"mine")
    with pytest.raises(RefusedError, match=r"holds notes\.txt, which is not a zarr"):
        dls.to_zarr(result, out, storage_options=s3, overwrite=True)
    assert place.read("notes.txt") == b"mine" and len(place.files()[0]) > 2
    place.delete(["notes.txt"])
    place.create(LOCK, b'{"pid": 1, "host": "elsewhere", "started": "now", '
                 b'"run": "x", "refreshed": 1e12}')  # fmt: skip
    with pytest.raises(LockedError, match="being written by another run"):
        dls.to_zarr(result, out, storage_options=s3, overwrite=True)


@pytest.mark.thorough
def test_the_command_line_killed_then_resumed_in_an_object_store(s3, image, tmp_path):
    put("s3://bucket/cli/in.zarr", image, s3, chunks=(4, 6, 6))
    options = [f"--storage-option={k}={v}" for k, v in s3.items()]
    args = ["percentile", "s3://bucket/cli/in.zarr", "s3://bucket/cli/out.zarr",
            "--percentile", "0.3", "--selem", "4", "8", "8", "--spacing", "2", "4",
            "4", "--chunks", "4", "6", "6", *options]  # fmt: skip
    slow = [sys.executable, os.path.join(TESTS, "slowly.py"), "0.3", *args]
    proc = subprocess.Popen(slow, stderr=subprocess.PIPE, text=True)
    place = place_of("s3://bucket/cli/out.zarr", s3)

    def some_chunks():
        return sum(k.startswith("c/") for k in place.files()[0]) >= 3

    kill_when(proc, some_chunks)
    assert LOCK in place.files()[0]  # left by the killed run; its process is gone
    cli = [sys.executable, "-m", "dask_localstats._cli"]
    resumed = subprocess.run([*cli, *args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "chunks computed" in resumed.stderr
    out = zarr.open_array(place.store(), mode="r")
    expected = dls.local_percentile(image, 0.3, selem=(4, 8, 8), spacing=(2, 4, 4))
    np.testing.assert_array_equal(out[:], expected)
    assert out.attrs["dask_localstats"]["complete"] is True
    assert LOCK not in place.files()[0]
