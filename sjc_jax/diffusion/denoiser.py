"""The denoiser interface of the SJC step, and eps/v -> D conversions and classifier-free guidance.

A denoiser here is the VE-form posterior mean ``D(z, sigma, label)``: ``z = y + sigma * n`` is a
noisy image, ``label`` selects the condition. Whatever model is behind it, the step only sees
`Denoiser.apply`, a pure jittable function, and `Denoiser.params`, a pytree passed to the jitted
step as an argument (so large weights are never baked into the compiled program as constants).

Conditions are integer labels, the same for every model:

* ``0..3``: the view labels of view-augmented prompting (front, side, backside, overhead; the
  empirical denoiser's subset of that label);
* `UNCONDITIONAL` (-1): no condition (SD: the empty prompt; the empirical denoiser: the whole
  set);
* `NEGATIVE` (-2): a negative condition (SD: the negative prompt; models without one treat it as
  unconditional).

A denoiser applies no guidance: estimators (`sjc_jax.estimators`) ask for the conditions they
need (in one call of the model where they need several) and combine them themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

UNCONDITIONAL = -1  # label of the unconditional prediction
NEGATIVE = -2  # label of the negative-prompt prediction

# (params, z [B, H, W, C], sigma [B], label [B] int32) -> D [B, H, W, C]
ApplyFn = Callable[[Any, Array, Array, Array], Array]
# images [B, H, W, C] in the model's feature space -> RGB [B, H', W', 3] in [0, 1]
DecodeFn = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    """A VE denoiser and what the SJC loop needs to know about its model.

    Attributes:
      apply: ``(params, z [B, H, W, C], sigma [B], label [B] int32) -> D [B, H, W, C]``, the
        unguided denoiser of each image's condition (module docstring); pure and jittable;
        ``sigma`` may be any positive level (models with a discrete table snap it).
      params: pytree of arrays that `apply` reads (weights, condition tables, image sets).
      sigmas: ``[T]`` ascending noise table of the model, ``sigmas[t]`` the level of timestep t;
        the noise schedules of the SJC loop draw from it.
      channels: C of the images the model denoises (4 for SD latents, 3 for RGB).
      resolution: H = W of the images the model expects.
      feature_space: ``"sd-latent"`` or ``"rgb"``.
      decode: maps model-space images to displayable RGB in [0, 1] (VAE decode for SD, clipping
        for RGB); used for previews and videos, never inside the step.
      name: for logs and config files.
    """

    apply: ApplyFn
    params: Any
    sigmas: np.ndarray
    channels: int
    resolution: int
    feature_space: str
    decode: DecodeFn
    name: str = "denoiser"


# Conversions from a variance-preserving (VP, DDPM) model to the VE denoiser. With
# ``a = 1 / sqrt(1 + sigma^2)`` and ``s = sigma a`` (so ``a^2 + s^2 = 1``), the VP input of the VE
# image ``z = y + sigma n`` is ``x = a z = a y + s n``. Model outputs, for a clean estimate ``y0``:
#   epsilon:       eps                      (the noise n)
#   v_prediction:  v = a eps - s y0  =>  eps = s x + a v,  y0 = a x - s v
#   sample:        y0                   =>  eps = (x - a y0) / s
# and the VE denoiser is ``D = z - sigma eps`` (equal to y0). Each map is affine in the model
# output, so classifier-free guidance gives the same D before or after the conversion.
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def vp_coefficients(sigma: Array) -> tuple[Array, Array]:
    """``(a, s) = (1 / sqrt(1 + sigma^2), sigma / sqrt(1 + sigma^2))``, the VP scales of a level."""
    a = jax.lax.rsqrt(1.0 + jnp.square(sigma))
    return a, sigma * a


def _per_image(sigma: Array, like: Array) -> Array:
    """``sigma [B]`` (or a scalar) broadcast against images ``like [B, H, W, C]``."""
    sigma = jnp.asarray(sigma, like.dtype)
    return jnp.reshape(sigma, sigma.shape + (1,) * (like.ndim - sigma.ndim))


def model_output_to_eps(output: Array, x_vp: Array, sigma: Array, prediction_type: str) -> Array:
    """The noise estimate eps ``[B, H, W, C]`` of a VP model's ``output [B, H, W, C]``.

    ``x_vp [B, H, W, C]`` is the model's input, ``sigma [B]`` the VE level (see the table above).
    """
    if prediction_type == "epsilon":
        return output
    a, s = vp_coefficients(_per_image(sigma, x_vp))
    if prediction_type == "v_prediction":
        return s * x_vp + a * output
    if prediction_type == "sample":
        return (x_vp - a * output) / s
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_to_denoised(z: Array, sigma: Array, eps: Array) -> Array:
    """``D = z - sigma eps``: the VE denoiser of ``z, eps [B, H, W, C]`` at ``sigma [B]``."""
    return z - _per_image(sigma, z) * eps


def classifier_free_guidance(eps_uncond: Array, eps_cond: Array, scale: float | Array) -> Array:
    """``eps_u + scale (eps_c - eps_u)``: scale 1 is the conditional model, 0 the unconditional.

    It applies to denoised images as well (``D = z - sigma eps`` is affine in eps for the same z
    and sigma, so guiding D or eps gives the same D).
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)
