"""Pinhole cameras, ray generation, and the camera distributions and paths of SJC.

Conventions of this module:

* Camera frame is OpenGL: the camera looks down its -z axis, +y is up, +x is right.
* World frame is right-handed with +y up; the object sits at the origin.
* `Camera.rotation` is camera-to-world: its columns are the camera's x, y, z axes in world space.
* Pixel (col x, row y) has camera-space direction
  ``((x - (W/2 - 0.5)) / f, -(y - (H/2 - 0.5)) / f, -1)`` with ``f = (W/2) / tan(fov_x / 2)``;
  row 0 is the top row. Rays are flattened row-major (``index = y * W + x``).
* Angles are radians inside functions; configs and the public distribution arguments use degrees
  where their names say so (``*_deg``).
* View labels (for view-augmented prompts and the testbed's labelled image sets) are ints:
  `VIEW_FRONT`, `VIEW_SIDE`, `VIEW_BACK`, `VIEW_OVERHEAD`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

VIEW_FRONT, VIEW_SIDE, VIEW_BACK, VIEW_OVERHEAD = 0, 1, 2, 3
VIEW_NAMES = ("front", "side", "back", "overhead")
NUM_VIEW_LABELS = 4
# Label of each azimuth quadrant ((h + 45) % 360) // 90, as in the original.
_QUADRANT_LABELS = np.array([VIEW_FRONT, VIEW_SIDE, VIEW_BACK, VIEW_SIDE], np.int32)


@struct.dataclass
class Camera:
    """A pinhole camera (a pytree; array fields may carry leading batch axes).

    Attributes:
      rotation: ``[..., 3, 3]`` camera-to-world rotation (columns = camera x, y, z in world).
      eye: ``[..., 3]`` camera centre in world space.
      fov_x: ``[...]`` horizontal field of view in radians.
      height: image rows H (static).
      width: image columns W (static).
    """

    rotation: Array
    eye: Array
    fov_x: Array
    height: int = struct.field(pytree_node=False, default=64)
    width: int = struct.field(pytree_node=False, default=64)


def focal_length(fov_x: Array, width: int) -> Array:
    """Focal length in pixels, ``(W / 2) / tan(fov_x / 2)``; ``fov_x`` in radians (any shape)."""
    return (width / 2) / jnp.tan(fov_x / 2)


def _normalize(v: Array) -> Array:
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def look_at(eye: Array, target: Array | None = None, up: Array | None = None) -> Array:
    """Camera-to-world rotation ``[..., 3, 3]`` of a camera at ``eye [..., 3]`` facing ``target``.

    ``z = normalize(eye - target)``, ``x = normalize(up x z)``, ``y = z x x`` (the original's
    ``camera_pose``); ``target`` defaults to the origin and ``up`` to +y. Undefined when the viewing
    direction is parallel to ``up``.
    """
    eye = jnp.asarray(eye, jnp.float32)
    target = jnp.zeros(3, jnp.float32) if target is None else jnp.asarray(target, jnp.float32)
    up = jnp.array([0.0, 1.0, 0.0], jnp.float32) if up is None else jnp.asarray(up, jnp.float32)
    z = _normalize(eye - target)
    x = _normalize(jnp.cross(jnp.broadcast_to(up, z.shape), z))
    y = _normalize(jnp.cross(z, x))
    return jnp.stack([x, y, z], axis=-1)


def make_camera(
    eye: Array, *, fov_x_deg: float | Array = 60.0, height: int = 64, width: int = 64, target=None
) -> Camera:
    """A look-at camera at ``eye [..., 3]`` aimed at ``target`` (default origin), +y up."""
    eye = jnp.asarray(eye, jnp.float32)
    fov = jnp.broadcast_to(jnp.deg2rad(jnp.asarray(fov_x_deg, jnp.float32)), eye.shape[:-1])
    return Camera(look_at(eye, target), eye, fov, height=height, width=width)


def pixel_directions(camera: Camera) -> Array:
    """Camera-space (unnormalised, z = -1) directions ``[H * W, 3]`` of every pixel centre."""
    height, width = camera.height, camera.width
    f = focal_length(camera.fov_x, width)
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    x = (cols.reshape(-1) - (width / 2 - 0.5)) / f
    y = -(rows.reshape(-1) - (height / 2 - 0.5)) / f
    return jnp.stack([x, y, -jnp.ones_like(x)], axis=-1)


def generate_rays(camera: Camera) -> tuple[Array, Array]:
    """World-space rays of one (unbatched) camera.

    Returns:
      origins ``[H * W, 3]`` (the eye) and unit directions ``[H * W, 3]``, row-major.
    """
    directions = _normalize(pixel_directions(camera) @ camera.rotation.T)
    origins = jnp.broadcast_to(camera.eye, directions.shape)
    return origins, directions


def sjc_eye(azimuth: Array, polar: Array, radius: float | Array) -> Array:
    """The original's eye placement ``[..., 3]``: polar angle from +y, azimuth 0 on the -x side.

    ``eye = r (sin(polar) cos(pi - azimuth), cos(polar), sin(polar) sin(pi - azimuth))``, radians.
    """
    return jnp.stack(
        [
            radius * jnp.sin(polar) * jnp.cos(jnp.pi - azimuth),
            radius * jnp.cos(polar),
            radius * jnp.sin(polar) * jnp.sin(jnp.pi - azimuth),
        ],
        axis=-1,
    )


def view_label(azimuth_deg: Array, elevation_v_deg: Array, *, overhead_deg: float = 30.0) -> Array:
    """SJC's view label of a camera (int32, any shape).

    ``v < overhead_deg`` is overhead; otherwise the quadrant ``((h + 45) % 360) // 90`` gives
    front, side, back, side. ``v`` is the original's "vertical" draw in degrees (0 = overhead).
    """
    quadrant = (jnp.mod(azimuth_deg + 45.0, 360.0) // 90.0).astype(jnp.int32)
    quadrant = jnp.clip(quadrant, 0, 3)
    labels = jnp.asarray(_QUADRANT_LABELS)[quadrant]
    return jnp.where(elevation_v_deg < overhead_deg, VIEW_OVERHEAD, labels).astype(jnp.int32)


def sample_training_cameras(
    key: Array,
    num: int,
    *,
    radius: float = 1.5,
    max_v_deg: float = 100.0,
    fov_range_deg: tuple[float, float] = (40.0, 70.0),
    overhead_deg: float = 30.0,
    height: int = 64,
    width: int = 64,
) -> tuple[Camera, Array]:
    """Draw ``num`` cameras from SJC's training distribution (docs/original.md section 2).

    Azimuth ``h ~ U[0, 360)`` deg, ``v ~ U[0, max_v_deg)`` deg (clipped to [0.01, pi - 0.01] rad),
    polar angle ``arccos(1 - 2 v / pi)`` from +y (area-uniform), ``fov_x ~ U[fov_range_deg)``, all
    cameras look at the origin from ``radius``.

    Returns:
      A batched `Camera` (fields with leading axis ``[num]``) and view labels ``[num]`` int32.
    """
    if num < 1:
        raise ValueError(f"num must be positive, got {num}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    key_h, key_v, key_fov = jax.random.split(key, 3)
    h_deg = jax.random.uniform(key_h, (num,), jnp.float32, 0.0, 360.0)
    v_rad = jax.random.uniform(key_v, (num,), jnp.float32, 0.0, math.radians(max_v_deg))
    v_rad = jnp.clip(v_rad, 1e-2, jnp.pi - 1e-2)
    low, high = fov_range_deg
    fov_deg = jax.random.uniform(key_fov, (num,), jnp.float32, low, high)
    polar = jnp.arccos(1.0 - 2.0 * v_rad / jnp.pi)
    eye = sjc_eye(jnp.deg2rad(h_deg), polar, radius)
    labels = view_label(h_deg, jnp.rad2deg(v_rad), overhead_deg=overhead_deg)
    camera = Camera(look_at(eye), eye, jnp.deg2rad(fov_deg), height=height, width=width)
    return camera, labels


def spiral_path(
    *,
    num_frames: int = 100,
    radius: float = 1.5,
    turns: int = 3,
    fov_x_deg: float = 60.0,
    min_radius: float = 0.5,
    height: int = 64,
    width: int = 64,
) -> Camera:
    """The original's evaluation spiral: batched `Camera` ``[num_frames]`` descending from above.

    Frame i: ``r = (i + 1) / num_frames``, height ``radius (1 - r)``, angle ``r * 360 * turns`` deg,
    horizontal radius ``max(radius sin(r pi / 2), min_radius)``, looking at the origin.
    """
    ratio = np.arange(1, num_frames + 1, dtype=np.float64) / num_frames
    angle = np.deg2rad(ratio * 360.0 * turns)
    horizontal = np.maximum(radius * np.sin(ratio * np.pi / 2), min_radius)
    eye = np.stack(
        [horizontal * np.cos(angle), radius * (1 - ratio), horizontal * np.sin(angle)], -1
    )
    return make_camera(eye.astype(np.float32), fov_x_deg=fov_x_deg, height=height, width=width)


def turntable_path(
    *,
    num_frames: int = 100,
    radius: float = 1.5,
    elevation_deg: float = 15.0,
    fov_x_deg: float = 60.0,
    height: int = 64,
    width: int = 64,
) -> Camera:
    """A full circle around the +y axis at a fixed elevation above the horizon, starting in front.

    Frame 0 sits on the -x side (SJC's azimuth 0, a "front" view); azimuth grows by
    ``360 / num_frames`` deg per frame in SJC's azimuth convention.
    """
    azimuth = np.deg2rad(np.arange(num_frames) * 360.0 / num_frames)
    polar = np.full(num_frames, np.deg2rad(90.0 - elevation_deg))
    eye = np.asarray(sjc_eye(azimuth, polar, radius), np.float32)
    return make_camera(eye, fov_x_deg=fov_x_deg, height=height, width=width)


def index_camera(camera: Camera, i) -> Camera:
    """The i-th camera of a batched `Camera`."""
    return jax.tree_util.tree_map(lambda a: a[i], camera)
