"""Equal-step ray marching and alpha compositing of a `VoxelGrid`, as the original SJC renderer.

Conventions of this module:

* Rays are ``origins, directions [N, 3]`` in world space with unit directions; ``t`` is the
  distance along the ray.
* Samples sit at ``t_i = t_min + i * delta`` (no jitter), ``i < S`` where S is a static sample
  budget that covers the box diagonal, so one compilation serves every camera. A sample is valid
  iff ``i * delta < t_max - t_min``; invalid samples have zero density (their weight is exactly 0
  and they do not attenuate the ray), which reproduces the original's per-view sample count
  ``k = int(max(t_max - t_min) / delta) + 1`` exactly.
* Compositing: ``alpha_i = 1 - exp(-sigma_i delta)``, transmittance in log space
  ``T_i = exp(-sum_{j<i} sigma_j delta)``, ``w_i = alpha_i T_i``.
* Per-ray code is written for one ray and vmapped over rays; the field query runs on the flat list
  of sample points (see `query_field`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax.camera import Camera, generate_rays
from sjc_jax.grid import DEFAULT_AABB, VoxelGrid, activate_density, voxel_size

Array = jax.Array

# `RenderConfig.feature_activation`: what turns the grid's features into appearance.
FEATURE_ACTIVATIONS = ("none", "sigmoid")


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Static renderer settings (hashable; closed over by jit)."""

    # Axis-aligned scene box ((xlo, ylo, zlo), (xhi, yhi, zhi)) covered by the grid.
    aabb: tuple[tuple[float, float, float], tuple[float, float, float]] = DEFAULT_AABB
    # Step size as a fraction of the mean voxel edge (0.5 = half a voxel, the original).
    step_ratio: float = 0.5
    # Added to the scaled raw density before softplus (the original's density_shift).
    density_shift: float = -1.0
    # Features count only where a sample's weight exceeds this (hard mask, not differentiated).
    weight_threshold: float = 1e-4
    # Depth assigned to the background (the transmittance left at the end of the ray).
    background_depth: float = 10.0
    # Background lookup: True wraps the texture around in azimuth (its height) and clamps it at
    # the poles (its width), so the sphere has no seam; False zero-pads both, as the original's
    # grid_sample does, which blends black into a line at the azimuth wrap (docs/deviations.md).
    background_wrap: bool = True
    # Performance only (results are bitwise the same): sizes of the packed field lookup as
    # fractions of the N x S dense samples; the smallest that holds a view's valid samples runs
    # (SJC training views fill 50-74 %), the dense lookup is the fallback. () = always dense.
    # Under jax.vmap the switch becomes a select that runs every tier: render a batch of views
    # by flattening their rays into one `render_rays` call instead (as `make_step` does).
    compact_tiers: tuple[float, ...] = (0.55, 0.65, 0.75)
    # Performance only: the name of an enclosing vmap axis (a batch of lifts, `sjc_jax.sweep`)
    # whose members share one packed-lookup size, the largest any of them needs, so the switch
    # keeps an unbatched index and runs one tier instead of all. None = no such axis.
    batch_axis: str | None = None
    # How the grid's feature channels become the composited appearance: "none" uses them as they
    # are (SD latents, the original); "sigmoid" squashes each interpolated sample into (0, 1), so
    # RGB cannot leave its range and a faint volume cannot fake a solid colour with extreme values.
    feature_activation: str = "none"

    def __post_init__(self):
        lo, hi = np.asarray(self.aabb, np.float64)
        if lo.shape != (3,) or hi.shape != (3,) or np.any(hi <= lo):
            raise ValueError(
                f"aabb must be ((xlo, ylo, zlo), (xhi, yhi, zhi)) with hi > lo, got {self.aabb!r}"
            )
        if not self.step_ratio > 0:
            raise ValueError(f"step_ratio must be positive, got {self.step_ratio}")
        if any(not 0 < f < 1 for f in self.compact_tiers):
            raise ValueError(f"compact_tiers must lie in (0, 1), got {self.compact_tiers!r}")
        if not self.weight_threshold >= 0:
            raise ValueError(f"weight_threshold must be >= 0, got {self.weight_threshold}")
        if self.feature_activation not in FEATURE_ACTIVATIONS:
            raise ValueError(
                f"feature_activation must be one of {FEATURE_ACTIVATIONS}, "
                f"got {self.feature_activation!r}"
            )


