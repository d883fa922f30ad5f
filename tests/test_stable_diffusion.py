import dataclasses
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import constants

from sjc_jax.diffusion import schedule
from sjc_jax.diffusion import stable_diffusion as sd
from sjc_jax.prompts import view_prompts

PROMPT = "a hamburger"


@pytest.fixture(scope="module")
def eps_components(tiny_sd_eps):
    return sd.load_components(tiny_sd_eps)


def _inputs(b=2, size=8, seed=0):
    z = jax.random.normal(jax.random.key(seed), (b, size, size, 4))
    sigma = schedule.snap_sigma(schedule.ddpm_sigmas(), jnp.array([0.5, 3.0][:b]))  # table levels
    return z, sigma, jnp.array([0, 3][:b], jnp.int32)


def test_load_eps_pipeline_and_denoise(tiny_sd_eps):
    den = sd.load_stable_diffusion(tiny_sd_eps, prompt=PROMPT)
    assert (den.channels, den.resolution, den.feature_space) == (4, 8, "sd-latent")
    np.testing.assert_array_equal(den.sigmas, schedule.ddpm_sigmas())
    assert den.params["cond"].shape == (4, 77, 32) and den.params["uncond"].shape == (77, 32)
    assert den.params["negative"].shape == (77, 32)
    # Not committed to the CPU by the Flax loaders: the jitted step places them on its device.
    assert not any(leaf.committed for leaf in jax.tree_util.tree_leaves(den.params))
    z, sigma, label = _inputs()
    d = jax.jit(den.apply)(den.params, z, sigma, label)
    assert d.shape == (2, 8, 8, 4) and d.dtype == jnp.float32
    assert np.all(np.isfinite(d))
    rgb = den.decode(z)
    assert rgb.shape == (2, 16, 16, 3) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1


