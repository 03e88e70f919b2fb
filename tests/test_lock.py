"""The lock of an output: flocked for a run, stale once its run is gone."""

import pytest

from dask_localstats._lock import LOCK, check_guard, locked
from dask_localstats.errors import LockedError


def test_a_lock_left_behind_is_named_and_cleared_only_when_asked(tmp_path):
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / LOCK).write_text("")  # unreadable, and nobody holds it
    gone = r"a run that is gone \(an unreadable lock"
    with pytest.raises(LockedError, match=gone), locked(out, clear_stale=False):
        pass
    assert (out / LOCK).exists()
    with locked(out, clear_stale=True) as lock:
        assert '"pid": ' in lock.read_text()
    assert not (out / LOCK).exists()


def test_a_guard_stops_writes_once_the_lock_is_not_the_runs(tmp_path):
    with locked(tmp_path, clear_stale=False) as lock:
        guard = (str(lock), lock.read_text())
        check_guard(guard)  # the run's own lock: writes go on
    with pytest.raises(LockedError, match=r"is not this run's any more"):
        check_guard(guard)  # let go: a late task writes nothing
    stale = pytest.raises(LockedError, match=r"is not this run's any more")
    with locked(tmp_path, clear_stale=False), stale:  # another run's lock now
        check_guard(guard)
