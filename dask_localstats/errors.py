"""The exceptions of dask_localstats.

Each refines the built-in exception a caller would catch anyway
(``ValueError``, ``FileNotFoundError``), and all derive from
:class:`LocalStatsError`, so a program (the command line among them) can tell
a refusal or a damaged input, which the user can act on, from a bug.

Bad parameters raise plain ``ValueError`` or ``TypeError`` naming the
parameter and the value, before anything is computed.

Examples
--------
>>> from dask_localstats.errors import LocalStatsError, RefusedError
>>> issubclass(RefusedError, ValueError) and issubclass(RefusedError, LocalStatsError)
True
"""

from __future__ import annotations

import contextlib

__all__ = [
    "CorruptChunkError",
    "InputChangedError",
    "LocalStatsError",
    "LockedError",
    "MemoryBudgetError",
    "MissingChunksError",
    "RefusedError",
    "SourceNotFoundError",
    "StorageError",
]


class LocalStatsError(Exception):
    """Base class of the errors this library raises on purpose."""


class RefusedError(LocalStatsError, ValueError):
    """Writing was refused, to protect data: nothing was changed."""


class LockedError(RefusedError):
    """Another run holds the output's lock, or left it behind."""


class InputChangedError(RefusedError):
    """An input differs from the one an output was computed from."""


class MissingChunksError(LocalStatsError, ValueError):
    """A stored input lacks chunks (see ``missing_chunks``)."""


class CorruptChunkError(LocalStatsError, ValueError):
    """A stored chunk or file of an input cannot be read or decoded."""


class MemoryBudgetError(LocalStatsError, ValueError):
    """The smallest task of a job would need more memory than its budget."""


class SourceNotFoundError(LocalStatsError, FileNotFoundError):
    """An input does not exist."""


class StorageError(LocalStatsError, OSError):
    """A store cannot be reached or written (credentials, network, rights)."""


@contextlib.contextmanager
def _reading(what):
    """Turn the failures of reading `what` (a file) into the library's errors.

    A missing file is a :class:`SourceNotFoundError`; anything a reader or a
    codec raises (libraries raise many kinds) a :class:`CorruptChunkError`
    naming `what`. The library's own errors and ``MemoryError`` pass.
    """
    try:
        yield
    except FileNotFoundError:
        msg = f"{what} is gone"
        raise SourceNotFoundError(msg) from None
    except (MemoryError, LocalStatsError):
        raise
    except Exception as error:
        msg = f"{what} cannot be read: {type(error).__name__}: {error}"
        raise CorruptChunkError(msg) from error
