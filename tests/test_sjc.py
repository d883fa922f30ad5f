"""The SJC step: the chained gradient, the optimiser, one compilation, reproducibility."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sjc_jax import estimators, losses, optim, sjc
from sjc_jax.camera import generate_rays
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
    return sjc.SJCConfig.flat(**{**base, **kw})


class Recorder:
    """Wraps a research choice and keeps what it was called with and returned (run eagerly)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args):
        out = self.fn(*args)
        self.calls.append((args, out))
        return out


CHAIN_CASES = {
    "sjc": dict(),
    "sjc eq15 n3 sigma2": dict(var_red=False, noise_samples=3, score_scale="sigma2"),
    "sjc guided": dict(guidance_scale=7.0),
    "sds fantasia3d": dict(estimator="sds", sds_weighting="fantasia3d", noise_samples=2),
    "nfsd": dict(estimator="nfsd", guidance_scale=7.5),
    "csd": dict(estimator="csd"),
    "annealed": dict(sigma_schedule="annealed"),
    "dreamtime": dict(sigma_schedule="dreamtime"),
    "fixed": dict(sigma_schedule="fixed", t_max=500),
}


@pytest.mark.parametrize("case", list(CHAIN_CASES))
def test_step_equals_explicit_chain_rule(case):
    """One step's update equals Adamax applied to ``J^T cotangent + grad(reg)``, computed
    independently (jax.grad of the surrogate ``sum(stop_gradient(c) * y) + reg``) from what the
    step's camera sampler, sigma sampler and estimator were called with and returned."""
    config = small_config(**CHAIN_CASES[case])
    den = toy_denoiser()
    cams = Recorder(sjc.camera_sampler_from_config(config, SIZE))
    sigmas = Recorder(sjc.sigma_sampler_from_config(config))
    est = Recorder(sjc.estimator_from_config(config))
    state = sjc.init_state(config, 3)
    grid0 = jax.tree_util.tree_map(jnp.array, state.grid)
    step = sjc.make_step(config, den, estimator=est, camera_sampler=cams, sigma_sampler=sigmas)
    with jax.disable_jit():
        new_state, _ = step(state, den.params)
    (_, (cameras, labels)), (_, sigma) = cams.calls[-1], sigmas.calls[-1]
    (key, _, _, images, est_sigma, est_labels), (cotangent, _) = est.calls[-1]
    np.testing.assert_array_equal(est_sigma, sigma)
    np.testing.assert_array_equal(est_labels, labels)
    # The estimator's output is also a function of its inputs alone.
    again = sjc.estimator_from_config(config)(key, den, den.params, images, sigma, labels)[0]
    np.testing.assert_allclose(again, cotangent, rtol=1e-6, atol=1e-7)

    rc = config.render_config()
    o, d = jax.vmap(generate_rays)(cameras)
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    t0, t1 = intersect_rays(o, d)
    k = view_sample_count(t0.reshape(2, -1), t1.reshape(2, -1), step_size(rc, (6, 6, 6)))

    def surrogate(grid):
        out = render_rays(grid, o, d, t0, t1, rc)
        y = out.features.reshape(2, SIZE, SIZE, 3)
        w = out.weights.reshape(2, SIZE * SIZE, -1)
        empty = jnp.mean(jnp.stack([losses.emptiness_loss(w[i], k[i]) for i in range(2)]))
        depth = out.depth.reshape(2, SIZE, SIZE)
        center = jnp.mean(jnp.stack([losses.center_depth_loss(depth[i]) for i in range(2)]))
        return jnp.sum(jax.lax.stop_gradient(cotangent) * y) + 5.0 * empty + 0.5 * center, y

    grads, y = jax.grad(surrogate, has_aux=True)(grid0)
    np.testing.assert_allclose(y, images, rtol=1e-5, atol=1e-6)
    opt = sjc.optimizer_from_config(config)
    updates, _ = opt.update(grads, opt.init(grid0), grid0)
    expected = optax.apply_updates(grid0, updates)
    chex.assert_trees_all_close(new_state.grid, expected, atol=1e-5, rtol=1e-5)
    assert int(new_state.step) == 1


