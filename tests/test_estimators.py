"""Estimators against float64 closed forms on Gaussian data, where the exact denoiser is known.

Each condition c has data N(mu_c, s_c^2 I), so its VE denoiser is linear in z:
``D_c(z) = a_c z + b_c`` with ``a_c = s_c^2 / (s_c^2 + sigma^2)``, ``b_c = sigma^2 mu_c / (s_c^2 +
sigma^2)``. With ``z = y + sigma n`` every estimator is affine in the noise n, so its mean over n
and its variance are closed forms, and one draw is an exact float64 expression of that n.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax import estimators
from sjc_jax.diffusion import schedule
from sjc_jax.diffusion.denoiser import NEGATIVE, UNCONDITIONAL, Denoiser

# Condition -> (mu, s): view labels 0 and 1, the unconditional and the negative condition.
GAUSSIANS = {0: (0.3, 0.5), 1: (-0.4, 0.7), UNCONDITIONAL: (0.0, 1.0), NEGATIVE: (0.6, 0.4)}
NUM = 20000
SIGMAS = schedule.ddpm_sigmas()


def gaussian_apply(params, z, sigma, label):
    """The exact VE denoiser of each label's Gaussian (float32)."""
    keys = sorted(GAUSSIANS)
    mu = jnp.select([label == k for k in keys], [params["mu"][i] for i in range(len(keys))])
    s2 = jnp.select([label == k for k in keys], [params["s2"][i] for i in range(len(keys))])
    mu, s2 = mu[:, None, None, None], s2[:, None, None, None]
    sig2 = jnp.square(sigma)[:, None, None, None]
    return (s2 * z + sig2 * mu) / (s2 + sig2)


def gaussian_denoiser(apply=gaussian_apply) -> Denoiser:
    keys = sorted(GAUSSIANS)
    params = {
        "mu": jnp.array([GAUSSIANS[k][0] for k in keys], jnp.float32),
        "s2": jnp.array([GAUSSIANS[k][1] ** 2 for k in keys], jnp.float32),
    }
    return Denoiser(apply, params, SIGMAS, 1, 2, "rgb", lambda x: x, "gaussian")


def coefficients(label, sigma):
    """float64 ``(a, b)`` of ``D = a z + b`` per image, ``[B, 1, 1, 1]`` each."""
    mu = np.array([GAUSSIANS[int(c)][0] for c in np.broadcast_to(label, sigma.shape)])
    s2 = np.array([GAUSSIANS[int(c)][1] ** 2 for c in np.broadcast_to(label, sigma.shape)])
    sig2 = sigma.astype(np.float64) ** 2
    a, b = s2 / (s2 + sig2), sig2 * mu / (s2 + sig2)
    return a[:, None, None, None], b[:, None, None, None]


def exact(name, y, sigma, labels, n, **kw):
    """float64 cotangent of estimator ``name`` for one noise draw ``n [B, H, W, C]``."""
    y, n, sig = (np.asarray(v, np.float64) for v in (y, n, sigma))
    sig_b = sig[:, None, None, None]
    z = y + sig_b * n

    def d(label):
        a, b = coefficients(label, sig)
        return a * z + b

    def eps(label):
        return (z - d(label)) / sig_b

    w = {
        "uniform": np.ones_like(sig),
        "sds": sig**2 / (1 + sig**2),
        "fantasia3d": sig**2 / (1 + sig**2) ** 1.5,
    }[kw.get("weighting_name", "sds")][:, None, None, None]
    s = kw.get("guidance_scale", 1.0)
    if name == "sjc":
        d_cfg = d(UNCONDITIONAL) + s * (d(labels) - d(UNCONDITIONAL)) if s != 1 else d(labels)
        g = (d_cfg - (y if kw.get("var_red", True) else z)) / sig_b
        return -(g / sig_b if kw.get("scale") == "sigma2" else g)
    if name == "sds":
        e = eps(UNCONDITIONAL) + s * (eps(labels) - eps(UNCONDITIONAL))
        return w * (e - n)
    if name == "nfsd":
        t = schedule.sigma_to_timestep(SIGMAS, sig)
        late = (np.asarray(t) >= kw.get("switch_timestep", 200))[:, None, None, None]
        delta_d = np.where(late, eps(UNCONDITIONAL) - eps(NEGATIVE), eps(UNCONDITIONAL))
        return w * (delta_d + s * (eps(labels) - eps(UNCONDITIONAL)))
    if name == "naive":
        y_b = y + 0 * n  # the render itself is the denoiser's input
        a, b = coefficients(labels, sig)
        a_u, b_u = coefficients(UNCONDITIONAL, sig)
        d_c, d_u = a * y_b + b, a_u * y_b + b_u
        d_cfg = d_u + s * (d_c - d_u) if s != 1 else d_c
        return -(d_cfg - y_b) / sig_b
    if name == "csd":
        grad = eps(labels) - eps(UNCONDITIONAL)
        grad = grad - kw.get("negative_weight", 0.0) * (eps(NEGATIVE) - eps(UNCONDITIONAL))
        return w * grad
    raise AssertionError(name)


