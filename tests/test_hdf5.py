"""HDF5 sources: plain datasets, BigDataViewer/BigStitcher and Imaris files."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import zarr

import dask_localstats as dls

h5py = pytest.importorskip("h5py")

GEOMETRY = dict(selem=(4, 8, 6), spacing=(3, 5, 5))
BDV_XML = """<?xml version="1.0" encoding="UTF-8"?>
<SpimData version="0.2"><SequenceDescription><ViewSetups>
<ViewSetup><id>0</id><voxelSize><unit>um</unit><size>0.5 0.5 2.0</size></voxelSize></ViewSetup>
<ViewSetup><id>1</id><voxelSize><unit>um</unit><size>0.6 0.6 3.0</size></voxelSize></ViewSetup>
</ViewSetups></SequenceDescription></SpimData>
"""


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(30000, 40000, (2, 12, 30, 25)).astype(np.uint16)


def _imaris_size(value):
    return np.array(list(str(value)), dtype="S1")


@pytest.fixture
def files(tmp_path, images):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f.create_dataset("acq/data", data=images[0], chunks=(4, 10, 25))
        f.create_dataset("acq/other", data=images[1])
    bdv = tmp_path / "dataset.h5"  # 16 bits stored as int16, as BigDataViewer does
    with h5py.File(bdv, "w") as f:
        for setup, image in enumerate(images):
            f.create_dataset(f"t00000/s{setup:02d}/0/cells", data=image.view(np.int16))
    (tmp_path / "dataset.xml").write_text(BDV_XML)
    ims = tmp_path / "stack.ims"  # padded to whole chunks, cropped by its attributes
    with h5py.File(ims, "w") as f:
        for channel, image in enumerate(images):
            group = f.create_group(
                f"DataSet/ResolutionLevel 0/TimePoint 0/Channel {channel}"
            )
            padded = np.zeros((16, 32, 32), np.uint16)
            padded[:12, :30, :25] = image
            group.create_dataset("Data", data=padded, chunks=(16, 32, 32))
            for axis, size in zip("ZYX", image.shape, strict=True):
                group.attrs[f"ImageSize{axis}"] = _imaris_size(size)
    return plain, bdv, ims


def test_each_layout_opens_lazily_and_matches(files, images):
    plain, bdv, ims = files
    cases = [
        (dls.open_source(f"{plain}:/acq/data"), images[0]),
        (dls.open_source(bdv), images[0]),
        (dls.open_source(bdv, setup=1), images[1]),
        (dls.open_source(ims, setup=1), images[1]),
    ]
    for source, image in cases:
        assert (source.shape, source.dtype) == (image.shape, np.uint16)
        assert len(pickle.dumps(source)) < 2000  # names, no data
        np.testing.assert_array_equal(
            source[2:5, 3:9, ...], image[2:5, 3:9], strict=True
        )
        np.testing.assert_array_equal(source[3], image[3], strict=True)
        result = dls.local_percentile(source, 0.5, **GEOMETRY)
        expected = dls.local_percentile(image, 0.5, **GEOMETRY)
        np.testing.assert_array_equal(result.compute(), expected, strict=True)
    assert cases[1][0].voxel_size == (2.0, 0.5, 0.5)  # z y x, from the XML


def test_refusals_name_what_to_give(files, tmp_path):
    plain, bdv, ims = files
    with pytest.raises(ValueError, match=r"holds 2 datasets .*name one: .*plain.h5:/"):
        dls.open_source(plain)
    with pytest.raises(ValueError, match=r"has no dataset '/nothing'"):
        dls.open_source(f"{plain}:/nothing")
    with pytest.raises(ValueError, match=r"has no 't00000/s02/0/cells' \(check"):
        dls.open_source(bdv, setup=2)
    with pytest.raises(ValueError, match=r"has no 'DataSet/ResolutionLevel 1/"):
        dls.open_source(ims, level=1)
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        dls.open_source(tmp_path / "missing.h5")


def test_command_line_reads_bigdataviewer_and_imaris(files, images, tmp_path):
    _, bdv, ims = files
    cli = [sys.executable, "-m", "dask_localstats._cli", "percentile"]
    args = ["--percentile", "0.5", "--selem", "4", "8", "6", "--spacing", "3", "5", "5",
            "--quiet", "--setup", "1"]  # fmt: skip
    runs = [
        subprocess.Popen(
            [*cli, bdv, tmp_path / "b.zarr", *args], stderr=subprocess.PIPE
        ),
        subprocess.Popen(
            [*cli, ims, tmp_path / "i.zarr", *args], stderr=subprocess.PIPE
        ),
    ]
    for run in runs:
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    expected = dls.local_percentile(images[1], 0.5, **GEOMETRY)
    bdv_out = zarr.open_group(tmp_path / "b.zarr", mode="r")  # OME: the XML's scale
    np.testing.assert_array_equal(bdv_out["0"][:], expected, strict=True)
    transforms = bdv_out.attrs["ome"]["multiscales"][0]["datasets"][0]
    assert transforms["coordinateTransformations"][0]["scale"] == [3.0, 0.6, 0.6]
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "i.zarr")[:], expected)


def test_damaged_or_removed_files_are_named(files):
    from dask_localstats.errors import CorruptChunkError, SourceNotFoundError

    plain, bdv, _ = files
    source = dls.open_source(f"{plain}:/acq/data")
    plain.write_bytes(plain.read_bytes()[:2048])  # truncated after opening
    with pytest.raises(CorruptChunkError, match=r"/acq/data of HDF5 file .*plain.h5"):
        source[0]
    lazy = dls.open_source(bdv)
    bdv.unlink()
    with pytest.raises(SourceNotFoundError, match=r"HDF5 file .*dataset.h5' is gone"):
        lazy[0]
