"""The exact posterior-mean denoiser of a finite labelled image set (the ground-truth testbed).

For images ``{y_i}`` drawn uniformly from a finite set, the optimal VE denoiser is known in closed
form: with ``z = y + sigma * n``,

    D(z, sigma) = sum_i softmax_i(-|z - y_i|^2 / (2 sigma^2)) y_i,

the mean-shift step of the set. The condition ``label`` selects the subset ``{i: labels_i ==
label}`` (the view label of view-augmented prompting), so the SJC step runs unchanged on it.

Label rules (decided here, relied on by the testbed):

* a label in ``[0, num_labels)`` whose subset is empty falls back to the whole set;
* a label outside ``[0, num_labels)`` (`UNCONDITIONAL` = -1, `NEGATIVE` = -2 of
  `sjc_jax.diffusion.denoiser`) means "unconditional": the whole set. A finite image set has
  no negative condition, so the negative prediction is the unconditional one.

Numerics: ``|z|^2`` is the same for every ``i`` and cancels in the softmax, so a logit is
``(z.y_i - |y_i|^2 / 2) / sigma^2``, and a chunk of the set costs one matmul. Images and ``z`` are
centred on the set mean first (it cancels too) to shrink the float32 cancellation error of the
expansion. The set is scanned in chunks with an online log-sum-exp (running max, normaliser and
weighted sum), so memory is ``O(B * (chunk_size + H * W * C))`` beyond the set itself. Matmuls run
at ``Precision.HIGHEST`` because TF32/bf16 passes on accelerators would swamp the logit differences
at small sigma.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax.diffusion.denoiser import DecodeFn, Denoiser
from sjc_jax.grid_io import FEATURE_CHANNELS

Array = jax.Array

# 1 / sigma^2 is capped here (sigma >= 1e-15) so logits stay finite in float32 for any input of
# sane magnitude; at that level the softmax is already one-hot for any two distinct images.
_MAX_INV_VARIANCE = 1e30


def _clip_rgb(images: Array) -> Array:
    """Displayable RGB ``[B, H, W, 3]``: the images clipped to [0, 1]."""
    return jnp.clip(images, 0.0, 1.0)


def empirical_denoise(params: dict, z: Array, sigma: Array, label: Array) -> Array:
    """Posterior mean of the label's subset of the image set in ``params``.

    Args:
      params: the pytree built by `make_empirical_denoiser` (``images [N, K, P]`` centred and
        chunked, ``half_sq_norms [N, K]``, ``labels [N, K]`` (-1 on padding), ``valid [N, K]``,
        ``counts [L]``, ``mean [P]``, with ``P = H * W * C``).
      z: ``[B, H, W, C]`` noisy images.
      sigma: ``[B]`` positive noise levels (any value; no table snapping).
      label: ``[B]`` int32 subset labels (see the module docstring for empty / out-of-range).

    Returns:
      ``[B, H, W, C]`` float32 posterior means.
    """
    batch, height, width, channels = z.shape
    pixels = height * width * channels
    if params["mean"].shape[-1] != pixels:
        raise ValueError(
            f"z has {height}x{width}x{channels} values per image, the image set has "
            f"{params['mean'].shape[-1]}"
        )
    precision = jax.lax.Precision.HIGHEST
    zc = z.reshape(batch, pixels).astype(jnp.float32) - params["mean"]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (batch,))
    inv_var = jnp.minimum(1.0 / jnp.square(sigma), _MAX_INV_VARIANCE)
    label = jnp.broadcast_to(jnp.asarray(label, jnp.int32), (batch,))
    counts = params["counts"]
    in_range = (label >= 0) & (label < counts.shape[0])
    has_images = counts[jnp.clip(label, 0, counts.shape[0] - 1)] > 0
    use_all = ~(in_range & has_images)  # [B]

    def body(carry, chunk):
        running_max, normaliser, weighted = carry
        images, half_sq_norms, labels, valid = chunk
        dots = jnp.matmul(zc, images.T, precision=precision)  # [B, K]
        logits = (dots - half_sq_norms) * inv_var[:, None]
        selected = jnp.where(use_all[:, None], valid[None, :], labels[None, :] == label[:, None])
        logits = jnp.where(selected, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        # Before the first selected image the max is -inf; shift by 0 then (every term is 0).
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        rescale = jnp.exp(running_max - shift)  # [B]
        weights = jnp.exp(logits - shift[:, None])  # [B, K]
        normaliser = normaliser * rescale + jnp.sum(weights, axis=-1)
        weighted = weighted * rescale[:, None] + jnp.matmul(weights, images, precision=precision)
        return (new_max, normaliser, weighted), None

    init = (
        jnp.full((batch,), -jnp.inf, jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, pixels), jnp.float32),
    )
    chunks = (params["images"], params["half_sq_norms"], params["labels"], params["valid"])
    (_, normaliser, weighted), _ = jax.lax.scan(body, init, chunks)
    # The subset is never empty (fallback above), so its best image contributes exp(0) = 1.
    out = weighted / normaliser[:, None] + params["mean"]
    return out.reshape(batch, height, width, channels)


def make_empirical_denoiser(
    images,
    labels,
    *,
    num_labels: int = 4,
    sigmas=None,
    chunk_size: int = 256,
    feature_space: str = "rgb",
    decode: DecodeFn | None = None,
    name: str = "empirical",
) -> Denoiser:
    """The exact empirical denoiser of a labelled image set, as a `Denoiser`.

    Args:
      images: ``[M, H, W, C]`` the image set (H = W), in the model's feature space.
      labels: ``[M]`` ints in ``[0, num_labels)``, the subset of each image.
      num_labels: number of conditions L (4 view labels by default).
      sigmas: ``[T]`` ascending noise table reported to the SJC loop (the denoiser itself is exact
        at any level); default ``ddpm_sigmas()`` (SD v1's table).
      chunk_size: images per scan step (bounds memory; need not divide M).
      feature_space: ``"rgb"`` (C = 3, decoded by clipping to [0, 1]) or ``"sd-latent"`` (C = 4).
      decode: ``[B, H, W, C] -> [B, H', W', 3]`` RGB in [0, 1]; required for ``"sd-latent"``,
        defaults to clipping for ``"rgb"``.
      name: for logs and config files.

    Returns:
      A `Denoiser` whose ``params`` hold the (centred, chunked) set, so it is passed to the jitted
      step as an argument rather than baked in as a constant.
    """
    images = np.asarray(images, np.float32)
    labels_np = np.asarray(labels)
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be [M, H, W, C] with M >= 1, got shape {images.shape}")
    num, height, width, channels = images.shape
    if height != width:
        raise ValueError(f"images must be square (H = W), got {height}x{width}")
    if not np.all(np.isfinite(images)):
        raise ValueError("images must be finite")
    if feature_space not in FEATURE_CHANNELS:
        raise ValueError(f"feature_space must be 'rgb' or 'sd-latent', got {feature_space!r}")
    if channels != FEATURE_CHANNELS[feature_space]:
        raise ValueError(
            f"images have C = {channels}, feature_space {feature_space!r} needs "
            f"C = {FEATURE_CHANNELS[feature_space]}"
        )
    if num_labels < 1:
        raise ValueError(f"num_labels must be positive, got {num_labels}")
    if labels_np.shape != (num,) or not np.issubdtype(labels_np.dtype, np.integer):
        raise ValueError(
            f"labels must be [M] = [{num}] ints, got {labels_np.dtype} {labels_np.shape}"
        )
    if np.any((labels_np < 0) | (labels_np >= num_labels)):
        raise ValueError(f"labels must lie in [0, num_labels) = [0, {num_labels})")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if decode is None:
        if feature_space != "rgb":
            raise ValueError("decode is required for feature_space 'sd-latent'")
        decode = _clip_rgb
    if sigmas is None:
        from sjc_jax.diffusion.schedule import ddpm_sigmas

        sigmas = ddpm_sigmas()
    sigmas = np.asarray(sigmas, np.float32)
    if sigmas.ndim != 1 or sigmas.size < 1 or np.any(np.diff(sigmas) <= 0) or sigmas[0] <= 0:
        raise ValueError("sigmas must be a non-empty ascending [T] table of positive levels")

    chunk = min(chunk_size, num)
    num_chunks = -(-num // chunk)
    pad = num_chunks * chunk - num
    flat = images.reshape(num, -1).astype(np.float64)
    mean = flat.mean(axis=0)
    centred = np.concatenate([flat - mean, np.zeros((pad, flat.shape[1]))]).astype(np.float32)
    # Norms of the float32 centred images, so logits are consistent with the matmul operands.
    half_sq_norms = 0.5 * np.sum(np.square(centred.astype(np.float64)), axis=-1)
    padded_labels = np.concatenate([labels_np.astype(np.int32), np.full(pad, -1, np.int32)])
    valid = np.arange(num_chunks * chunk) < num
    params = {
        "images": jnp.asarray(centred.reshape(num_chunks, chunk, -1)),
        "half_sq_norms": jnp.asarray(half_sq_norms.reshape(num_chunks, chunk), jnp.float32),
        "labels": jnp.asarray(padded_labels.reshape(num_chunks, chunk)),
        "valid": jnp.asarray(valid.reshape(num_chunks, chunk)),
        "counts": jnp.asarray(np.bincount(labels_np, minlength=num_labels).astype(np.int32)),
        "mean": jnp.asarray(mean, jnp.float32),
    }
    return Denoiser(
        apply=empirical_denoise,
        params=params,
        sigmas=sigmas,
        channels=channels,
        resolution=height,
        feature_space=feature_space,
        decode=decode,
        name=name,
    )
