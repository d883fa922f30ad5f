"""Perturb-and-average scoring (PAAS): the image-space gradient that SJC chains into 3D.

Conventions of this module:

* ``y [B, H, W, C]`` is the rendered image (the render of SJC is already in the model's feature
  space), ``sigma [B]`` one VE level per image, ``label [B]`` int32 the view labels, ``noise
  [n, B, H, W, C]`` the n standard-normal samples; ``z = y + sigma noise``.
* Sign: ``g`` points uphill in log-density (``g ~ sigma * score`` with the default scaling). The
  optimiser descends ``-J^T g`` (``grad_theta = vjp_render(-g)``; the original's
  ``y.backward(-g)``). The SDS gradient has the opposite sign: it is descended as ``J^T sds``.
* Forms (SJC paper): Eq. 15 ``g = (D(z) - z) / sigma`` is the denoiser's score at z times sigma;
  Eq. 16 (``var_red``, the default) ``g = (D(z) - y) / sigma`` drops the zero-mean term
  ``-noise``. With an eps-model ``D = z - sigma eps_hat`` Eq. 16 is ``noise - eps_hat``, minus
  DreamFusion's SDS gradient with w(t) = 1, exactly (`sds_gradient`).
* Scaling: ``"sigma"`` divides by sigma as the original code does; ``"sigma2"`` divides by
  sigma^2, giving the score estimate itself.
* What the average estimates: ``E_n[(D(y + sigma n) - y) / sigma^2] = E_n[grad log p_sigma(y +
  sigma n)]``, the gradient of ``log p_sigma`` smoothed by N(0, sigma^2) (both forms have that
  mean). It is not the score of ``p`` at noise ``sqrt(2) sigma`` in general: for Gaussian data
  N(mu, s^2 I) it is ``(mu - y) / (s^2 + sigma^2)``, the score at noise sigma, while
  ``p_{sqrt(2) sigma}`` has ``(mu - y) / (s^2 + 2 sigma^2)`` (tests/test_score.py shows both).
  Eq. 16 has the lower variance when D varies slowly with z (for that Gaussian: when s < sigma).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sjc_jax.diffusion.denoiser import ApplyFn

Array = jax.Array

SCALES = ("sigma", "sigma2")


def sample_noise(key: Array, y: Array, num_samples: int = 1) -> Array:
    """Standard-normal noise ``[num_samples, B, H, W, C]`` for images ``y [B, H, W, C]``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    return jax.random.normal(key, (num_samples,) + y.shape, y.dtype)


def _denoise_samples(
    apply: ApplyFn, params: Any, y: Array, sigma: Array, label: Array, noise: Array
) -> tuple[Array, Array, Array]:
    """``(z, D, sigma_b)``: the n noisy copies of y denoised in ONE apply call of batch n B."""
    n, b = noise.shape[:2]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, y.dtype), (b,))
    label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), (b,))
    sigma_b = sigma[:, None, None, None]
    z = y[None] + sigma_b[None] * noise
    flat = lambda a: a.reshape((n * b,) + a.shape[2:])
    d = apply(params, flat(z), jnp.tile(sigma, n), jnp.tile(label, n))
    return z, d.reshape(z.shape).astype(y.dtype), sigma_b


def paas_gradient_from_noise(
    apply: ApplyFn,
    params: Any,
    y: Array,
    sigma: Array,
    label: Array,
    noise: Array,
    *,
    var_red: bool = True,
    scale: str = "sigma",
) -> Array:
    """PAAS gradient ``g [B, H, W, C]`` for given ``noise [n, B, H, W, C]`` (module docstring).

    ``g = mean_n (D(z) - y) / sigma`` (Eq. 16, ``var_red``) or ``mean_n (D(z) - z) / sigma``
    (Eq. 15), divided once more by sigma when ``scale="sigma2"``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    z, d, sigma_b = _denoise_samples(apply, params, y, sigma, label, noise)
    g = jnp.mean(d - (y[None] if var_red else z), axis=0) / sigma_b
    return g / sigma_b if scale == "sigma2" else g


def paas_gradient(
    key: Array,
    apply: ApplyFn,
    params: Any,
    y: Array,
    sigma: Array,
    label: Array,
    *,
    num_samples: int = 1,
    var_red: bool = True,
    scale: str = "sigma",
) -> Array:
    """SJC's image-space gradient ``g [B, H, W, C]`` averaged over ``num_samples`` noise draws.

    ``y [B, H, W, C]``, ``sigma [B]`` (or a scalar), ``label [B]`` int32; ``num_samples=1`` is
    SJC. The optimiser descends ``-J^T g``. The same ``key`` draws the same noise as
    `sds_gradient`.
    """
    noise = sample_noise(key, y, num_samples)
    return paas_gradient_from_noise(
        apply, params, y, sigma, label, noise, var_red=var_red, scale=scale
    )


def sds_gradient_from_noise(
    apply: ApplyFn, params: Any, y: Array, sigma: Array, label: Array, noise: Array
) -> Array:
    """DreamFusion's SDS gradient ``mean_n (eps_hat - noise)`` ``[B, H, W, C]`` (w(t) = 1).

    ``eps_hat = (z - D(z)) / sigma`` is the denoiser's noise estimate; descend ``J^T sds``.
    """
    z, d, sigma_b = _denoise_samples(apply, params, y, sigma, label, noise)
    return jnp.mean((z - d) / sigma_b - noise, axis=0)


def sds_gradient(
    key: Array,
    apply: ApplyFn,
    params: Any,
    y: Array,
    sigma: Array,
    label: Array,
    *,
    num_samples: int = 1,
) -> Array:
    """SDS gradient ``[B, H, W, C]``; the same key draws the same noise as `paas_gradient`."""
    noise = sample_noise(key, y, num_samples)
    return sds_gradient_from_noise(apply, params, y, sigma, label, noise)
