"""Score-distillation estimators as values: SJC (PAAS), SDS, NFSD, CSD, and your own.

An estimator maps rendered images to the image-space vector that is chained through the
renderer. It is a plain function, made by a factory that closes over its hyper-parameters (as an
optax transform is):

    estimator(key, denoiser, params, images [B, H, W, C], sigma [B], labels [B])
        -> (cotangent [B, H, W, C], metrics {name: [] array})

Conventions of this module (formulas and sources: docs/estimators.md):

* One sign for all: ``cotangent`` is the image-space gradient the optimiser DESCENDS; the grid
  gradient is ``J_render^T cotangent`` (the step's ``vjp_fn(cotangent)``). SJC's ascent
  direction ``g`` is returned as ``-g``; SDS's ``w (eps_hat - n)`` as is.
* VE form: ``z = y + sigma n`` with ``n ~ N(0, I)``, ``D(z, sigma, c)`` the denoiser of condition
  c (`sjc_jax.diffusion.denoiser`: view labels 0..3, `UNCONDITIONAL`, `NEGATIVE`), the noise
  estimate ``eps_hat = (z - D) / sigma``, and the VP relation ``abar = 1 / (1 + sigma^2)``.
* Randomness: ``key`` draws ``noise = normal(key, (noise_samples, B, H, W, C))``; all noisy copies
  (and both halves of classifier-free guidance) go through ONE denoiser call of batch
  ``noise_samples * B`` (``2 * noise_samples * B`` when guided).
* Guidance: ``guidance_scale == 1`` asks only for the conditional prediction (one half);
  otherwise ``D_cfg = D_u + s (D_c - D_u)``.
* Metrics are scalars (means over the batch); the step adds ``score_norm`` (the RMS of the
  cotangent) itself.

Stateful estimators (e.g. VSD's LoRA, trained alongside the grid) are `StatefulEstimator`
values: ``init(key, denoiser, params) -> state`` and ``update(key, denoiser, params, images,
sigma, labels, state) -> (cotangent, metrics, state)``; the state lives in ``TrainState`` and is
checkpointed with it. A plain estimator is the stateless special case (`as_stateful`).

`ESTIMATORS` (at the end) is the one table of the estimators a config can name: name -> factory
and the `sjc_jax.config.ScoreConfig` fields its keywords read. ``ScoreConfig`` validation, the
command line's help and `sjc_jax.sjc.estimator_from_config` all read it, so adding an estimator
is one entry there (plus a ``ScoreConfig`` field for a hyper-parameter no estimator had before).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sjc_jax.diffusion.denoiser import (
    NEGATIVE,
    UNCONDITIONAL,
    Denoiser,
    classifier_free_guidance,
)
from sjc_jax.diffusion.schedule import sigma_to_timestep

Array = jax.Array
Metrics = dict[str, Array]
# (key, denoiser, params, images [B, H, W, C], sigma [B], labels [B]) -> (cotangent, metrics)
Estimator = Callable[[Array, Denoiser, Any, Array, Array, Array], tuple[Array, Metrics]]

SCALES = ("sigma", "sigma2")


class StatefulEstimator(NamedTuple):
    """An estimator with state carried from step to step (module docstring)."""

    init: Callable[[Array, Denoiser, Any], Any]
    update: Callable[..., tuple[Array, Metrics, Any]]


def as_stateful(estimator: Estimator | StatefulEstimator) -> StatefulEstimator:
    """``estimator`` as a `StatefulEstimator` (a plain function gets the empty state ``()``)."""
    if isinstance(estimator, StatefulEstimator):
        return estimator
    if not callable(estimator):
        raise ValueError(f"estimator must be a function or a StatefulEstimator, got {estimator!r}")

    def update(key, denoiser, params, images, sigma, labels, state):
        cotangent, metrics = estimator(key, denoiser, params, images, sigma, labels)
        return cotangent, metrics, state

    return StatefulEstimator(init=lambda key, denoiser, params: (), update=update)


# --- building blocks (usable by custom estimators) -------------------------------------------


def per_image(sigma: Array) -> Array:
    """``sigma [B]`` as ``[B, 1, 1, 1]`` to broadcast against images ``[B, H, W, C]``."""
    return jnp.asarray(sigma)[:, None, None, None]


def perturb(key: Array, images: Array, sigma: Array, noise_samples: int = 1) -> tuple[Array, Array]:
    """``(z, noise)``, both ``[n, B, H, W, C]`` (n = noise_samples): ``z = images + sigma n``."""
    if noise_samples < 1:
        raise ValueError(f"noise_samples must be positive, got {noise_samples}")
    noise = jax.random.normal(key, (noise_samples,) + images.shape, images.dtype)
    return images[None] + per_image(sigma)[None] * noise, noise


def denoise(
    denoiser: Denoiser, params: Any, z: Array, sigma: Array, *conditions: Array | int
) -> tuple[Array, ...]:
    """``D [n, B, H, W, C]`` of ``z [n, B, H, W, C]`` under each condition, in ONE model call.

    ``sigma [B]``; each condition is labels ``[B]`` or one label for all (e.g. `UNCONDITIONAL`).
    The call has batch ``len(conditions) * n * B``, the conditions in the order given (SD runs
    the halves of classifier-free guidance as one UNet call of batch 2B this way).
    """
    n, b = z.shape[:2]
    k = len(conditions)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, z.dtype), (b,))
    labels = jnp.concatenate(
        [jnp.broadcast_to(jnp.asarray(c, jnp.int32), (b,)) for c in conditions]
    )
    flat = z.reshape((n * b,) + z.shape[2:])
    if k > 1:
        flat = jnp.tile(flat, (k,) + (1,) * (flat.ndim - 1))
    # Batch order: condition, then noise sample, then view.
    d = denoiser.apply(
        params,
        flat,
        jnp.tile(sigma, n * k),
        jnp.tile(labels.reshape(k, 1, b), (1, n, 1)).reshape(-1),
    )
    d = d.reshape((k,) + z.shape).astype(z.dtype)
    return tuple(d[i] for i in range(k))


def guided(
    denoiser: Denoiser, params: Any, z: Array, sigma: Array, labels: Array, guidance_scale: float
) -> Array:
    """Classifier-free guided ``D_cfg [n, B, H, W, C]`` (conditional only when the scale is 1; a
    traced scale, a batch's per-lift value, always takes both halves)."""
    if not isinstance(guidance_scale, jax.core.Tracer) and guidance_scale == 1.0:
        return denoise(denoiser, params, z, sigma, labels)[0]
    d_uncond, d_cond = denoise(denoiser, params, z, sigma, UNCONDITIONAL, labels)
    return classifier_free_guidance(d_uncond, d_cond, guidance_scale)


def noise_estimate(z: Array, d: Array, sigma: Array) -> Array:
    """``eps_hat = (z - D) / sigma`` for ``z, d [n, B, H, W, C]``, ``sigma [B]``."""
    return (z - d) / per_image(sigma)[None]


def _sds_weight(sigma: Array) -> Array:
    return jnp.square(sigma) / (1.0 + jnp.square(sigma))  # 1 - abar


def _fantasia3d_weight(sigma: Array) -> Array:
    return _sds_weight(sigma) * jax.lax.rsqrt(1.0 + jnp.square(sigma))  # sqrt(abar) (1 - abar)


# w(sigma) [B] of the SDS family, by name (docs/estimators.md).
WEIGHTINGS: dict[str, Callable[[Array], Array]] = {
    "uniform": lambda sigma: jnp.ones_like(sigma),
    "sds": _sds_weight,
    "fantasia3d": _fantasia3d_weight,
}


def weighting(name: str) -> Callable[[Array], Array]:
    """The weighting function ``w(sigma [B]) -> [B]`` called ``name`` (`WEIGHTINGS`)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {tuple(WEIGHTINGS)}, got {name!r}")
    return WEIGHTINGS[name]


def _check_scale(name: str, value: float) -> None:
    if isinstance(value, jax.core.Tracer):  # a batch's per-lift value, checked concretely before
        return
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


# --- the built-in estimators ------------------------------------------------------------------


def sjc(
    *,
    guidance_scale: float = 100.0,
    var_red: bool = True,
    noise_samples: int = 1,
    scale: str = "sigma",
) -> Estimator:
    """Score Jacobian Chaining's PAAS gradient (Wang et al., CVPR 2023, Eq. 15 / 16).

    ``g = mean_n (D_cfg(z) - y) / sigma`` (Eq. 16, ``var_red``, the original's default) or
    ``mean_n (D_cfg(z) - z) / sigma`` (Eq. 15), divided once more by sigma with
    ``scale="sigma2"`` (the score estimate itself); returns ``-g``. With ``var_red`` and
    ``scale="sigma"`` it equals `sds` with ``weighting="uniform"`` (exactly, in exact arithmetic).

    Example::

        est = estimators.sjc(guidance_scale=100.0)
        cotangent, metrics = est(key, denoiser, denoiser.params, images, sigma, labels)
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if noise_samples < 1:
        raise ValueError(f"noise_samples must be positive, got {noise_samples}")
    _check_scale("guidance_scale", guidance_scale)

    def estimate(key, denoiser, params, images, sigma, labels):
        z, _ = perturb(key, images, sigma, noise_samples)
        d = guided(denoiser, params, z, sigma, labels, guidance_scale)
        sigma_b = per_image(sigma)
        g = jnp.mean(d - (images[None] if var_red else z), axis=0) / sigma_b
        g = g / sigma_b if scale == "sigma2" else g
        return -g, {}

    return estimate


def naive(*, guidance_scale: float = 100.0) -> Estimator:
    """Naive scoring: the denoiser applied to the render itself, no perturbation.

    ``g = (D_cfg(y, sigma) - y) / sigma`` with the render ``y`` as the noisy input at level
    sigma; returns ``-g``. This is what PAAS replaces (Wang et al., Sec. 3.3): a render is off
    the denoiser's noisy-image manifold at every sigma, so a learned denoiser's output there is
    unreliable. ``key`` is not used.
    """
    _check_scale("guidance_scale", guidance_scale)

    def estimate(key, denoiser, params, images, sigma, labels):
        d = guided(denoiser, params, images[None], sigma, labels, guidance_scale)[0]
        return -(d - images) / per_image(sigma), {}

    return estimate


def sds(
    *, guidance_scale: float = 100.0, weighting_name: str = "sds", noise_samples: int = 1
) -> Estimator:
    """DreamFusion's score distillation sampling (Poole et al., ICLR 2023).

    ``cotangent = w(sigma) mean_n (eps_hat_cfg(z) - n)`` with ``w`` one of `WEIGHTINGS`:
    ``"uniform"`` (1), ``"sds"`` (``1 - abar = sigma^2 / (1 + sigma^2)``, DreamFusion's) or
    ``"fantasia3d"`` (``sqrt(abar) (1 - abar)``, Chen et al., ICCV 2023).
    """
    w = weighting(weighting_name)
    if noise_samples < 1:
        raise ValueError(f"noise_samples must be positive, got {noise_samples}")
    _check_scale("guidance_scale", guidance_scale)

    def estimate(key, denoiser, params, images, sigma, labels):
        z, noise = perturb(key, images, sigma, noise_samples)
        d = guided(denoiser, params, z, sigma, labels, guidance_scale)
        grad = jnp.mean(noise_estimate(z, d, sigma) - noise, axis=0)
        return per_image(w(sigma)) * grad, {}

    return estimate


def nfsd(
    *, guidance_scale: float = 7.5, switch_timestep: int = 200, weighting_name: str = "sds"
) -> Estimator:
    """Noise-free score distillation (Katzir et al., ICLR 2024).

    ``cotangent = w(sigma) (delta_D + s delta_C)`` with the condition term ``delta_C = eps_c -
    eps_u`` and the denoising term ``delta_D = eps_u`` below timestep ``switch_timestep`` and
    ``eps_u - eps_neg`` (the `NEGATIVE` condition) from it on (sigma's nearest timestep of the
    model's table decides); no ``- n`` term. One model call of batch 3B (unconditional,
    negative, conditional). The paper's s is 7.5 and its negative prompt "unrealistic, blurry,
    low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy".
    """
    w = weighting(weighting_name)
    _check_scale("guidance_scale", guidance_scale)

    def estimate(key, denoiser, params, images, sigma, labels):
        table = denoiser.sigmas
        if not 0 <= switch_timestep < len(table):
            raise ValueError(
                f"switch_timestep must lie in [0, {len(table)}), got {switch_timestep}"
            )
        z, _ = perturb(key, images, sigma, 1)
        d_u, d_neg, d_c = denoise(denoiser, params, z, sigma, UNCONDITIONAL, NEGATIVE, labels)
        eps_u, eps_neg, eps_c = (noise_estimate(z, d, sigma)[0] for d in (d_u, d_neg, d_c))
        late = per_image(sigma_to_timestep(table, sigma) >= switch_timestep)
        delta_d = jnp.where(late, eps_u - eps_neg, eps_u)
        return per_image(w(sigma)) * (delta_d + guidance_scale * (eps_c - eps_u)), {}

    return estimate


def csd(*, weighting_name: str = "sds", negative_weight: float = 0.0) -> Estimator:
    """Classifier score distillation (Yu et al., ICLR 2024): the guidance term alone.

    ``cotangent = w(sigma) ((eps_c - eps_u) - negative_weight (eps_neg - eps_u))`` (the
    authors' code weighs the classifier term by 1; ``negative_weight`` is their omega_2 of the
    negative prompt, 0 = off, one model call of batch 2B; else 3B).
    """
    w = weighting(weighting_name)
    _check_scale("negative_weight", negative_weight)

    def estimate(key, denoiser, params, images, sigma, labels):
        z, _ = perturb(key, images, sigma, 1)
        if negative_weight:
            d_u, d_c, d_neg = denoise(denoiser, params, z, sigma, UNCONDITIONAL, labels, NEGATIVE)
        else:
            d_u, d_c = denoise(denoiser, params, z, sigma, UNCONDITIONAL, labels)
        # eps_a - eps_b = (D_b - D_a) / sigma for the same z.
        grad = (d_u - d_c)[0] / per_image(sigma)
        if negative_weight:
            grad = grad - negative_weight * (d_u - d_neg)[0] / per_image(sigma)
        return per_image(w(sigma)) * grad, {}

    return estimate


# --- the estimators a config can name -----------------------------------------------------------


class Registered(NamedTuple):
    """An estimator ``ScoreConfig.estimator`` can name."""

    factory: Callable[..., Estimator | StatefulEstimator]
    # factory keyword -> the `sjc_jax.config.ScoreConfig` field it is given
    fields: Mapping[str, str]
    summary: str  # a few words for the command line's help


ESTIMATORS: dict[str, Registered] = {
    "sjc": Registered(
        sjc,
        {
            "guidance_scale": "guidance_scale",
            "var_red": "var_red",
            "noise_samples": "noise_samples",
            "scale": "score_scale",
        },
        "SJC's PAAS, the original",
    ),
    "sds": Registered(
        sds,
        {
            "guidance_scale": "guidance_scale",
            "weighting_name": "sds_weighting",
            "noise_samples": "noise_samples",
        },
        "score distillation sampling",
    ),
    "nfsd": Registered(
        nfsd,
        {
            "guidance_scale": "guidance_scale",
            "switch_timestep": "nfsd_switch_timestep",
            "weighting_name": "sds_weighting",
        },
        "noise-free score distillation",
    ),
    "csd": Registered(
        csd,
        {"weighting_name": "sds_weighting", "negative_weight": "csd_negative_weight"},
        "classifier score distillation",
    ),
    "naive": Registered(naive, {"guidance_scale": "guidance_scale"}, "no perturbation"),
}
