"""The learned known-answer model: a small conditional diffusers UNet in RGB pixel space.

A `FlaxUNet2DConditionModel` predicts epsilon or v (the scheduler config's ``prediction_type``)
for RGB images of the testbed's feature space (linear RGB, about [0, 1]) under a DDPM noise
schedule, conditioned by cross-attention on two
tokens of a learned table: a *scene* token (the "prompt": ``duck``, ``house``, ... or a grid
file's name) and a *view* token (front / side / back / overhead, the labels of view-augmented
prompting). Each table has one extra row, the null token, that condition dropout trains, so
classifier-free guidance works.

Conventions of this module:

* Images are channels-last ``[B, H, W, 3]``. The UNet sees them space-to-depth folded by
  ``patch`` (``[B, H/p, W/p, 3 p^2]``, a DiT-style patchify, 4x cheaper on a CPU at p = 2) and
  NCHW only inside its call; `patchify` / `unpatchify` are exact inverses.
* The condition of a run is the scene of its prompt. Denoiser labels (`sjc_jax.diffusion.
  denoiser`) select contexts ``[2, D]`` = (scene token, view token): view label v -> (scene,
  view v) (with view augmentation off, (scene, null view) for every v); `UNCONDITIONAL` and
  `NEGATIVE` -> (null scene, null view). The params of the denoiser have SD's structure
  ``{"unet", "cond" [4, 2, D], "uncond" [2, D], "negative" [2, D]}``, so the same
  `condition_table` picks them.
* ``D = z - sigma eps(z / sqrt(1 + sigma^2), t(sigma), c)`` with sigma snapped to the nearest
  table level, as for SD (a v-prediction converted to eps first,
  `sjc_jax.diffusion.denoiser.model_output_to_eps`); the UNet computes with the original's numerics
  (`sjc_jax.diffusion.numerics`), so the saved model is the same function in diffusers' torch
  UNet (tests/test_learned.py checks it).

On disk (a diffusers-format directory, `save_model` / `load_model`)::

    sjc_model.json                   the marker: format, patch, image size, background, scenes,
                                     training record (command, seed, steps, data)
    model_index.json                 diffusers' index of the components
    unet/config.json                 FlaxUNet2DConditionModel / UNet2DConditionModel config
    unet/diffusion_pytorch_model.safetensors   weights in torch layout (loadable by both)
    scheduler/scheduler_config.json  DDPMScheduler (linear betas 1e-4..0.02, prediction_type)
    tokens/tokens.safetensors        "scene" [S + 1, D], "view" [V + 1, D] (last row: null)
    tokens/vocabulary.json           {"scenes": [...], "views": [...]}

The UNet loads through `sjc_jax.diffusion.stable_diffusion`'s loader (diffusers' config,
``from_config``, the numpy torch -> Flax conversion and its cache), the same path as SD's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax.diffusion.attention import attention_context, resolve_attention
from sjc_jax.diffusion.denoiser import (
    ApplyFn,
    Denoiser,
    eps_to_denoised,
    model_output_to_eps,
    vp_coefficients,
)
from sjc_jax.diffusion.numerics import check_gelu, original_numerics
from sjc_jax.diffusion.schedule import sigma_to_timestep, sigmas_from_scheduler_config, snap_sigma
from sjc_jax.diffusion.weights import ModelLoadError

Array = jax.Array

MARKER = "sjc_model.json"
KIND = "sjc-learned"
FORMAT = 1
VIEW_TOKENS = ("front", "side", "back", "overhead")  # indexed by view label
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"

# DDPM's linear schedule: on [0, 1] RGB its levels t = 10..100 are sigma 0.045..0.34, about the
# testbed's (SD's table at the same t: 0.098..0.34).
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.39.0",
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "variance_type": "fixed_small",
    "trained_betas": None,
}

# What the model's output is (diffusers' names); the VE denoiser converts either to eps.
MODEL_PREDICTIONS = ("epsilon", "v_prediction")


def scheduler_config(prediction_type: str) -> dict[str, Any]:
    """The ``scheduler_config.json`` of a model predicting ``prediction_type``."""
    if prediction_type not in MODEL_PREDICTIONS:
        raise ValueError(
            f"prediction_type must be one of {MODEL_PREDICTIONS}, got {prediction_type!r}"
        )
    return {**SCHEDULER_CONFIG, "prediction_type": prediction_type}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The UNet's shape. Channels are multiples of 32 (diffusers' Flax GroupNorm has 32 groups).

    The defaults (measured on the project's 2-core CPU, batch 32 of 32 x 32 images, one
    optimiser step): patch 2, channels (64, 64, 64), cross-attention at the lowest level only,
    1.9 M params, 0.34 s; unpatched 32 x 32 with (32, 64, 64): 0.82 s; with attention at 16 x 16
    as well: 1.6 s.
    """

    image_size: int = 32
    patch: int = 2
    block_out_channels: tuple[int, ...] = (64, 64, 64)
    layers_per_block: int = 1
    attention_levels: int = 1  # cross-attention blocks at the lowest this many levels
    attention_head_dim: int = 8  # diffusers' name: the number of heads of each attention
    token_dim: int = 64

    def __post_init__(self):
        if self.image_size % self.patch or self.patch < 1:
            raise ValueError(f"patch {self.patch} must divide image_size {self.image_size}")
        levels = len(self.block_out_channels)
        if not levels or any(c % 32 for c in self.block_out_channels):
            raise ValueError(
                f"block_out_channels must be multiples of 32, got {self.block_out_channels}"
            )
        if not 1 <= self.attention_levels <= levels:
            raise ValueError(f"attention_levels must lie in [1, {levels}]")
        side = self.image_size // self.patch
        if side % (2 ** (levels - 1)):
            raise ValueError(
                f"{levels} levels need the folded side {side} to halve {levels - 1} times"
            )

    def unet_config(self) -> dict[str, Any]:
        """The diffusers UNet config (``config.json`` of ``unet/``)."""
        levels = len(self.block_out_channels)
        plain = levels - self.attention_levels
        channels = 3 * self.patch**2
        return {
            "sample_size": self.image_size // self.patch,
            "in_channels": channels,
            "out_channels": channels,
            "down_block_types": ["DownBlock2D"] * plain
            + ["CrossAttnDownBlock2D"] * self.attention_levels,
            "up_block_types": ["CrossAttnUpBlock2D"] * self.attention_levels
            + ["UpBlock2D"] * plain,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_head_dim,
            "cross_attention_dim": self.token_dim,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Architecture:
        values = dict(values)
        values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)