def test_sjc_eq16_and_sds_uniform_give_the_same_update():
    """SJC (var_red) and SDS with w = 1 are the same image-space vector: same grid, same key."""
    den = toy_denoiser()
    grids = []
    for extra in (dict(), dict(estimator="sds", sds_weighting="uniform")):
        config = small_config(guidance_scale=1.0, **extra)
        step = sjc.make_step(config, den)
        state = sjc.init_state(config, 3)
        for _ in range(3):
            state, _ = step(state, den.params)
        grids.append(jax.device_get(state.grid))
    # The two differ only by float32 rounding of (D - y) / sigma vs (z - D) / sigma - n.
    chex.assert_trees_all_close(grids[0], grids[1], atol=2e-6, rtol=1e-6)


def test_custom_estimator_in_ten_lines():
    """A function passed as ``estimator=`` runs through make_step with no library edit."""

    def my_sds(key, denoiser, params, images, sigma, labels):
        z, noise = estimators.perturb(key, images, sigma)
        d = estimators.guided(denoiser, params, z, sigma, labels, 1.0)
        w = estimators.per_image(jnp.sqrt(sigma))
        grad = w * jnp.mean(estimators.noise_estimate(z, d, sigma) - noise, axis=0)
        return grad, {"my_norm": jnp.mean(jnp.abs(grad))}

    config = small_config()
    den = toy_denoiser()
    step = sjc.make_step(config, den, estimator=my_sds)
    state = sjc.init_state(config, 3)
    state, metrics = step(state, den.params)
    assert bool(metrics["finite"]) and float(metrics["my_norm"]) > 0


def test_stateful_estimator_state_is_carried_in_the_train_state():
    base = sjc.estimator_from_config(small_config())

    def update(key, denoiser, params, images, sigma, labels, state):
        cot, metrics = base(key, denoiser, params, images, sigma, labels)
        return cot, {"count": state["count"]}, {"count": state["count"] + 1}

    est = estimators.StatefulEstimator(
        init=lambda key, den, params: {"count": jnp.int32(0)}, update=update
    )
    config, den = small_config(), toy_denoiser()
    state = sjc.init_state(config, 3, estimator=est, denoiser=den)
    step = sjc.make_step(config, den, estimator=est)
    for _ in range(3):
        state, metrics = step(state, den.params)
    assert int(state.estimator_state["count"]) == 3 and int(metrics["count"]) == 2


def test_regularizers_and_optimizer_as_values():
    """A custom regulariser list and optax optimiser replace the config's."""
    config, den = small_config(), toy_denoiser()

    def opacity_penalty(views, step):
        loss = jnp.mean(views.opacity.reshape(views.opacity.shape[0], -1), axis=1)
        return 0.1 * loss, {"penalty": loss}

    opt = optax.sgd(1e-3)
    state = sjc.init_state(config, 3, optimizer=opt)
    step = sjc.make_step(config, den, regularizers=[opacity_penalty], optimizer=opt)
    state, metrics = step(state, den.params)
    assert "penalty" in metrics and "emptiness" not in metrics
    assert bool(metrics["finite"])


def test_optimizer_groups_follow_the_field_names():
    grid = sjc.init_state(small_config(), 3).grid
    labels = optim.field_labels(grid)
    assert labels.background == "background"
    assert {labels.density, labels.features, labels.density_scale} == {"field"}
    assert optim.field_labels({"background": 1, "coarse": {"density": 2}}) == {
        "background": "background",
        "coarse": {"density": "field"},
    }


