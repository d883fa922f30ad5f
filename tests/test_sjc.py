"""The SJC step: the chained gradient, the optimiser, one compilation, reproducibility."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sjc_jax import losses, sjc
from sjc_jax.camera import generate_rays, sample_training_cameras
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.diffusion.schedule import ddpm_sigmas
from sjc_jax.render import intersect_rays, render_rays, step_size, view_sample_count

SIZE = 8


def toy_denoiser(apply=None) -> Denoiser:
    """D(z) = 0.5 z + 0.2 label: cheap, label-dependent, and not an identity."""

    def default_apply(params, z, sigma, label):
        return params["a"] * z + 0.2 * label[:, None, None, None].astype(z.dtype)

    return Denoiser(
        apply=apply or default_apply,
        params={"a": jnp.float32(0.5)},
        sigmas=ddpm_sigmas(),
        channels=3,
        resolution=SIZE,
        feature_space="rgb",
        decode=lambda x: jnp.clip(x, 0, 1),
        name="toy",
    )


def small_config(**kw) -> sjc.SJCConfig:
    base = dict(
        grid_resolution=6, steps=10, emptiness_weight=5.0, center_depth_weight=0.5, views_per_step=2
    )
    return sjc.SJCConfig(**{**base, **kw})


def test_step_equals_explicit_chain_rule():
    """One step's update equals Adamax applied to -J^T g + grad(reg), computed independently
    with jax.grad of the surrogate sum(-g * y) + reg over the same cameras, sigma and noise."""
    config = small_config()
    den = toy_denoiser()
    state = sjc.init_state(config, 3)
    grid0 = jax.tree_util.tree_map(jnp.array, state.grid)
    key = jax.random.wrap_key_data(jnp.array(state.key))  # the step donates the state
    new_state, _ = sjc.make_step(config, den)(state, den.params)

    key_cam, key_sigma, key_noise, _ = jax.random.split(key, 4)
    cams, labels = sample_training_cameras(key_cam, 2, height=SIZE, width=SIZE)
    o, d = jax.vmap(generate_rays)(cams)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    t0, t1 = intersect_rays(o, d)
    sigma = ddpm_sigmas()[np.asarray(jax.random.randint(key_sigma, (2,), 10, 970))]
    noise = jax.random.normal(key_noise, (1, 2, SIZE, SIZE, 3))[0]
    rc = config.render_config()
    k = view_sample_count(t0.reshape(2, -1), t1.reshape(2, -1), step_size(rc, (6, 6, 6)))

    def surrogate(grid):
        out = render_rays(grid, o, d, t0, t1, rc)
        y = out.features.reshape(2, SIZE, SIZE, 3)
        z = y + sigma[:, None, None, None] * noise
        dn = 0.5 * z + 0.2 * labels[:, None, None, None]
        g = jax.lax.stop_gradient((dn - y) / sigma[:, None, None, None])
        w = out.weights.reshape(2, SIZE * SIZE, -1)
        empty = jnp.mean(jnp.stack([losses.emptiness_loss(w[i], k[i]) for i in range(2)]))
        depth = out.depth.reshape(2, SIZE, SIZE)
        center = jnp.mean(jnp.stack([losses.center_depth_loss(depth[i]) for i in range(2)]))
        return jnp.sum(-g * y) + 5.0 * empty + 0.5 * center

    grads = jax.grad(surrogate)(grid0)
    opt = sjc.make_optimizer(config)
    updates, _ = opt.update(grads, opt.init(grid0), grid0)
    expected = optax.apply_updates(grid0, updates)
    chex.assert_trees_all_close(new_state.grid, expected, atol=1e-5, rtol=1e-5)
    assert int(new_state.step) == 1


def test_adamax_matches_torch_formula_with_background_lr():
    config = small_config(lr=0.05, background_lr=1e-4)
    state = sjc.init_state(config, 3)
    opt = sjc.make_optimizer(config)
    params, opt_state = state.grid, opt.init(state.grid)
    rng = np.random.default_rng(0)
    m = {f: 0.0 for f in ("density", "features", "background", "density_scale")}
    u = dict(m)
    expected = {f: np.asarray(getattr(params, f), np.float64) for f in m}
    for t in range(1, 4):
        grads = jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for f in m:  # torch.optim.Adamax
            g = np.asarray(getattr(grads, f), np.float64)
            m[f] = 0.9 * m[f] + 0.1 * g
            u[f] = np.maximum(0.999 * u[f], np.abs(g) + 1e-8)
            lr = 1e-4 if f == "background" else 0.05
            expected[f] = expected[f] - lr / (1 - 0.9**t) * m[f] / u[f]
    for f in m:
        np.testing.assert_allclose(getattr(params, f), expected[f], atol=1e-6, err_msg=f)


def test_one_compilation_over_steps():
    config = small_config(emptiness_step=0.3)
    den = toy_denoiser()
    traced = chex.assert_max_traces(den.apply, n=1)
    den = toy_denoiser(apply=traced)
    step = sjc.make_step(config, den)
    state = sjc.init_state(config, 3)
    for _ in range(5):  # crosses the emptiness ramp at step 3: weights are traced, no retrace
        state, metrics = step(state, den.params)
    assert int(state.step) == 5 and bool(metrics["finite"])
    assert float(metrics["emptiness_weight"]) == 100.0


def test_reproducible_from_seed_and_view_labels_off():
    den = toy_denoiser()
    results = []
    for _ in range(2):
        config = small_config(seed=3, view_augmentation=False)
        step = sjc.make_step(config, den)
        state = sjc.init_state(config, 3)
        for _ in range(3):
            state, metrics = step(state, den.params)
        results.append((state.grid, int(metrics["label"])))
    chex.assert_trees_all_equal(results[0][0], results[1][0])
    assert results[0][1] == 0  # every view uses label 0 without view augmentation


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        sjc.SJCConfig(steps=0)
    with pytest.raises(ValueError, match="dtype"):
        sjc.SJCConfig(dtype="float16")
    with pytest.raises(ValueError, match="sigma_schedule"):
        sjc.SJCConfig(sigma_schedule="cosine")
    with pytest.raises(ValueError, match="t_max"):
        sjc.make_step(sjc.SJCConfig(t_max=5000), toy_denoiser())
    with pytest.raises(ValueError, match="image_size"):
        sjc.make_step(sjc.SJCConfig(image_size=16), toy_denoiser())
    defaults = sjc.SJCConfig()
    assert (defaults.lr, defaults.background_lr, defaults.emptiness_weight) == (0.05, 1e-4, 1e4)
    assert (defaults.t_min, defaults.t_max, defaults.guidance_scale) == (10, 969, 100.0)


DATA_PARALLEL_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
import sys
sys.path.insert(0, {tests!r})
from test_sjc import small_config, toy_denoiser
from sjc_jax import sjc
assert jax.device_count() == 2, jax.devices()
config = small_config(views_per_step=4)
den = toy_denoiser()
grids = []
for mesh in (None, Mesh(np.array(jax.devices()), ("views",))):
    step = sjc.make_step(config, den, mesh=mesh)
    state = sjc.init_state(config, 3)
    for _ in range(3):
        state, metrics = step(state, den.params)
    grids.append((jax.device_get(state.grid), jax.device_get(metrics)))
(a, ma), (b, mb) = grids
for f in ("density", "features", "background", "density_scale"):
    # Adamax normalises each update, so summation-order noise in near-zero gradients shows
    # at the 1e-5 level after a few steps.
    np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-4, atol=1e-4, err_msg=f)
for k in ma:
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, err_msg=k)
print("OK")
"""


def test_data_parallel_step_matches_one_device():
    """Views split over 2 (forced host) devices give the one-device result."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(tests.parent),
    }
    result = subprocess.run(
        [sys.executable, "-c", DATA_PARALLEL_SCRIPT.format(tests=str(tests))],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
    with pytest.raises(ValueError, match="multiple"):
        from jax.sharding import Mesh

        mesh = Mesh(np.array(jax.devices() * 3)[:3].reshape(3), ("views",))
        sjc.make_step(small_config(views_per_step=2), toy_denoiser(), mesh=mesh)
