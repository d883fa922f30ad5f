"""The voxel radiance field: parameters, initialisation, trilinear lookup, density activation.

Conventions of this module:

* Layout is channels-last with world x on the first axis: ``density [X, Y, Z]``,
  ``features [X, Y, Z, C]`` (the original stores torch ``[Z, Y, X]``; only the layout differs).
* Voxel centres: voxel ``i`` along an axis is centred at ``lo + (i + 0.5) * size`` where
  ``size = (hi - lo) / resolution`` (torch ``grid_sample`` with ``align_corners=False``).
* Zero padding: an interpolation corner outside the grid contributes 0 to the raw value, so the
  half-voxel shell just inside the box fades towards raw 0 (not towards empty space: the density
  activation of raw 0 is ``softplus(density_shift)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

DEFAULT_AABB = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))


@struct.dataclass
class VoxelGrid:
    """Trainable scene parameters (a pytree; every field is differentiable).

    Attributes:
      density: ``[X, Y, Z]`` raw density (pre-activation), initialised to 0.
      features: ``[X, Y, Z, C]`` raw appearance (SD latents for C = 4, RGB for C = 3).
      background: ``[Hb, Wb, C]`` background texture indexed by ray direction.
      density_scale: ``[]`` log-scale of the raw density (SJC's ``d_scale``), initialised to 0.
    """

    density: Array
    features: Array
    background: Array
    density_scale: Array

    @property
    def resolution(self) -> tuple[int, int, int]:
        return tuple(self.density.shape)  # type: ignore[return-value]

    @property
    def channels(self) -> int:
        return self.features.shape[-1]


def init_grid(
    key: Array,
    *,
    resolution: int | tuple[int, int, int] = 100,
    channels: int = 4,
    background_resolution: int = 4,
) -> VoxelGrid:
    """Initialise a grid as the original: density 0, features N(0, 1), background N(0, 1), scale 0.

    Args:
      key: PRNG key.
      resolution: voxels per axis (an int for a cube, or ``(X, Y, Z)``).
      channels: appearance channels C (4 for Stable Diffusion latents, 3 for RGB).
      background_resolution: side of the square background texture.

    Returns:
      A float32 `VoxelGrid`.
    """
    res = (resolution,) * 3 if isinstance(resolution, int) else tuple(resolution)
    if len(res) != 3 or min(res) < 1:
        raise ValueError(
            f"resolution must be a positive int or 3 positive ints, got {resolution!r}"
        )
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    if background_resolution < 1:
        raise ValueError(f"background_resolution must be positive, got {background_resolution}")
    key_features, key_background = jax.random.split(key)
    return VoxelGrid(
        density=jnp.zeros(res, jnp.float32),
        features=jax.random.normal(key_features, (*res, channels), jnp.float32),
        background=jax.random.normal(
            key_background, (background_resolution, background_resolution, channels), jnp.float32
        ),
        density_scale=jnp.zeros((), jnp.float32),
    )


def voxel_size(aabb, resolution) -> np.ndarray:
    """Edge lengths ``[3]`` of a voxel for a box ``((lo...), (hi...))`` and a resolution ``[3]``."""
    aabb = np.asarray(aabb, np.float32)
    return (aabb[1] - aabb[0]) / np.asarray(resolution, np.float32)


def world_to_index(points: Array, aabb, resolution) -> Array:
    """Continuous voxel coordinates ``[..., 3]`` of world points ``[..., 3]``.

    Integer values sit on voxel centres: ``index = (p - lo) / size - 0.5``.
    """
    aabb = np.asarray(aabb, np.float32)
    size = voxel_size(aabb, resolution)
    return (points - aabb[0]) / size - 0.5


def trilinear(values: Array, points: Array, aabb=DEFAULT_AABB) -> Array:
    """Trilinear interpolation with the voxel-centre convention and zero padding.

    Args:
      values: ``[X, Y, Z, ...]`` grid values (trailing axes are carried along).
      points: ``[N, 3]`` world points.
      aabb: ``((xlo, ylo, zlo), (xhi, yhi, zhi))`` box covered by the grid.

    Returns:
      ``[N, ...]`` interpolated values; corners outside the grid count as 0.
    """
    resolution = values.shape[:3]
    index = world_to_index(points, aabb, resolution)
    base = jnp.floor(index)
    frac = index - base
    base = base.astype(jnp.int32)
    out = 0.0
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], np.int32)
        idx = base + offset
        inside = jnp.all((idx >= 0) & (idx < np.asarray(resolution)), axis=-1)
        weight = jnp.prod(jnp.where(offset == 1, frac, 1.0 - frac), axis=-1)
        weight = jnp.where(inside, weight, 0.0)
        clipped = jnp.clip(idx, 0, np.asarray(resolution) - 1)
        corner_values = values[clipped[:, 0], clipped[:, 1], clipped[:, 2]]
        out = out + weight.reshape(weight.shape + (1,) * (values.ndim - 3)) * corner_values
    return out


def activate_density(raw: Array, density_scale: Array, density_shift: float = -1.0) -> Array:
    """Volume density ``softplus(raw * exp(density_scale) + density_shift)`` (any shape).

    ``jax.nn.softplus`` is evaluated stably for large arguments, which matches torch's softplus
    (identity above 20) to float32 accuracy.
    """
    return jax.nn.softplus(raw * jnp.exp(density_scale) + density_shift)
