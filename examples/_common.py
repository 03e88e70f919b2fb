"""Shared helpers of the example scripts: the synthetic volume and the figures.

The volume is the deterministic light-sheet-like stack of
``benchmarks/data.py`` (imported, not copied): a dim background under an
illumination that fades along y and falls off on both sides of the sheet's
waist along x, stripes varying along x, bright Gaussian "cells" and shot
noise. Its axes are ``(z, y, x)``.
"""

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "examples" / "figures"


def lightsheet(shape=(64, 512, 512), seed=0, bits=16):
    """The synthetic uint16 volume of ``benchmarks/data.py::lightsheet``."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    from data import lightsheet as make

    return make(shape, seed=seed, bits=bits)


def parse_args(argv, doc):
    """Parse ``[--out DIR]`` (default ``examples/figures``) for an example."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=FIGURES, help="folder of the PNG figures"
    )
    return parser.parse_args(argv)


def save(fig, out, name):
    """Save `fig` as ``out/name`` (PNG), close it, print and return the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"saved {path}")
    return path


def show(ax, image, title, **kwargs):
    """Show a 2-D `image` on `ax` with a title, pixel axes and a colorbar."""
    im = ax.imshow(image, cmap=kwargs.pop("cmap", "gray"), **kwargs)
    ax.set(title=title, xlabel="x (voxels)", ylabel="y (voxels)")
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return im


def clim(image, low=1, high=99.5):
    """``vmin``/``vmax`` keywords spanning the given percentiles of `image`."""
    vmin, vmax = np.percentile(image, [low, high])
    return {"vmin": vmin, "vmax": vmax}


@contextmanager
def timed(label, times):
    """Record the wall time of the block as ``times[label]`` (seconds)."""
    start = time.perf_counter()
    yield
    times[label] = time.perf_counter() - start
    print(f"{label}: {times[label]:.2f} s")
