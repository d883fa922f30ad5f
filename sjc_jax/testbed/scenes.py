"""Procedural ground-truth scenes and the labelled multi-view dataset of the testbed.

Conventions of this module:

* World frame as everywhere: right-handed, +y up, the object centred at the origin inside the
  ``[-1, 1]^3`` box and within radius 0.7 of the origin.
* Every scene faces **-x**: SJC's azimuth 0 puts the camera on -x and labels it "front", so the
  front camera looks from -x towards +x and sees the duck's beak, the house's door, the robot's
  face and the mug's logo. The back (+x) carries different parts (tail, chimney, backpack, plain
  mug side), and +z/-z differ where a scene has a handle.
* A scene is a list of parts, each a signed distance (negative inside, world units) and an RGB
  colour, evaluated in float64 at voxel centres (``lo + (i + 0.5) * size``, as `sjc_jax.grid`).
  The union is the minimum distance; a voxel takes the colour of the part nearest to it, so
  colours extend smoothly outwards and trilinear lookups at the surface see the right colour.
* Density: the raw value ramps linearly in the signed distance over `RAMP_VOXELS` voxels, from
  `RAW_OUTSIDE` (activated density ~1.7e-5) to ``1 - density_shift + OPTICAL_DEPTH_PER_VOXEL /
  voxel_size`` inside, so ``softplus(raw * exp(0) - 1)`` gives an optical depth of
  `OPTICAL_DEPTH_PER_VOXEL` per voxel: opaque within a couple of voxels at any resolution, with a
  boundary smooth enough to be learned.
* Features are linear RGB in [0, 1] (C = 3, ``feature_space = "rgb"``). The background texture is
  the testbed world's known background: `BACKGROUND_RGB` (white) in every texel. Its side is
  `BACKGROUND_RESOLUTION` rather than SJC's 4 because the original's bilinear lookup
  (``background_wrap=False``) zero-pads the texture border: a constant 4x4 texture renders
  visibly darker within 45 deg of the -x direction (the seam of v) and 22 deg of +-z (the poles
  of u); a 128x128 one only in bands about 1.4 deg wide, and none with the default wrapped lookup.
  A lift should use the scene's texture as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax.camera import (
    Camera,
    make_camera,
    sample_training_cameras,
    sjc_eye,
    view_label,
)
from sjc_jax.grid import DEFAULT_AABB, VoxelGrid
from sjc_jax.render import RenderConfig, render_views

Array = jax.Array

BACKGROUND_RGB = (1.0, 1.0, 1.0)  # the testbed world's known background colour
BACKGROUND_RESOLUTION = 128  # side of the (constant) background texture of a scene
RAW_OUTSIDE = -10.0  # raw density of empty space
OPTICAL_DEPTH_PER_VOXEL = 2.0  # sigma * voxel_size inside an object
RAMP_VOXELS = 3.0  # width of the raw-density ramp across a surface, in voxels

# A part: (signed distance [...], colour [..., 3] or [3]) evaluated at points [..., 3].
Part = tuple[np.ndarray, np.ndarray]


# --- signed distances (float64 numpy; p [..., 3] -> [...]) ------------------------------------


def _length(v: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(v * v, axis=-1))


def sphere(p, center, radius):
    return _length(p - np.asarray(center)) - radius


def ellipsoid(p, center, radii):
    """Approximate (bound-correct near the surface) distance to an axis-aligned ellipsoid."""
    q = (p - np.asarray(center)) / np.asarray(radii)
    k0 = _length(q)
    k1 = _length(q / np.asarray(radii))
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-12)


def box(p, center, half, rounding=0.0):
    q = np.abs(p - np.asarray(center)) - np.asarray(half) + rounding
    outside = _length(np.maximum(q, 0.0))
    return outside + np.minimum(np.max(q, axis=-1), 0.0) - rounding


def cylinder(p, center, radius, half_length, axis=1):
    """Capped cylinder along world axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    q = p - np.asarray(center)
    radial = _length(np.delete(q, axis, axis=-1)) - radius
    along = np.abs(q[..., axis]) - half_length
    d = np.stack([radial, along], -1)
    return _length(np.maximum(d, 0.0)) + np.minimum(np.max(d, axis=-1), 0.0)


def torus(p, center, major, minor, axis=0):
    """Torus around world axis ``axis`` through ``center``."""
    q = p - np.asarray(center)
    ring = _length(np.delete(q, axis, axis=-1)) - major
    return np.sqrt(ring * ring + q[..., axis] ** 2) - minor