def test_adamax_matches_torch_formula_with_background_lr():
    config = small_config(lr=0.05, background_lr=1e-4)
    state = sjc.init_state(config, 3)
    opt = sjc.optimizer_from_config(config)
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
        sjc.SJCConfig.flat(steps=0)
    with pytest.raises(ValueError, match="dtype"):
        sjc.SJCConfig.flat(dtype="float16")
    with pytest.raises(ValueError, match="sigma_schedule"):
        sjc.SJCConfig.flat(sigma_schedule="cosine")
    with pytest.raises(ValueError, match="estimator"):
        sjc.SJCConfig.flat(estimator="vsd")
    with pytest.raises(ValueError, match="t_max"):
        sjc.make_step(sjc.SJCConfig.flat(t_max=5000), toy_denoiser())
    defaults = sjc.SJCConfig()
    assert (defaults.optimizer.lr, defaults.optimizer.background_lr) == (0.05, 1e-4)
    assert defaults.regularizers.emptiness_weight == 1e4
    assert (defaults.score.t_min, defaults.score.t_max) == (10, 969)
    assert (defaults.score.guidance_scale, defaults.score.estimator) == (100.0, "sjc")


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


def test_every_registered_estimator_reads_score_config_fields_its_factory_takes():
    import dataclasses
    import inspect

    from sjc_jax.config import ScoreConfig

    fields = {f.name for f in dataclasses.fields(ScoreConfig)}
    for name, registered in estimators.ESTIMATORS.items():
        params = inspect.signature(registered.factory).parameters
        assert set(registered.fields) <= set(params), name
        assert set(registered.fields.values()) <= fields, name
        built = sjc.estimator_from_config(small_config(estimator=name))
        assert callable(built) or isinstance(built, estimators.StatefulEstimator)


def test_an_estimator_added_to_the_table_is_valid_everywhere(monkeypatch):
    """One entry in `estimators.ESTIMATORS`: the config accepts the name, the builder calls its
    factory with the fields it names, the command line lists it."""
    from sjc_jax.config import ScoreConfig

    seen = {}

    def halved(*, guidance_scale, scale):
        seen.update(guidance_scale=guidance_scale, scale=scale)
        base = estimators.sjc(guidance_scale=guidance_scale)
        return lambda *args: (0.5 * base(*args)[0], {})

    with pytest.raises(ValueError, match="estimator must be one of"):
        ScoreConfig(estimator="halved")
    monkeypatch.setitem(
        estimators.ESTIMATORS,
        "halved",
        estimators.Registered(
            halved, {"guidance_scale": "guidance_scale", "scale": "score_scale"}, "half of sjc"
        ),
    )
    config = small_config(estimator="halved", guidance_scale=3.0, score_scale="sigma2")
    state, metrics = sjc.make_step(config, toy_denoiser())(sjc.init_state(config, 3), {"a": 0.5})
    assert seen == {"guidance_scale": 3.0, "scale": "sigma2"} and bool(metrics["finite"])


def test_make_lift_is_init_state_and_make_step_with_shared_choices():
    config, den = small_config(), toy_denoiser()
    init, step = sjc.make_lift(config, den)
    a, metrics_a = step(init(), den.params)
    b, metrics_b = sjc.make_step(config, den)(sjc.init_state(config, 3), den.params)
    chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal(metrics_a, metrics_b)

    # A stateful estimator given once reaches both halves (init_state without it would leave
    # the state empty and the step would fail on it).
    base = sjc.estimator_from_config(config)

    def update(key, denoiser, params, images, sigma, labels, state):
        cot, _ = base(key, denoiser, params, images, sigma, labels)
        return cot, {}, {"count": state["count"] + 1}

    est = estimators.StatefulEstimator(
        init=lambda key, den, params: {"count": jnp.int32(0)}, update=update
    )
    init, step = sjc.make_lift(config, den, estimator=est, optimizer=optax.sgd(0.1))
    state = init(background=np.full((4, 4, 3), 0.5, np.float32))
    np.testing.assert_array_equal(state.grid.background, 0.5)
    assert isinstance(state.opt_state[0], optax.EmptyState)  # sgd's, not the config's Adamax
    state, _ = step(state, den.params)
    assert int(state.estimator_state["count"]) == 1
