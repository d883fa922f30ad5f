"""What the learned model and its trainer share about a scene: its plain background, its file.

Below both `sjc_jax.learned` (the model kind: the ground truth a lift is evaluated against) and
`sjc_jax.learned.train` (the training data), so the model kind never imports the trainer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sjc_jax.testbed.scenes import BACKGROUND_RESOLUTION


def plain_background(rgb: Sequence[float]) -> np.ndarray:
    """The background texture ``[128, 128, 3]`` of one colour (the scenes' texture size)."""
    rgb = np.asarray(rgb, np.float32)
    if rgb.shape != (3,) or not np.all(np.isfinite(rgb)):
        raise ValueError(f"a plain background is 3 finite numbers (RGB), got {rgb.tolist()}")
    texture = np.empty((BACKGROUND_RESOLUTION, BACKGROUND_RESOLUTION, 3), np.float32)
    texture[:] = rgb
    return texture


def file_sha256(path: str) -> str:
    """The SHA-256 hex digest of the file at ``path`` (a scene file's identity in a model dir)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
