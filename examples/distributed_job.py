"""The background removal of ``background_removal.py`` on a LocalCluster.

The volume is first written to a zarr store; the background removal then
reads it lazily (``dask.array.from_zarr``), so the task graph holds only the
store's location and the workers read their own chunks. ``local_percentile``
on a dask array gives a lazy dask array, the subtraction stays lazy, and ``dask_localstats.to_zarr``
streams the result into a new zarr array on a
``distributed.LocalCluster(n_workers=2, threads_per_worker=1)``: no step
holds the whole volume in memory. The cluster's workers are started
without dask.distributed's ``MALLOC_TRIM_THRESHOLD_``, under which glibc
maps every array of 128 KiB or more afresh and the kernels run 2 to 3 times
slower (see the README's Clusters section). For comparison the same job
also runs with dask's default threaded scheduler, and the two results are
checked to be identical.

The figure shows a plane before and after, with the timings.

Run it with::

    python examples/distributed_job.py [--out examples/figures]
"""

import tempfile
from pathlib import Path

import dask
import dask.array as da
import matplotlib.pyplot as plt
import numpy as np
import zarr
from _common import clim, lightsheet, parse_args, save, show, timed
from background_removal import SHAPE, remove_background
from distributed import Client, LocalCluster

from dask_localstats import to_zarr

CHUNKS = (16, 256, 256)


def run(source, target):
    """Remove the background of the zarr array at `source` into `target`."""
    _, removed = remove_background(da.from_zarr(source))  # lazy in, lazy out
    return to_zarr(removed.astype(np.float32), target, chunks=CHUNKS)


def main(argv=None):
    args = parse_args(argv, __doc__)
    times = {}
    with tempfile.TemporaryDirectory() as folder:
        source = str(Path(folder) / "volume.zarr")
        with timed("make and store the volume", times):
            to_zarr(lightsheet(SHAPE), source, chunks=CHUNKS)
        # the workers keep glibc's own defaults, as a plain process does
        glibc = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
        with timed("start the cluster", times), dask.config.set(glibc):
            cluster = LocalCluster(
                n_workers=2, threads_per_worker=1, dashboard_address=":0"
            )
            client = Client(cluster)
        try:
            with timed("background removal on the cluster", times):
                stored = run(source, Path(folder) / "cluster.zarr")
        finally:
            client.close()
            cluster.close()
        threads = dask.config.set(scheduler="threads", num_workers=2)
        with timed("same job, threaded scheduler", times), threads:
            threaded = run(source, Path(folder) / "threads.zarr")
        result = stored[:]
        assert np.array_equal(result, threaded[:]), "cluster and threads differ"
        raw = zarr.open_array(source, mode="r")[SHAPE[0] // 2]

    z = SHAPE[0] // 2
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5), layout="constrained")
    show(axes[0], raw, f"raw, plane z={z}", **clim(raw))
    show(
        axes[1], result[z], "raw - background (read back from zarr)", **clim(result[z])
    )
    text = "\n".join(f"{label}: {seconds:.1f} s" for label, seconds in times.items())
    fig.text(0.5, -0.01, text, ha="center", va="top", family="monospace")
    fig.suptitle(
        f"Background removal of a {SHAPE} uint16 zarr volume on a LocalCluster "
        "(2 workers x 1 thread)"
    )
    save(fig, args.out, "distributed_job.png")
    return times


if __name__ == "__main__":
    main()
