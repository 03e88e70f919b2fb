"""Zarr sources (v2, v3, groups, OME-Zarr) and storing results."""

import pickle

import dask.array as da
import numpy as np
import pytest
import zarr
from dask.array.utils import assert_eq
from strategies import write_zarr

import dask_localstats as dls
from dask_localstats.errors import MissingChunksError

KWARGS = dict(selem=(6, 8, 5), spacing=(4, 5, 5))


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 500, (17, 30, 25)).astype(np.uint16)


def _write(path, image, zarr_format=3, chunks=(5, 7, 9)):
    return zarr.open_array(write_zarr(path, image, chunks, zarr_format), mode="r")


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("order", [None, 1, 3])
def test_zarr_paths_give_lazy_results_equal_to_numpy(
    tmp_path, image, zarr_format, order
):
    path = tmp_path / "image.zarr"
    _write(path, image, zarr_format)
    result = dls.local_percentile(str(path), [0.1, 0.5], interpolate=order, **KWARGS)
    assert isinstance(result, da.Array)
    expected = dls.local_percentile(image, [0.1, 0.5], interpolate=order, **KWARGS)
    assert_eq(result, expected, rtol=0, atol=0)
    if order is not None:
        assert result.chunks[:3] == da.core.normalize_chunks((5, 7, 9), image.shape)


def test_zarr_array_input_keeps_data_out_of_the_graph(tmp_path, image):
    z = _write(tmp_path / "image.zarr", image)
    result = dls.local_percentile(z, 0.5, **KWARGS)
    graph = dict(result.__dask_graph__())
    # every task is a reference to the store and some geometry, never data
    assert max(len(pickle.dumps(task)) for task in graph.values()) < image.nbytes / 4
    assert_eq(result, dls.local_percentile(image, 0.5, **KWARGS), rtol=0, atol=0)


def test_group_with_one_array_and_ome_zarr(tmp_path, image):
    group = zarr.open_group(tmp_path / "single.zarr", mode="w")
    group.create_array("data", shape=image.shape, dtype=image.dtype)[:] = image
    result = dls.local_percentile(str(tmp_path / "single.zarr"), 0.5, **KWARGS)
    expected = dls.local_percentile(image, 0.5, **KWARGS)
    assert_eq(result, expected, rtol=0, atol=0)

    for version, attrs in [("0.4", None), ("0.5", "ome")]:
        path = tmp_path / f"ome-{version}.zarr"
        group = zarr.open_group(path, mode="w")
        group.create_array("0", shape=image.shape, dtype=image.dtype)[:] = image
        half = image[::2, ::2, ::2]
        group.create_array("1", shape=half.shape, dtype=half.dtype)[:] = half
        multiscales = [
            {
                "version": version,
                "axes": [{"name": a} for a in "zyx"],
                "datasets": [{"path": "0"}, {"path": "1"}],
            }
        ]
        if attrs:
            group.attrs["ome"] = {"version": version, "multiscales": multiscales}
        else:
            group.attrs["multiscales"] = multiscales
        result = dls.local_percentile(str(path), 0.5, **KWARGS)
        assert_eq(result, expected, rtol=0, atol=0)


def test_zarr_mask_with_other_chunks(tmp_path, image):
    mask = image > 200
    zmask = zarr.create_array(
        tmp_path / "mask.zarr", shape=mask.shape, chunks=(4, 4, 4), dtype=bool
    )
    zmask[:] = mask  # zarr leaves out the chunks that are all False
    assert zmask.nchunks_initialized < zmask.nchunks
    z = _write(tmp_path / "image.zarr", image)
    with pytest.raises(MissingChunksError, match=r"`mask` .*mask.zarr lacks \d+ of"):
        dls.local_percentile(z, 0.5, mask=str(tmp_path / "mask.zarr"), **KWARGS)
    result = dls.local_percentile(
        z, 0.5, mask=str(tmp_path / "mask.zarr"), missing_chunks="fill", **KWARGS
    )
    expected = dls.local_percentile(image, 0.5, mask=mask, **KWARGS)
    assert_eq(result, expected, rtol=0, atol=0)


def test_numpy_source_with_lazy_mask_is_lazy(image):
    mask = da.from_array(image > 100, chunks=6)
    result = dls.local_percentile(image, 0.5, mask=mask, **KWARGS)
    assert isinstance(result, da.Array)


def test_source_is_never_written(tmp_path, image):
    path = tmp_path / "image.zarr"
    _write(path, image)
    before = sorted(p.stat().st_mtime_ns for p in path.rglob("*"))
    dls.local_percentile(str(path), 0.5, **KWARGS).compute()
    after = sorted(p.stat().st_mtime_ns for p in path.rglob("*"))
    assert before == after
    np.testing.assert_array_equal(zarr.open_array(path, mode="r")[:], image)


def test_to_zarr_writes_compressed_v3_chunk_by_chunk(tmp_path, image):
    z = _write(tmp_path / "image.zarr", image)
    background = dls.local_percentile(z, 0.2, **KWARGS)
    result = da.from_zarr(z) - background
    out = dls.to_zarr(
        result, tmp_path / "out.zarr", chunks=(8, 8, 8), attributes={"note": "test"}
    )
    reopened = zarr.open_array(tmp_path / "out.zarr", mode="r")
    assert reopened.metadata.zarr_format == 3
    assert reopened.chunks == (8, 8, 8)
    assert reopened.attrs["note"] == "test"
    assert reopened.compressors  # zarr's default compression is kept
    expected = image - dls.local_percentile(image, 0.2, **KWARGS)
    np.testing.assert_array_equal(out[:], expected)
    with pytest.raises(ValueError, match=r"exists"):
        dls.to_zarr(result, tmp_path / "out.zarr")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`source`: no zarr array or group"):
        dls.local_percentile(str(tmp_path / "missing.zarr"), 0.5, selem=(2, 2))
    with pytest.raises(FileNotFoundError, match=r"`mask`: no zarr array or group"):
        dls.local_percentile(
            np.zeros((4, 4)), 0.5, selem=(2, 2), mask=str(tmp_path / "missing.zarr")
        )


def test_path_that_is_not_zarr(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises((FileNotFoundError, ValueError), match=r"notes\.txt"):
        dls.local_percentile(str(tmp_path / "notes.txt"), 0.5, selem=(2, 2))


def test_group_with_several_arrays(tmp_path):
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("a", shape=(4, 4), dtype="u1")
    group.create_array("b", shape=(4, 4), dtype="u1")
    with pytest.raises(ValueError, match=r"zarr group with 2 arrays \(\['a', 'b'\]\)"):
        dls.local_percentile(str(tmp_path / "g.zarr"), 0.5, selem=(2, 2))


def test_bad_source_types():
    with pytest.raises(TypeError, match=r"`source` must be an array or the path"):
        dls.local_percentile(None, 0.5, selem=(2, 2))
    with pytest.raises(TypeError, match=r"`source` must be a numeric array"):
        dls.local_percentile(np.array([object(), object()]), 0.5, selem=2)


def test_from_zarr_arrays_are_read_from_the_store(tmp_path, image):
    z = _write(tmp_path / "image.zarr", image)
    source = da.from_zarr(z)
    result = dls.local_percentile(source, 0.5, **KWARGS)
    assert not set(source.dask.layers) & set(result.dask.layers)
    assert_eq(result, dls.local_percentile(image, 0.5, **KWARGS), rtol=0, atol=0)
