"""ClearMap-style equalization: divide by a local low percentile, capped.

ClearMap's cell detection equalizes the intensity before detecting cells:
two local percentiles ``(low, high) = (0.4, 0.975)`` on a coarse sub-grid
(``selem=(200, 200, 5)``, ``spacing=(50, 50, 5)`` in ClearMap's x, y, z
order), interpolated linearly, then every voxel is divided by the local low
percentile, so that the background sits at 1, unless the local contrast
``high / low`` exceeds ``max_value`` (1.5), in which case it is divided by
``high / max_value`` instead, so that the local high percentile sits at
``max_value``::

    scale = max(low, 1), or high / max_value where high / max(low, 1) > max_value
    equalized = source / scale

Here the volume is smaller, so the window and spacing are scaled down (and
written in this project's z, y, x order). The figure shows a plane before and
after, the two percentile maps, and profiles across the illumination: after
equalization the background is flat at 1 and cells are comparable whether
they sit under bright or dim illumination.

Run it with::

    python examples/equalization.py [--out examples/figures]
"""

import matplotlib.pyplot as plt
import numpy as np
from _common import clim, lightsheet, parse_args, save, show, timed

from dask_localstats import local_percentile

SHAPE = (64, 512, 512)  # (z, y, x)
PERCENTILES = (0.4, 0.975)
SELEM = (5, 100, 100)  # ClearMap's (200, 200, 5) for an image half the size
SPACING = (5, 25, 25)  # ClearMap's (50, 50, 5), likewise
MAX_VALUE = 1.5


def equalize(volume, percentile=PERCENTILES, max_value=MAX_VALUE):
    """``(equalized, low, high, scale)``, as ClearMap's ``equalize`` computes it."""
    both = local_percentile(
        volume, percentile, selem=SELEM, spacing=SPACING, interpolate=1, dtype=float
    )
    low, high = both[..., 0], both[..., 1]
    scale = np.maximum(low, 1)
    capped = high / scale > max_value
    scale[capped] = high[capped] / max_value
    return volume / scale, low, high, scale


def main(argv=None):
    args = parse_args(argv, __doc__)
    times = {}
    with timed("make the volume", times):
        volume = lightsheet(SHAPE)
    with timed("two local percentiles and equalization", times):
        equalized, low, high, scale = equalize(volume)

    z, band = SHAPE[0] // 2, slice(240, 272)
    fig, axes = plt.subplot_mosaic(
        "ABC;DDE;FFE", figsize=(15, 12), height_ratios=(3, 2, 2), layout="constrained"
    )
    show(axes["A"], volume[z], f"raw, plane z={z}", **clim(volume[z]))
    show(axes["B"], scale[z], "divisor: low, or high / max_value inside green")
    axes["B"].contour(scale[z] > low[z], levels=[0.5], colors="tab:green")
    show(axes["C"], equalized[z], "equalized = raw / divisor", **clim(equalized[z]))
    for key in "ABC":
        axes[key].axhspan(band.start, band.stop, color="tab:orange", alpha=0.3, lw=0)

    x, ax = np.arange(SHAPE[2]), axes["D"]
    ax.plot(x, volume[z, band].mean(0), color="0.5", lw=0.8, label="raw")
    for image, p, color in [
        (low, PERCENTILES[0], "tab:blue"),
        (high, PERCENTILES[1], "tab:green"),
    ]:
        ax.plot(x, image[z, band].mean(0), color=color, label=f"local {p} percentile")
    ax.set(
        ylabel="counts",
        title=f"before: profile along x, mean over rows {band.start}-{band.stop - 1}",
    )
    ax.legend(ncols=3, loc="upper left")
    ax = axes["F"]
    ax.plot(x, equalized[z, band].mean(0), color="tab:red", lw=0.8, label="equalized")
    ax.axhline(1, color="tab:blue", ls=":", label="background (low) maps to 1")
    ax.axhline(
        MAX_VALUE, color="tab:green", ls=":", label="high maps to at most max_value"
    )
    ax.set(xlabel="x (voxels)", ylabel="equalized", title="after: the same profile")
    ax.legend(ncols=3)

    # the background's spread: raw follows the illumination, equalized does not
    ax, median = axes["E"], np.median(volume[z])
    bins = (np.arange(0.5 * median, 2 * median, 2) + 0.5) / median  # integer-aligned
    ax.hist(
        (volume[z] / median).ravel(),
        bins,
        histtype="step",
        color="0.5",
        label="raw / median",
    )
    ax.hist(
        equalized[z].ravel(), bins, histtype="step", color="tab:red", label="equalized"
    )
    ax.set(
        title=f"histogram of plane z={z}", xlabel="relative intensity", ylabel="voxels"
    )
    ax.legend()
    fig.suptitle(
        f"ClearMap equalization: local_percentile({PERCENTILES}, selem={SELEM}, spacing={SPACING}), max_value={MAX_VALUE}"
    )
    save(fig, args.out, "equalization.png")
    return times


if __name__ == "__main__":
    main()
