"""Local statistics of huge images on a sub-grid, out of core with dask.

ClearMap's ``LocalStatistics`` API (:func:`apply_local_function`,
:func:`local_histogram`, :func:`local_percentile`) on NumPy arrays, dask
arrays and zarr stores, with lazy, chunked results.
"""

from importlib.metadata import PackageNotFoundError, version

from ._api import (
    apply_local_function,
    local_histogram,
    local_percentile,
    subtract_background,
)
from ._io import open_source
from ._write import to_zarr

try:
    __version__ = version("dask-localstats")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "apply_local_function",
    "local_histogram",
    "local_percentile",
    "open_source",
    "subtract_background",
    "to_zarr",
]
