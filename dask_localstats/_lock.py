"""The lock of an output: one writer at a time.

A run holds ``.dask_localstats.lock`` in its output for as long as it
writes: a file holding the run's pid, host and start time, and flocked by
the run. The system releases a flock when its process ends, however it ends,
so a lock file that nobody flocks was left by a run that is gone; it is
reported, and cleared only when the caller says so (resuming or
overwriting). Taking a lock and taking over a stale one are the same
operation, so two runs can never both hold it. Tasks check the lock before
each write (:func:`check_guard`), so a task of a failed run that is still
running writes nothing once another run holds the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import LockedError

__all__ = ["LOCK", "check_guard", "holder", "locked"]

LOCK = ".dask_localstats.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds an output's lock."""

    pid: int
    host: str
    started: str
    run: str = ""  # unique to the run: the same process may run again

    def __str__(self):
        return f"pid {self.pid} on {self.host}, since {self.started}"


def holder(lock):
    try:
        return Holder(**json.loads(Path(lock).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _flocked(lock):
    """An open descriptor of the file `lock`, flocked by us, or None if taken.

    Returns ``(fd, created)``. The lock file is the path's current file: one
    removed or replaced while we waited is opened again.
    """
    while True:
        try:
            fd, created = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
        except FileExistsError:
            try:
                fd, created = os.open(lock, os.O_RDWR), False
            except FileNotFoundError:
                continue  # removed meanwhile: try again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None, False
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)  # we locked a file that is no longer the lock: again


@contextlib.contextmanager
def locked(path, clear_stale):
    """Hold the lock of the output folder `path` while in the block.

    The lock is a file, ``.dask_localstats.lock``, holding the pid, host and
    start time of the run, and flocked by it for as long as it runs: the
    system releases a flock when its process ends however it ends, so a
    lock file nobody flocks was left by a run that is gone.
    """
    lock = path / LOCK
    fd, created = _flocked(lock)
    if fd is None:
        who = holder(lock) or "a run holding its lock"
        msg = f"the output {path} is being written by another run ({who}); wait for it, or stop it first"
        raise LockedError(msg)
    try:
        if not created and not clear_stale:
            msg = (
                f"the output {path} holds the lock of a run that is gone "
                f"({holder(lock) or 'an unreadable lock file'}); pass resume=True "
                "(--resume) to continue it or overwrite=True (--overwrite) to start again"
            )
            raise LockedError(msg)
        me = Holder(
            os.getpid(),
            socket.gethostname(),
            datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            uuid.uuid4().hex,
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me.__dict__).encode(), 0)
        os.fsync(fd)
        yield lock
    finally:
        if created or clear_stale:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    lock.unlink()  # while still flocked: nobody else holds it
        os.close(fd)


def check_guard(guard):
    """Refuse to write once this run's lock is not its own any more.

    `guard` is ``(lock path, lock text)`` of the run, or None. A task still
    running after its run failed and let the lock go finds another run's
    lock, or none, and writes nothing.
    """
    if guard is None:
        return
    lock, text = guard
    try:
        held = Path(lock).read_text() == text
    except OSError:
        held = False
    if not held:
        msg = f"the lock {lock} is not this run's any more; its writes stopped"
        raise LockedError(msg)
