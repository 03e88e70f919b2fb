"""The same pipelines on a dask.distributed cluster with process workers."""

import os
import signal
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from dask.array.utils import assert_eq

import dask_localstats as dls

pytestmark = pytest.mark.thorough

distributed = pytest.importorskip("distributed")

KWARGS = dict(selem=(8, 16, 16), spacing=(8, 8, 8))


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 1000, (32, 64, 64)).astype(np.uint16)
    path = tmp_path_factory.mktemp("data") / "image.zarr"
    z = zarr.create_array(
        path, shape=image.shape, chunks=(16, 32, 32), dtype=image.dtype
    )
    z[:] = image
    return image, str(path)


def test_results_match_the_local_computation(client, stored):
    image, path = stored
    result = dls.local_percentile(path, [0.1, 0.5], block_bytes=2**16, **KWARGS)
    background = result[..., 0]
    out = (da.from_zarr(path).astype(np.float64) - background).compute()
    expected = dls.local_percentile(image, [0.1, 0.5], **KWARGS)
    assert_eq(result, expected, scheduler=client, rtol=0, atol=0)  # on the cluster
    np.testing.assert_array_equal(out, image.astype(np.float64) - expected[..., 0])


def test_result_survives_the_loss_of_a_worker(client, stored):
    image, path = stored

    def slow_mean(kept):
        time.sleep(0.02)
        return float(np.mean(kept))

    result = dls.apply_local_function(
        path, slow_mean, interpolate=None, dtype=np.float64, block_bytes=2**15, **KWARGS
    )
    future = client.compute(result)
    deadline = time.monotonic() + 30
    while not any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = next(w for w, tasks in client.processing().items() if tasks)
    pid = client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    computed = future.result(timeout=120)
    assert victim not in client.scheduler_info()["workers"]
    expected = dls.apply_local_function(
        image, np.mean, interpolate=None, dtype=np.float64, **KWARGS
    )
    np.testing.assert_array_equal(computed, expected)
