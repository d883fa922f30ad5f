import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax import cli
from sjc_jax.diffusion import attention
from sjc_jax.diffusion import stable_diffusion as sd
from sjc_jax.diffusion.tiny import _UNET_CONFIG
from sjc_jax.sjc import SJCConfig


@pytest.fixture(scope="module")
def eps_components(tiny_sd_eps):
    return sd.load_components(tiny_sd_eps)


def _params(components, seed=0):
    key_c, key_u, key_n = jax.random.split(jax.random.key(seed), 3)
    return {
        "unet": components.unet_params,
        "cond": jax.random.normal(key_c, (4, 77, 32)),
        "uncond": jax.random.normal(key_u, (77, 32)),
        "negative": jax.random.normal(key_n, (77, 32)),
    }


def _inputs(seed=1):
    z = 2.0 * jax.random.normal(jax.random.key(seed), (2, 8, 8, 4))
    return z, jnp.array([0.7, 4.0]), jnp.array([1, 3], jnp.int32)


def test_xla_kernel_computes_diffusers_attention(eps_components):
    params, (z, sigma, label) = _params(eps_components), _inputs()
    ref = jax.jit(sd.make_apply(eps_components, attention="diffusers"))(params, z, sigma, label)
    out = jax.jit(sd.make_apply(eps_components, attention="xla"))(params, z, sigma, label)
    # Compare at the scale of the result.
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * scale)
    assert not np.array_equal(out, z)


def test_every_attention_layer_goes_through_the_kernel(eps_components, monkeypatch):
    seen = []
    original = jax.nn.dot_product_attention

    def record(q, k, v, **kwargs):
        seen.append((q.shape, k.shape, kwargs["implementation"]))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    params, (z, sigma, label) = _params(eps_components), _inputs()
    # Tracing alone calls the kernel once per layer: abstract evaluation, nothing compiled or run
    # (the values are checked by test_xla_kernel_computes_diffusers_attention).
    jax.eval_shape(sd.make_apply(eps_components, attention="xla"), params, z, sigma, label)
    # One level (no downsampling, 8 x 8 = 64 tokens): transformer blocks 1 down, 1 middle, 2 up
    # (layers_per_block + 1), each a self- and a cross-attention (77 text tokens).
    heads = _UNET_CONFIG["attention_head_dim"]
    dim = _UNET_CONFIG["block_out_channels"][0] // heads
    tokens = {q[1] for q, _, _ in seen}
    assert {k[1] for _, k, _ in seen} >= {77} and all(impl == "xla" for *_, impl in seen)
    assert all(q[0] == 2 and q[2:] == (heads, dim) for q, _, _ in seen)  # 2 views, unguided
    assert len(seen) == 2 * 4 and tokens == {64}


def test_diffusers_kind_intercepts_nothing(eps_components, monkeypatch):
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: pytest.fail("called"))
    params, (z, sigma, label) = _params(eps_components), _inputs()
    d = sd.make_apply(eps_components, attention="diffusers")(params, z, sigma, label)
    assert np.all(np.isfinite(d))


ON_GPU = jax.default_backend() in ("gpu", "cuda")


@pytest.mark.skipif(ON_GPU, reason="CPU resolution rules")
def test_resolve_on_a_cpu():
    assert attention.resolve_attention("auto", jnp.bfloat16) == "diffusers"
    assert attention.resolve_attention("auto", jnp.float32) == "diffusers"
    assert attention.resolve_attention("xla", jnp.float32) == "xla"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        attention.resolve_attention("cudnn", jnp.bfloat16)
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.resolve_attention("flash", jnp.bfloat16)
    with pytest.raises(ValueError, match="resolved"):
        with attention.attention_context("auto"):
            pass


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
def test_resolve_on_a_gpu():
    assert attention.resolve_attention("auto", jnp.bfloat16) == "cudnn"
    assert attention.resolve_attention("auto", jnp.float32) == "diffusers"