CASES = [
    ("sjc", {}),
    ("sjc", {"var_red": False}),
    ("sjc", {"scale": "sigma2", "guidance_scale": 3.0}),
    ("sds", {"weighting_name": "uniform", "guidance_scale": 1.0}),
    ("sds", {"weighting_name": "sds", "guidance_scale": 5.0}),
    ("sds", {"weighting_name": "fantasia3d", "guidance_scale": 2.0}),
    ("nfsd", {"guidance_scale": 7.5}),
    ("nfsd", {"guidance_scale": 2.0, "weighting_name": "uniform", "switch_timestep": 500}),
    ("csd", {}),
    ("csd", {"negative_weight": 0.5, "weighting_name": "uniform"}),
    ("naive", {"guidance_scale": 1.0}),
    ("naive", {"guidance_scale": 4.0}),
]
Y = np.array([-1.0, 0.0, 0.8, 2.0, 0.5, -0.2], np.float32).reshape(3, 1, 2, 1)
LABELS = np.array([0, 1, 0], np.int32)
# Timesteps 150, 400, 900: NFSD's switch at 200 (and 500) falls between them.
SIGMA = SIGMAS[np.array([150, 400, 900])].astype(np.float32)


def build(name, kw):
    kw = dict(kw)
    if name == "sjc":
        kw.setdefault("guidance_scale", 1.0)
    return getattr(estimators, name)(**kw)


@pytest.mark.parametrize("name,kw", CASES)
def test_one_draw_equals_the_float64_formula(name, kw):
    est = build(name, kw)
    den = gaussian_denoiser()
    key = jax.random.key(5)
    got, metrics = jax.jit(lambda k: est(k, den, den.params, Y, SIGMA, LABELS))(key)
    n = np.asarray(jax.random.normal(key, (1,) + Y.shape, jnp.float32))[0]
    want = exact(name, Y, SIGMA, LABELS, n, **kw)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5, atol=2e-5)
    assert got.shape == Y.shape and got.dtype == jnp.float32 and isinstance(metrics, dict)


@pytest.mark.parametrize("name,kw", CASES)
def test_mean_and_variance_over_noise_match_the_closed_form(name, kw):
    """Monte Carlo over NUM keys against E_n and Var_n of the affine-in-n float64 formula."""
    est = build(name, kw)
    den = gaussian_denoiser()
    keys = jax.random.split(jax.random.key(0), NUM)
    draws = jax.jit(jax.vmap(lambda k: est(k, den, den.params, Y, SIGMA, LABELS)[0]))(keys)
    draws = np.asarray(draws, np.float64)
    zero, one = np.zeros_like(Y), np.ones_like(Y)
    mean = exact(name, Y, SIGMA, LABELS, zero, **kw)  # affine in n: E = value at n = 0
    slope = exact(name, Y, SIGMA, LABELS, one, **kw) - mean  # per-element coefficient of n
    se = np.maximum(np.abs(slope), 1e-12) / np.sqrt(NUM)
    np.testing.assert_array_less(np.abs(draws.mean(0) - mean), 4 * se + 1e-6)
    np.testing.assert_allclose(draws.var(0), slope**2, rtol=0.06, atol=1e-10)


