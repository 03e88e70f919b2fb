"""Corner against center alignment, on a linear ramp.

The local median of a linear ramp is the ramp's value at the window's
center, so a correct resampling of the coarse medians gives back the ramp.
ClearMap's ``align='corners'`` (the default) instead stretches the coarse
grid so that its first sample lands on the first voxel and its last sample
on the last voxel, though the outermost centers sit about half a spacing
inside the image: the result is off by up to half a spacing at both ends,
and its slope is wrong everywhere. ``align='centers'`` puts each sample on
its own center: the ramp is exact between the outermost centers and held
constant beyond them.

The window is 31 voxels wide (odd, so each window's median is exactly the
ramp at its center) and the spacing defaults to the window. The image is 8
spacings long; when its size is not a multiple of the spacing, the
outermost centers sit ``(spacing + size % spacing) // 2`` voxels inside it,
so the corner shift grows towards a whole spacing.

Run it with::

    python examples/alignment.py [--out examples/figures]
"""

import matplotlib.pyplot as plt
import numpy as np
from _common import parse_args, save

from dask_localstats import local_percentile

SIZE = 248  # 8 spacings, so the outermost centers sit half a spacing in
SELEM = 31


def main(argv=None):
    args = parse_args(argv, __doc__)
    ramp = np.arange(SIZE, dtype=float)
    coarse, centers = local_percentile(
        ramp, 0.5, selem=SELEM, interpolate=None, return_centers=True
    )
    centers = centers[:, 0]
    results = {
        align: local_percentile(ramp, 0.5, selem=SELEM, interpolate=1, align=align)
        for align in ("corners", "centers")
    }
    for align, result in results.items():
        error = np.abs(result - ramp)
        inner = error[centers[0] : centers[-1] + 1].max()
        print(f"{align}: max error {error.max():.2f}, between the centers {inner:.2f}")

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(10, 8), sharex=True, height_ratios=(3, 2), layout="constrained"
    )
    top.plot(ramp, ramp, color="k", lw=3, alpha=0.3, label="true ramp")
    styles = {"corners": ("tab:red", "--"), "centers": ("tab:blue", "-")}
    for align, result in results.items():
        color, ls = styles[align]
        top.plot(ramp, result, color=color, ls=ls, label=f"align='{align}'")
        bottom.plot(ramp, result - ramp, color=color, ls=ls, label=f"align='{align}'")
    corners = np.linspace(0, SIZE - 1, len(centers))
    top.plot(
        centers, coarse, "o", color="tab:blue", label="coarse median at its center"
    )
    top.plot(
        corners, coarse, "x", color="tab:red", ms=8, label="where 'corners' puts it"
    )
    top.set(
        ylabel="value", title=f"local median of a ramp, selem={SELEM}, interpolate=1"
    )
    top.legend()
    half = (centers[1] - centers[0]) / 2
    for ax in (top, bottom):
        for c in centers:
            ax.axvline(c, color="0.8", lw=0.8, zorder=0)
    bottom.axhline(0, color="k", lw=0.5)
    for sign in (-1, 1):
        bottom.axhline(sign * half, color="0.5", ls=":", lw=1)
    bottom.text(SIZE / 2, -half + 0.5, "- half a spacing", color="0.4", ha="center")
    bottom.set(
        xlabel="voxel (grey lines: centers)", ylabel="result - ramp", title="error"
    )
    bottom.legend(loc="upper right")
    save(fig, args.out, "alignment.png")
    return results


if __name__ == "__main__":
    main()