def _rgb(values) -> np.ndarray:
    return np.asarray(values, np.float64)


# --- scenes (each returns its parts at points p [..., 3]) --------------------------------------


def duck_parts(p) -> list[Part]:
    """A yellow duck: beak and eyes on the front (-x), a raised tail at the back (+x)."""
    yellow, wing = _rgb((1.0, 0.85, 0.1)), _rgb((0.9, 0.6, 0.05))
    return [
        (ellipsoid(p, (0.05, -0.15, 0.0), (0.45, 0.3, 0.32)), yellow),
        (sphere(p, (-0.3, 0.22, 0.0), 0.2), yellow),
        (ellipsoid(p, (-0.52, 0.2, 0.0), (0.13, 0.05, 0.09)), _rgb((1.0, 0.4, 0.0))),
        (sphere(p, (-0.44, 0.3, 0.1), 0.05), _rgb((0.05, 0.05, 0.1))),
        (sphere(p, (-0.44, 0.3, -0.1), 0.05), _rgb((0.05, 0.05, 0.1))),
        (ellipsoid(p, (0.45, 0.02, 0.0), (0.16, 0.09, 0.1)), wing),
        (ellipsoid(p, (0.1, -0.08, 0.3), (0.25, 0.12, 0.06)), wing),
        (ellipsoid(p, (0.1, -0.08, -0.3), (0.25, 0.12, 0.06)), wing),
    ]


def house_parts(p) -> list[Part]:
    """A house: door and blue windows on the front (-x), chimney and a green window at the back."""
    # Roof: a prism with its ridge along z, as the intersection of five half-spaces.
    slope = np.array([0.36, 0.4]) / np.hypot(0.36, 0.4)  # (rise, run) of a roof face
    y = p[..., 1] - 0.02
    roof = np.maximum.reduce(
        [
            -y,
            (p[..., 0] * slope[0] + y * slope[1]) - 0.4 * slope[0],
            (-p[..., 0] * slope[0] + y * slope[1]) - 0.4 * slope[0],
            np.abs(p[..., 2]) - 0.46,
        ]
    )
    blue = _rgb((0.2, 0.5, 0.95))
    return [
        (box(p, (0.0, -0.2, 0.0), (0.32, 0.22, 0.4)), _rgb((0.85, 0.72, 0.5))),
        (roof, _rgb((0.75, 0.12, 0.08))),
        (box(p, (-0.33, -0.27, 0.0), (0.03, 0.15, 0.09)), _rgb((0.4, 0.2, 0.06))),
        (box(p, (-0.33, -0.12, 0.26), (0.02, 0.07, 0.07)), blue),
        (box(p, (-0.33, -0.12, -0.26), (0.02, 0.07, 0.07)), blue),
        (box(p, (0.2, 0.32, 0.22), (0.06, 0.16, 0.06)), _rgb((0.35, 0.3, 0.3))),
        (box(p, (0.33, -0.18, 0.0), (0.02, 0.1, 0.15)), _rgb((0.2, 0.7, 0.3))),
    ]


def robot_parts(p) -> list[Part]:
    """A robot: red eyes and a yellow chest panel on the front (-x), an orange backpack at +x."""
    dark = _rgb((0.25, 0.25, 0.3))
    return [
        (box(p, (0.0, -0.1, 0.0), (0.2, 0.26, 0.26), rounding=0.05), _rgb((0.3, 0.45, 0.7))),
        (box(p, (0.0, 0.3, 0.0), (0.15, 0.13, 0.15), rounding=0.03), _rgb((0.6, 0.65, 0.72))),
        (sphere(p, (-0.15, 0.33, 0.07), 0.045), _rgb((1.0, 0.1, 0.1))),
        (sphere(p, (-0.15, 0.33, -0.07), 0.045), _rgb((1.0, 0.1, 0.1))),
        (box(p, (-0.2, -0.05, 0.0), (0.03, 0.1, 0.14)), _rgb((0.95, 0.8, 0.1))),
        (cylinder(p, (0.0, 0.5, 0.0), 0.02, 0.08), dark),
        (sphere(p, (0.0, 0.6, 0.0), 0.05), _rgb((1.0, 0.1, 0.1))),
        (box(p, (0.25, -0.05, 0.0), (0.07, 0.17, 0.17), rounding=0.02), _rgb((0.95, 0.5, 0.1))),
        (cylinder(p, (0.0, -0.1, 0.33), 0.07, 0.2), dark),
        (cylinder(p, (0.0, -0.1, -0.33), 0.07, 0.2), dark),
        (cylinder(p, (0.0, -0.48, 0.12), 0.08, 0.12), dark),
        (cylinder(p, (0.0, -0.48, -0.12), 0.08, 0.12), dark),
    ]


