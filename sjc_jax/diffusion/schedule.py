"""Noise levels: the DDPM -> VE noise table, sigma <-> timestep, and the SJC sigma schedules.

Conventions of this module:

* A DDPM (variance-preserving) model at timestep ``t`` sees ``x_t = sqrt(abar_t) x_0 +
  sqrt(1 - abar_t) eps``. Dividing by ``sqrt(abar_t)`` gives the variance-exploding (VE) form
  ``z = x_0 + sigma_t eps`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``; the table
  ``sigmas [T]`` is ascending in ``t``.
* ``sigma -> t`` snaps to the nearest table entry (absolute difference), as the original's
  ``adapt_sd.py`` does, so any positive sigma is accepted; `snap_sigma` gives that entry's level.
* Schedules are pure functions of a key (and of a traced step for the annealed one), so a jitted
  step draws its level without recompiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# SJC draws timesteps uniformly from 10..969 (both ends included): sigma 0.0983..12.23 for SD v1.
DEFAULT_T_MIN = 10
DEFAULT_T_MAX = 969


def ddpm_sigmas(
    *,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "scaled_linear",
) -> np.ndarray:
    """The VE noise table ``sigmas [T]`` of a DDPM beta schedule (SD v1 defaults).

    ``linear``: ``betas = linspace(beta_start, beta_end, T)``; ``scaled_linear`` (SD):
    ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``. Computed in float64 and
    returned as float32, ascending: ``sigmas[t] = sqrt((1 - abar_t) / abar_t)``.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = (
            np.linspace(
                np.sqrt(beta_start), np.sqrt(beta_end), num_train_timesteps, dtype=np.float64
            )
            ** 2
        )
    else:
        raise ValueError(
            f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}"
        )
    return _sigmas_from_betas(betas)


def _sigmas_from_betas(betas: np.ndarray) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0 or np.any(betas <= 0) or np.any(betas >= 1):
        raise ValueError("betas must be a non-empty 1D sequence in (0, 1)")
    abar = np.cumprod(1.0 - betas)
    return np.sqrt((1.0 - abar) / abar).astype(np.float32)


def sigmas_from_scheduler_config(config: Mapping[str, Any]) -> np.ndarray:
    """The VE table ``[T]`` of a diffusers ``scheduler_config.json`` (a dict).

    Reads ``trained_betas`` when given, else ``beta_schedule``, ``beta_start``, ``beta_end`` and
    ``num_train_timesteps`` (diffusers' defaults where a key is missing: linear, 1e-4, 0.02, 1000).
    """
    trained: Sequence[float] | None = config.get("trained_betas")
    if trained is not None:
        return _sigmas_from_betas(np.asarray(trained))
    return ddpm_sigmas(
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_schedule=str(config.get("beta_schedule", "linear")),
    )


def sigma_to_timestep(sigmas: Array, sigma: Array) -> Array:
    """Nearest timestep of each level: ``sigmas [T]``, ``sigma [...]`` -> ``t [...]`` int32.

    Jittable; ``argmin |sigmas - sigma|`` (ties go to the smaller t).
    """
    sigmas = jnp.asarray(sigmas)
    sigma = jnp.asarray(sigma, dtype=sigmas.dtype)
    return jnp.argmin(jnp.abs(sigmas - sigma[..., None]), axis=-1).astype(jnp.int32)


def snap_sigma(sigmas: Array, sigma: Array) -> Array:
    """The nearest table level of each sigma: ``sigmas [T]``, ``sigma [...]`` -> ``[...]``.

    ``sigmas[sigma_to_timestep(sigmas, sigma)]`` in the table's dtype; jittable. The original
    snaps sigma so, and uses the snapped level everywhere the model sees it.
    """
    sigmas = jnp.asarray(sigmas)
    return sigmas[sigma_to_timestep(sigmas, sigma)]