def activate_features(features: Array, activation: str) -> Array:
    """The appearance of interpolated ``features`` under ``activation`` (`RenderConfig`)."""
    if activation == "sigmoid":
        return jax.nn.sigmoid(features)
    return features


def step_size(config: RenderConfig, resolution) -> float:
    """The step ``delta = mean(voxel size) * step_ratio``, rounded to float32 as the original."""
    size = voxel_size(config.aabb, resolution)
    return float(np.float32(np.float32(np.mean(size)) * np.float32(config.step_ratio)))


def sample_budget(config: RenderConfig, resolution) -> int:
    """Static samples per ray S: the smallest count that covers the box diagonal."""
    lo, hi = np.asarray(config.aabb, np.float32)
    diagonal = np.float32(np.linalg.norm(hi - lo))
    return int(diagonal / np.float32(step_size(config, resolution))) + 1


class RenderOutput(NamedTuple):
    """Result of `render_rays` for N rays with a static budget of S samples per ray."""

    features: Array  # [N, C] composited features (SD latents or RGB) over the background
    depth: Array  # [N] expected distance, background at `background_depth`
    weights: Array  # [N, S] compositing weights; 0 past each ray's end
    opacity: Array  # [N] sum of the weights (1 - background weight)
    num_samples: Array  # [] int32, the original's per-view sample count k


class RenderView(NamedTuple):
    """Result of `render_view` for one camera of H x W pixels."""

    image: Array  # [H, W, C]
    depth: Array  # [H, W]
    weights: Array  # [H * W, S]
    opacity: Array  # [H, W]
    num_samples: Array  # [] int32


class ViewBatch(NamedTuple):
    """Result of `render_cameras` for B cameras of H x W pixels."""

    images: Array  # [B, H, W, C]
    depth: Array  # [B, H, W]
    weights: Array  # [B, H * W, S]
    opacity: Array  # [B, H, W]
    num_samples: Array  # [B] int32, each view's sample count k


def intersect_box(origin: Array, direction: Array, aabb) -> tuple[Array, Array]:
    """Slab test of one ray ``origin, direction [3]``; returns ``t_min, t_max`` clamped at 0.

    Zero direction components are replaced by 1e-6 (as the original). A ray that misses the box has
    ``t_max <= t_min`` and so no valid samples.
    """
    lo, hi = (jnp.asarray(b, jnp.float32) for b in aabb)
    direction = jnp.where(direction == 0, 1e-6, direction)
    t_lo = (lo - origin) / direction
    t_hi = (hi - origin) / direction
    t_min = jnp.max(jnp.minimum(t_lo, t_hi))
    t_max = jnp.min(jnp.maximum(t_lo, t_hi))
    return jnp.maximum(t_min, 0.0), jnp.maximum(t_max, 0.0)


def background_uv(direction: Array) -> Array:
    """Texture coordinates ``[2]`` in [0, 1] of a unit ray direction ``[3]`` (the original's map).

    ``u = atan2(sqrt(dx^2 + dy^2), dz) / pi`` runs along the texture width and
    ``v = atan2(dy, dx) / (2 pi) + 0.5`` along its height (z is the polar axis here).
    """
    dx, dy, dz = direction[0], direction[1], direction[2]
    u = jnp.arctan2(jnp.sqrt(dx * dx + dy * dy), dz) / jnp.pi
    v = jnp.arctan2(dy, dx) / (2 * jnp.pi) + 0.5
    return jnp.stack([u, v])


