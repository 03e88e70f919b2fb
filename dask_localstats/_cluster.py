"""Where a computation runs: this process's threads or a dask.distributed cluster.

Computations use dask's default scheduler: this process's threads, or the
dask.distributed client in use. :func:`connect` makes one from a scheduler's
address or starts a local cluster of worker processes (with the
``distributed`` extra), for as long as a ``with`` block lasts.
"""

from __future__ import annotations

import contextlib

__all__ = ["connect"]


@contextlib.contextmanager
def connect(scheduler=None, workers=None, memory_limit=None):
    """A dask.distributed client for the duration of a ``with`` block.

    Parameters
    ----------
    scheduler : str or None
        Address of a running scheduler, e.g. ``"tcp://10.0.0.1:8786"``.
    workers : int or None
        Start a local cluster of this many worker processes instead.
    memory_limit : str or None
        Memory limit per local worker, e.g. ``"4GB"``; default ``"auto"``.

    Yields
    ------
    distributed.Client or None
        None when neither `scheduler` nor `workers` is given: computations
        then run in this process's threads.

    Examples
    --------
    >>> with connect() as client:
    ...     print(client)
    None
    """
    if scheduler is None and workers is None:
        if memory_limit is not None:
            msg = "`memory_limit` (--memory-limit) applies to `workers` (--workers)"
            raise ValueError(msg)
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - the `distributed` extra is missing
        msg = "a cluster needs: pip install 'dask-localstats[distributed]'"
        raise ValueError(msg) from None
    if scheduler is not None:
        try:
            client = Client(scheduler)
        except OSError as error:
            msg = f"`scheduler`: cannot connect to {scheduler!r}: {error}"
            raise ValueError(msg) from None
        with client:
            yield client
        return
    if workers < 1:
        msg = f"`workers` (--workers) must be a positive number of processes, got {workers}"
        raise ValueError(msg)
    cluster = LocalCluster(
        n_workers=workers,
        processes=True,
        dashboard_address=":0",
        memory_limit=_memory_limit(memory_limit),
    )
    with cluster, Client(cluster) as client:
        yield client


def _memory_limit(text):
    if text is None or text == "auto":
        return "auto"
    from dask.utils import parse_bytes

    try:
        return parse_bytes(text)
    except (ValueError, TypeError):
        msg = f"`memory_limit` (--memory-limit) must be a size such as 4GB or 'auto', got {text!r}"
        raise ValueError(msg) from None
