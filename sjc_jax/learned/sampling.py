"""A model's own sampler, through the `Denoiser` interface: DDIM (eta = 0) in VE form.

With the VE denoiser ``D(z, sigma)``, DDIM's deterministic update from level sigma to sigma' is
``z' = D + sigma' (z - D) / sigma`` (the Euler step of the probability-flow ODE in sigma; Song
et al. 2021, Karras et al. 2022, Eq. 4 with their sigma(t) = t). It works for any denoiser of
the interface: the learned UNet and the exact empirical denoiser alike. Classifier-free
guidance combines the conditional and unconditional predictions of one call.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax.diffusion.denoiser import UNCONDITIONAL, Denoiser, classifier_free_guidance

Array = jax.Array


def sampling_levels(
    sigmas: np.ndarray, steps: int, *, sigma_max: float | None = None
) -> np.ndarray:
    """``steps + 1`` descending levels: ``steps`` table levels evenly spaced in timestep, then 0.

    The first is the table's top level (or the level nearest ``sigma_max``).
    """
    sigmas = np.asarray(sigmas, np.float64)
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    top = len(sigmas) - 1 if sigma_max is None else int(np.argmin(np.abs(sigmas - sigma_max)))
    index = np.round(np.linspace(top, 0, steps)).astype(int)
    return np.concatenate([sigmas[index], [0.0]]).astype(np.float32)


def guided_denoise(denoiser: Denoiser, z: Array, sigma: Array, labels: Array, guidance: float):
    """``D_u + guidance (D_c - D_u)`` of ``z [B, ...]`` at ``sigma [B]`` (one call of 2B).

    ``guidance = 1`` asks only for the conditional prediction (one call of B).
    """
    if guidance == 1.0:
        return denoiser.apply(denoiser.params, z, sigma, labels)
    both = denoiser.apply(
        denoiser.params,
        jnp.concatenate([z, z]),
        jnp.concatenate([sigma, sigma]),
        jnp.concatenate([labels, jnp.full_like(labels, UNCONDITIONAL)]),
    )
    cond, uncond = jnp.split(both, 2)
    return classifier_free_guidance(uncond, cond, guidance)


def ddim_sample(
    denoiser: Denoiser,
    key: Array,
    labels,
    *,
    steps: int = 50,
    guidance: float = 1.0,
    sigma_max: float | None = None,
    clip: tuple[float, float] | None = None,
    eta: float = 0.0,
) -> Array:
    """Samples ``[B, H, W, C]`` for condition ``labels [B]`` by DDIM from pure noise.

    ``z_0 = sigma_max n`` (the table's top level by default), then `sampling_levels`. ``clip``
    clips each step's denoised estimate to a range (diffusers' ``clip_sample`` for pixel
    models: at large sigma an epsilon error e is an error sigma e of D). ``eta`` in [0, 1]
    adds fresh noise per step (DDIM's eta; 1 = ancestral sampling): the step goes down to
    ``sigma_down`` and adds ``sigma_up n``, with ``sigma_up = eta sigma' sqrt(1 - sigma'^2 /
    sigma^2)`` and ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``.
    """
    labels = jnp.asarray(labels, jnp.int32)
    levels = jnp.asarray(sampling_levels(denoiser.sigmas, steps, sigma_max=sigma_max))
    b = labels.shape[0]
    shape = (b, denoiser.resolution, denoiser.resolution, denoiser.channels)
    key, k0 = jax.random.split(key)
    z = levels[0] * jax.random.normal(k0, shape, jnp.float32)
    keys = jax.random.split(key, steps)

    @jax.jit
    def run(params, z, levels, keys):
        model = dataclasses.replace(denoiser, params=params)  # params as an argument

        def body(z, inputs):
            sigma, nxt, k = inputs
            d = guided_denoise(model, z, jnp.full((b,), sigma), labels, guidance)
            d = d if clip is None else jnp.clip(d, *clip)
            up = eta * nxt * jnp.sqrt(jnp.maximum(1.0 - jnp.square(nxt / sigma), 0.0))
            down = jnp.sqrt(jnp.maximum(jnp.square(nxt) - jnp.square(up), 0.0))
            return d + down * (z - d) / sigma + up * jax.random.normal(k, z.shape), None

        z, _ = jax.lax.scan(body, z, (levels[:-1], levels[1:], keys))
        return z

    return run(denoiser.params, z, levels, keys)


def checkerboard_energy(images, *, tile: int = 8) -> float:
    """The energy of 2 x 2 alternating patterns in ``images [N, H, W, C]``: a measure of the fold
    artefacts of a space-to-depth UNet.

    Three patterns alternate every pixel: ``(-1)^i`` (rows), ``(-1)^j`` (columns) and
    ``(-1)^(i + j)`` (the checkerboard), the Nyquist frequencies a 2 x 2 fold repeats. Each is
    measured after a high-pass that leaves it doubled and removes linear ramps (the second
    difference along its axis; the 4-neighbour Laplacian for the checkerboard), in ``tile x
    tile`` tiles of each image and channel (a pattern whose sign changes across the image is
    kept): the result is the mean over tiles of the summed squared amplitudes, so a pattern of
    amplitude ``a`` everywhere reads ``a^2``. Edges of real content read a little, which the same
    measure on the training images gives as the level to compare against.
    """
    x = np.asarray(images, np.float64)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {x.shape}")
    centre = x[:, 1:-1, 1:-1]
    rows = centre - 0.5 * (x[:, :-2, 1:-1] + x[:, 2:, 1:-1])
    cols = centre - 0.5 * (x[:, 1:-1, :-2] + x[:, 1:-1, 2:])
    both = centre - 0.25 * (x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:])
    h, w = (centre.shape[1] // tile) * tile, (centre.shape[2] // tile) * tile
    if not h or not w:
        raise ValueError(f"images of {x.shape[1]} x {x.shape[2]} are smaller than a tile")
    sign = (-1.0) ** np.arange(tile)
    total = 0.0
    for filtered, pattern in (
        (rows, np.outer(sign, np.ones(tile))),
        (cols, np.outer(np.ones(tile), sign)),
        (both, np.outer(sign, sign)),
    ):
        f = filtered[:, :h, :w]
        f = f.reshape(f.shape[0], h // tile, tile, w // tile, tile, f.shape[-1])
        amplitude = np.einsum("naubsc,us->nabc", f, pattern) / (2 * tile * tile)
        total += np.mean(np.square(amplitude))
    return float(total)
