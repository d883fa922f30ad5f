"""The original's layer numerics in diffusers' Flax UNet, swapped in without touching its params.

Two layers of diffusers' Flax UNet compute something slightly different from the ldm code the
original SJC runs (and from diffusers' own torch UNet):

* ``FlaxGEGLU`` (the transformer blocks' feed-forward) uses the tanh approximation of GELU
  (``flax.linen.gelu``'s default); torch and ldm use the exact ``x Phi(x)``. The difference is
  about 3e-4 relative on SD's denoised output at every sigma.
* ``FlaxTransformer2DModel``'s input GroupNorm has epsilon 1e-5; torch and ldm use 1e-6.

`original_numerics` intercepts both layers (Flax's ``nn.intercept_methods``, as
`sjc_jax.diffusion.attention` does for attention) and computes them the original's way from the
layers' own params, so checkpoints, param names and every other layer stay diffusers'.

Kinds of GELU (``gelu=``): ``"exact"`` (the original's, the default) or ``"tanh"`` (diffusers'
Flax approximation, a little cheaper on some backends).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp

GELU_KINDS = ("exact", "tanh")
# The GroupNorm epsilon of the original's spatial transformer (ldm ``Normalize``).
TRANSFORMER_NORM_EPSILON = 1e-6


def check_gelu(gelu: str) -> str:
    """``gelu`` if it is one of `GELU_KINDS`, else `ValueError` naming it."""
    if gelu not in GELU_KINDS:
        raise ValueError(f"gelu must be one of {GELU_KINDS}, got {gelu!r}")
    return gelu


def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, *, groups: int, epsilon: float
) -> jax.Array:
    """torch's ``GroupNorm`` over channels-last ``x [B, ..., C]`` with ``scale, bias [C]``.

    Channel c is in group ``c // (C / groups)``; mean and (biased, two-pass) variance over the
    spatial axes and the group's channels, computed in at least float32; the result has the
    dtype of ``x``, ``scale`` and ``bias`` promoted together (as Flax's ``GroupNorm``).
    """
    channels = x.shape[-1]
    if channels % groups:
        raise ValueError(f"groups must divide the {channels} channels, got {groups}")
    out_dtype = jnp.result_type(x, scale, bias)
    compute = jnp.promote_types(out_dtype, jnp.float32)
    grouped = x.astype(compute).reshape(*x.shape[:-1], groups, channels // groups)
    axes = (*range(1, x.ndim - 1), x.ndim)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)
    return (normed * scale.astype(compute) + bias.astype(compute)).astype(out_dtype)


def _first_arg(x, *args, **kwargs):
    return x


def _geglu_call(hidden_states, deterministic=True):
    return hidden_states, deterministic


@contextlib.contextmanager
def original_numerics(gelu: str = "exact") -> Iterator[None]:
    """Within it, diffusers' Flax UNet layers compute as the original (module docstring).

    Enter it around the ``unet.apply`` call being traced. The spatial transformers' GroupNorm
    always uses `TRANSFORMER_NORM_EPSILON`; ``gelu="tanh"`` keeps diffusers' feed-forward.
    """
    check_gelu(gelu)
    import flax.linen as nn
    from diffusers.models.attention_flax import FlaxGEGLU, FlaxTransformer2DModel

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.GroupNorm) and isinstance(module.parent, FlaxTransformer2DModel):
            x = _first_arg(*args, **kwargs)
            shape = (x.shape[-1],)
            scale = module.param("scale", module.scale_init, shape, module.param_dtype)
            bias = module.param("bias", module.bias_init, shape, module.param_dtype)
            groups = module.num_groups
            return group_norm(x, scale, bias, groups=groups, epsilon=TRANSFORMER_NORM_EPSILON)
        if gelu == "exact" and isinstance(module, FlaxGEGLU):
            hidden_states, deterministic = _geglu_call(*args, **kwargs)
            linear, gate = jnp.split(module.proj(hidden_states), 2, axis=2)
            out = linear * nn.gelu(gate, approximate=False)
            return module.dropout_layer(out, deterministic=deterministic)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
        yield