def bilinear(texture: Array, uv: Array, *, wrap: bool = False) -> Array:
    """Bilinear lookup of ``texture [Hb, Wb, C]`` at ``uv [2]`` in [0, 1] (u along width).

    Texel centres at ``(i + 0.5) / size``. ``wrap=False``: zero padding, as torch
    ``grid_sample`` with ``align_corners=False`` (the original). ``wrap=True``: rows wrap around
    (v is the azimuth, periodic) and columns clamp to the edge (u is the polar angle, whose ends
    are the poles), so a texture on the sphere has no seam.
    """
    height, width = texture.shape[:2]
    if wrap:
        return _bilinear_wrapped(texture, uv)
    col = uv[0] * width - 0.5
    row = uv[1] * height - 0.5
    c0, r0 = jnp.floor(col), jnp.floor(row)
    fc, fr = col - c0, row - r0
    c0, r0 = c0.astype(jnp.int32), r0.astype(jnp.int32)
    out = jnp.zeros(texture.shape[2:], texture.dtype)
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        r, c = r0 + dr, c0 + dc
        weight = (fr if dr else 1 - fr) * (fc if dc else 1 - fc)
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        texel = texture[jnp.clip(r, 0, height - 1), jnp.clip(c, 0, width - 1)]
        out = out + jnp.where(inside, weight, 0.0) * texel
    return out


def _bilinear_wrapped(texture: Array, uv: Array) -> Array:
    height, width = texture.shape[:2]
    col = jnp.clip(uv[0] * width - 0.5, 0.0, width - 1.0)
    row = uv[1] * height - 0.5
    c0, r0 = jnp.floor(col), jnp.floor(row)
    fc, fr = col - c0, row - r0
    c0, r0 = c0.astype(jnp.int32), r0.astype(jnp.int32)
    out = jnp.zeros(texture.shape[2:], texture.dtype)
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        r, c = jnp.mod(r0 + dr, height), jnp.minimum(c0 + dc, width - 1)
        weight = (fr if dr else 1 - fr) * (fc if dc else 1 - fc)
        out = out + weight * texture[r, c]
    return out


def view_sample_count(t_min: Array, t_max: Array, delta: float) -> Array:
    """The original's per-view sample count ``k = int(max(t_max - t_min) / delta) + 1``.

    Reduces the last axis (``[..., N] -> [...]`` int32); at least 1 when every ray misses.
    """
    chord = jnp.max(t_max - t_min, axis=-1)
    return jnp.maximum((chord / jnp.float32(delta)).astype(jnp.int32) + 1, 1)


def intersect_rays(origins: Array, directions: Array, aabb=DEFAULT_AABB) -> tuple[Array, Array]:
    """`intersect_box` over rays: ``t_min, t_max [N]`` for ``origins, directions [N, 3]``."""
    return jax.vmap(lambda o, d: intersect_box(o, d, aabb))(origins, directions)


def march_ray(
    origin: Array, direction: Array, t_min: Array, t_max: Array, *, delta: float, budget: int
):
    """Sample placement along one ray entering the box at ``t_min`` and leaving at ``t_max``.

    Returns:
      ``t [S]`` sample distances, ``valid [S]`` bool, ``points [S, 3]``, and the chord
      ``t_max - t_min`` (negative or zero for rays that miss).
    """
    ticks = jnp.arange(budget, dtype=jnp.float32) * jnp.float32(delta)
    t = t_min + ticks
    chord = t_max - t_min
    valid = ticks < chord
    points = origin + direction * t[:, None]
    return t, valid, points, chord


def composite_ray(
    sigma: Array,
    features: Array,
    t: Array,
    background: Array,
    *,
    delta: float,
    weight_threshold: float,
    background_depth: float,
):
    """Alpha compositing of one ray.

    Args:
      sigma: ``[S]`` activated density, 0 at invalid samples.
      features: ``[S, C]`` appearance at the samples.
      t: ``[S]`` sample distances.
      background: ``[C]`` background feature of the ray.

    Returns:
      ``features [C], depth [], weights [S], opacity []``.
    """
    optical = sigma * jnp.float32(delta)
    alpha = -jnp.expm1(-optical)
    transmittance = jnp.exp(-(jnp.cumsum(optical) - optical))
    weights = alpha * transmittance
    # The original counts features only where the weight clears the threshold; the mask is a
    # constant for differentiation, so it changes the density gradient (as in the original).
    mask = jax.lax.stop_gradient(weights > weight_threshold)
    feature_weights = jnp.where(mask, weights, 0.0)
    opacity = jnp.sum(weights)
    rgb = jnp.sum(feature_weights[:, None] * features, 0) + (1.0 - opacity) * background
    depth = jnp.sum(weights * t) + (1.0 - opacity) * background_depth
    return rgb, depth, weights, opacity


