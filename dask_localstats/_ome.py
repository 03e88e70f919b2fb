"""OME-Zarr images: reading a multiscale image's level, writing 0.5 metadata.

An OME-Zarr image is a zarr group whose ``multiscales`` attribute (under
``"ome"`` since 0.5, at the top level before) lists its resolution levels,
each a child array with coordinate transformations: a scale (voxel size) and
a translation (position of voxel 0), composed with the image's own. Reading
takes one level's array and its physical placement (:func:`read_image`);
writing describes one full-resolution level (:class:`OmeImage`).

A statistic with a trailing axis (several percentiles, histogram bins) gets
a channel axis, which OME-Zarr wants before the spatial axes
(:func:`output_image`); coarse grids are placed at their window centers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zarr

__all__ = [
    "OmeImage",
    "axis_names",
    "level_path",
    "output_image",
    "read_image",
    "with_voxel_size",
]

VERSION = "0.5"
_DEFAULT_AXES = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


@dataclass
class OmeImage:
    """One OME-Zarr image level: axes and physical placement.

    Attributes
    ----------
    axes : list of dict
        ``{"name", "type"[, "unit"]}`` per axis.
    scale, translation : list of float
        Voxel size and position of voxel 0, per axis.
    name : str
        The image's name.
    maximum : float or None
        The largest value the image records holding (``omero`` channels'
        ``window.max``), if it records one.

    Examples
    --------
    >>> image = OmeImage.default(3)
    >>> image.dimension_names, image.scale
    (['z', 'y', 'x'], [1.0, 1.0, 1.0])
    >>> image.attributes()["version"]
    '0.5'
    """

    axes: list
    scale: list = field(default_factory=list)
    translation: list = field(default_factory=list)
    name: str = ""
    maximum: float | None = None

    def __post_init__(self):
        ndim = len(self.axes)
        self.scale = [float(s) for s in (self.scale or [1.0] * ndim)]
        self.translation = [float(t) for t in (self.translation or [0.0] * ndim)]

    @classmethod
    def default(cls, ndim, name=""):
        """Axes ``yx``, ``zyx``, ``czyx`` or ``tczyx``, unit scale."""
        if ndim not in _DEFAULT_AXES:
            msg = f"OME-Zarr images have 2 to 5 dimensions, got {ndim}"
            raise ValueError(msg)
        axes = [{"name": a, "type": _AXIS_TYPES[a]} for a in _DEFAULT_AXES[ndim]]
        return cls(axes, name=name)

    @property
    def dimension_names(self):
        return [a["name"] for a in self.axes]

    def attributes(self, levels=None):
        """The group attributes of an OME-Zarr 0.5 image.

        `levels` is a list of ``(path, scale, translation)``, finest first;
        default: this level alone, at path ``"0"``.
        """
        levels = levels or [("0", self.scale, self.translation)]
        datasets = [
            {
                "path": path,
                "coordinateTransformations": [
                    {"type": "scale", "scale": list(scale)},
                    {"type": "translation", "translation": list(translation)},
                ],
            }
            for path, scale, translation in levels
        ]
        image = {"name": self.name, "axes": self.axes, "datasets": datasets}
        return {"version": VERSION, "multiscales": [image]}


def _multiscales(group):
    attrs = group.attrs.asdict()
    return attrs.get("ome", attrs).get("multiscales")


def level_path(group, level=0):
    """Path of the `level`-th dataset of an OME-Zarr image group, or None."""
    multiscales = _multiscales(group)
    if not multiscales:
        return None
    datasets = multiscales[0]["datasets"]
    if not 0 <= level < len(datasets):
        msg = f"`level` must be in [0, {len(datasets)}) for this image, got {level}"
        raise ValueError(msg)
    return datasets[level]["path"]


def _transforms(transforms, ndim):
    """Scale and translation of a list of OME coordinate transformations."""
    scale, translation = np.ones(ndim), np.zeros(ndim)
    for transform in transforms or []:
        if transform.get("type") == "scale" and "scale" in transform:
            scale = scale * np.asarray(transform["scale"], float)
        elif transform.get("type") == "translation" and "translation" in transform:
            translation = translation + np.asarray(transform["translation"], float)
    return scale, translation


def read_image(location, level, ndim, storage_options=None):
    """The :class:`OmeImage` of one level of an OME-Zarr image, else None.

    Parameters
    ----------
    location : str or zarr store
        The image's group.
    level : int
        Resolution level.
    ndim : int
        Number of dimensions of that level's array.
    storage_options : dict or None
        fsspec options of a URL `location`.
    """
    options = {} if storage_options is None else {"storage_options": storage_options}
    try:
        group = zarr.open_group(location, mode="r", **options)
    except Exception:  # not a group (an array, TIFF or anything else)
        return None
    multiscales = _multiscales(group)
    if not multiscales:
        return None
    image = multiscales[0]
    axes = [a if isinstance(a, dict) else {"name": a} for a in image.get("axes", [])]
    if len(axes) != ndim:
        axes = OmeImage.default(ndim).axes
    dataset = image["datasets"][level]
    scale, translation = _transforms(dataset.get("coordinateTransformations"), ndim)
    outer_scale, outer = _transforms(image.get("coordinateTransformations"), ndim)
    return OmeImage(
        axes,
        list(scale * outer_scale),
        list(translation * outer_scale + outer),
        maximum=_recorded_maximum(group),
    )


def _recorded_maximum(group):
    """The largest ``window.max`` of the image's ``omero`` channels, or None."""
    attrs = group.attrs.asdict()
    channels = attrs.get("ome", attrs).get("omero", {}).get("channels", [])
    values = [c["window"]["max"] for c in channels if "max" in c.get("window", {})]
    return max(values) if values else None


