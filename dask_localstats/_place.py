"""Where an output is written: a local folder, or a prefix of an object store.

Writing (:mod:`dask_localstats._write`) asks a few things of its output's
place, and a :class:`Folder` (a local path) and a :class:`Prefix` (any
fsspec URL, such as ``s3://bucket/out.zarr``, with its storage options)
answer them alike:

- whether anything is there (:meth:`exists`), and making the place;
- every file in it, as keys relative to it (:meth:`files`), with the first
  that is not a plain file (a symlink), which no writer may delete;
- reading, deleting and writing whole files: a local file is written
  aside, synced and renamed into place; an object is one PUT, which object
  stores make visible whole or not at all;
- creating a file only if it is absent (:meth:`create`): ``O_EXCL``
  locally, a conditional PUT (``If-None-Match: *``) in object stores;
- the zarr store to open (:meth:`store`).

The lock differs most between the two (see :mod:`dask_localstats._lock`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import zarr

from ._stored import blocking, locate, protocol_of
from .errors import LocalStatsError, StorageError

__all__ = ["Folder", "Prefix", "place_of"]


@dataclass(frozen=True)
class Folder:
    """A local folder (its parent resolved through symlinks)."""

    path: Path
    local = True

    def __str__(self):
        return str(self.path)

    def location(self):
        return locate(self.path)

    def exists(self):
        return self.path.exists() or self.path.is_symlink()

    def is_folder(self):
        return self.path.is_dir() and not self.path.is_symlink()

    def make(self):
        """Create the folder; FileExistsError if it appeared meanwhile."""
        self.path.mkdir(parents=True)

    def files(self):
        """``(keys, foreign)``: every file's key, and the first symlink or None."""
        keys = []
        for folder, dirs, names in os.walk(self.path):
            for name in [*dirs, *names]:
                path = Path(folder) / name
                key = path.relative_to(self.path).as_posix()
                if path.is_symlink():
                    return keys, key
                if name in names:
                    keys.append(key)
        return keys, None

    def read(self, key):
        return (self.path / key).read_bytes()

    def write(self, key, data):
        """Store `data` as `key`, whole: written aside, synced, renamed."""
        path = self.path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        with open(partial, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)

    def create(self, key, data):
        """Store `data` as `key` only if absent (FileExistsError otherwise)."""
        fd = os.open(self.path / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    def delete(self, keys):
        """Delete the files `keys`, then the folders they leave empty (only
        those: no walk through the rest of the folder)."""
        folders = set()
        for key in keys:
            (self.path / key).unlink(missing_ok=True)
            folders.update(PurePosixPath(key).parents)
        folders.discard(PurePosixPath("."))
        for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: not ours
                (self.path / folder).rmdir()

    def store(self):
        return str(self.path)


@contextlib.contextmanager
def _reaching(place):
    """Failures to reach an object store as :class:`StorageError` naming it.

    ``FileNotFoundError`` and ``FileExistsError`` mean what they say, and
    pass.
    """
    try:
        yield
    except (FileNotFoundError, FileExistsError, LocalStatsError):
        raise
    except Exception as error:
        msg = f"the store {place} cannot be reached: {type(error).__name__}: {error}"
        raise StorageError(msg) from error


@dataclass(frozen=True)
class Prefix:
    """A prefix of an fsspec file system (an object store, usually).

    Parameters
    ----------
    url : str
        ``protocol://path``.
    options : tuple
        The storage options, as sorted ``(key, value)`` pairs (hashable, so
        that tasks can carry the place).
    """

    url: str
    options: tuple = ()
    local = False

    def __str__(self):
        return self.url

    @functools.cached_property
    def _fs(self):
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url, **dict(self.options))
        return fs, root.rstrip("/")

    def _path(self, key):
        return f"{self._fs[1]}/{key}"

    def location(self):
        return locate(self.url)

    def exists(self):
        fs, root = self._fs
        with _reaching(self):  # a prefix exists once an object lies below it
            return fs.exists(root)

    def is_folder(self):
        with _reaching(self):
            return not self._fs[0].isfile(self._fs[1])

    def make(self):
        """Nothing to make: a prefix exists once an object is in it."""

    def files(self):
        fs, root = self._fs
        with _reaching(self):
            return [path[len(root) + 1 :] for path in fs.find(root)], None

    def read(self, key):
        with _reaching(self):
            return self._fs[0].cat_file(self._path(key))

    def write(self, key, data):
        with _reaching(self):
            self._fs[0].pipe_file(self._path(key), data)

    def create(self, key, data):
        """Store `data` as `key` only if absent: a conditional PUT."""
        with _reaching(self), self._fs[0].open(self._path(key), "xb") as file:
            file.write(data)

    def delete(self, keys):
        with _reaching(self):
            if keys:
                self._fs[0].rm([self._path(key) for key in keys])

    def store(self):
        with _reaching(self):
            return zarr.storage.FsspecStore.from_url(
                self.url, storage_options=dict(self.options), read_only=False
            )


def place_of(store, storage_options=None):
    """The :class:`Folder` or :class:`Prefix` of an output `store`.

    Parameters
    ----------
    store : str, os.PathLike, zarr LocalStore or FsspecStore
        A local path, a ``file://`` URL or any fsspec URL.
    storage_options : dict or None
        fsspec options of a URL (credentials, ``endpoint_url``, ...).
    """
    if isinstance(store, zarr.storage.LocalStore):
        return Folder(Path(store.root))
    if isinstance(store, zarr.storage.FsspecStore):
        fs = blocking(store.fs)
        protocol = protocol_of(fs)
        if protocol == "file":  # a folder, locked as a path's is
            return place_of(store.path)
        options = tuple(sorted(fs.storage_options.items()))
        return Prefix(f"{protocol}://{store.path.rstrip('/')}", options)
    if not isinstance(store, str | os.PathLike):
        msg = f"`store` must be a path, a URL or a zarr LocalStore, got {store!r}"
        raise TypeError(msg)
    text = os.fspath(store)
    if text.startswith("file:"):
        url = urllib.parse.urlparse(text)
        if url.netloc not in ("", "localhost"):
            msg = f"`store` must be on this machine, got {store!r}"
            raise ValueError(msg)
        text = urllib.request.url2pathname(url.path)
    if "://" in text:
        return Prefix(text.rstrip("/"), tuple(sorted((storage_options or {}).items())))
    path = Path(text).expanduser()
    return Folder(Path(os.path.realpath(path.parent)) / path.name)