def _corner_weights(frac: Array) -> Array:
    """Trilinear weights ``[P, 8]`` (corners x-major, then y, then z) of fractions ``[P, 3]``."""
    fx, fy, fz = frac[:, 0:1], frac[:, 1:2], frac[:, 2:3]
    wx = jnp.concatenate([1 - fx, fx], -1)
    wy = jnp.concatenate([1 - fy, fy], -1)
    wz = jnp.concatenate([1 - fz, fz], -1)
    return (wx[:, :, None, None] * wy[:, None, :, None] * wz[:, None, None, :]).reshape(-1, 8)


def query_field(grid: VoxelGrid, points: Array, aabb) -> tuple[Array, Array]:
    """Raw density ``[P]`` and features ``[P, C]`` at world points ``[P, 3]`` (trilinear).

    Same convention as `sjc_jax.grid.trilinear` (voxel centres, zero padding). Density and
    features are interpolated together from one zero-padded ``[X+2, Y+2, Z+2, 1+C]`` table, so a
    sample costs one gather of 8 corner rows and one weighted sum (the padding replaces bounds
    checks; points outside the box are clamped onto the padding and must be masked by the caller).
    """
    values = jnp.concatenate([grid.density[..., None], grid.features], axis=-1)
    values = jnp.pad(values, ((1, 1), (1, 1), (1, 1), (0, 0)))
    _, sy, sz, channels = values.shape
    res = np.asarray(grid.density.shape)
    lo, hi = np.asarray(aabb, np.float32)
    scale = (res / (hi - lo)).astype(np.float32)
    # Padded index space: voxel i of the grid is centred at padded index i + 1.
    index = (points - lo) * scale + np.float32(0.5)
    base = jnp.floor(index)
    frac = index - base
    base = jnp.clip(base.astype(jnp.int32), 0, res)
    corner = (base[:, 0] * sy + base[:, 1]) * sz + base[:, 2]
    offsets = np.array([x * sy * sz + y * sz + z for x in (0, 1) for y in (0, 1) for z in (0, 1)])
    corners = values.reshape(-1, channels)[corner[:, None] + offsets]
    # HIGHEST keeps float32 on TPU/GPU, whose default matmul precision is lower.
    out = jnp.einsum(
        "pk,pkc->pc", _corner_weights(frac), corners, precision=jax.lax.Precision.HIGHEST
    )
    return out[:, 0], out[:, 1:]


@jax.custom_vjp
def _expand(compact: Array, dense_slot: Array, slot_dense: Array) -> Array:
    """``compact [B + 1, K]`` rows placed at ``dense_slot [P]`` (slot B is a zero row).

    The map is a bijection between the first B slots that are in use and the dense entries that
    point at them, so the transpose is a gather too (``slot_dense [B]``, -1 where unused) and no
    scatter is needed in the backward pass.
    """
    return compact[dense_slot]


def _expand_fwd(compact, dense_slot, slot_dense):
    return compact[dense_slot], (slot_dense, compact.shape[0])


def _expand_bwd(residual, cotangent):
    slot_dense, rows = residual
    used = slot_dense >= 0
    grad = jnp.where(used[:, None], cotangent[jnp.maximum(slot_dense, 0)], 0.0)
    grad = jnp.concatenate([grad, jnp.zeros((rows - grad.shape[0], grad.shape[1]), grad.dtype)])
    return grad, None, None


_expand.defvjp(_expand_fwd, _expand_bwd)


