"""A background-removed OME-Zarr pyramid, opened in napari: a screenshot.

The command line removes the light-sheet background of a synthetic stack
and writes the result as an OME-Zarr 0.5 image of four resolution levels
with the stack's voxel size (``--subtract --voxel-size 4 1.6 1.6 --pyramid
4``); napari opens it with its OME-Zarr plugin (napari-ome-zarr) as one
multiscale image layer, and this script saves a screenshot of napari's
window showing the middle plane.

It needs napari with a Qt binding and the plugin, and a display; without
one, a virtual display does::

    pip install "napari[pyqt5]" napari-ome-zarr
    xvfb-run -a python examples/pyramid_in_napari.py [--out examples/figures]
"""

import tempfile
from pathlib import Path

import zarr
from _common import lightsheet, parse_args

from dask_localstats._cli import main as command_line

SHAPE = (32, 1024, 1024)  # (z, y, x)


def write_pyramid(folder):
    """The synthetic stack in `folder`, and its flattened OME-Zarr pyramid."""
    source, out = Path(folder) / "stack.zarr", Path(folder) / "flat.ome.zarr"
    stack = zarr.create_array(source, shape=SHAPE, chunks=(8, 256, 256), dtype="u2")
    stack[:] = lightsheet(SHAPE)
    command_line([
        "percentile", str(source), str(out), "--percentile", "0.25",
        "--selem", "1", "200", "200", "--spacing", "1", "25", "25",
        "--step", "1", "2", "2", "--subtract", "--voxel-size", "4", "1.6", "1.6",
        "--pyramid", "4", "--quiet",
    ])  # fmt: skip
    return out


def main(argv=None):
    args = parse_args(argv, __doc__)
    import napari

    with tempfile.TemporaryDirectory() as folder:
        out = write_pyramid(folder)
        levels = [zarr.open_group(out, mode="r")[str(k)].shape for k in range(4)]
        print("levels:", ", ".join("x".join(map(str, s)) for s in levels))
        viewer = napari.Viewer(show=False)
        [layer] = viewer.open(str(out), plugin="napari-ome-zarr")
        layer.contrast_limits = (0, 1500)
        viewer.dims.set_point(0, SHAPE[0] // 2 * 4.0)  # z in micrometers
        viewer.reset_view()
        viewer.window._qt_window.resize(1100, 800)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "pyramid_in_napari.png"
        viewer.screenshot(str(path), canvas_only=False)
        viewer.close()
    print(f"saved {path}")


if __name__ == "__main__":
    main()