def patchify(x: Array, patch: int) -> Array:
    """Space-to-depth ``[B, H, W, C] -> [B, H/p, W/p, C p^2]`` (channel index (i p + j) C + c)."""
    if patch == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // patch, w // patch, patch * patch * c)


def unpatchify(x: Array, patch: int) -> Array:
    """The inverse of `patchify`."""
    if patch == 1:
        return x
    b, h, w, pc = x.shape
    c = pc // (patch * patch)
    x = x.reshape(b, h, w, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch, w * patch, c)


def make_unet(architecture: Architecture, dtype: Any = jnp.float32):
    """A stateless `FlaxUNet2DConditionModel` of ``architecture`` (params separate)."""
    from sjc_jax.diffusion.quiet import import_flax_models

    cls = import_flax_models()[0]
    return cls.from_config(architecture.unet_config(), dtype=dtype)


@functools.lru_cache(maxsize=8)
def _jitted_init(architecture: Architecture):
    """The UNet's init, compiled (a third of the time of running Flax's init op by op)."""
    return jax.jit(make_unet(architecture).init_weights)


def init_params(key: Array, architecture: Architecture, num_scenes: int) -> dict[str, Any]:
    """Fresh ``{"unet": ..., "tokens": {"scene" [S + 1, D], "view" [V + 1, D]}}``."""
    k_unet, k_scene, k_view = jax.random.split(key, 3)
    d = architecture.token_dim
    return {
        "unet": _jitted_init(architecture)(k_unet),
        "tokens": {
            "scene": jax.random.normal(k_scene, (num_scenes + 1, d), jnp.float32),
            "view": jax.random.normal(k_view, (len(VIEW_TOKENS) + 1, d), jnp.float32),
        },
    }


