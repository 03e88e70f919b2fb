"""TIFF sources: stacks, slices, series and file names as microscopes write them."""

import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr

import dask_localstats as dls
from dask_localstats._tiff import _read_tiff, series_of

LAVISION = "13-45-12_UltraII[00 x 00]_C{c:02d}_xyz-Table Z{z:04d}.ome.tif"


@pytest.fixture
def lavision(tmp_path):
    """A LaVision UltraMicroscope folder: two channels of 12 planes."""
    rng = np.random.default_rng(0)
    channels = rng.integers(0, 1000, (2, 12, 20, 24)).astype(np.uint16)
    folder = tmp_path / "lv"
    folder.mkdir()
    for c, stack in enumerate(channels):
        for z, plane in enumerate(stack):
            tifffile.imwrite(folder / LAVISION.format(c=c, z=z), plane)
    return folder, channels


def test_literal_brackets_and_series(lavision):
    folder, channels = lavision
    pattern = str(folder / "13-45-12_UltraII[00 x 00]_C01_xyz-Table Z*.ome.tif")
    stack = dls.open_source(pattern)
    assert stack.shape == (12, 20, 24)
    np.testing.assert_array_equal(stack[:], channels[1], strict=True)
    with pytest.raises(ValueError, match=r"holds 2 series of slices .*C00.*C01"):
        dls.open_source(folder)
    np.testing.assert_array_equal(
        dls.open_source(folder, series="C00")[:], channels[0], strict=True
    )
    with pytest.raises(ValueError, match=r"of which none matches 'C07'"):
        dls.open_source(folder, series="C07")
    with pytest.raises(ValueError, match=r"of which 2 match 'xyz'"):
        dls.open_source(folder, series="xyz")


def test_planes_follow_the_plane_number_not_the_name(tmp_path):
    names = ["img_7.tif", "img_10.tif", "img_9.tif", "img_0008.tif"]
    assert list(series_of(names).values()) == [
        ["img_7.tif", "img_0008.tif", "img_9.tif", "img_10.tif"]
    ]
    tiles = [f"t{t}_Z{z}.tif" for t in (1, 2) for z in range(5)]
    assert sorted(series_of(tiles)) == ["t1_Z*.tif", "t2_Z*.tif"]
    assert series_of(["b.tif", "a.tif"]) == {
        "(names without numbers)": ["a.tif", "b.tif"]
    }


def test_command_line_takes_a_lavision_glob_and_refuses_mixed_series(
    lavision, tmp_path
):
    folder, channels = lavision
    pattern = str(folder / LAVISION.format(c=0, z=0)).replace("Z0000", "Z*")
    args = ["--percentile", "0.5", "--selem", "4", "8", "8", "--quiet"]
    cli = [sys.executable, "-m", "dask_localstats._cli", "percentile"]
    runs = [
        subprocess.Popen([*cli, *a, *args], stderr=subprocess.PIPE, text=True)
        for a in (
            [pattern, tmp_path / "a.zarr"],
            [folder, tmp_path / "b.zarr"],
            [folder, tmp_path / "c.zarr", "--series", "C01"],
        )
    ]  # at once: most of a run is importing
    done = []
    for r in runs:
        _, err = r.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(r.args, r.returncode, "", err))
    assert done[0].returncode == 0, done[0].stderr
    expected = dls.local_percentile(channels[0], 0.5, selem=(4, 8, 8))
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "a.zarr")[:], expected)
    assert done[1].returncode == 2
    assert "holds 2 series of slices" in done[1].stderr
    assert "--series LABEL" in done[1].stderr
    assert done[2].returncode == 0, done[2].stderr
    expected = dls.local_percentile(channels[1], 0.5, selem=(4, 8, 8))
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "c.zarr")[:], expected)


def test_copies_of_a_plane_are_refused_and_hidden_files_left_out(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    plane = np.zeros((4, 5), np.uint16)
    for name in ("Z1.tif", "Z2.tif", "._Z1.tif"):  # macOS's resource-fork copy
        tifffile.imwrite(folder / name, plane)
    assert dls.open_source(folder).shape == (2, 4, 5)
    tifffile.imwrite(folder / "Z01.tif", plane)
    with pytest.raises(
        ValueError, match=r"several files of plane 1 .*remove the copies"
    ):
        dls.open_source(folder)


@pytest.mark.parametrize(
    "layout",
    [
        {},  # uncompressed in one piece: mapped
        {"byteorder": ">"},
        {"compression": "zlib", "rowsperstrip": 3},  # strips: decoded
        {"compression": "zlib", "tile": (16, 16)},
    ],
)
def test_every_way_of_reading_a_tiff_gives_the_region(tmp_path, layout):
    plane = np.random.default_rng(2).integers(0, 60000, (40, 48)).astype(np.uint16)
    path = tmp_path / "plane.tif"
    tifffile.imwrite(path, plane, **layout)
    selections = [
        (),  # whole: mapped, or decoded whole
        (slice(2, 37), slice(None)),  # most of it
        (slice(3, 9), slice(5, 20)),  # a small region: through zarr
        (7, slice(1, 40, 3)),
        (Ellipsis, 2),
    ]
    for selection in selections:
        region = _read_tiff(str(path), selection, expect=(plane.shape, plane.dtype))
        np.testing.assert_array_equal(region, plane[selection], strict=True)
