"""The lock of an output: one writer at a time.

A run holds ``.dask_localstats.lock`` in its output for as long as it
writes: a file holding the run's pid, host, start time and a token unique
to the run.

- In a local folder the run also flocks the file. The system releases a
  flock when its process ends, however it ends, so a lock file that nobody
  flocks was left by a run that is gone. Taking a lock and taking over a
  stale one are the same operation, so two runs can never both hold it.
- In an object store (no flock there) the lock is a *lease*: created only
  if absent (a conditional PUT), and refreshed by the run every
  ``LEASE / 4`` seconds. A lease not refreshed for ``LEASE`` seconds, or
  held by a process of this host that is gone, was left by a run that is
  gone.

A stale lock is reported, and cleared only when the caller says so
(resuming or overwriting). Tasks check the lock before each write
(:func:`check_guard`), so a task of a failed run that is still running
writes nothing once another run holds the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from .errors import LockedError

__all__ = ["LOCK", "Guard", "check_guard", "holder", "locked"]

LOCK = ".dask_localstats.lock"
LEASE = 120.0  # seconds an object store's lease lasts unless refreshed


@dataclass(frozen=True)
class Holder:
    """Who holds an output's lock."""

    pid: int
    host: str
    started: str
    run: str = ""  # unique to the run: the same process may run again
    refreshed: float = 0.0  # leases: when last refreshed (seconds since 1970)

    def __str__(self):
        return f"pid {self.pid} on {self.host}, since {self.started}"

    def text(self):
        return json.dumps(asdict(self))

    def gone(self):
        """Whether the holder of a lease is gone: expired, or dead on this host."""
        if time.time() - self.refreshed > LEASE:
            return True
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _me():
    return Holder(
        os.getpid(),
        socket.gethostname(),
        datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        uuid.uuid4().hex,
        time.time(),
    )


def holder(place):
    """The :class:`Holder` of the lock of `place`, or None (none, unreadable)."""
    try:
        return Holder(**json.loads(place.read(LOCK)))
    except (OSError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class Guard:
    """What tasks check before writing: the output's place and the run's token."""

    place: object  # a dask_localstats._place.Folder or Prefix
    run: str

    def __str__(self):
        return f"{self.place}/{LOCK}"


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
def locked(place, clear_stale):
    """Hold the lock of the output `place` while in the block; yield a :class:`Guard`.

    Raises :class:`~dask_localstats.errors.LockedError` when another run
    holds it, or when a run that is gone left it and `clear_stale` is
    false.
    """
    hold = _flock if place.local else _lease
    with hold(place, clear_stale) as guard:
        yield guard


def _refused(place, who, gone):
    if gone:
        return LockedError(
            f"the output {place} holds the lock of a run that is gone "
            f"({who or 'an unreadable lock file'}); pass resume=True "
            "(--resume) to continue it or overwrite=True (--overwrite) to start again"
        )
    return LockedError(
        f"the output {place} is being written by another run "
        f"({who or 'a run holding its lock'}); wait for it, or stop it first"
    )


@contextlib.contextmanager
def _flock(place, clear_stale):
    lock = place.path / LOCK
    fd, created = _flocked(lock)
    if fd is None:
        raise _refused(place.path, holder(place), gone=False)
    try:
        if not created and not clear_stale:
            raise _refused(place.path, holder(place), gone=True)
        me = _me()
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.text().encode(), 0)
        os.fsync(fd)
        yield Guard(place, me.run)
    finally:
        if created or clear_stale:
            with contextlib.suppress(OSError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    lock.unlink()  # while still flocked: nobody else holds it
        os.close(fd)


@contextlib.contextmanager
def _lease(place, clear_stale):
    me = _me()
    try:
        place.create(LOCK, me.text().encode())
    except FileExistsError:
        who = holder(place)
        gone = who is None or who.gone()
        if not (gone and clear_stale):
            raise _refused(place, who, gone) from None
        place.delete([LOCK])
        try:
            place.create(LOCK, me.text().encode())
        except FileExistsError:
            raise _refused(place, holder(place), gone=False) from None
    guard = Guard(place, me.run)
    stop = threading.Event()
    refresher = threading.Thread(target=_refresh, args=(guard, me, stop), daemon=True)
    refresher.start()
    try:
        yield guard
    finally:
        stop.set()
        refresher.join()
        with contextlib.suppress(OSError):
            if _holds(guard):
                place.delete([LOCK])


def _refresh(guard, me, stop):
    """Refresh a lease until `stop`, as long as it is still the run's."""
    while not stop.wait(LEASE / 4):
        with contextlib.suppress(OSError):
            if not _holds(guard):
                return
            me = Holder(**{**asdict(me), "refreshed": time.time()})
            guard.place.write(LOCK, me.text().encode())


def _holds(guard):
    who = holder(guard.place)
    return who is not None and who.run == guard.run


def check_guard(guard):
    """Refuse to write once this run's lock is not its own any more.

    `guard` is the run's :class:`Guard`, or None. A task still running after
    its run failed and let the lock go finds another run's lock, or none,
    and writes nothing.
    """
    if guard is not None and not _holds(guard):
        msg = f"the lock {guard} is not this run's any more; its writes stopped"
        raise LockedError(msg)