def test_embeddings_follow_the_view_texts(eps_components):
    cond = sd.view_conditioning(eps_components, PROMPT, negative_prompt="blurry")
    texts = (*view_prompts(PROMPT), "", "blurry")
    direct = sd.encode_prompts(eps_components, texts)
    np.testing.assert_allclose(cond["cond"], direct[:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cond["uncond"], direct[4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cond["negative"], direct[5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(cond["cond"][0], cond["cond"][3])
    same = sd.view_conditioning(eps_components, PROMPT, view_augmentation=False)["cond"]
    np.testing.assert_array_equal(same[0], same[3])
    # Duplicated texts are encoded once and gathered back in order.
    dup = sd.encode_prompts(eps_components, ["b", "a", "b"])
    np.testing.assert_array_equal(dup[0], dup[2])


class _FakeUNet:
    """Stands in for the Flax UNet: eps = first context entry; records each call."""

    def __init__(self):
        self.calls = []

    def apply(self, variables, x, t, context):
        self.calls.append((x.shape, x.dtype, t.shape, context.dtype))
        assert x.shape[1] == 4  # NCHW inside the wrapper
        return SimpleNamespace(sample=jnp.zeros_like(x) + context[:, 0, 0][:, None, None, None])


def _fake_params(rng):
    return {
        "unet": None,
        "cond": jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32),
        "uncond": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
        "negative": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
    }


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_picks_each_label_condition(eps_components, dtype):
    """Labels 0..3 take the view embeddings, -1 the empty prompt, -2 the negative prompt."""
    fake = _FakeUNet()
    comps = dataclasses.replace(eps_components, unet=fake, dtype=dtype)
    params = _fake_params(np.random.default_rng(0))
    z = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
    sigma = schedule.snap_sigma(schedule.ddpm_sigmas(), jnp.array([0.5, 3.0, 1.0, 2.0]))
    label = jnp.array([0, 3, -1, -2], jnp.int32)
    d = jax.jit(sd.make_apply(comps))(params, z, sigma, label)
    assert fake.calls == [((4, 4, 8, 8), dtype, (4,), dtype)]
    q = lambda v: np.asarray(jnp.asarray(v, dtype), np.float64)  # what the UNet saw
    rows = [params["cond"][0], params["cond"][3], params["uncond"], params["negative"]]
    eps = np.array([q(r[0, 0]) for r in rows])
    expected = np.asarray(z) - np.asarray(sigma)[:, None, None, None] * eps[:, None, None, None]
    assert d.dtype == jnp.float32
    np.testing.assert_allclose(d, expected, rtol=1e-5, atol=1e-4)


def test_guidance_is_one_unet_call_of_batch_2b(eps_components):
    """The SJC estimator's CFG through SD: one UNet call of 2B, eps_u + s (eps_c - eps_u)."""
    from sjc_jax import estimators
    from sjc_jax.diffusion.denoiser import Denoiser

    fake = _FakeUNet()
    comps = dataclasses.replace(eps_components, unet=fake)
    params = _fake_params(np.random.default_rng(1))
    den = Denoiser(sd.make_apply(comps), params, comps.sigmas, 4, 8, "sd-latent", None)
    z, sigma, label = _inputs()
    d = estimators.guided(den, params, z[None], sigma, label, 100.0)[0]
    assert [c[0] for c in fake.calls] == [(4, 4, 8, 8)]
    eps_u = np.float64(params["uncond"][0, 0])
    eps_c = np.asarray(params["cond"][np.asarray(label), 0, 0], np.float64)
    eps = eps_u + 100.0 * (eps_c - eps_u)
    expected = np.asarray(z) - np.asarray(sigma)[:, None, None, None] * eps[:, None, None, None]
    np.testing.assert_allclose(d, expected, rtol=1e-4, atol=1e-3)


def test_apply_snaps_sigma_to_the_nearest_timestep(eps_components):
    seen = []

    class RecordT(_FakeUNet):
        def apply(self, variables, x, t, context):
            seen.append(np.asarray(t))
            return super().apply(variables, x, t, context)

    comps = dataclasses.replace(eps_components, unet=RecordT())
    params = _fake_params(np.random.default_rng(2))
    s = schedule.ddpm_sigmas()
    z, _, label = _inputs()
    sd.make_apply(comps)(params, z, jnp.array([s[10] * 1.001, s[969]]), label)
    np.testing.assert_array_equal(seen[0], [10, 969])


def test_v_prediction_is_converted(tiny_sd_eps, tiny_sd_v):
    """Same weights read as eps- and as v-model: D_v follows from D_eps by the VP algebra."""
    den_e = sd.load_stable_diffusion(tiny_sd_eps, prompt=PROMPT)
    den_v = sd.load_stable_diffusion(tiny_sd_v, prompt=PROMPT)
    z, sigma, label = _inputs()
    both = jax.jit(lambda p, q: (den_e.apply(p, z, sigma, label), den_v.apply(q, z, sigma, label)))
    d_e, d_v = (np.asarray(x, np.float64) for x in both(den_e.params, den_v.params))
    sg = np.asarray(sigma, np.float64)[:, None, None, None]
    out = (np.asarray(z) - d_e) / sg  # the network output
    a = 1 / np.sqrt(1 + sg**2)
    eps_v = sg * a * (a * np.asarray(z)) + a * out  # eps = s x + a v, x = a z
    np.testing.assert_allclose(d_v, np.asarray(z) - sg * eps_v, rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(d_v))


def test_bfloat16_runs_and_returns_float32(tiny_sd_eps):
    den = sd.load_stable_diffusion(tiny_sd_eps, prompt=PROMPT, dtype="bfloat16")
    leaves = jax.tree_util.tree_leaves(den.params["unet"])
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    z, sigma, label = _inputs()
    d = jax.jit(den.apply)(den.params, z, sigma, label)
    assert d.shape == (2, 8, 8, 4) and d.dtype == jnp.float32 and np.all(np.isfinite(d))


def test_torch_only_pipeline_matches_torch(tiny_sd_torch):
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    from sjc_jax import estimators

    den = sd.load_stable_diffusion(tiny_sd_torch, prompt=PROMPT)
    z, sigma, label = _inputs()
    guided = jax.jit(lambda p: estimators.guided(den, p, z[None], sigma, label, 3.0)[0])
    d = np.asarray(guided(den.params), np.float64)
    assert d.shape == (2, 8, 8, 4) and np.all(np.isfinite(d))
    # Reference: the PyTorch UNet itself on the same inputs and embeddings.
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_torch / "unet").eval()
    sg = np.asarray(sigma, np.float64)[:, None, None, None]
    x = np.asarray(z, np.float64) / np.sqrt(1 + sg**2)
    t = np.asarray(schedule.sigma_to_timestep(den.sigmas, sigma))
    ctx = np.concatenate([np.broadcast_to(den.params["uncond"], (2, 77, 32)),
                          np.asarray(den.params["cond"])[np.asarray(label)]])  # fmt: skip
    with torch.no_grad():
        out = unet(
            torch.tensor(np.concatenate([x, x]).transpose(0, 3, 1, 2), dtype=torch.float32),
            torch.tensor(np.concatenate([t, t])),
            encoder_hidden_states=torch.tensor(ctx, dtype=torch.float32),
        ).sample.numpy()
    eps = out.transpose(0, 2, 3, 1).astype(np.float64)
    eps = eps[:2] + 3.0 * (eps[2:] - eps[:2])
    np.testing.assert_allclose(d, np.asarray(z) - sg * eps, rtol=1e-3, atol=1e-3)
    rgb = den.decode(z)
    assert rgb.shape == (2, 16, 16, 3) and np.all(np.isfinite(rgb))


def _isolated_hub(monkeypatch, tmp_path, offline=True):
    """An empty hub cache; offline, or online against a closed local port (no network)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "unreachable"])
def test_unknown_model_gives_one_line(monkeypatch, tmp_path, offline):
    _isolated_hub(monkeypatch, tmp_path, offline)
    with pytest.raises(sd.ModelLoadError) as info:
        sd.load_stable_diffusion("nobody/no-such-model", prompt=PROMPT)
    message = str(info.value)
    assert "\n" not in message
    assert "'nobody/no-such-model'" in message and "--model" in message
    assert "local diffusers-format directory" in message
    assert ("HF_HUB_OFFLINE=1" in message) == offline


def test_missing_local_directory(monkeypatch, tmp_path):
    _isolated_hub(monkeypatch, tmp_path)
    with pytest.raises(sd.ModelLoadError, match="is not a directory.*--model") as info:
        sd.load_components(str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("remove", "named"),
    [
        ("vae", "vae/"),
        ("scheduler", "scheduler/"),
        ("tokenizer", "tokenizer/"),
        ("unet/diffusion_flax_model.msgpack", "weights in unet/"),
        ("text_encoder/config.json", "text_encoder/config.json"),
    ],
)
def test_missing_component_is_named(tiny_sd_eps, tmp_path, remove, named):
    root = shutil.copytree(tiny_sd_eps, tmp_path / "pipe")
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(sd.ModelLoadError, match=named) as info:
        sd.load_components(root)
    assert "\n" not in str(info.value)


def test_bad_arguments(tiny_sd_eps):
    with pytest.raises(ValueError, match="prompt is empty"):
        sd.load_stable_diffusion(tiny_sd_eps, prompt="   ")
    with pytest.raises(ValueError, match="dtype"):
        sd.load_components(tiny_sd_eps, dtype="float16")


def test_latent_to_rgb_approx():
    lat = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
    rgb = sd.latent_to_rgb_approx(lat)
    expected = np.clip(lat @ sd.SD_V1_LATENT_RGB / 2 + 0.5, 0, 1)
    assert rgb.shape == (2, 3, 5, 3)
    np.testing.assert_allclose(rgb, expected, rtol=1e-6, atol=1e-6)


def test_hub_id_loads_from_the_offline_cache(tiny_sd_eps, monkeypatch, tmp_path):
    """A hub id found in the huggingface_hub cache (HF_HOME) loads with HF_HUB_OFFLINE=1."""
    _isolated_hub(monkeypatch, tmp_path)
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny--sd"
    shutil.copytree(tiny_sd_eps, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    comps = sd.load_components("tiny/sd")
    assert comps.name == "tiny/sd" and comps.prediction_type == "epsilon"
    assert sd.resolve_model_dir("tiny/sd") == repo / "snapshots" / commit