def mug_parts(p) -> list[Part]:
    """A blue mug of coffee: yellow logo on the front (-x), red handle on the +z side."""
    outer, inner, center_y = 0.34, 0.25, -0.1
    shell = np.maximum(
        cylinder(p, (0.0, center_y, 0.0), outer, 0.33),
        -cylinder(p, (0.0, center_y + 0.07, 0.0), inner, 0.34),  # open top, 0.06 thick bottom
    )
    radial = _length(p[..., [1, 2]] - np.array([center_y, 0.0]))
    logo = (p[..., 0] < 0) & (radial < 0.14)
    colour = np.where(logo[..., None], _rgb((1.0, 0.85, 0.0)), _rgb((0.15, 0.3, 0.8)))
    inside = _length(p[..., [0, 2]]) < 0.5 * (outer + inner)
    colour = np.where(inside[..., None], _rgb((0.9, 0.88, 0.8)), colour)
    handle = np.maximum(torus(p, (0.0, center_y, outer), 0.17, 0.045), outer - 0.02 - p[..., 2])
    coffee = cylinder(p, (0.0, -0.13, 0.0), inner, 0.24)  # surface at y = 0.11
    return [(shell, colour), (handle, _rgb((0.8, 0.1, 0.1))), (coffee, _rgb((0.35, 0.2, 0.08)))]


SCENES: dict[str, Callable[[np.ndarray], list[Part]]] = {
    "duck": duck_parts,
    "house": house_parts,
    "robot": robot_parts,
    "mug": mug_parts,
}


def list_scenes() -> list[str]:
    """Names of the built-in scenes, in registry order."""
    return list(SCENES)


def constant_background(rgb=BACKGROUND_RGB, *, resolution: int = BACKGROUND_RESOLUTION) -> Array:
    """A texture ``[resolution, resolution, C]`` holding ``rgb [C]`` in every texel."""
    rgb = jnp.asarray(rgb, jnp.float32)
    return jnp.broadcast_to(rgb, (resolution, resolution, rgb.shape[-1]))


