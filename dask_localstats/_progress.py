"""One progress bar over a whole write, weighted by work, with an ETA.

A job has two stages: ``background``, the coarse grid's blocks (each reads
the source region under its centers), and ``write``, the output's chunks
(each resamples, combines and encodes its voxels). Each stage counts the
voxels it has covered, so a bar that counted tasks (a few heavy coarse blocks
against many light chunks) no longer sits near 0% for half a run. The bar
shows both stages, the elapsed time, the rate in voxels per second and an
estimate of the time left, on one line rewritten in place on a terminal, or
as plain lines every `interval` seconds in a log file.

Locally the bar follows dask's callbacks task by task; on a
dask.distributed cluster it polls the scheduler's task counts per stage.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from dataclasses import dataclass, field

from dask.callbacks import Callback

__all__ = ["Progress", "Stage"]

COARSE = "localstats-coarse"
WRITE = "localstats-write"


@dataclass
class Stage:
    """A stage of a job: its tasks' name prefix and voxels per task.

    Attributes
    ----------
    name : str
        Shown on the bar.
    prefix : str
        The dask key-name prefix of its tasks.
    voxels : float
        Voxels a task covers (on average).
    tasks : int
        How many tasks the stage has in this run.
    done : int
        How many are finished.
    """

    name: str
    prefix: str
    voxels: float
    tasks: int
    done: int = 0

    @property
    def total(self):
        return self.voxels * self.tasks

    @property
    def covered(self):
        return self.voxels * min(self.done, self.tasks)


@dataclass
class Progress:
    """The progress of one write, shown on a stream.

    Parameters
    ----------
    stages : list of Stage
    out : file
        Where to show it (stderr by default).
    interval : float
        Seconds between two lines in a file (a terminal line is rewritten
        at most every 0.2 s).
    """

    stages: list
    out: object = field(default_factory=lambda: sys.stderr)
    interval: float = 10.0
    started: float = field(default_factory=time.monotonic)
    _shown: float = field(default_factory=time.monotonic)  # the first after a while
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def line(self):
        """The text of the bar now."""
        total = sum(s.total for s in self.stages) or 1
        covered = sum(s.covered for s in self.stages)
        fraction = covered / total
        elapsed = time.monotonic() - self.started
        rate = covered / elapsed if elapsed > 0 else 0.0
        left = (total - covered) / rate if rate else math.inf
        voxels = rate / max(len(self.stages), 1)  # each voxel passes every stage
        bar = "#" * int(30 * fraction)
        parts = " ".join(
            f"{s.name} {100 * s.covered / s.total:3.0f}%"
            for s in self.stages
            if s.total
        )
        return (
            f"[{bar:<30}] {100 * fraction:3.0f}% | {parts} | {_si(voxels)}vox/s | "
            f"{_clock(elapsed)} elapsed, {_clock(left)} left"
        )

    def advance(self, prefix):
        """Count one finished task of the stage of `prefix`."""
        for stage in self.stages:
            if prefix.startswith(stage.prefix):
                stage.done += 1
        self.show()

    def show(self, force=False):
        tty = getattr(self.out, "isatty", lambda: False)()
        now = time.monotonic()
        with self._lock:
            if not force and now - self._shown < (0.2 if tty else self.interval):
                return
            self._shown = now
            end = "\r" if tty and not force else "\n"
            print(self.line(), end=end, file=self.out, flush=True)

    @contextlib.contextmanager
    def following(self, client=None, tasks=None):
        """Follow a computation made within the block (locally or on `client`).

        `tasks` gives how many tasks of each stage's prefix it runs (default:
        all the stage's tasks), counted done when it ends.
        """
        before = {s.prefix: s.done for s in self.stages}
        try:
            with self._watching(client):
                yield
        except BaseException:
            if getattr(self.out, "isatty", lambda: False)():
                print(file=self.out)  # end the bar's line before the error's
            raise
        for stage in self.stages:
            ran = stage.tasks if tasks is None else tasks.get(stage.prefix, 0)
            stage.done = before[stage.prefix] + ran
        self.show(force=True)

    @contextlib.contextmanager
    def _watching(self, client):
        if client is None:
            with _Follower(self):
                yield
            return
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(client, stop), daemon=True)
        poller.start()
        try:
            yield
        finally:
            stop.set()
            poller.join()

    def _poll(self, client, stop):
        """Count the tasks finished since the start, polling the scheduler.

        The scheduler's counts per prefix can fall when it forgets the task
        group of an earlier computation, so a stage never counts backwards.
        """
        prefixes = [s.prefix for s in self.stages]
        start, base = None, {s.prefix: s.done for s in self.stages}
        while not stop.wait(1.0):
            try:
                counts = client.run_on_scheduler(_finished, prefixes)
            except Exception:  # the cluster is going away: stop showing
                return
            start = counts if start is None else start
            for stage in self.stages:
                ran = counts.get(stage.prefix, 0) - start.get(stage.prefix, 0)
                stage.done = max(stage.done, base[stage.prefix] + ran)
            self.show()


def _finished(prefixes, dask_scheduler=None):
    """Finished tasks per key prefix, on a dask.distributed scheduler."""
    done = {}
    for name, prefix in dask_scheduler.task_prefixes.items():
        for wanted in prefixes:
            if name.startswith(wanted):
                counts = prefix.states
                finished = sum(
                    counts.get(s, 0) for s in ("memory", "released", "forgotten")
                )
                done[wanted] = done.get(wanted, 0) + finished
    return done


class _Follower(Callback):
    """dask's local callbacks, counting finished tasks into a Progress."""

    def __init__(self, progress):
        super().__init__()
        self.progress = progress

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key[0] if isinstance(key, tuple) else key
        self.progress.advance(str(name))


def _si(value):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} "


def _clock(seconds):
    if not math.isfinite(seconds):
        return "--:--"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
    )
