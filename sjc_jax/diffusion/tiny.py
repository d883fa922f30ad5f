"""A tiny random Stable Diffusion pipeline on disk, in diffusers format, for tests and smoke runs.

``write_tiny_pipeline(path)`` writes ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` and ``model_index.json`` with ``save_pretrained``, so it loads through the same
``from_pretrained`` path as real weights: Flax msgpack weights by default, PyTorch safetensors
only with ``torch_only=True`` (needs torch). The models are random (their outputs mean nothing)
and small enough to load and run in about a second on a CPU. Command line::

    python -m sjc_jax.diffusion.tiny OUT_DIR [--torch-only] [--prediction-type v_prediction]
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

# One level of 32 channels (the Flax UNet and VAE hard-code GroupNorm(32)): compiles in ~1 s.
_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D"],
    "block_out_channels": [32],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
}
_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "scaling_factor": 0.18215,
}
_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
}
_SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def _write_tokenizer(path: Path) -> None:
    """A CLIP BPE tokenizer over single characters (any lowercase ASCII text tokenizes)."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ".,'!?-"
    merges = [
        ("t", "h"),
        ("th", "e</w>"),
        ("o", "f</w>"),
        ("v", "i"),
        ("vi", "e"),
        ("vie", "w</w>"),
    ]
    tokens = [*_SPECIAL, *chars, *(f"{c}</w>" for c in chars), *("".join(m) for m in merges)]
    raw = path / "_raw"
    raw.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = raw / "vocab.json", raw / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        unk_token="<unk>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(path)
    vocab_file.unlink()
    merges_file.unlink()
    raw.rmdir()


def _text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, **_TEXT_CONFIG
    )


def _scheduler_config(prediction_type: str, torch_only: bool) -> dict:
    return {
        "_class_name": "PNDMScheduler" if torch_only else "FlaxPNDMScheduler",
        "_diffusers_version": "0.39.0",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }


def _random_params(shapes, seed: int):
    """Random weights for a pytree of shapes, without running the (slow to compile) Flax init.

    Kernels and embeddings ~ N(0, 1 / fan_in), biases 0, norm scales 1: outputs stay O(1).
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _write_flax_models(path: Path, seed: int, sample_size: int, vocab_size: int) -> None:
    import jax

    from sjc_jax.diffusion.quiet import import_flax_models

    FlaxUNet2DConditionModel, FlaxAutoencoderKL, FlaxCLIPTextModel = import_flax_models()

    key = jax.random.key(0)
    unet = FlaxUNet2DConditionModel(sample_size=sample_size, **_UNET_CONFIG)
    params = _random_params(jax.eval_shape(unet.init_weights, key), seed)
    unet.save_pretrained(path / "unet", params=params)
    vae = FlaxAutoencoderKL(sample_size=2 * sample_size, **_VAE_CONFIG)
    params = _random_params(jax.eval_shape(vae.init_weights, key), seed + 1)
    vae.save_pretrained(path / "vae", params=params)
    text = FlaxCLIPTextModel(_text_config(vocab_size), _do_init=False)
    shapes = jax.eval_shape(lambda k: text.init_weights(k, text.input_shape), key)
    text.save_pretrained(path / "text_encoder", params=_random_params(shapes, seed + 2))


def _write_torch_models(path: Path, seed: int, sample_size: int, vocab_size: int) -> None:
    try:
        import torch
    except ImportError as err:
        raise ValueError("torch_only=True needs torch: pip install torch") from err
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    UNet2DConditionModel(sample_size=sample_size, **_UNET_CONFIG).save_pretrained(
        path / "unet", safe_serialization=True
    )
    AutoencoderKL(sample_size=2 * sample_size, **_VAE_CONFIG).save_pretrained(
        path / "vae", safe_serialization=True
    )
    CLIPTextModel(_text_config(vocab_size)).save_pretrained(
        path / "text_encoder", safe_serialization=True
    )


def write_tiny_pipeline(
    path: str | Path,
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    torch_only: bool = False,
    sample_size: int = 8,
) -> Path:
    """Write a tiny random diffusers-format SD pipeline to ``path`` (created); returns the path.

    ``sample_size`` is the UNet's latent size (the VAE decodes it to twice that in pixels);
    ``prediction_type`` goes into the scheduler config (``"epsilon"`` or ``"v_prediction"``).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(path / "tokenizer")
    from transformers import CLIPTokenizer

    vocab_size = len(CLIPTokenizer.from_pretrained(path / "tokenizer"))
    writer = _write_torch_models if torch_only else _write_flax_models
    writer(path, seed, sample_size, vocab_size)
    (path / "scheduler").mkdir(exist_ok=True)
    scheduler = _scheduler_config(prediction_type, torch_only)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    prefix = "" if torch_only else "Flax"
    index = {
        "_class_name": f"{prefix}StableDiffusionPipeline",
        "_diffusers_version": "0.39.0",
        "unet": ["diffusers", f"{prefix}UNet2DConditionModel"],
        "vae": ["diffusers", f"{prefix}AutoencoderKL"],
        "text_encoder": ["transformers", f"{prefix}CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler["_class_name"]],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the pipeline into")
    parser.add_argument("--torch-only", action="store_true", help="PyTorch safetensors only")
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-size", type=int, default=8, help="latent size of the UNet")
    args = parser.parse_args(argv)
    from sjc_jax.diffusion.quiet import silence_flax_deprecations

    silence_flax_deprecations()
    out = write_tiny_pipeline(
        args.out_dir,
        seed=args.seed,
        prediction_type=args.prediction_type,
        torch_only=args.torch_only,
        sample_size=args.sample_size,
    )
    print(out)


if __name__ == "__main__":
    main()
