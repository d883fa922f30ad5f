"""The denoiser interface of the SJC step, and eps/v -> D conversions and classifier-free guidance.

A denoiser here is the VE-form posterior mean ``D(z, sigma, label)``: ``z = y + sigma * n`` is a
noisy image, ``label`` selects the condition (the view label of view-augmented prompting, or a
subset for the empirical denoiser). Whatever model is behind it, the SJC step only sees
`Denoiser.apply`, a pure jittable function, and `Denoiser.params`, a pytree passed to the jitted
step as an argument (so large weights are never baked into the compiled program as constants).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

Array = jax.Array

# (params, z [B, H, W, C], sigma [B], label [B] int32) -> D [B, H, W, C]
ApplyFn = Callable[[Any, Array, Array, Array], Array]
# images [B, H, W, C] in the model's feature space -> RGB [B, H', W', 3] in [0, 1]
DecodeFn = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    """A VE denoiser and what the SJC loop needs to know about its model.

    Attributes:
      apply: ``(params, z [B, H, W, C], sigma [B], label [B] int32) -> D [B, H, W, C]``; pure and
        jittable; ``sigma`` may be any positive level (models with a discrete table snap it).
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
