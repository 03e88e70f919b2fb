"""Locations of stored data, listings of inputs and absent chunks."""

import functools
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
    files = [locate(tmp_path / "slices" / f"Z{z}.tif") for z in range(3)]
    assert locations(slices) == [*files, locate(tmp_path / "slices")]
    assert locations(image) == []
    # slices in several folders: the files, not an ancestor of them all
    (tmp_path / "more").mkdir()
    tifffile.imwrite(tmp_path / "more" / "Z3.tif", image[0])
    spread = dls.open_source(str(tmp_path / "*" / "Z*.tif"))
    assert locations(spread) == [locate(p) for p in spread.files]


def test_locations_take_what_holds_an_input_whole(tmp_path):
    image = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
    group = zarr.create_group(tmp_path / "img.zarr")
    for level in ("0", "1"):
        group.create_array(level, data=image)
    img = locate(tmp_path / "img.zarr")
    # the outermost group holding an array, however the array is reached
    level0 = zarr.open_array(tmp_path / "img.zarr" / "0")
    assert locations(level0) == [img]
    logged = zarr.open_array(zarr.storage.LoggingStore(level0.store), mode="r")
    assert locations(logged) == [img]
    for inline in (
        da.from_zarr(tmp_path / "img.zarr" / "1", inline_array=True) + 1,
        da.from_array(level0, inline_array=True),
    ):
        assert locations(inline) == [img]
    named = tmp_path / "img.zarr" / "0"
    assert locations(str(named)) == [locate(named), img]  # as named, and whole
    # read by a function given it in a partial, or in a dict
    read = functools.partial(lambda z, block_info=None: z[:], level0)
    assert locations(da.map_blocks(read, chunks=image.shape, dtype=image.dtype)) == [
        img
    ]
    take = lambda block, of: of["z"][:]  # noqa: E731
    held = da.map_blocks(take, da.zeros(image.shape), of={"z": level0}, dtype="u2")
    assert locations(held) == [img]
    zipped = zarr.create_array(
        zarr.storage.ZipStore(tmp_path / "a.zip", mode="w"), data=image
    )
    assert locations(zipped) == [locate(tmp_path / "a.zip")]


class _Elsewhere(zarr.abc.store.Store):
    """A store of a kind whose location is unknown (a dict's, behind another class)."""

    supports_writes = supports_deletes = supports_listing = True
    supports_partial_writes = False

    def __init__(self):
        super().__init__(read_only=False)
        self.inner = zarr.storage.MemoryStore()

    def __eq__(self, other):
        return self is other

    def __getattr__(self, name):  # get, set, exists, list, ...: the dict's
        return getattr(self.__dict__["inner"], name)


for _name in sorted(zarr.abc.store.Store.__abstractmethods__ - {"__eq__"}):
    if not _name.startswith("supports"):
        setattr(
            _Elsewhere,
            _name,
            lambda self, *a, _n=_name, **k: getattr(self.inner, _n)(*a, **k),
        )
_Elsewhere.__abstractmethods__ = frozenset()


def test_an_input_in_a_store_of_unknown_location_is_refused():
    z = zarr.create_array(_Elsewhere(), shape=(2,), dtype="u1")
    with pytest.raises(
        dls.errors.RefusedError, match=r"store of unknown kind \(_Elsewhere\)"
    ):
        locations(da.from_zarr(z))


def test_file_urls_are_listed_with_status_change_times(tmp_path):
    path = write_zarr(tmp_path / "a.zarr", np.zeros((4, 4), np.uint16), chunks=(2, 2))
    by_path = Inventory.of(zarr.open_array(path, mode="r"))
    by_url = Inventory.of(zarr.open_array(f"file://{path}", mode="r"))
    assert by_url.entries == by_path.entries


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
