"""Where a computation runs: this process's threads or a dask.distributed cluster.

Computations use dask's default scheduler: this process's threads, or the
dask.distributed client in use. :func:`connect` makes one from a scheduler's
address, starts a local cluster of worker processes (with the
``distributed`` extra), or submits worker jobs to a batch system (SLURM,
PBS, SGE, LSF... with the ``jobqueue`` extra, dask-jobqueue), for as long
as a ``with`` block lasts.

Each worker of a cluster started here is set up for the library's work
(:func:`tune_workers`):

- it decodes and encodes zarr chunks in as many threads as it runs tasks:
  zarr's own pool would otherwise take every core of the machine in every
  worker, so that a worker of one thread already kept two cores busy and
  eight workers of a node ran dozens of codec threads against each other;
- its C library keeps freed memory for the next arrays
  (:func:`~dask_localstats._engine.keep_freed_memory`): dask.distributed's
  default for workers has every array of 128 KiB or more mapped afresh,
  which made the kernels 2 to 3 times slower.
"""

from __future__ import annotations

import contextlib

__all__ = ["JOBQUEUES", "connect", "job_script"]

# batch systems, by their dask-jobqueue cluster class; "local" runs the jobs
# as processes of this machine (dask-jobqueue's own test runner)
JOBQUEUES = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "oar": "OARCluster",
    "htcondor": "HTCondorCluster",
    "moab": "MoabCluster",
    "local": "local.LocalCluster",
}


@contextlib.contextmanager
def connect(
    scheduler=None, workers=None, memory_limit=None, jobqueue=None, jobs=1,
    job_options=None, threads=None,
):  # fmt: skip
    """A dask.distributed client for the duration of a ``with`` block.

    Parameters
    ----------
    scheduler : str or None
        Address of a running scheduler, e.g. ``"tcp://10.0.0.1:8786"``.
    workers : int or None
        Start a local cluster of this many worker processes instead.
    memory_limit : str or None
        Memory limit per local worker, e.g. ``"4GB"``; default ``"auto"``.
    jobqueue : str or None
        Instead, submit `jobs` worker jobs to this batch system (a key of
        :data:`JOBQUEUES`), through dask-jobqueue's cluster class made with
        `job_options` (``cores``, ``memory``, ``walltime``, ``queue``,
        ``account``, ``scheduler_options``...); they are cancelled when the
        block ends.
    jobs : int
        Number of jobs.
    job_options : dict or None
        Keyword arguments of the dask-jobqueue cluster class.
    threads : int or None
        Threads of each local worker (default: the cores shared among the
        `workers`).

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
    if workers is None:
        for name, value in (("memory_limit", memory_limit), ("threads", threads)):
            if value is not None:
                flag = name.replace("_", "-")
                msg = f"`{name}` (--{flag}) applies to `workers` (--workers)"
                raise ValueError(msg)
    if jobqueue is not None:
        with _jobqueue_cluster(jobqueue, job_options) as cluster:
            cluster.scale(jobs=_positive("jobs", jobs))
            from distributed import Client

            with Client(cluster) as client:
                yield tune_workers(client)
        return
    if scheduler is None and workers is None:
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
        with client:  # a cluster of someone's: its workers are left as they are
            yield client
        return
    if workers < 1:
        msg = f"`workers` (--workers) must be a positive number of processes, got {workers}"
        raise ValueError(msg)
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=None if threads is None else _positive("threads", threads),
        processes=True,
        dashboard_address=":0",
        memory_limit=_memory_limit(memory_limit),
    )
    with cluster, Client(cluster) as client:
        yield tune_workers(client)


def tune_workers(client):
    """Set up the workers of `client` for the library's work.

    Registers a worker plugin (on the workers there are and those to come)
    that sets zarr's ``threading.max_workers`` to the worker's number of
    threads before zarr makes its pool, at a worker's first read or write,
    and has the worker's C library keep freed memory for the next arrays
    (:func:`~dask_localstats._engine.keep_freed_memory`). Returns `client`.
    """
    from distributed import WorkerPlugin

    class TuneWorkers(WorkerPlugin):
        name = "dask-localstats-tune-workers"
        idempotent = True

        def setup(self, worker):
            import zarr

            from dask_localstats._engine import keep_freed_memory

            zarr.config.set({"threading.max_workers": worker.state.nthreads})
            keep_freed_memory()

    client.register_plugin(TuneWorkers())
    return client


def _memory_limit(text):
    if text is None or text == "auto":
        return "auto"
    from dask.utils import parse_bytes

    try:
        return parse_bytes(text)
    except (ValueError, TypeError):
        msg = f"`memory_limit` (--memory-limit) must be a size such as 4GB or 'auto', got {text!r}"
        raise ValueError(msg) from None


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"`{name}` (--{name}) must be a positive number, got {value!r}"
        raise ValueError(msg)
    return value


def _jobqueue_cluster(kind, options):
    """The dask-jobqueue cluster of batch system `kind`, made with `options`."""
    if kind not in JOBQUEUES:
        msg = (
            f"`jobqueue` (--jobqueue) must be one of {sorted(JOBQUEUES)}, got {kind!r}"
        )
        raise ValueError(msg)
    try:
        import dask_jobqueue
        import dask_jobqueue.local
    except ImportError:  # pragma: no cover - the `jobqueue` extra is missing
        msg = "a batch-system cluster needs: pip install 'dask-localstats[jobqueue]'"
        raise ValueError(msg) from None
    module, _, name = JOBQUEUES[kind].rpartition(".")
    cls = getattr(dask_jobqueue.local if module else dask_jobqueue, name)
    try:
        return cls(**(options or {}))
    except (TypeError, ValueError) as error:
        msg = f"`job_options` (--job-option) for {kind}: {error}"
        raise ValueError(msg) from None


def job_script(kind, options=None):
    """The script each worker job of batch system `kind` would run.

    Examples
    --------
    >>> script = job_script("slurm", {"cores": 4, "memory": "16GB", "queue": "cpu"})
    >>> "#SBATCH -p cpu" in script and "dask_worker" in script.replace(".", "_")
    True
    """
    # the script names this scheduler, which serves nothing: its dashboard
    # takes any free port, not the 8787 of a cluster that may be running here
    options = dict(options or {})
    scheduler = options.get("scheduler_options")
    if scheduler is None or isinstance(scheduler, dict):
        options["scheduler_options"] = {"dashboard_address": ":0", **(scheduler or {})}
    with _jobqueue_cluster(kind, options) as cluster:
        return cluster.job_script()