def _compact_query(grid, origins, directions, t_min, counts, slots, *, aabb, delta, budget):
    """`query_field` at the first ``counts [N]`` samples of each ray, packed into ``slots`` rows.

    Returns raw density ``[N, S]`` and features ``[N, S, C]`` (0 at unused samples).
    """
    num_rays = origins.shape[0]
    offsets = jnp.cumsum(counts) - counts
    total = offsets[-1] + counts[-1]
    slot = jnp.arange(slots)
    starts = jnp.zeros(slots, jnp.int32).at[offsets].add(1, mode="drop")
    ray = jnp.cumsum(starts) - 1
    sample = slot - offsets[ray]
    used = slot < total
    # Same float operations as `march_ray`, so the points are bitwise the dense ones.
    t = t_min[ray] + sample.astype(jnp.float32) * jnp.float32(delta)
    points = origins[ray] + directions[ray] * t[:, None]
    raw, feats = query_field(grid, points, aabb)
    compact = jnp.concatenate([raw[:, None], feats], -1)
    compact = jnp.concatenate([compact, jnp.zeros((1, compact.shape[1]), compact.dtype)], 0)
    index = jnp.arange(budget)
    dense_slot = jnp.where(index < counts[:, None], offsets[:, None] + index, slots).reshape(-1)
    slot_dense = jnp.where(used, ray * budget + sample, -1)
    dense = _expand(compact, dense_slot, slot_dense).reshape(num_rays, budget, -1)
    return dense[..., 0], dense[..., 1:]


def render_rays(
    grid: VoxelGrid,
    origins: Array,
    directions: Array,
    t_min: Array | None = None,
    t_max: Array | None = None,
    config: RenderConfig = RenderConfig(),
) -> RenderOutput:
    """Render N rays through the grid (the original renderer, to float32 accuracy).

    Args:
      grid: the scene.
      origins: ``[N, 3]`` ray origins.
      directions: ``[N, 3]`` unit ray directions.
      t_min, t_max: ``[N]`` where each ray enters and leaves the box (`intersect_rays`); None
        computes them from ``config.aabb``.
      config: static settings.

    Returns:
      `RenderOutput` with features ``[N, C]``, depth ``[N]``, weights ``[N, S]``, opacity ``[N]``
      and the per-view sample count k.
    """
    grid = jax.tree_util.tree_map(jnp.asarray, grid)
    origins = jnp.asarray(origins, jnp.float32)
    directions = jnp.asarray(directions, jnp.float32)
    if t_min is None or t_max is None:
        t_min, t_max = intersect_rays(origins, directions, config.aabb)
    t_min, t_max = jnp.asarray(t_min, jnp.float32), jnp.asarray(t_max, jnp.float32)
    delta = step_size(config, grid.density.shape)
    budget = sample_budget(config, grid.density.shape)
    march = jax.vmap(lambda o, d, t0, t1: march_ray(o, d, t0, t1, delta=delta, budget=budget))
    t, valid, points, _ = march(origins, directions, t_min, t_max)
    num_rays = origins.shape[0]
    counts = jnp.sum(valid, axis=1, dtype=jnp.int32)

    def dense_query(grid):
        raw, feats = query_field(grid, points.reshape(-1, 3), config.aabb)
        return raw.reshape(num_rays, budget), feats.reshape(num_rays, budget, -1)

    def compact_query(slots):
        return lambda grid: _compact_query(
            grid,
            origins,
            directions,
            t_min,
            counts,
            slots,
            aabb=config.aabb,
            delta=delta,
            budget=budget,
        )

    total = num_rays * budget
    tiers = sorted({int(math.ceil(f * total)) for f in config.compact_tiers if f * total < total})
    branches = [compact_query(slots) for slots in tiers] + [dense_query]
    tier = jnp.searchsorted(jnp.asarray(tiers, jnp.int32), jnp.sum(counts), side="left")
    if config.batch_axis is not None:
        tier = jax.lax.pmax(tier, config.batch_axis)
    raw, feats = jax.lax.switch(tier, branches, grid)
    feats = activate_features(feats, config.feature_activation)
    sigma = jnp.where(valid, activate_density(raw, grid.density_scale, config.density_shift), 0.0)
    wrap = config.background_wrap
    bg = jax.vmap(lambda d: bilinear(grid.background, background_uv(d), wrap=wrap))(directions)
    composite = jax.vmap(
        lambda s, f, tt, b: composite_ray(
            s,
            f,
            tt,
            b,
            delta=delta,
            weight_threshold=config.weight_threshold,
            background_depth=config.background_depth,
        )
    )
    rgb, depth, weights, opacity = composite(sigma, feats, t, bg)
    num_samples = view_sample_count(t_min, t_max, delta)
    return RenderOutput(rgb, depth, weights, opacity, num_samples)


