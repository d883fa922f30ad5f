"""What a step draws, as values: training cameras and noise levels.

A camera sampler is ``sampler(key, batch) -> (cameras [batch], labels [batch] int32)``; a sigma
sampler is ``sampler(key, step, sigmas [T], batch) -> sigma [batch]``, with ``step`` the traced
step count (so schedules never recompile) and ``sigmas`` the model's ascending noise table
(``sigmas[t]`` is the level of timestep t). Factories close over the scalars each one needs:

    sigma_sampler = samplers.annealed_sigma(t_min=10, t_max=969, num_steps=10_000)
    sigma = sigma_sampler(key, state.step, denoiser.sigmas, 4)   # [4]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax.camera import Camera, sample_training_cameras
from sjc_jax.diffusion import schedule

Array = jax.Array
CameraSampler = Callable[[Array, int], tuple[Camera, Array]]
SigmaSampler = Callable[[Array, Array, Array, int], Array]


def sjc_cameras(
    *,
    image_size: int = 64,
    radius: float = 1.5,
    max_v_deg: float = 100.0,
    fov_range_deg: tuple[float, float] = (40.0, 70.0),
    overhead_deg: float = 30.0,
    view_augmentation: bool = True,
) -> CameraSampler:
    """SJC's training cameras (`sample_training_cameras`) at ``image_size`` squared pixels.

    Without ``view_augmentation`` every label is 0: the step then asks the model for one
    condition (the plain prompt; the empirical denoiser's set built with label 0 only).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")

    def sample(key: Array, batch: int) -> tuple[Camera, Array]:
        cameras, labels = sample_training_cameras(
            key,
            batch,
            radius=radius,
            max_v_deg=max_v_deg,
            fov_range_deg=fov_range_deg,
            overhead_deg=overhead_deg,
            height=image_size,
            width=image_size,
        )
        return cameras, labels if view_augmentation else jnp.zeros_like(labels)

    return sample


def random_sigma(*, t_min: int = 10, t_max: int = 969) -> SigmaSampler:
    """SJC's random schedule: ``sigmas[t]``, ``t ~ U{t_min..t_max}`` per view, every step."""

    def sample(key: Array, step: Array, sigmas: Array, batch: int) -> Array:
        return schedule.random_sigma(key, sigmas, t_min=t_min, t_max=t_max, shape=(batch,))

    return sample


def annealed_sigma(
    *, t_min: int = 10, t_max: int = 969, num_steps: int, jitter: float = 0.05
) -> SigmaSampler:
    """Timestep linear from ``t_max`` to ``t_min`` over ``num_steps``, jittered by ``jitter``
    of the span (`schedule.annealed_timestep`)."""

    def sample(key: Array, step: Array, sigmas: Array, batch: int) -> Array:
        return schedule.annealed_sigma(
            key, step, num_steps, sigmas, t_min=t_min, t_max=t_max, jitter=jitter, shape=(batch,)
        )

    return sample


def fixed_sigma(*, timestep: int) -> SigmaSampler:
    """One noise level for every view and step: ``sigmas[timestep]``."""

    def sample(key: Array, step: Array, sigmas: Array, batch: int) -> Array:
        schedule.check_timestep_bounds(timestep, timestep, len(sigmas))
        return jnp.full((batch,), jnp.asarray(sigmas)[timestep])

    return sample


def dreamtime_weights(
    sigmas: np.ndarray,
    *,
    t_min: int = 10,
    t_max: int = 969,
    m1: float = 800.0,
    m2: float = 500.0,
    s1: float = 300.0,
    s2: float = 100.0,
) -> np.ndarray:
    """DreamTime's prior over timesteps ``p [t_max - t_min + 1]`` (float64, sums to 1).

    ``W(t) = W_d(t) W_p(t)`` over ``t_min..t_max``: the diffusion-training term ``W_d(t) =
    sqrt((1 - abar_t) / abar_t)`` (= ``sigmas[t]`` in VE form) and the prior ``W_p(t) = 1`` on
    ``[m2, m1]``, ``exp(-(t - m1)^2 / (2 s1^2))`` above ``m1``, ``exp(-(t - m2)^2 / (2 s2^2))``
    below ``m2`` (the defaults are the first author's released code; docs/estimators.md).
    """
    check_range = schedule.check_timestep_bounds
    check_range(t_min, t_max, len(sigmas))
    if not (s1 > 0 and s2 > 0 and m2 <= m1):
        raise ValueError(f"need s1, s2 > 0 and m2 <= m1, got {s1}, {s2}, {m2}, {m1}")
    t = np.arange(t_min, t_max + 1, dtype=np.float64)
    prior = np.where(
        t > m1,
        np.exp(-np.square(t - m1) / (2 * s1**2)),
        np.where(t < m2, np.exp(-np.square(t - m2) / (2 * s2**2)), 1.0),
    )
    weights = np.asarray(sigmas, np.float64)[t_min : t_max + 1] * prior
    return weights / weights.sum()


def dreamtime_timesteps(num_steps: int, weights: np.ndarray, t_min: int = 10) -> np.ndarray:
    """The monotone schedule ``t(i) [num_steps]`` of a prior ``weights`` over ``t_min..``.

    ``t(i) = argmin_t |sum_{tau >= t} p(tau) - i / num_steps|``: large timesteps first, each
    timestep held for a share of the run proportional to its prior mass.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    tail = np.cumsum(weights[::-1])[::-1]  # tail[j] = sum of p over t >= t_min + j
    targets = np.arange(num_steps, dtype=np.float64) / num_steps
    index = np.argmin(np.abs(tail[None, :] - targets[:, None]), axis=1)
    return (t_min + index).astype(np.int32)


def dreamtime_sigma(
    *, num_steps: int, t_min: int = 10, t_max: int = 969, **prior: float
) -> SigmaSampler:
    """DreamTime's time-prioritised schedule (Huang et al., ICLR 2024): deterministic, monotone.

    Step i takes ``sigmas[t(i)]`` for every view (`dreamtime_timesteps` of `dreamtime_weights`
    with ``prior`` = m1, m2, s1, s2); steps past ``num_steps`` keep the last level.
    """

    def sample(key: Array, step: Array, sigmas: Array, batch: int) -> Array:
        weights = dreamtime_weights(np.asarray(sigmas), t_min=t_min, t_max=t_max, **prior)
        table = jnp.asarray(dreamtime_timesteps(num_steps, weights, t_min))
        t = table[jnp.clip(step, 0, num_steps - 1)]
        return jnp.full((batch,), jnp.asarray(sigmas)[t])

    return sample