def check_timestep_bounds(t_min: int, t_max: int, num_timesteps: int) -> None:
    """Raise ValueError unless ``0 <= t_min <= t_max < num_timesteps`` (traced bounds, a batch's
    per-lift values checked concretely before, pass)."""
    if isinstance(t_min, jax.core.Tracer) or isinstance(t_max, jax.core.Tracer):
        return
    if not 0 <= t_min <= t_max < num_timesteps:
        raise ValueError(
            f"need 0 <= t_min <= t_max < {num_timesteps} (table size), got {t_min}, {t_max}"
        )


def random_timestep(
    key: Array,
    num_timesteps: int,
    *,
    t_min: int = DEFAULT_T_MIN,
    t_max: int = DEFAULT_T_MAX,
    shape: Sequence[int] = (),
) -> Array:
    """Uniform integer timesteps in ``[t_min, t_max]`` (inclusive), ``shape`` int32."""
    check_timestep_bounds(t_min, t_max, num_timesteps)
    return jax.random.randint(key, tuple(shape), t_min, t_max + 1, dtype=jnp.int32)


def random_sigma(
    key: Array,
    sigmas: Array,
    *,
    t_min: int = DEFAULT_T_MIN,
    t_max: int = DEFAULT_T_MAX,
    shape: Sequence[int] = (),
) -> Array:
    """SJC's random sigma schedule: ``sigmas[t]`` with ``t ~ U{t_min..t_max}``, ``shape``.

    ``sigmas [T]`` may be a numpy table (a constant) or a traced array; jittable with ``t_min``,
    ``t_max`` and ``shape`` static. Pass ``shape=(B,)`` for one level per view of a batch.
    """
    sigmas = jnp.asarray(sigmas)
    t = random_timestep(key, sigmas.shape[0], t_min=t_min, t_max=t_max, shape=shape)
    return sigmas[t]


def annealed_timestep(
    key: Array,
    step: Array,
    num_steps: int,
    num_timesteps: int,
    *,
    t_min: int = DEFAULT_T_MIN,
    t_max: int = DEFAULT_T_MAX,
    jitter: float = 0.05,
    shape: Sequence[int] = (),
) -> Array:
    """Annealed timesteps: linear from ``t_max`` (step 0) to ``t_min`` (last step), jittered.

    The law: ``frac = clip(step / (num_steps - 1), 0, 1)``, centre ``c = t_max - frac (t_max -
    t_min)``, ``t = round(c + u)`` with ``u ~ U[-j, j]``, ``j = jitter (t_max - t_min)``, then
    clipped to ``[t_min, t_max]``. ``jitter=0`` gives the deterministic linear ramp. ``step`` may
    be traced (no recompiles); ``num_steps`` is static.
    """
    check_timestep_bounds(t_min, t_max, num_timesteps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    span = float(t_max - t_min)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(num_steps - 1, 1), 0.0, 1.0)
    centre = t_max - frac * span
    u = jax.random.uniform(key, tuple(shape), minval=-1.0, maxval=1.0) * (jitter * span)
    t = jnp.clip(jnp.round(centre + u), t_min, t_max)
    return t.astype(jnp.int32)


def annealed_sigma(
    key: Array,
    step: Array,
    num_steps: int,
    sigmas: Array,
    *,
    t_min: int = DEFAULT_T_MIN,
    t_max: int = DEFAULT_T_MAX,
    jitter: float = 0.05,
    shape: Sequence[int] = (),
) -> Array:
    """Annealed sigma schedule: ``sigmas[annealed_timestep(...)]`` (see its law), ``shape``.

    Sigma decreases over the run from about ``sigmas[t_max]`` to about ``sigmas[t_min]``.
    """
    sigmas = jnp.asarray(sigmas)
    t = annealed_timestep(
        key,
        step,
        num_steps,
        sigmas.shape[0],
        t_min=t_min,
        t_max=t_max,
        jitter=jitter,
        shape=shape,
    )
    return sigmas[t]
