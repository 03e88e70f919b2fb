"""The lock of an output: flocked in a folder, a lease in an object store."""

import json
import time

import pytest

from dask_localstats import _lock
from dask_localstats._lock import LOCK, check_guard, holder, locked
from dask_localstats._place import Folder, Prefix
from dask_localstats.errors import LockedError


def test_a_lock_left_behind_is_named_and_cleared_only_when_asked(tmp_path):
    out = Folder(tmp_path / "out.zarr")
    out.make()
    (out.path / LOCK).write_text("")  # unreadable, and nobody holds it
    gone = r"a run that is gone \(an unreadable lock"
    with pytest.raises(LockedError, match=gone), locked(out, clear_stale=False):
        pass
    assert (out.path / LOCK).exists()
    with locked(out, clear_stale=True):
        assert '"pid": ' in (out.path / LOCK).read_text()
    assert not (out.path / LOCK).exists()


@pytest.mark.parametrize("kind", ["folder", "object store"])
def test_a_guard_stops_writes_once_the_lock_is_not_the_runs(tmp_path, kind):
    place = Folder(tmp_path) if kind == "folder" else Prefix("memory://guard/out")
    with locked(place, clear_stale=False) as guard:
        check_guard(guard)  # the run's own lock: writes go on
    with pytest.raises(LockedError, match=r"is not this run's any more"):
        check_guard(guard)  # let go: a late task writes nothing
    stale = pytest.raises(LockedError, match=r"is not this run's any more")
    with locked(place, clear_stale=False), stale:  # another run's lock now
        check_guard(guard)


def _left(place, **changes):
    """A lease as a run left it: this process's, refreshed just now."""
    with locked(place, clear_stale=False):
        record = json.loads(place.read(LOCK))
    place.write(LOCK, json.dumps({**record, **changes}).encode())


def test_a_live_lease_is_refused_even_to_resume():
    place = Prefix("memory://lease/live")
    _left(place)  # this very process, just refreshed: alive
    for clear in (False, True):
        refused = pytest.raises(LockedError, match="being written by another run")
        with refused, locked(place, clear_stale=clear):
            pass


@pytest.mark.parametrize(
    "left", [{"refreshed": 0.0}, {"pid": 2**22 + 1}], ids=["expired", "dead pid"]
)
def test_a_lease_left_by_a_run_that_is_gone_is_taken_over_only_when_asked(left):
    place = Prefix("memory://lease/gone")
    _left(place, **left)
    refused = pytest.raises(LockedError, match="a run that is gone")
    with refused, locked(place, clear_stale=False):
        pass
    with locked(place, clear_stale=True) as guard:
        assert holder(place).run == guard.run
    assert not place.exists()


def test_a_lease_is_refreshed_while_held(monkeypatch):
    monkeypatch.setattr(_lock, "LEASE", 0.2)
    place = Prefix("memory://lease/refreshed")
    with locked(place, clear_stale=False) as guard:
        first = holder(place).refreshed
        time.sleep(0.3)
        assert holder(place).refreshed > first
        check_guard(guard)
