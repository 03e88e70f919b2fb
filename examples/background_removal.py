"""Background removal: subtract a local low percentile, resampled to every voxel.

A light-sheet stack has a background that follows the illumination: brighter
at the sheet's waist, darker towards its sides and where the sheet has
travelled further. A low percentile (here the 25th) of a window much larger
than a cell, computed on a coarse sub-grid and interpolated linearly to full
resolution, estimates that background; subtracting it leaves the cells on a
flat, near-zero floor.

The figure shows a plane of the raw volume, the background, the result, and
a line profile across the illumination gradient (along x, averaged over a
band of rows) before and after.

Run it with::

    python examples/background_removal.py [--out examples/figures]
"""

import matplotlib.pyplot as plt
import numpy as np
from _common import clim, lightsheet, parse_args, save, show, timed

from dask_localstats import local_percentile

SHAPE = (64, 512, 512)  # (z, y, x)
SELEM = (16, 32, 32)  # window: many cells wide, smaller than the gradient
SPACING = (8, 16, 16)  # one coarse sample every half window


def remove_background(volume, percentile=0.25):
    """``(background, removed)``: a local percentile and the volume minus it."""
    background = local_percentile(
        volume,
        percentile,
        selem=SELEM,
        spacing=SPACING,
        interpolate=1,
        dtype=float,
        align="centers",  # each sample on its own center, see alignment.py
    )
    removed = np.clip(volume - background, 0, None)
    return background, removed


def main(argv=None):
    args = parse_args(argv, __doc__)
    times = {}
    with timed("make the volume", times):
        volume = lightsheet(SHAPE)
    with timed("local percentile and subtraction", times):
        background, removed = remove_background(volume)

    z, band = SHAPE[0] // 2, slice(240, 272)
    fig, axes = plt.subplot_mosaic("ABC;DDE", figsize=(15, 10), layout="constrained")
    limits = clim(volume[z])
    show(axes["A"], volume[z], f"raw, plane z={z}", **limits)
    show(axes["B"], background[z], "background (local 25th percentile)", **limits)
    show(axes["C"], removed[z], "raw - background", **clim(removed[z]))
    for key in "ABC":
        axes[key].axhspan(band.start, band.stop, color="tab:orange", alpha=0.3, lw=0)
        axes[key].axvspan(band.start, band.stop, color="tab:green", alpha=0.3, lw=0)

    # profiles along x (orange band) and y (green band); the median over the
    # band and over z drops the cells out and leaves the background level
    for key, axis, name in [("D", 2, "x"), ("E", 1, "y")]:
        ax, cut = axes[key], (slice(None), band) if axis == 2 else (..., band)
        for image, label, color in [
            (volume, "raw", "0.5"),
            (background, "background", "tab:blue"),
            (removed, "raw - background", "tab:red"),
        ]:
            profile = np.median(image[cut], axis=(0, 3 - axis))
            ax.plot(profile, label=label, color=color)
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel=f"{name} (voxels)", ylabel="intensity (counts)")
        ax.set_title(f"profile along {name}: median over z and the band")
    axes["D"].legend()
    fig.suptitle(
        f"Background removal: local_percentile(p=0.25, selem={SELEM}, spacing={SPACING})"
    )
    save(fig, args.out, "background_removal.png")
    return times


if __name__ == "__main__":
    main()
