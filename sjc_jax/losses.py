"""SJC's regularisers: the emptiness loss and the center-depth loss, and the emptiness schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def emptiness_loss(weights: Array, num_samples: Array, *, scale: float = 10.0) -> Array:
    """``mean(log(1 + scale * w))`` over the view's k x N weights (the original's normalisation).

    Args:
      weights: ``[N, S]`` compositing weights of one view (0 past each ray's end).
      num_samples: ``[]`` the view's sample count k (``S >= k``; the extra samples weigh 0 and
        add ``log(1) = 0``, so the sum over S divided by ``k * N`` is the original's mean).
      scale: B in ``log(1 + B w)``.

    Returns:
      ``[]`` the unweighted loss.
    """
    count = jnp.maximum(num_samples, 1).astype(jnp.float32) * weights.shape[0]
    return jnp.sum(jnp.log1p(scale * weights)) / count


def emptiness_weight(
    step: Array,
    num_steps: int,
    *,
    weight: float = 1e4,
    multiplier: float = 20.0,
    ramp_fraction: float = 0.5,
) -> Array:
    """The original's schedule: ``weight``, times ``multiplier`` once ``step >= ramp_fraction *
    num_steps`` (a step function). ``step`` may be traced."""
    late = jnp.asarray(step) >= ramp_fraction * num_steps
    return jnp.where(late, weight * multiplier, weight).astype(jnp.float32)


def center_margin(size: int) -> int:
    """Border width of the center-depth loss: 7 pixels at 64 (rows/cols 7..56), scaled."""
    return max(1, round(7 * size / 64))


def center_depth_loss(depth: Array, *, margin: int | None = None, eps: float = 1e-6) -> Array:
    """``-log(mean(border) - mean(center))`` of a depth map ``[H, W]`` (a log barrier).

    The original writes ``-log(mean(center) - mean(border) + 1e-12)``, which is NaN whenever the
    center is nearer than the border (the usual case) while its gradient stays finite; this is
    the intended form, pulling the object to the middle of the view. The difference is clamped
    at ``eps`` so the loss stays finite (its gradient is then 0) when the center is farther.

    Args:
      depth: ``[H, W]`` expected depth (background at `RenderConfig.background_depth`).
      margin: border width in pixels (default `center_margin`).
    """
    h, w = depth.shape
    m = center_margin(min(h, w)) if margin is None else margin
    if not 0 < 2 * m < min(h, w):
        raise ValueError(f"margin must leave a center and a border, got {m} for {h}x{w}")
    center = depth[m : h - m, m : w - m]
    border_mean = (jnp.sum(depth) - jnp.sum(center)) / (h * w - center.size)
    gap = border_mean - jnp.mean(center)
    return -jnp.log(jnp.maximum(gap, eps))