def _attention_f64(q, k, v, scale):
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, T, dim]
    logits = (q @ k.transpose(0, 1, 3, 2)) * scale
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3)


@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(
    "tokens, keys, dim", [(4096, 4096, 40), (4096, 77, 40), (256, 256, 160), (64, 77, 160)]
)
def test_cudnn_kernel_against_float64(tokens, keys, dim):
    """SD 1.5's attention shapes (8 heads; 64 x 64 latents down to 8 x 8; 77 text tokens)."""
    kq, kk, kv = jax.random.split(jax.random.key(tokens + keys + dim), 3)
    q = jax.random.normal(kq, (1, tokens, 8, dim), jnp.bfloat16)
    k = jax.random.normal(kk, (1, keys, 8, dim), jnp.bfloat16)
    v = jax.random.normal(kv, (1, keys, 8, dim), jnp.bfloat16)
    scale = dim**-0.5
    ref = _attention_f64(q, k, v, scale)
    for kind in ("cudnn", "xla"):
        out = np.asarray(jax.jit(attention._attend, static_argnums=(3, 4))(q, k, v, scale, kind))
        err = np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref)
        assert err < 1e-2, (kind, err)


def test_cudnn_falls_back_to_xla_where_refused(monkeypatch):
    calls = []

    def fake(q, k, v, *, scale, implementation):
        calls.append(implementation)
        if implementation == "cudnn":
            raise NotImplementedError("head dim")
        return jnp.zeros_like(q)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q = jnp.ones((1, 4, 2, 8))
    assert attention._attend(q, q, q, 0.5, "cudnn").shape == q.shape
    assert calls == ["cudnn", "xla"]


def test_config_and_command_line_refuse_bad_kinds(tiny_sd_eps, tmp_path, capsys):
    with pytest.raises(ValueError, match="attention must be one of"):
        SJCConfig.flat(attention="flash")
    argv = ["run", "--model", str(tiny_sd_eps), "--prompt", "a cup", "--attention", "cudnn"]
    argv += ["--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an NVIDIA GPU" in err[0]


def test_bench_step_with_a_tiny_unet():
    from sjc_jax.bench import bench_step

    config = {**_UNET_CONFIG, "sample_size": 8}
    result = bench_step("float32", 1, attention="xla", suffix="_xla", unet_config=config)
    assert set(result) == {"step_ms_float32_xla", "compile_s_float32_xla"}
    assert all(np.isfinite(v) and v > 0 for v in result.values())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--attention", "flash"], "attention must be one of"),
        (["--dtypes", "float16"], "dtype must be one of"),
        (["--parts", "unet"], "unknown bench parts"),
    ],
)
def test_bench_refuses_bad_values_in_one_line(flags, message, capsys):
    assert cli.main(["bench", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.skipif(ON_GPU, reason="CPU resolution rules")
def test_bench_times_each_dtype_and_kernel_once(monkeypatch):
    from sjc_jax import bench

    calls, reported = [], []

    def fake_step(dtype, repeats, *, attention, suffix):
        calls.append((dtype, attention))
        return {f"step_ms_{dtype}{suffix}": 1.0}

    monkeypatch.setattr(bench, "bench_step", fake_step)
    result = bench.run_bench(
        parts=("step",),
        dtypes=("bfloat16", "float32"),
        attention=("auto", "diffusers", "xla"),
        report=reported.append,
    )
    # On a CPU auto is diffusers' kernel for both dtypes: timed once as "auto".
    assert calls == [
        ("bfloat16", "auto"),
        ("bfloat16", "xla"),
        ("float32", "auto"),
        ("float32", "xla"),
    ]
    assert reported == [{k: v} for k, v in result.items() if k.startswith("step_ms")]
    assert set(result) >= {"step_ms_bfloat16", "step_ms_bfloat16_xla", "step_ms_float32_xla"}