def render_view(
    grid: VoxelGrid, camera: Camera, config: RenderConfig = RenderConfig()
) -> RenderView:
    """Render one (unbatched) camera: image ``[H, W, C]``, depth ``[H, W]``, weights, opacity."""
    origins, directions = generate_rays(camera)
    t_min, t_max = intersect_rays(origins, directions, config.aabb)
    out = render_rays(grid, origins, directions, t_min, t_max, config)
    shape = (camera.height, camera.width)
    return RenderView(
        out.features.reshape(*shape, -1),
        out.depth.reshape(shape),
        out.weights,
        out.opacity.reshape(shape),
        out.num_samples,
    )


def render_cameras(
    grid: VoxelGrid, cameras: Camera, config: RenderConfig = RenderConfig()
) -> ViewBatch:
    """Render a batch of cameras ``[B]`` (the one place that batches views).

    The rays of all cameras go through ONE `render_rays` call, not a vmap of `render_view`:
    under vmap the packed lookup's `lax.switch` has a batched index and becomes a select that
    runs every tier. Each view keeps its own sample count k (`ViewBatch.num_samples`).
    """
    origins, directions = jax.vmap(generate_rays)(cameras)  # [B, H * W, 3]
    views, height, width = origins.shape[0], cameras.height, cameras.width
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    t_min, t_max = intersect_rays(origins, directions, config.aabb)
    delta = step_size(config, grid.density.shape)
    k = view_sample_count(t_min.reshape(views, -1), t_max.reshape(views, -1), delta)
    out = render_rays(grid, origins, directions, t_min, t_max, config)
    shape = (views, height, width)
    return ViewBatch(
        out.features.reshape(*shape, -1),
        out.depth.reshape(shape),
        out.weights.reshape(views, height * width, -1),
        out.opacity.reshape(shape),
        k,
    )


# --- many cameras, a chunk at a time (previews, videos, datasets, evaluation) ---------------


def _render_batch_impl(grid: VoxelGrid, cameras: Camera, config: RenderConfig):
    views = render_cameras(grid, cameras, config)
    return views.images, views.depth, views.opacity


# One compiled program per (shapes, config); the grid is an argument, never a constant.
_render_batch = jax.jit(_render_batch_impl, static_argnames="config")


def render_views(
    grid: VoxelGrid, cameras: Camera, config: RenderConfig, *, chunk_size: int = 8
) -> tuple[Array, Array, Array]:
    """Render a batch of cameras, ``chunk_size`` at a time (the last chunk padded, then trimmed).

    Args:
      grid: the scene.
      cameras: batched `Camera` ``[N]``.
      config: renderer settings.
      chunk_size: cameras rendered together (bounds memory: each holds ``[H * W, S]`` weights).

    Returns:
      images ``[N, H, W, C]``, depth ``[N, H, W]``, opacity ``[N, H, W]`` (float32).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    num = cameras.eye.shape[0]
    chunk = min(chunk_size, num)
    outputs = []
    for start in range(0, num, chunk):
        index = np.arange(start, start + chunk).clip(max=num - 1)
        batch = jax.tree_util.tree_map(lambda a, index=index: a[index], cameras)
        out = _render_batch(grid, batch, config)
        outputs.append([o[: num - start] for o in out])
    return tuple(jnp.concatenate(parts) for parts in zip(*outputs, strict=True))
