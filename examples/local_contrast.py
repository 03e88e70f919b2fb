"""Local contrast normalization from local histograms (CLAHE without clipping).

``local_histogram`` counts the values of every window of a coarse sub-grid
(here non-overlapping tiles, as in CLAHE). Each tile's cumulative histogram,
divided by its voxel count, is that tile's CDF: it maps an intensity to the
fraction of the tile's voxels below it. Every voxel is then mapped through
the CDFs of the (up to 8) tiles whose centers surround it, weighted
trilinearly by its distance to those centers, and held beyond the outermost
centers (``align='centers'``). This is adaptive histogram equalization
without a clip limit: every region ends up with a nearly uniform intensity
distribution on ``[0, 1]``, so a cell under dim illumination is as bright as
one under the sheet's waist, and, without a clip limit, noise in a flat
background is stretched as much as anything else.

The figure shows a plane before and after, the CDFs of a bright and a dim
tile, and per-row levels of background and cells along the fading
illumination (y), before and after. Structure smaller than a tile, such as
the stripes along x, is not normalized away but stretched like the rest.

Run it with::

    python examples/local_contrast.py [--out examples/figures]
"""

import itertools

import matplotlib.pyplot as plt
import numpy as np
from _common import clim, lightsheet, parse_args, save, show, timed

from dask_localstats import local_histogram

SHAPE = (64, 512, 512)  # (z, y, x)
MAX_BIN = 4096  # a 12-bit camera
TILE = (16, 64, 64)  # the window and the spacing: non-overlapping tiles


def local_cdfs(volume):
    """``(cdf, centers)``: each tile's mid-rank CDF, shape ``m + (MAX_BIN,)``."""
    counts, centers = local_histogram(volume, MAX_BIN, selem=TILE, return_centers=True)
    cdf = np.cumsum(counts, axis=-1) - 0.5 * counts
    return cdf / counts.sum(axis=-1, keepdims=True), centers


def equalize(volume, cdf, centers):
    """Map each voxel through its surrounding tiles' CDFs, trilinearly weighted."""
    lower, weight = [], []
    for axis, size in enumerate(volume.shape):
        c = np.unique(centers[..., axis])  # the centers along this axis
        f = np.interp(np.arange(size), c, np.arange(len(c)))  # held beyond the ends
        i = np.minimum(f.astype(int), len(c) - 2)
        shape = [1] * volume.ndim
        shape[axis] = size
        lower.append(i.reshape(shape))
        weight.append((f - i).reshape(shape))
    out = np.zeros(volume.shape)
    for corner in itertools.product((0, 1), repeat=volume.ndim):
        index = tuple(i + k for i, k in zip(lower, corner, strict=True))
        w = 1.0
        for u, k in zip(weight, corner, strict=True):
            w = w * (u if k else 1 - u)  # broadcasts to the volume's shape
        out += w * cdf[(*index, volume)]
    return out


def main(argv=None):
    args = parse_args(argv, __doc__)
    times = {}
    with timed("make the volume", times):
        volume = lightsheet(SHAPE, bits=12)
    with timed("local histograms", times):
        cdf, centers = local_cdfs(volume)
    with timed("mapping through the local CDFs", times):
        normalized = equalize(volume, cdf, centers)

    z = SHAPE[0] // 2
    iz = np.argmin(abs(centers[:, 0, 0, 0] - z))
    bright, dim = (iz, 3, 3), (iz, 7, 0)  # tiles under the waist and at a far side
    fig, axes = plt.subplot_mosaic(
        "AABBCC;DDDEEE", figsize=(15, 10), layout="constrained"
    )
    show(axes["A"], volume[z], f"raw (12-bit), plane z={z}", **clim(volume[z]))
    show(axes["B"], normalized[z], "mapped through the local CDFs", vmin=0, vmax=1)
    for tile, color in [(bright, "tab:orange"), (dim, "tab:purple")]:
        cz, cy, cx = centers[tile]
        corner, (height, width) = (cx - TILE[2] / 2, cy - TILE[1] / 2), TILE[1:]
        for key in "AB":
            box = plt.Rectangle(corner, width, height, fill=False, color=color, lw=2)
            axes[key].add_patch(box)
        axes["C"].plot(
            cdf[tile],
            color=color,
            label=f"tile centered at (z, y, x) = ({cz}, {cy}, {cx})",
        )
    axes["C"].set(
        xlim=np.percentile(volume, [0.1, 99.9]),
        xlabel="raw intensity (counts)",
        ylabel="local CDF",
    )
    axes["C"].set_title("local CDFs (cumulative local histograms)")
    axes["C"].legend(loc="lower right")

    # along y the illumination fades: raw levels drop, the mapped ones do not
    levels = [(50, "median (background)"), (99.7, "99.7th percentile (cells)")]
    for key, image, unit in [("D", volume, "counts"), ("E", normalized, "mapped")]:
        ax = axes[key]
        for q, label in levels:
            ax.plot(np.percentile(image, q, axis=(0, 2)), label=label)
        ax.set(xlabel="y (voxels)", ylabel=unit, ylim=(0, None))
        ax.legend(loc="lower left")
    axes["D"].set_title("raw: levels per row y, over all z and x")
    axes["E"].set_title("mapped: the same levels")
    fig.suptitle(
        f"Local contrast normalization: local_histogram(max_bin={MAX_BIN}, selem={TILE})"
    )
    save(fig, args.out, "local_contrast.png")
    return times


if __name__ == "__main__":
    main()
