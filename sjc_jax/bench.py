"""``python -m sjc_jax bench``: renderer and SJC-step timings, printed as one JSON object.

* ``render_vjp_ms``: one SJC-sized view (100^3 grid, 4 channels, 64 x 64, fov 60, radius 1.5,
  SJC's initial grid) rendered and its VJP taken; median of ``repeats`` after a warm-up.
  ``samples_per_s`` counts the view's N x k samples (the original's work) per second of it.
* ``step_ms_float32`` / ``step_ms_bfloat16``: one whole SJC step (camera, render, UNet with
  classifier-free guidance at batch 2, VJP, Adamax update) with a random-initialised UNet of
  Stable Diffusion 1.5's shape at 64 x 64 latents (no weights needed), with the default
  attention kernel (``attention="auto"``); ``compile_s_*`` apart.
* ``--dtypes`` / ``--attention`` (comma lists) choose the steps timed: every pair, keys suffixed
  by the kernel unless it is ``auto`` (``step_ms_bfloat16_xla``; `sjc_jax.diffusion.attention`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax.camera import make_camera, sjc_eye
from sjc_jax.diffusion.attention import resolve_attention
from sjc_jax.grid import init_grid
from sjc_jax.render import RenderConfig, render_view

# Stable Diffusion 1.5's UNet (diffusers' config of runwayml/stable-diffusion-v1-5).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)


def _time(fn, *args, repeats: int) -> tuple[float, float]:
    """(compile + first run seconds, median seconds of ``repeats`` runs)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def bench_view():
    """The timed view: ``(RenderConfig(), SJC's initial 100^3 x 4 grid, a 64 x 64 camera)``."""
    grid = init_grid(jax.random.key(0), resolution=100, channels=4)
    eye = sjc_eye(jnp.deg2rad(30.0), jnp.deg2rad(60.0), 1.5)
    return RenderConfig(), grid, make_camera(eye, fov_x_deg=60.0, height=64, width=64)


def bench_render(repeats: int = 5) -> dict[str, Any]:
    config, grid, camera = bench_view()

    @jax.jit
    def render_vjp(grid):
        view, vjp_fn = jax.vjp(lambda g: render_view(g, camera, config), grid)
        cotangent = jax.tree_util.tree_map(jnp.ones_like, view)
        return view.image, vjp_fn(cotangent)

    _, seconds = _time(render_vjp, grid, repeats=repeats)
    k = int(jax.jit(lambda g: render_view(g, camera, config).num_samples)(grid))
    return {
        "render_vjp_ms": 1e3 * seconds,
        "render_samples_k": k,
        "samples_per_s": 64 * 64 * k / seconds,
    }


