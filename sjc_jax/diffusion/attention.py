"""Attention kernels for the diffusers Flax UNet, swapped in without touching diffusers' code.

diffusers' ``FlaxAttention`` computes ``softmax(q k^T / sqrt(d)) v`` with two einsums and
materialises the ``[B*heads, T, T]`` score matrix: at SD's 64 x 64 latents that is 4096^2 scores
per head in each of the five full-resolution self-attention layers, written to and read back
from GPU memory. `attention_context` intercepts every ``FlaxAttention.__call__`` (Flax's
``nn.intercept_methods``) and computes the same function with `jax.nn.dot_product_attention`,
reusing the module's own projections (``to_q``, ``to_k``, ``to_v``, ``to_out_0``), so the
parameters, their names and every other layer stay diffusers'.

Kinds (``SJCConfig.attention``):

* ``"diffusers"``: the library's own einsum attention (no interception).
* ``"xla"``: `jax.nn.dot_product_attention` with XLA's implementation (any backend, any dtype).
* ``"cudnn"``: cuDNN's fused flash attention (NVIDIA GPU, bfloat16 UNet); a layer cuDNN
  refuses (e.g. a head size it does not support) falls back to ``"xla"`` at trace time.
* ``"auto"``: ``"cudnn"`` on a GPU with a bfloat16 UNet, else ``"diffusers"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

ATTENTION_KINDS = ("auto", "diffusers", "xla", "cudnn")


def resolve_attention(kind: str, dtype: Any) -> str:
    """The concrete kind (``diffusers``, ``xla`` or ``cudnn``) for ``kind`` on this backend."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    on_gpu = jax.default_backend() in ("gpu", "cuda")
    if kind == "auto":
        return "cudnn" if on_gpu and jnp.dtype(dtype) == jnp.bfloat16 else "diffusers"
    if kind == "cudnn" and not on_gpu:
        raise ValueError(
            f"attention='cudnn' needs an NVIDIA GPU (backend is {jax.default_backend()})"
        )
    return kind


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, kind: str) -> jax.Array:
    """``softmax(q k^T * scale) v`` over ``[B, T, heads, dim]`` inputs."""
    if kind == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # cuDNN refuses this shape or dtype: the XLA version computes the same function
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


def _call_args(hidden_states, context=None, deterministic=True):
    return hidden_states, context, deterministic


@contextlib.contextmanager
def attention_context(kind: str) -> Iterator[None]:
    """Within it, diffusers' Flax attention layers use the kernel ``kind`` (already resolved).

    Enter it around the ``unet.apply`` call that is being traced; ``"diffusers"`` changes nothing.
    """
    if kind == "diffusers":
        yield
        return
    if kind not in ATTENTION_KINDS[2:]:
        raise ValueError(f"attention kind must be resolved to xla or cudnn, got {kind!r}")
    import flax.linen as nn
    from diffusers.models.attention_flax import FlaxAttention

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, FlaxAttention):
            return next_fun(*args, **kwargs)
        hidden_states, states, deterministic = _call_args(*args, **kwargs)
        states = hidden_states if states is None else states
        heads = (module.heads, module.dim_head)
        q = module.query(hidden_states)
        k, v = module.key(states), module.value(states)
        q, k, v = (x.reshape(*x.shape[:2], *heads) for x in (q, k, v))
        out = _attend(q, k, v, module.scale, kind)
        out = module.proj_attn(out.reshape(*out.shape[:2], heads[0] * heads[1]))
        return module.dropout_layer(out, deterministic=deterministic)

    with nn.intercept_methods(intercept):
        yield
