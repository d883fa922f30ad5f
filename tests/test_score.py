import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax import score
from sjc_jax.diffusion import denoiser, schedule

MU = 0.3
S = 0.5  # data std; below sigma so that Eq. 16 is the low-variance form
SIGMA = 1.0
NUM = 20000


def gaussian_apply(params, z, sigma, label):
    """Posterior mean of N(mu, s^2 I) data under VE noise sigma (label ignored)."""
    del label
    s2 = params["s"] ** 2
    sig2 = jnp.square(sigma)[:, None, None, None]
    return (s2 * z + sig2 * params["mu"]) / (s2 + sig2)


PARAMS = {"mu": jnp.float32(MU), "s": jnp.float32(S)}


def _per_sample(var_red, scale, y, sigma):
    """NUM one-sample gradients (SJC's n = 1) from independent keys: [NUM, B, H, W, C]."""
    keys = jax.random.split(jax.random.key(0), NUM)
    one = lambda k: score.paas_gradient(
        k, gaussian_apply, PARAMS, y, sigma, jnp.zeros(y.shape[0], jnp.int32),
        var_red=var_red, scale=scale,
    )  # fmt: skip
    return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


@pytest.fixture(scope="module")
def y_and_sigma():
    y = jnp.array([-1.0, 0.0, 0.8, 2.0], jnp.float32).reshape(2, 1, 2, 1)
    return y, jnp.full((2,), SIGMA, jnp.float32)


def test_paas_mean_is_the_score_of_the_smoothed_log_density(y_and_sigma):
    y, sigma = y_and_sigma
    g = _per_sample(False, "sigma2", y, sigma)  # Eq. 15, the score itself
    mean, se = g.mean(0), g.std(0, ddof=1) / np.sqrt(NUM)
    yy = np.asarray(y, np.float64)
    at_sigma = (MU - yy) / (S**2 + SIGMA**2)
    np.testing.assert_array_less(np.abs(mean - at_sigma), 3 * se)
    # For Gaussian data this is the score at noise sigma, not at sqrt(2) sigma: the two differ by
    # many standard errors wherever y != mu (see the docstring of sjc_jax.score).
    at_sqrt2 = (MU - yy) / (S**2 + 2 * SIGMA**2)
    assert np.all(np.abs(mean - at_sqrt2) > 10 * se)


def test_eq16_same_mean_lower_variance(y_and_sigma):
    y, sigma = y_and_sigma
    g15 = _per_sample(False, "sigma2", y, sigma)
    g16 = _per_sample(True, "sigma2", y, sigma)
    se = np.sqrt(g15.var(0) / NUM + g16.var(0) / NUM)
    np.testing.assert_array_less(np.abs(g15.mean(0) - g16.mean(0)), 3 * se)
    # Analytic variances: Eq. 16 s^4 / (sigma^2 (s^2 + sigma^2)^2), Eq. 15 sigma^2 / (...)^2.
    denom = (S**2 + SIGMA**2) ** 2
    np.testing.assert_allclose(g16.var(0), S**4 / (SIGMA**2 * denom), rtol=0.05)
    np.testing.assert_allclose(g15.var(0), SIGMA**2 / denom, rtol=0.05)
    assert np.all(g16.var(0) < g15.var(0))


def test_scalings_and_sample_average(y_and_sigma):
    y, sigma = y_and_sigma
    sigma = jnp.array([0.5, 2.0], jnp.float32)
    label = jnp.zeros(2, jnp.int32)
    noise = score.sample_noise(jax.random.key(3), y, 8)
    paas = jax.jit(score.paas_gradient_from_noise, static_argnums=0, static_argnames="scale")
    g1 = paas(gaussian_apply, PARAMS, y, sigma, label, noise)
    g2 = paas(gaussian_apply, PARAMS, y, sigma, label, noise, scale="sigma2")
    np.testing.assert_allclose(g2, g1 / sigma[:, None, None, None], rtol=1e-6)
    singles = [paas(gaussian_apply, PARAMS, y, sigma, label, noise[i : i + 1]) for i in range(8)]
    np.testing.assert_allclose(g1, np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)
    # Eq. 16 by hand for sample 0.
    z = y + sigma[:, None, None, None] * noise[0]
    d = gaussian_apply(PARAMS, z, sigma, label)
    np.testing.assert_allclose(singles[0], (d - y) / sigma[:, None, None, None], rtol=1e-5)


def test_paas_batches_the_samples_into_one_call(y_and_sigma):
    y, sigma = y_and_sigma
    batches = []

    def apply(params, z, sig, label):
        batches.append(z.shape[0])
        return gaussian_apply(params, z, sig, label)

    score.paas_gradient(jax.random.key(0), apply, PARAMS, y, sigma, jnp.zeros(2, jnp.int32),
                        num_samples=5)  # fmt: skip
    assert batches == [10]


def test_bad_arguments():
    y = jnp.zeros((1, 2, 2, 1))
    with pytest.raises(ValueError, match="scale"):
        score.paas_gradient(jax.random.key(0), gaussian_apply, PARAMS, y, 1.0, 0, scale="sigma3")
    with pytest.raises(ValueError, match="num_samples"):
        score.paas_gradient(jax.random.key(0), gaussian_apply, PARAMS, y, 1.0, 0, num_samples=0)


def test_var_red_sjc_equals_minus_sds_for_an_eps_model():
    """g = (D - y) / sigma = noise - eps_hat = -(DreamFusion SDS gradient), same noise."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(4, 4)) / 2
    sigmas = schedule.ddpm_sigmas()
    t = np.array([10, 400, 969])

    def apply(params, z, sigma, label):  # the VE denoiser of a VP eps-network eps(x_t, t)
        t = schedule.sigma_to_timestep(sigmas, sigma)
        a, _ = denoiser.vp_coefficients(sigma)
        x_vp = z * a[:, None, None, None]
        # HIGHEST: a GPU's default float32 matmul is TF32 (~1e-3 relative), not what is tested.
        x_w = jnp.matmul(x_vp, w.astype(np.float32), precision=jax.lax.Precision.HIGHEST)
        eps = jnp.tanh(x_w + t[:, None, None, None] / 1000.0)
        return denoiser.eps_to_denoised(z, sigma, eps)

    y = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
    sigma, label = sigmas[t], np.zeros(3, np.int32)
    noise = rng.normal(size=(2,) + y.shape).astype(np.float32)
    # DreamFusion's form in float64: x_t = sqrt(abar) y + sqrt(1 - abar) n, grad = eps(x_t, t) - n.
    abar = (1.0 / (1.0 + sigma.astype(np.float64) ** 2))[None, :, None, None, None]
    x_t = np.sqrt(abar) * y[None] + np.sqrt(1 - abar) * noise
    sds_ref = np.mean(np.tanh(x_t @ w + t[None, :, None, None, None] / 1000.0) - noise, axis=0)
    paas = jax.jit(score.paas_gradient_from_noise, static_argnums=0)
    sds = jax.jit(score.sds_gradient_from_noise, static_argnums=0)
    np.testing.assert_allclose(paas(apply, None, y, sigma, label, noise), -sds_ref, atol=2e-4)
    np.testing.assert_allclose(sds(apply, None, y, sigma, label, noise), sds_ref, atol=2e-4)
    # The key-based pair draws the same noise.
    key = jax.random.key(11)
    np.testing.assert_allclose(
        jax.jit(score.paas_gradient, static_argnums=1)(key, apply, None, y, sigma, label),
        -jax.jit(score.sds_gradient, static_argnums=1)(key, apply, None, y, sigma, label),
        atol=2e-4,
    )
