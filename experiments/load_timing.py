"""Time loading a PyTorch-safetensors pipeline without torch: first (convert) vs second (cache).

    PYTHONPATH=. python experiments/load_timing.py [--size tiny|sd15] [--dir DIR]

Writes a random pipeline with PyTorch safetensors only (``tiny``: `sjc_jax.diffusion.tiny`;
``sd15``: SD 1.5's UNet, VAE and CLIP ViT-L text encoder shapes, 1.07 G params, 4.3 GB; needs
torch to write, about 10 GB of memory to load), then loads it twice, each time in a fresh
process where torch cannot be imported, into an empty converted-params cache: the first load
converts and caches, the second reads the cache. Prints a markdown table of
`load_components` seconds (and of the whole process, imports included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# SD 1.5's configs (diffusers' unet/, vae/ and text_encoder/ config.json).
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
    vocab_size=49408,
)

_LOAD = """
import sys, time, json
sys.modules["torch"] = None  # not installed, as far as this process can tell
start = time.perf_counter()
from sjc_jax.diffusion import stable_diffusion as sd
imported = time.perf_counter()
components = sd.load_components(sys.argv[1])
import jax
jax.block_until_ready(components.unet_params)
done = time.perf_counter()
print(json.dumps({"load_s": done - imported, "process_s": done - start}))
"""


def write_sd15(path: Path) -> Path:
    """A random SD-1.5-shaped pipeline with PyTorch safetensors only (torch initialisers)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sjc_jax.bench import SD15_UNET
    from sjc_jax.diffusion import tiny

    tiny.write_tiny_pipeline(path, torch_only=True)  # tokenizer, scheduler, index; replaced below
    torch.manual_seed(0)
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in SD15_UNET.items()}
    UNet2DConditionModel(**unet).save_pretrained(path / "unet", safe_serialization=True)
    AutoencoderKL(**SD15_VAE).save_pretrained(path / "vae", safe_serialization=True)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, **SD15_TEXT)
    CLIPTextModel(config).save_pretrained(path / "text_encoder", safe_serialization=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--dir", type=Path, default=None, help="keep the pipeline here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = args.dir or Path(tmp) / "pipeline"
        if not (pipeline / "model_index.json").exists():
            if args.size == "tiny":
                from sjc_jax.diffusion.tiny import write_tiny_pipeline

                write_tiny_pipeline(pipeline, torch_only=True)
            else:
                write_sd15(pipeline)
        size = sum(f.stat().st_size for f in pipeline.rglob("*.safetensors")) / 1e9
        env = {**os.environ, "SJC_JAX_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(ROOT)}
        rows = []
        for which in ("first (convert + cache)", "second (cache)"):
            out = subprocess.run(
                [sys.executable, "-c", _LOAD, str(pipeline)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append((which, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"| {args.size} pipeline ({size:.2f} GB safetensors) | load_components | process |")
    print("| --- | --- | --- |")
    for which, t in rows:
        print(f"| {which} | {t['load_s']:.1f} s | {t['process_s']:.1f} s |")


if __name__ == "__main__":
    main()