def output_image(image, ndim, grid, coarse, extra, name=""):
    """The OME image of a result, and where its statistic axis goes.

    Parameters
    ----------
    image : OmeImage or None
        The input's, or None for default axes and unit scale.
    ndim : int
        Number of spatial (input) dimensions.
    grid : Grid
        The sampling grid: a coarse result sits on the window centers.
    coarse : bool
        Whether the result is the coarse grid.
    extra : (str, int) or None
        Name and length of the statistic's trailing axis.
    name : str

    Returns
    -------
    image : OmeImage
    position : int or None
        Axis index where the statistic's trailing axis must move, or None.
    """
    image = image or OmeImage.default(ndim)
    axes = [dict(a) for a in image.axes]
    scale, translation = np.asarray(image.scale), np.asarray(image.translation)
    if coarse:
        translation = translation + np.asarray(grid.first) * scale
        scale = scale * np.asarray(grid.spacing)
    scale, translation = list(map(float, scale)), list(map(float, translation))
    if extra is None:
        return OmeImage(axes, scale, translation, name), None
    label = extra[0]
    if len(axes) >= 5 or any(a.get("type") not in ("space", "time") for a in axes):
        names = [a["name"] for a in axes]
        msg = (
            f"OME-Zarr output would need a '{label}' axis besides the input's "
            f"axes {names}, which OME-Zarr 0.5 does not allow; give one value, "
            "or write plain zarr"
        )
        raise ValueError(msg)
    position = sum(a.get("type") == "time" for a in axes)
    axes.insert(position, {"name": label, "type": "channel"})
    scale.insert(position, 1.0)
    translation.insert(position, 0.0)
    return OmeImage(axes, scale, translation, name), position


def with_voxel_size(image, ndim, voxel, unit="micrometer"):
    """`image` (or default axes) with the voxel size `voxel`, if given.

    Parameters
    ----------
    image : OmeImage or None
    ndim : int
    voxel : sequence of float or None
        Physical size of a voxel per axis; None leaves `image` as it is.
    unit : str
        Unit of the spatial axes.
    """
    if voxel is None:
        return image
    if len(voxel) != ndim:
        msg = f"--voxel-size needs {ndim} sizes (one per axis of IN), got {list(voxel)}"
        raise ValueError(msg)
    if any(v <= 0 for v in voxel):
        msg = f"--voxel-size must be positive, got {list(voxel)}"
        raise ValueError(msg)
    base = image or OmeImage.default(ndim)
    axes = [{**a, "unit": unit} if a.get("type") == "space" else a for a in base.axes]
    return OmeImage(axes, list(voxel), base.translation, base.name, base.maximum)


def axis_names(image, ndim):
    """The names of an image's axes: its own, else the default for `ndim`."""
    if image is not None:
        return [a["name"] for a in image.axes]
    return OmeImage.default(ndim).dimension_names if 2 <= ndim <= 5 else None
