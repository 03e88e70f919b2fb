"""Write a small synthetic light-sheet-like volume to try ``dask-localstats`` on.

The volume is uint16, like a microscope's, and mixes what background removal
has to cope with: a smooth illumination that fades across the sheet (along
x) and with depth (along z), stripes along the sheet's direction (shadows of
absorbing objects, varying in y and z), a few hundred bright blobs ("cells")
and Poisson-like noise. It is stored as a zarr v3 array whose chunks are a
fraction of the volume, so that the commands stream through it.

Usage::

    python examples/make_example.py example.zarr [--shape 64 256 256]
    dask-localstats percentile example.zarr background.zarr --percentile 0.1 \\
        --selem 32 64 64 --spacing 16 32 32 --subtract
"""

import argparse
import sys

import numpy as np
import zarr


def make_volume(shape=(64, 256, 256), seed=0):
    """The synthetic volume as a uint16 NumPy array.

    Parameters
    ----------
    shape : tuple of 3 ints
        ``(z, y, x)`` size in voxels.
    seed : int
        Seed of the random blobs, stripes and noise.

    Returns
    -------
    ndarray of uint16
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z = np.linspace(0, 1, nz)[:, None, None]
    y = np.linspace(-1, 1, ny)[None, :, None]
    x = np.linspace(0, 1, nx)[None, None, :]
    # illumination: enters from the left, fades across x, dims with depth
    illumination = np.exp(-1.2 * x) * (1 - 0.4 * z) * (1 - 0.3 * y**2)
    # stripes along x: shadows that vary in y (and slowly in z)
    phases = rng.uniform(0, 2 * np.pi, 3)
    stripes = 1 - 0.15 * (
        np.sin(ny / 12 * np.pi * y + phases[0] + 2 * z) ** 2
        + 0.5 * np.sin(ny / 29 * np.pi * y + phases[1]) ** 2
    )
    volume = 400 + 1500 * illumination * stripes
    # bright blobs, dimmed by the same illumination
    count = max(1, int(np.prod(shape) / 2e4))
    centers = rng.uniform(0, 1, (count, 3)) * np.array(shape)
    radius = rng.uniform(1.5, 3.5, count)
    brightness = rng.uniform(2000, 8000, count)
    for center, r, b in zip(centers, radius, brightness, strict=True):
        lo = np.maximum((center - 3 * r).astype(int), 0)
        hi = np.minimum((center + 3 * r).astype(int) + 1, shape)
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d2 = (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        volume[box] += (
            b * illumination[box[0], box[1], box[2]] * np.exp(-d2 / (2 * r**2))
        )
    volume += rng.normal(0, np.sqrt(volume))  # shot noise
    return np.clip(np.rint(volume), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def main(argv=None):
    """Parse the arguments and write the volume."""
    parser = argparse.ArgumentParser(
        description="Write a synthetic light-sheet-like uint16 zarr v3 volume."
    )
    parser.add_argument("output", metavar="OUT", help="zarr store to create")
    parser.add_argument(
        "--shape",
        nargs=3,
        type=int,
        default=(64, 256, 256),
        metavar=("Z", "Y", "X"),
        help="size in voxels (default: 64 256 256)",
    )
    parser.add_argument(
        "--chunks",
        nargs=3,
        type=int,
        default=(32, 64, 64),
        metavar=("Z", "Y", "X"),
        help="zarr chunks (default: 32 64 64)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists"
    )
    args = parser.parse_args(argv)
    if min(args.shape) < 1 or min(args.chunks) < 1:
        parser.error(f"--shape and --chunks must be positive, got {args.shape}")
    volume = make_volume(tuple(args.shape), args.seed)
    try:
        array = zarr.create_array(
            args.output,
            shape=volume.shape,
            chunks=tuple(
                min(c, s) for c, s in zip(args.chunks, volume.shape, strict=True)
            ),
            dtype=volume.dtype,
            zarr_format=3,
            overwrite=args.overwrite,
        )
    except Exception as error:  # zarr's error for an existing store varies
        print(f"make_example.py: error: {error}", file=sys.stderr)
        return 2
    array[:] = volume
    print(f"wrote {args.output}: shape {volume.shape}, {volume.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
