"""Run the command line with slow chunk writes, so that tests can kill it.

``python tests/slowly.py DELAY ARGS...`` runs ``dask-localstats ARGS...``
after making zarr's local and fsspec stores sleep `DELAY` seconds before
writing each chunk (metadata is written at once). The delay is zarr's, not the
library's: the library runs unchanged.
"""

import os
import signal
import sys
import time

from zarr.storage import FsspecStore, LocalStore

METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def slow_writes(delay):
    """Make every chunk write of zarr's local and fsspec stores `delay` s longer."""
    for store in (LocalStore, FsspecStore):
        original = store.set

        async def set(self, key, value, *args, original=original, **kwargs):
            if not key.endswith(METADATA):
                time.sleep(delay)
            return await original(self, key, value, *args, **kwargs)

        store.set = set


def kill_when(proc, done, seconds=60):
    """SIGKILL a running process as soon as ``done()``; it must still run."""
    deadline = time.monotonic() + seconds
    while not done():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


if __name__ == "__main__":
    slow_writes(float(sys.argv[1]))
    from dask_localstats._cli import main

    sys.exit(main(sys.argv[2:]))
