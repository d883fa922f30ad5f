"""What the learned model and its trainer share about a scene: its plain background, its file,
its training renders.

Below both `sjc_jax.learned` (the model kind: the ground truth a lift is evaluated against) and
`sjc_jax.learned.train` (the training data), so the model kind never imports the trainer.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
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


def render_scenes(
    scenes: Sequence[str],
    *,
    views_per_scene: int,
    image_size: int,
    background: Sequence[float],
    seed: int,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images [M, H, W, 3], scene ids [M], view labels [M])``: the training renders.

    ``views_per_scene`` renders of each scene (a built-in name or an RGB grid file) at
    ``image_size``, from the testbed preset's camera distribution (cameras from
    ``fold_in(key(seed), scene index)``) and renderer, over the plain ``background``, clipped
    to [0, 1]. Deterministic: the trainer and the exact denoiser of a model get the same set.
    """
    import jax
    import jax.numpy as jnp

    from sjc_jax.testbed import load_scene, scene_render_config, testbed_config
    from sjc_jax.testbed.scenes import render_dataset

    run_config = testbed_config(image_size=image_size)
    c = run_config.camera
    texture = jnp.asarray(plain_background(background))
    key = jax.random.key(seed)
    images, scene_ids, labels = [], [], []
    for i, spec in enumerate(scenes):
        start = time.perf_counter()
        grid, aabb, _ = load_scene(spec)
        views, view_labels, _ = render_dataset(
            jax.random.fold_in(key, i),
            grid.replace(background=texture),
            num_views=views_per_scene,
            image_size=image_size,
            render_config=scene_render_config(run_config, aabb),
            radius=c.radius,
            max_v_deg=c.max_v_deg,
            fov_range_deg=(c.fov_min_deg, c.fov_max_deg),
            overhead_deg=c.overhead_deg,
            chunk_size=64,
        )
        images.append(np.clip(np.asarray(views), 0.0, 1.0))
        labels.append(np.asarray(view_labels, np.int32))
        scene_ids.append(np.full(views_per_scene, i, np.int32))
        if log is not None:
            seconds = time.perf_counter() - start
            log(f"rendered {views_per_scene} views of {spec} in {seconds:.1f} s")
    return np.concatenate(images), np.concatenate(scene_ids), np.concatenate(labels)