def unet_output(
    unet: Any,
    unet_params: Any,
    x: Array,
    timesteps: Array,
    context: Array,
    *,
    patch: int,
    dtype: Any = jnp.float32,
    gelu: str = "exact",
) -> Array:
    """The UNet's output ``[B, H, W, 3]`` float32 (eps or v) of VP inputs ``x [B, H, W, 3]``.

    ``timesteps [B]`` int, ``context [B, L, D]``; the same call trains and denoises.
    """
    folded = jnp.transpose(patchify(x, patch), (0, 3, 1, 2)).astype(dtype)
    with original_numerics(gelu):
        out = unet.apply({"params": unet_params}, folded, timesteps, context.astype(dtype)).sample
    return unpatchify(jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32), patch)


def token_context(tokens: dict[str, Array], scene: Array, view: Array) -> Array:
    """Contexts ``[B, 2, D]`` of scene ids ``[B]`` and view ids ``[B]`` (null = the last row)."""
    return jnp.stack([tokens["scene"][scene], tokens["view"][view]], axis=-2)


def conditioning(
    tokens: dict[str, Array], scene: int, *, view_augmentation: bool = True
) -> dict[str, Array]:
    """``{"cond": [4, 2, D] by view label, "uncond": [2, D], "negative": [2, D]}`` of a scene.

    Without view augmentation every label gets the null view token (the scene alone).
    """
    null_scene, null_view = tokens["scene"].shape[0] - 1, tokens["view"].shape[0] - 1
    views = np.arange(len(VIEW_TOKENS)) if view_augmentation else np.full(4, null_view)
    cond = token_context(tokens, jnp.full(4, scene), jnp.asarray(views))
    uncond = token_context(tokens, jnp.array([null_scene]), jnp.array([null_view]))[0]
    return {"cond": cond, "uncond": uncond, "negative": uncond}


def make_apply(
    unet: Any,
    sigmas: np.ndarray,
    *,
    patch: int,
    prediction_type: str = "epsilon",
    dtype: Any = jnp.float32,
    attention: str = "auto",
    gelu: str = "exact",
) -> ApplyFn:
    """The jittable VE denoiser ``(params, z [B, H, W, 3], sigma [B], label [B]) -> D``.

    ``params = {"unet", "cond", "uncond", "negative"}`` (module docstring); no guidance here.
    """
    from sjc_jax.diffusion.stable_diffusion import condition_table

    kernel = resolve_attention(attention, dtype)
    check_gelu(gelu)
    sigmas = np.asarray(sigmas)

    def apply(params: Any, z: Array, sigma: Array, label: Array) -> Array:
        z = jnp.asarray(z, jnp.float32)
        b = z.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
        sigma = snap_sigma(sigmas, sigma).astype(jnp.float32)
        context = condition_table(params, jnp.broadcast_to(jnp.asarray(label, jnp.int32), (b,)))
        x = z * vp_coefficients(sigma)[0][:, None, None, None]
        with attention_context(kernel):
            out = unet_output(
                unet,
                params["unet"],
                x,
                sigma_to_timestep(sigmas, sigma),
                context,
                patch=patch,
                dtype=dtype,
                gelu=gelu,
            )
        return eps_to_denoised(z, sigma, model_output_to_eps(out, x, sigma, prediction_type))

    return apply


# --- torch layout of the UNet's params -------------------------------------------------------

# Flax module names that are torch list entries (diffusers renames ``name.N`` to ``name_N``).
_LIST_MODULES = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "transformer_blocks",
    "to_out",
    "net",
)
_LIST_RE = re.compile(rf"^({'|'.join(_LIST_MODULES)})_(\d+)$")


