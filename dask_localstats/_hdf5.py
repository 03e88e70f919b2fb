"""HDF5 sources, read lazily with h5py, one region at a time.

Three layouts that light-sheet pipelines write are recognized:

- a plain dataset, named after the file: ``stack.h5:/path/to/dataset`` (a
  file holding a single dataset needs no name);
- BigDataViewer / BigStitcher HDF5: ``t{timepoint:05d}/s{setup:02d}/{level}/cells``,
  16-bit data stored as int16 and read as the uint16 they are; the voxel
  size comes from the XML file beside it (``stack.xml``) when present;
- Imaris ``.ims``: ``DataSet/ResolutionLevel {level}/TimePoint {timepoint}/
  Channel {channel}/Data``, padded to whole chunks and cropped here to the
  image size its attributes record.

A source is an :class:`Hdf5Source`: a small, picklable object holding the
file name, the dataset's path, shape and dtype, sliced like an array. Each
slice opens the file, reads the region and closes it, so no handle outlives
a read and a distributed graph carries no data.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET

import numpy as np

from .errors import SourceNotFoundError, _reading

__all__ = ["Hdf5Source", "hdf5_path", "open_hdf5"]

_PATH = re.compile(r"^(?P<file>.+\.(?:h5|hdf5|hdf|ims))(?::(?P<dataset>/.*))?$", re.I)


def _h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - the `h5` extra is not installed
        msg = "reading HDF5 needs h5py: pip install 'dask-localstats[h5]'"
        raise ImportError(msg) from None
    return h5py


def hdf5_path(source):
    """``(file, dataset or None)`` of an HDF5 source's text, else None."""
    text = os.fspath(source)
    if "://" in text:
        return None
    match = _PATH.match(text)
    return None if match is None else (match["file"], match["dataset"])


class Hdf5Source:
    """A dataset of an HDF5 file, read region by region.

    Parameters
    ----------
    path : str
        The file.
    dataset : str
        The dataset's path in the file.
    crop : tuple of int or None
        The image's shape, when the dataset is padded beyond it (Imaris).
    view : dtype or None
        The dtype to read the stored bits as (BigDataViewer's uint16).
    voxel_size : tuple of float or None
        Physical size of a voxel per axis, when the file records it.
    """

    def __init__(self, path, dataset, crop=None, view=None, voxel_size=None):
        self.files = (os.path.abspath(path),)
        self.dataset = dataset
        with _h5py().File(self.files[0], "r") as file:
            stored = file[dataset]
            shape, dtype, chunks = stored.shape, stored.dtype, stored.chunks
        self.shape = tuple(crop) if crop is not None else tuple(shape)
        self.dtype = np.dtype(view or dtype)
        self.view = None if view is None else np.dtype(view)
        self.chunks = tuple(chunks) if chunks else None
        self.voxel_size = voxel_size

    @property
    def ndim(self):
        return len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"Hdf5Source({self.files[0]!r}, {self.dataset!r}, shape={self.shape}, dtype={self.dtype})"

    def __dask_tokenize__(self):
        return ("Hdf5Source", self.files, self.dataset, self.shape, self.dtype.str)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        what = f"{self.dataset} of HDF5 file {self.files[0]!r}"
        with _reading(what), _h5py().File(self.files[0], "r") as file:
            data = _read(file[self.dataset], key, self.shape)
        return data.view(self.view) if self.view is not None else data


def _read(stored, key, shape):
    """``stored[key]`` within the first `shape` voxels (a cropped dataset)."""
    bounded = []
    for i, size in enumerate(shape):
        k = key[i] if i < len(key) else slice(None)
        if k is Ellipsis:
            rest = len(shape) - len(key) + 1
            return _read(
                stored, (*key[:i], *(slice(None),) * rest, *key[i + 1 :]), shape
            )
        bounded.append(
            slice(*k.indices(size)) if isinstance(k, slice) else int(k) % size
        )
    return np.asarray(stored[tuple(bounded)])


def _text(value):
    """An Imaris attribute (an array of single bytes) as text."""
    if isinstance(value, bytes | str):
        return value.decode() if isinstance(value, bytes) else value
    return b"".join(np.asarray(value).tolist()).decode()


def _bdv_voxel_size(path, setup):
    """z y x voxel size of a BigDataViewer setup from its XML, or None."""
    xml = os.path.splitext(path)[0] + ".xml"
    if not os.path.exists(xml):
        return None
    for view in ET.parse(xml).iter("ViewSetup"):
        if view.findtext("id") == str(setup):
            size = view.findtext("voxelSize/size")
            if size:
                return tuple(float(v) for v in reversed(size.split()))
    return None


def open_hdf5(path, dataset=None, level=0, setup=0, timepoint=0, name="source"):
    """The :class:`Hdf5Source` of a file's dataset, its layout recognized.

    Parameters
    ----------
    path : str
        The HDF5 file.
    dataset : str or None
        The dataset's path; None: the file's only dataset, or the image of a
        BigDataViewer or Imaris file.
    level : int
        Resolution level (BigDataViewer, Imaris).
    setup : int
        BigDataViewer setup, or Imaris channel.
    timepoint : int
        Time point (BigDataViewer, Imaris).
    name : str
        Parameter name for messages.
    """
    if not os.path.exists(path):
        msg = f"`{name}`: no such file {path!r}"
        raise SourceNotFoundError(msg)
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as file:
            return _open(file, path, dataset, level, setup, timepoint, name)
    except OSError as error:
        msg = f"`{name}`: cannot read {path!r} as HDF5: {error}"
        raise ValueError(msg) from None


def _open(file, path, dataset, level, setup, timepoint, name):
    if dataset is not None:
        if dataset not in file:
            msg = f"`{name}`: {path!r} has no dataset {dataset!r}"
            raise ValueError(msg)
        return Hdf5Source(path, dataset)
    if "DataSet" in file:  # Imaris
        group = f"DataSet/ResolutionLevel {level}/TimePoint {timepoint}/Channel {setup}"
        if group not in file:
            msg = f"`{name}`: {path!r} has no {group!r} (check --level, --timepoint, --setup)"
            raise ValueError(msg)
        attrs = file[group].attrs
        crop = tuple(int(_text(attrs[f"ImageSize{a}"])) for a in "ZYX")
        stored = file[f"{group}/Data"].shape
        if any(c > n for c, n in zip(crop, stored, strict=True)):
            msg = f"`{name}`: {path!r} records an image of {crop} voxels in data of {stored}"
            raise ValueError(msg)
        return Hdf5Source(path, f"{group}/Data", crop=crop)
    bdv = f"t{timepoint:05d}/s{setup:02d}/{level}/cells"
    if f"s{setup:02d}" in file or "t00000" in file:  # BigDataViewer
        if bdv not in file:
            msg = f"`{name}`: {path!r} has no {bdv!r} (check --level, --timepoint, --setup)"
            raise ValueError(msg)
        view = np.uint16 if file[bdv].dtype == np.int16 else None
        return Hdf5Source(path, bdv, view=view, voxel_size=_bdv_voxel_size(path, setup))
    found = []
    file.visititems(
        lambda key, node: found.append(key) if hasattr(node, "shape") else None
    )
    if len(found) != 1:
        msg = f"`{name}`: {path!r} holds {len(found)} datasets ({found[:4]}); name one: {path}:/DATASET"
        raise ValueError(msg)
    return Hdf5Source(path, found[0])