def test_paas_mean_is_the_score_at_sigma_not_sqrt2_sigma():
    """E_n of SJC's Eq. 15 with scale sigma2 (the score form) is (mu - y) / (s^2 + sigma^2)."""
    mu, s = GAUSSIANS[0]
    sigma = np.full(3, 1.0, np.float32)
    est = estimators.sjc(guidance_scale=1.0, var_red=False, scale="sigma2")
    den = gaussian_denoiser()
    keys = jax.random.split(jax.random.key(1), NUM)
    zeros = np.zeros(3, np.int32)
    g = -np.asarray(jax.jit(jax.vmap(lambda k: est(k, den, den.params, Y, sigma, zeros)[0]))(keys))
    mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(NUM)
    y = np.asarray(Y, np.float64)
    np.testing.assert_array_less(np.abs(mean - (mu - y) / (s**2 + 1.0)), 3 * se)
    assert np.all(np.abs(mean - (mu - y) / (s**2 + 2.0)) > 10 * se)


def test_sjc_var_red_equals_sds_uniform():
    den = gaussian_denoiser()
    key = jax.random.key(2)
    a = estimators.sjc(guidance_scale=4.0)(key, den, den.params, Y, SIGMA, LABELS)[0]
    b = estimators.sds(guidance_scale=4.0, weighting_name="uniform")(
        key, den, den.params, Y, SIGMA, LABELS
    )[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_noise_samples_average_in_one_call_and_guidance_halves():
    calls = []

    def counting(params, z, sigma, label):
        calls.append(z.shape[0])
        return gaussian_apply(params, z, sigma, label)

    den = gaussian_denoiser(counting)
    key = jax.random.key(3)
    estimators.sjc(guidance_scale=1.0, noise_samples=5)(key, den, den.params, Y, SIGMA, LABELS)
    estimators.sjc(guidance_scale=7.0, noise_samples=2)(key, den, den.params, Y, SIGMA, LABELS)
    estimators.nfsd()(key, den, den.params, Y, SIGMA, LABELS)
    estimators.csd()(key, den, den.params, Y, SIGMA, LABELS)
    assert calls == [15, 12, 9, 6]  # one model call each: n B, 2 n B, 3 B, 2 B
    # n samples average the single-sample estimates of the same noise draws.
    avg = estimators.sjc(guidance_scale=1.0, noise_samples=4)(
        key, den, den.params, Y, SIGMA, LABELS
    )
    _, noise = estimators.perturb(key, jnp.asarray(Y), SIGMA, 4)
    singles = [exact("sjc", Y, SIGMA, LABELS, np.asarray(noise[i])) for i in range(4)]
    np.testing.assert_allclose(avg[0], np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_one_line_value_errors():
    with pytest.raises(ValueError, match="scale"):
        estimators.sjc(scale="sigma3")
    with pytest.raises(ValueError, match="noise_samples"):
        estimators.sjc(noise_samples=0)
    with pytest.raises(ValueError, match="weighting"):
        estimators.sds(weighting_name="cosine")
    with pytest.raises(ValueError, match="guidance_scale"):
        estimators.sds(guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="estimator"):
        estimators.as_stateful(3)


def test_stateful_estimator_threads_its_state():
    def update(key, denoiser, params, images, sigma, labels, state):
        cot, metrics = estimators.sjc(guidance_scale=1.0)(
            key, denoiser, params, images, sigma, labels
        )
        return cot, {"calls": state + 1.0}, state + 1.0

    est = estimators.StatefulEstimator(
        init=lambda key, den, params: jnp.float32(0.0), update=update
    )
    assert estimators.as_stateful(est) is est
    den = gaussian_denoiser()
    state = est.init(jax.random.key(0), den, den.params)
    for _ in range(3):
        _, metrics, state = est.update(jax.random.key(0), den, den.params, Y, SIGMA, LABELS, state)
    assert float(state) == 3.0 and float(metrics["calls"]) == 3.0