def voxel_centers(resolution: int, aabb=DEFAULT_AABB) -> np.ndarray:
    """World positions ``[X, Y, Z, 3]`` (float64) of the voxel centres of a cubic grid."""
    lo, hi = np.asarray(aabb, np.float64)
    axes = [lo[i] + (np.arange(resolution) + 0.5) * (hi[i] - lo[i]) / resolution for i in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def scene_from_parts(parts: list[Part], voxel: float, *, density_shift: float = -1.0) -> VoxelGrid:
    """A `VoxelGrid` from parts evaluated at the voxel centres (see the module docstring).

    Args:
      parts: ``[(distance [X, Y, Z], colour [X, Y, Z, 3] or [3]), ...]``.
      voxel: the voxel edge length (world units).
      density_shift: the renderer's shift, so the inside density is the same whatever it is.
    """
    distances = np.stack([d for d, _ in parts])  # [P, X, Y, Z]
    colours = np.stack([np.broadcast_to(c, distances.shape[1:] + (3,)) for _, c in parts])
    nearest = np.argmin(distances, axis=0)
    features = np.take_along_axis(colours, nearest[None, ..., None], axis=0)[0]
    distance = np.min(distances, axis=0)
    raw_inside = OPTICAL_DEPTH_PER_VOXEL / voxel - density_shift
    inside = np.clip(0.5 - distance / (RAMP_VOXELS * voxel), 0.0, 1.0)
    raw = RAW_OUTSIDE + (raw_inside - RAW_OUTSIDE) * inside
    return VoxelGrid(
        density=jnp.asarray(raw, jnp.float32),
        features=jnp.asarray(np.clip(features, 0.0, 1.0), jnp.float32),
        background=constant_background(),
        density_scale=jnp.zeros((), jnp.float32),
    )


def make_scene(name: str, *, resolution: int = 64) -> VoxelGrid:
    """A built-in ground-truth scene as an RGB `VoxelGrid` over ``[-1, 1]^3``.

    Args:
      name: one of `list_scenes()`.
      resolution: voxels per axis.

    Returns:
      density ``[R, R, R]``, features ``[R, R, R, 3]`` in [0, 1], background
      ``[BACKGROUND_RESOLUTION, BACKGROUND_RESOLUTION, 3]`` = `BACKGROUND_RGB`, density_scale 0.
    """
    if name not in SCENES:
        raise ValueError(f"name must be one of {list_scenes()}, got {name!r}")
    if resolution < 8:
        raise ValueError(f"resolution must be at least 8, got {resolution}")
    points = voxel_centers(resolution)
    voxel = (DEFAULT_AABB[1][0] - DEFAULT_AABB[0][0]) / resolution
    return scene_from_parts(SCENES[name](points), voxel)


# --- the labelled multi-view dataset and held-out cameras -----------------------------------------


def render_dataset(
    key: Array,
    grid: VoxelGrid,
    *,
    num_views: int,
    image_size: int = 64,
    render_config: RenderConfig,
    radius: float = 1.5,
    max_v_deg: float = 100.0,
    fov_range_deg: tuple[float, float] = (40.0, 70.0),
    overhead_deg: float = 30.0,
    chunk_size: int = 8,
) -> tuple[Array, Array, Camera]:
    """Render the labelled image set of the testbed from SJC's training-camera distribution.

    Cameras come from `sjc_jax.camera.sample_training_cameras` (the camera options are passed to
    it; defaults are SJC's), so the set's view labels follow the same rule as view-augmented
    prompts.

    Returns:
      images ``[num_views, image_size, image_size, C]``, view labels ``[num_views]`` int32 and the
      batched `Camera` ``[num_views]``.
    """
    if num_views < 1:
        raise ValueError(f"num_views must be positive, got {num_views}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    cameras, labels = sample_training_cameras(
        key,
        num_views,
        radius=radius,
        max_v_deg=max_v_deg,
        fov_range_deg=fov_range_deg,
        overhead_deg=overhead_deg,
        height=image_size,
        width=image_size,
    )
    images, _, _ = render_views(grid, cameras, render_config, chunk_size=chunk_size)
    return images, labels, cameras


def heldout_cameras(
    *,
    image_size: int = 64,
    radius: float = 1.5,
    fov_x_deg: float = 55.0,
    elevations_deg: tuple[float, ...] = (10.0, 45.0),
    num_azimuths: int = 8,
    overhead_deg: float = 30.0,
) -> tuple[Camera, Array]:
    """Deterministic evaluation cameras: one ring of azimuths per elevation, looking at the origin.

    Ring j sits ``elevations_deg[j]`` above the horizon with azimuths (SJC's convention, 0 = front
    on -x) ``360 k / num_azimuths + j * 360 / (num_azimuths * len(elevations_deg))``, so rings
    interleave. Fixed poses at a fixed fov are almost surely none of the dataset's random draws.
    The defaults give 16 cameras: the low ring is labelled front/side/back, the high ring
    overhead (its SJC "vertical" angle is 26 deg < 30).

    Returns:
      A batched `Camera` ``[len(elevations_deg) * num_azimuths]`` and its view labels (int32).
    """
    if num_azimuths < 1 or not elevations_deg:
        raise ValueError("num_azimuths must be positive and elevations_deg non-empty")
    if any(not -90.0 < e < 90.0 for e in elevations_deg):
        raise ValueError(f"elevations_deg must lie in (-90, 90), got {elevations_deg}")
    rings = len(elevations_deg)
    azimuth = np.concatenate(
        [(np.arange(num_azimuths) + j / rings) * 360.0 / num_azimuths for j in range(rings)]
    )
    polar = np.deg2rad(90.0 - np.repeat(np.asarray(elevations_deg, np.float64), num_azimuths))
    eye = np.asarray(sjc_eye(np.deg2rad(azimuth), polar, radius), np.float32)
    camera = make_camera(eye, fov_x_deg=fov_x_deg, height=image_size, width=image_size)
    v_deg = np.rad2deg(np.pi / 2 * (1.0 - np.cos(polar)))  # inverse of polar = arccos(1 - 2v/pi)
    labels = view_label(jnp.asarray(azimuth, jnp.float32), v_deg, overhead_deg=overhead_deg)
    return camera, labels