def flax_to_torch(params: Any) -> dict[str, np.ndarray]:
    """The torch state dict (diffusers' ``UNet2DConditionModel`` names) of Flax UNet params.

    The inverse of diffusers' torch -> Flax rule: ``name_N`` -> ``name.N`` for list modules,
    conv kernels HWIO -> OIHW, linear kernels transposed, ``scale`` / ``embedding`` -> ``weight``.
    """
    from flax.traverse_util import flatten_dict

    state = {}
    for key, value in flatten_dict(params).items():
        value = np.asarray(value, np.float32)
        *path, leaf = key
        path = [_LIST_RE.sub(r"\1.\2", part) for part in path]
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            leaf = "weight"
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        state[".".join([*path, leaf])] = np.ascontiguousarray(value)
    return state


# --- the model directory ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LearnedModel:
    """A loaded model directory.

    Attributes:
      unet: the stateless Flax UNet (compute ``dtype``); unet_params its params.
      tokens: ``{"scene" [S + 1, D], "view" [V + 1, D]}`` float32.
      scenes: the scene vocabulary (token i = scenes[i]).
      architecture: patch, image size, channels.
      sigmas: ``[T]`` VE table of the scheduler config.
      prediction_type: what the UNet predicts (the scheduler config's ``prediction_type``).
      meta: the whole ``sjc_model.json`` (background, scene sources, training record).
      root: the directory.
    """

    unet: Any
    unet_params: Any
    tokens: dict[str, Array]
    scenes: tuple[str, ...]
    architecture: Architecture
    sigmas: np.ndarray
    meta: dict[str, Any]
    root: Path
    prediction_type: str = "epsilon"

    @property
    def background(self) -> np.ndarray:
        """The plain background colour ``[3]`` of the training renders."""
        return np.asarray(self.meta["background"], np.float32)

    def scene_index(self, prompt: str) -> int:
        """The token of ``prompt`` (a scene name); one line listing the scenes otherwise."""
        if prompt not in self.scenes:
            raise ValueError(
                f"model {str(self.root)!r} knows the scenes {', '.join(self.scenes)}; "
                f"--prompt {prompt!r} is none of them"
            )
        return self.scenes.index(prompt)


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory holding this kind's marker file."""
    marker = Path(path).expanduser() / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("kind") == KIND
    except (OSError, ValueError):
        return True  # ours, but unreadable: `load_model` says what is wrong


def save_model(
    path: str | os.PathLike,
    *,
    architecture: Architecture,
    params: dict[str, Any],
    scenes: Sequence[dict[str, Any]],
    background: Sequence[float],
    training: dict[str, Any],
    prediction_type: str = "epsilon",
) -> Path:
    """Write a model directory (module docstring) atomically: a sibling, then one rename.

    Args:
      path: the directory to create (an existing one is replaced only if it is a model dir).
      architecture: the UNet's shape.
      params: ``{"unet", "tokens"}`` as `init_params` (trained).
      scenes: one dict per scene token: ``name`` and ``source`` (built-in name or grid file),
        with ``sha256`` for files.
      background: the RGB of the training renders' plain background.
      training: the record of how the model was made (command, seed, steps, ...).
      prediction_type: what the UNet predicts, ``"epsilon"`` or ``"v_prediction"``.
    """
    from safetensors.numpy import save_file

    schedule = scheduler_config(prediction_type)
    path = Path(path)
    if path.exists() and not is_model_dir(path):
        raise ValueError(f"{path} exists and is not a model directory; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("unet", "scheduler", "tokens"):
        (tmp / sub).mkdir(parents=True)
    config = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.39.0",
        **architecture.unet_config(),
    }
    (tmp / "unet" / "config.json").write_text(json.dumps(config, indent=2))
    save_file(flax_to_torch(params["unet"]), tmp / "unet" / UNET_WEIGHTS)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule, indent=2))
    tokens = {k: np.asarray(v, np.float32) for k, v in params["tokens"].items()}
    save_file(tokens, tmp / "tokens" / "tokens.safetensors")
    vocabulary = {"scenes": [s["name"] for s in scenes], "views": list(VIEW_TOKENS)}
    (tmp / "tokens" / "vocabulary.json").write_text(json.dumps(vocabulary, indent=2))
    index = {
        "_class_name": "SJCLearnedPipeline",
        "_diffusers_version": "0.39.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    meta = {
        "kind": KIND,
        "format": FORMAT,
        "architecture": dataclasses.asdict(architecture),
        "background": [float(v) for v in background],
        "scenes": list(scenes),
        "training": training,
    }
    (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)
    return path


