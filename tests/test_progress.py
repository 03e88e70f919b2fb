"""The progress bar: stages weighted by voxels, rate and time left."""

import io

import numpy as np
import zarr
from strategies import write_zarr

import dask_localstats as dls
from dask_localstats._progress import Progress, Stage


def test_the_bar_weighs_stages_by_voxels_not_tasks():
    stages = [Stage("background", "c", 1000.0, 4), Stage("write", "w", 10.0, 400)]
    progress = Progress(stages, out=io.StringIO())
    for _ in range(2):
        progress.advance("c-block")  # two heavy blocks: half the background
    line = progress.line()
    assert "25% | background  50% write   0%" in line
    assert "left" in line and "elapsed" in line and "vox/s" in line
    for _ in range(400):
        progress.advance("w-chunk")
    assert "75% | background  50% write 100%" in progress.line()


def test_a_write_shows_both_stages_to_the_end(tmp_path):
    image = np.random.default_rng(0).integers(0, 900, (12, 30, 25)).astype(np.uint16)
    source = write_zarr(tmp_path / "in.zarr", image)
    background = dls.local_percentile(
        str(source), 0.5, selem=(6, 8, 5), spacing=(4, 5, 5), block_bytes=4000
    )
    log = io.StringIO()
    dls.to_zarr(background, tmp_path / "out.zarr", progress=log)
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith(
        "[##############################] 100% | background 100%"
    )
    assert "write 100%" in lines[-1]
    expected = dls.local_percentile(image, 0.5, selem=(6, 8, 5), spacing=(4, 5, 5))
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "out.zarr")[:], expected)
