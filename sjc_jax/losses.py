"""SJC's regularisers: the emptiness loss and the center-depth loss, and the emptiness schedule.

The losses are functions of one view. As values a step composes, regularisers are made by
factories (`emptiness`, `center_depth`) and have the form

    regularizer(views: ViewBatch, step []) -> (loss [b], metrics {name: [b]})

over the ``b`` rendered views of a step (`sjc_jax.render.ViewBatch`): ``loss`` is each view's
weighted loss (the step adds their mean over the step's views to the objective, so its gradient
joins the chained score in the same VJP), ``metrics`` per-view values the step averages.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from sjc_jax.render import ViewBatch

Array = jax.Array
Regularizer = Callable[[ViewBatch, Array], tuple[Array, dict[str, Array]]]


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


def emptiness(
    *,
    weight: float = 1e4,
    scale: float = 10.0,
    multiplier: float = 20.0,
    ramp_fraction: float = 0.5,
    num_steps: int,
) -> Regularizer:
    """SJC's emptiness regulariser: `emptiness_weight` times `emptiness_loss`, per view.

    Metrics: ``emptiness`` (the unweighted loss) and ``emptiness_weight``.
    """

    def regularize(views: ViewBatch, step: Array) -> tuple[Array, dict[str, Array]]:
        w = emptiness_weight(
            step, num_steps, weight=weight, multiplier=multiplier, ramp_fraction=ramp_fraction
        )
        b = views.weights.shape[0]
        loss = jax.vmap(lambda ww, k: emptiness_loss(ww, k, scale=scale))(
            views.weights, views.num_samples
        )
        return loss * w, {"emptiness": loss, "emptiness_weight": jnp.full((b,), w)}

    return regularize


def center_depth(*, weight: float, margin: int | None = None) -> Regularizer:
    """The center-depth regulariser: ``weight`` times `center_depth_loss` of each view's depth.

    Metric: ``center_depth`` (the unweighted loss).
    """

    def regularize(views: ViewBatch, step: Array) -> tuple[Array, dict[str, Array]]:
        loss = jax.vmap(lambda d: center_depth_loss(d, margin=margin))(views.depth)
        return weight * loss, {"center_depth": loss}

    return regularize
