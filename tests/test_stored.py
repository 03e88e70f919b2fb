"""Locations of stored data, listings of inputs and absent chunks."""

import os

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from strategies import write_zarr

import dask_localstats as dls
from dask_localstats._stored import (
    Inventory,
    Location,
    absent_chunks,
    locate,
    locations,
)


def test_every_spelling_of_a_place_is_one_location(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    os.chdir(tmp_path)
    where = Location("file", str(tmp_path / "data"))
    for spelling in [
        tmp_path / "data",
        "data",
        "data/",
        "./x/../data",
        "link",
        f"file://{tmp_path}/data",
        f"file://{tmp_path}/link/",
    ]:
        assert locate(spelling) == where, spelling
    inside = locate("data/a.zarr/c/0")
    assert where.contains(inside) and where.overlaps(inside)
    assert not inside.contains(where) and inside.overlaps(where)
    assert not where.contains(locate("data2"))  # a sibling, not a child
    assert not where.contains(Location("s3", str(tmp_path / "data")))
    assert str(locate("memory://bucket/x.zarr")) == "memory:///bucket/x.zarr"


def test_locations_of_arrays_lazy_results_and_tiff_slices(tmp_path):
    image = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
    write_zarr(tmp_path / "a.zarr", image, chunks=(3, 4, 5))
    (tmp_path / "slices").mkdir()
    for z, plane in enumerate(image):
        tifffile.imwrite(tmp_path / "slices" / f"Z{z}.tif", plane)
    a = locate(tmp_path / "a.zarr")
    lazy = da.from_zarr(f"file://{tmp_path}/a.zarr") + 1
    assert locations(lazy) == [a]
    result = dls.local_percentile(str(tmp_path / "a.zarr"), 0.5, selem=(3, 2, 5))
    assert locations(result) == [a]
    slices = dls.open_source(tmp_path / "slices")
    assert locations(slices) == [
        locate(tmp_path / "slices" / f"Z{z}.tif") for z in range(3)
    ]
    assert locations(image) == []


def test_inventories_notice_rewritten_and_removed_entries(tmp_path):
    image = np.arange(64, dtype=np.uint16).reshape(8, 8)
    path = write_zarr(tmp_path / "a.zarr", image, chunks=(4, 4))
    z = zarr.open_array(path, mode="r+")
    before = Inventory.of(z)
    assert before.changes(before.record()) is None
    z[0:4, 4:8] = 7
    (path / "c" / "1" / "1").unlink()
    change = Inventory.of(z).changes(before.record())
    assert "5 stored entries then, 4 now" in change  # zarr.json and 4 chunks
    assert "modified since: c/0/1" in change


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (dict(zarr_format=2), ["1.0"]),
        (dict(zarr_format=3), ["c/1/0"]),
        (dict(zarr_format=3, shards=(4, 8)), ["c/1/0"]),
    ],
)
def test_absent_chunks_of_v2_v3_and_sharded_arrays(tmp_path, options, expected):
    z = zarr.create_array(
        tmp_path / "a.zarr", shape=(8, 8), chunks=(4, 4), dtype="u1", **options
    )
    z[:] = 1
    z[4:8, 0 : 4 if "shards" not in options else 8] = 0  # all fill value: not written
    assert absent_chunks(z) == expected