def _random_params(shapes: Any, dtype: Any) -> Any:
    """Random weights of the given shapes: kernels ~ N(0, 1 / fan_in), norm scales 1, biases 0.

    Cheaper than compiling the model's own initialiser (minutes for SD's UNet on a GPU, where
    XLA autotunes it), and as good for timing: same shapes, finite activations. One normal
    vector is drawn and cut into the kernels on the host: a draw per leaf compiled a sampler
    per distinct shape (26 s of CPU for the tests' tiny UNet, 0.6 s this way).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    sizes = [int(np.prod(leaf.shape)) if len(leaf.shape) >= 2 else 0 for _, leaf in leaves]
    flat = np.asarray(jax.random.normal(jax.random.key(0), (max(sum(sizes), 1),), jnp.float32))
    out, start = [], 0
    for (path, leaf), size in zip(leaves, sizes, strict=True):
        if size:
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = flat[start : start + size].reshape(leaf.shape) * np.float32(fan_in**-0.5)
            start += size
        else:
            name = str(getattr(path[-1], "key", path[-1]))
            value = np.full(leaf.shape, 1.0 if name == "scale" else 0.0, np.float32)
        out.append(jnp.asarray(value, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _sd15_denoiser(dtype: str, attention: str = "auto", unet_config: dict | None = None):
    """A `Denoiser` around a random SD-1.5-shaped Flax UNet (4 view embeddings; the step's SJC
    estimator guides it at scale 100 with one UNet call of batch 2).

    ``unet_config`` replaces `SD15_UNET` (tests use a tiny one).
    """
    from sjc_jax.diffusion.quiet import import_flax_models

    FlaxUNet2DConditionModel = import_flax_models()[0]
    from sjc_jax.diffusion.denoiser import Denoiser
    from sjc_jax.diffusion.schedule import ddpm_sigmas
    from sjc_jax.diffusion.stable_diffusion import DTYPES, SDComponents, make_apply

    compute = DTYPES[dtype]
    unet_config = SD15_UNET if unet_config is None else unet_config
    unet = FlaxUNet2DConditionModel(**unet_config, dtype=compute)
    params = _random_params(jax.eval_shape(unet.init_weights, jax.random.key(0)), compute)
    components = SDComponents(
        unet=unet,
        unet_params=params,
        vae=None,
        vae_params=None,
        text_encoder=None,
        text_params=None,
        tokenizer=None,
        sigmas=ddpm_sigmas(),
        prediction_type="epsilon",
        scaling_factor=0.18215,
        dtype=compute,
        name=f"random-sd15-{dtype}",
    )
    key_c, key_u, key_n = jax.random.split(jax.random.key(1), 3)
    width = unet_config["cross_attention_dim"]
    cond = {
        "unet": params,
        "cond": jax.random.normal(key_c, (4, 77, width)),
        "uncond": jax.random.normal(key_u, (77, width)),
        "negative": jax.random.normal(key_n, (77, width)),
    }
    return Denoiser(
        apply=make_apply(components, attention=attention),
        params=cond,
        sigmas=ddpm_sigmas(),
        channels=unet_config["out_channels"],
        resolution=unet_config["sample_size"],
        feature_space="sd-latent",
        decode=lambda x: x,
        name=components.name,
    )


def bench_step(
    dtype: str,
    repeats: int = 5,
    *,
    attention: str = "auto",
    suffix: str = "",
    unet_config: dict | None = None,
) -> dict[str, Any]:
    """``step_ms_<dtype><suffix>`` (median) and ``compile_s_...`` of one SJC step."""
    from sjc_jax.sjc import SJCConfig, init_state, make_step

    denoiser = _sd15_denoiser(dtype, attention, unet_config)
    config = SJCConfig.flat(model="bench", prompt="bench", dtype=dtype, attention=attention)
    step = make_step(config, denoiser)
    state = init_state(config, denoiser.channels)
    start = time.perf_counter()
    state, metrics = step(state, denoiser.params)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, denoiser.params)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    if not np.isfinite(float(metrics["score_norm"])):
        raise ValueError(f"bench step produced a non-finite score ({dtype}, {attention})")
    name = f"{dtype}{suffix}"
    return {f"step_ms_{name}": 1e3 * statistics.median(times), f"compile_s_{name}": compile_s}


def run_bench(
    *,
    repeats: int = 5,
    parts=("render", "step"),
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    attention: tuple[str, ...] = ("auto",),
    report=lambda part: None,
) -> dict[str, Any]:
    """All timings as one JSON-serialisable dict.

    The step is timed for every ``dtypes`` x ``attention`` pair, in that order (a pair whose
    kernel resolves to one timed already is skipped); a kind other than ``"auto"`` suffixes its
    keys (``step_ms_bfloat16_xla``). ``report`` receives each part's dict as soon as it is done.
    """
    from sjc_jax.diffusion.stable_diffusion import DTYPES

    unknown = set(parts) - {"render", "step"}
    if unknown:
        raise ValueError(f"unknown bench parts {sorted(unknown)}; choose from render, step")
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        for kind in attention:
            resolve_attention(kind, DTYPES[dtype])
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "repeats": repeats,
    }
    if "render" in parts:
        part = bench_render(repeats)
        report(part)
        result.update(part)
    if "step" in parts:
        for dtype in dtypes:
            timed = set()
            for kind in attention:
                kernel = resolve_attention(kind, DTYPES[dtype])
                if kernel in timed:
                    continue  # e.g. auto is diffusers' kernel for float32: timed already
                timed.add(kernel)
                suffix = "" if kind == "auto" else f"_{kind}"
                part = bench_step(dtype, repeats, attention=kind, suffix=suffix)
                report(part)
                result.update(part)
    return result
