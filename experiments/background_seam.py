"""Count the dark rows of a lift's turntable with the original's background lookup and the wrap.

    PYTHONPATH=. python experiments/background_seam.py RUN_DIR [--frames 60] [--size 32]

Renders ``RUN_DIR/final/grid.npz`` (a testbed run: its background is the world's) along the
turntable path twice, with ``background_wrap=False`` (the original's zero-padded lookup) and
``True``, and counts per image row the frames in which the row's mean background luminance
(pixels of opacity below 0.01) is lower than both neighbouring rows' by more than 0.05: the
seam of the azimuth wrap is such a row (docs/deviations.md).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from sjc_jax import grid_io, testbed
from sjc_jax.camera import turntable_path
from sjc_jax.testbed.scenes import render_views

LUMA = np.array([0.2126, 0.7152, 0.0722])


def dark_rows(images: np.ndarray, opacity: np.ndarray, *, dip: float = 0.05) -> dict[int, int]:
    """``{row: frames}`` of rows darker than both neighbours by ``dip``; ``images [T, H, W, 3]``."""
    counts: dict[int, int] = {}
    for image, alpha in zip(images @ LUMA, opacity, strict=True):
        background = alpha < 0.01
        means = np.array(
            [
                row[b].mean() if b.sum() > 4 else np.nan
                for row, b in zip(image, background, strict=True)
            ]
        )
        lower = means[1:-1] - np.fmax(means[:-2], means[2:])
        for row in np.flatnonzero(lower < -dip) + 1:
            counts[int(row)] = counts.get(int(row), 0) + 1
    return dict(sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    config = testbed.testbed_config()
    grid, _, _ = grid_io.load_grid_file(f"{args.run_dir}/final/grid.npz")
    cameras = turntable_path(
        num_frames=args.frames, radius=config.camera.radius, height=args.size, width=args.size
    )
    for wrap in (False, True):
        render = dataclasses.replace(config.render_config(), background_wrap=wrap)
        images, _, opacity = render_views(grid, cameras, render, chunk_size=10)
        rows = dark_rows(np.asarray(images), np.asarray(opacity))
        print(f"background_wrap={wrap}: frames with a dark row, per row: {rows}")


if __name__ == "__main__":
    main()
