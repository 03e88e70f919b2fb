"""Synthetic, deterministic light-sheet-like volumes for the benchmarks.

:func:`lightsheet` makes a uint16 volume that looks, statistically, like a
cleared-tissue light-sheet stack: a dim background of a few hundred counts
under a smooth illumination gradient and low-frequency stripes, bright
Gaussian blobs for cells (up to a few thousand counts), and shot noise.
Everything is drawn from seeded generators, so the same ``shape`` and
``seed`` always give the same volume.

The volume is built slab by slab along axis 0 (about 4 M voxels a slab), so
memory stays near the size of the uint16 result; a (128, 512, 512) volume
takes a few seconds.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SLAB_VOXELS = 1 << 22
CELL_SIGMA = 1.5
CELL_DENSITY = 1 / 4000
OFFSET = 100.0


def _profiles(shape, rng):
    """Illumination times stripes, a float32 array of shape ``shape[1:]``."""
    ny, nx = shape[1:]
    y = np.linspace(0.0, 1.0, ny, dtype=np.float32)[:, None]
    x = np.linspace(-1.0, 1.0, nx, dtype=np.float32)[None, :]
    # the sheet enters along axis 1 and fades; its waist is a broad Gaussian
    illumination = (1.0 - 0.35 * y) * (0.55 + 0.45 * np.exp(-((x / 0.8) ** 2)))
    # shadows cast along the propagation axis: stripes varying along axis 2
    stripes = np.ones_like(x)
    for frequency in (3, 7, 13):
        phase = rng.uniform(0, 2 * np.pi)
        stripes += 0.2 / frequency**0.5 * np.sin(np.pi * frequency * x + phase)
    return (illumination * stripes).astype(np.float32)


def _cells(shape, rng):
    """Cell centers (int, shape ``(n, 3)``) and peak brightnesses."""
    count = int(np.prod(shape, dtype=np.float64) * CELL_DENSITY)
    centers = (rng.random((count, 3)) * shape).astype(np.intp)
    peaks = np.minimum(rng.lognormal(np.log(900), 0.6, count), 6000)
    return centers, peaks.astype(np.float32)


def lightsheet(shape, seed=0, bits=16):
    """A deterministic light-sheet-like uint16 volume.

    Parameters
    ----------
    shape : tuple of int
        Shape of the 3-D volume.
    seed : int
        Seed of every random draw.
    bits : int
        Bit depth: values are clipped to ``[0, 2**bits - 1]`` (``bits=12``
        gives a 12-bit camera image, all values below 4096).

    Returns
    -------
    numpy.ndarray
        The uint16 volume.

    Notes
    -----
    Mean intensity is ``OFFSET + (200 + cells) * illumination * stripes``,
    with cells Gaussian blobs of sigma ``CELL_SIGMA`` and peak brightness
    up to 6000 counts; the noise is Gaussian with the variance of the
    signal (a fast stand-in for Poisson noise).

    Examples
    --------
    >>> v = lightsheet((8, 32, 32))
    >>> v.dtype, v.shape, bool(100 < np.median(v) < 400)
    (dtype('uint16'), (8, 32, 32), True)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        msg = f"`shape` must have 3 entries, got {shape!r}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    gain = _profiles(shape, rng)
    centers, peaks = _cells(shape, rng)
    order = np.argsort(centers[:, 0], kind="stable")
    centers, peaks = centers[order], peaks[order]
    # a unit impulse filtered to a blob has this peak; scale impulses by it
    norm = np.float32((2 * np.pi) ** 1.5 * CELL_SIGMA**3)
    halo = int(4 * CELL_SIGMA + 1)
    top = 2**bits - 1
    out = np.empty(shape, dtype=np.uint16)
    planes = max(1, SLAB_VOXELS // (shape[1] * shape[2]))
    for index, z0 in enumerate(range(0, shape[0], planes)):
        z1 = min(z0 + planes, shape[0])
        lo, hi = max(z0 - halo, 0), min(z1 + halo, shape[0])
        cells = np.zeros((hi - lo, *shape[1:]), dtype=np.float32)
        first, last = np.searchsorted(centers[:, 0], (lo, hi))
        c = centers[first:last]
        np.add.at(cells, (c[:, 0] - lo, c[:, 1], c[:, 2]), peaks[first:last] * norm)
        cells = ndimage.gaussian_filter(cells, CELL_SIGMA, mode="constant")
        mean = cells[z0 - lo : z1 - lo]
        mean += 200.0
        mean *= gain
        mean += OFFSET
        noise = np.random.default_rng([seed, index]).standard_normal(
            mean.shape, dtype=np.float32
        )
        noise *= np.sqrt(mean - OFFSET + 1.0)
        mean += noise
        np.clip(mean, 0, top, out=mean)
        out[z0:z1] = np.rint(mean)
    return out


def coarse_grid(shape, seed=0):
    """A deterministic float64 coarse grid, as a local statistic would give.

    Parameters
    ----------
    shape : tuple of int
        Shape of the grid.
    seed : int
        Seed of the random draw.

    Returns
    -------
    numpy.ndarray
        Values between 100 and 3000 (float64).
    """
    return np.random.default_rng(seed).uniform(100.0, 3000.0, shape)