def _read_json(path: Path, root: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(
            f"model directory {str(root)!r} lacks {path.relative_to(root)}"
        ) from None
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"model directory {str(root)!r}: cannot read {path.name} ({err})"
        ) from None


def load_model(path: str | os.PathLike, *, dtype: str = "float32") -> LearnedModel:
    """Load a model directory written by `save_model` (UNet compute ``dtype``).

    Raises `ModelLoadError` (one line) for a missing or malformed part.
    """
    from safetensors.numpy import load_file

    from sjc_jax.diffusion.quiet import import_flax_models
    from sjc_jax.diffusion.stable_diffusion import _load_diffusers_model, _uncommitted

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    root = Path(path).expanduser()
    meta = _read_json(root / MARKER, root)
    if meta.get("kind") != KIND or meta.get("format") != FORMAT:
        raise ModelLoadError(
            f"model directory {str(root)!r} is kind {meta.get('kind')!r} format "
            f"{meta.get('format')!r}; this version reads {KIND!r} format {FORMAT}"
        )
    scheduler = _read_json(root / "scheduler" / "scheduler_config.json", root)
    vocabulary = _read_json(root / "tokens" / "vocabulary.json", root)
    try:
        architecture = Architecture.from_dict(meta["architecture"])
        sigmas = sigmas_from_scheduler_config(scheduler)
        prediction_type = scheduler.get("prediction_type", "epsilon")
        if prediction_type not in MODEL_PREDICTIONS:
            raise ValueError(
                f"prediction_type must be one of {MODEL_PREDICTIONS}, got {prediction_type!r}"
            )
        tokens = load_file(root / "tokens" / "tokens.safetensors")
        scenes = tuple(str(s) for s in vocabulary["scenes"])
        if tokens["scene"].shape[0] != len(scenes) + 1:
            raise ValueError(f"{len(scenes)} scenes but {tokens['scene'].shape[0]} scene tokens")
        if not (root / "unet" / UNET_WEIGHTS).is_file():
            raise FileNotFoundError(f"unet/{UNET_WEIGHTS}")
        unet, unet_params = _load_diffusers_model(
            import_flax_models()[0], str(root), root, "unet", DTYPES[dtype]
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(
            f"cannot load model {str(root)!r}: {type(err).__name__}: {err}"
        ) from err
    return LearnedModel(
        unet=unet,
        unet_params=_uncommitted(unet_params, DTYPES[dtype]),
        tokens={k: jnp.asarray(v) for k, v in tokens.items()},
        scenes=scenes,
        architecture=architecture,
        sigmas=sigmas,
        meta=meta,
        root=root,
        prediction_type=prediction_type,
    )


def _clip_rgb(images: Array) -> Array:
    return jnp.clip(images, 0.0, 1.0)


def make_denoiser(
    model: LearnedModel,
    prompt: str,
    *,
    view_augmentation: bool = True,
    dtype: str = "float32",
    attention: str = "auto",
    gelu: str = "exact",
) -> Denoiser:
    """The `Denoiser` of ``model`` for the scene ``prompt`` (module docstring)."""
    scene = model.scene_index(prompt)
    params = {
        "unet": model.unet_params,
        **conditioning(model.tokens, scene, view_augmentation=view_augmentation),
    }
    return Denoiser(
        apply=make_apply(
            model.unet,
            model.sigmas,
            patch=model.architecture.patch,
            prediction_type=model.prediction_type,
            dtype=DTYPES[dtype],
            attention=attention,
            gelu=gelu,
        ),
        params=params,
        sigmas=model.sigmas,
        channels=3,
        resolution=model.architecture.image_size,
        feature_space="rgb",
        decode=_clip_rgb,
        name=str(model.root),
    )
