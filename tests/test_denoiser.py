import numpy as np
import pytest

from sjc_jax.diffusion import denoiser


def _setup(seed=0):
    rng = np.random.default_rng(seed)
    y0 = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
    eps = rng.normal(size=y0.shape).astype(np.float32)
    sigma = np.array([0.03, 1.0, 14.6], np.float32)
    return y0, eps, sigma


def _ref_vp(sigma):
    """float64 a = sqrt(abar), s = sqrt(1 - abar) with sigma^2 = (1 - abar) / abar."""
    abar = 1.0 / (1.0 + sigma.astype(np.float64) ** 2)
    return np.sqrt(abar)[:, None, None, None], np.sqrt(1 - abar)[:, None, None, None]


def test_vp_coefficients():
    sigma = np.array([0.0, 0.5, 3.0, 100.0], np.float32)
    a, s = denoiser.vp_coefficients(sigma)
    ra, rs = _ref_vp(sigma)
    np.testing.assert_allclose(a, ra.ravel(), rtol=1e-6)
    np.testing.assert_allclose(s, rs.ravel(), rtol=1e-6)
    np.testing.assert_allclose(np.square(a) + np.square(s), 1.0, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_perfect_model_outputs_give_the_clean_image(prediction_type):
    y0, eps, sigma = _setup()
    a, s = _ref_vp(sigma)
    z = y0 + sigma[:, None, None, None] * eps  # VE
    x = a * z  # VP input: a y0 + s eps
    output = {"epsilon": eps, "v_prediction": a * eps - s * y0, "sample": y0}[prediction_type]
    eps_hat = denoiser.model_output_to_eps(
        output.astype(np.float32), x.astype(np.float32), sigma, prediction_type
    )
    np.testing.assert_allclose(
        eps_hat, eps, rtol=1e-4, atol=1e-4 if prediction_type != "sample" else 2e-2
    )
    d = denoiser.eps_to_denoised(z.astype(np.float32), sigma, eps_hat)
    np.testing.assert_allclose(d, y0, atol=2e-3)


def test_eps_to_denoised_formula():
    y0, eps, sigma = _setup(1)
    z = y0 + 0.1
    np.testing.assert_allclose(
        denoiser.eps_to_denoised(z, sigma, eps), z - sigma[:, None, None, None] * eps, rtol=1e-6
    )
    # A scalar sigma broadcasts to every image.
    np.testing.assert_allclose(denoiser.eps_to_denoised(z, 2.0, eps), z - 2.0 * eps, rtol=1e-6)


def test_unknown_prediction_type():
    y0, eps, sigma = _setup()
    with pytest.raises(ValueError, match="prediction_type"):
        denoiser.model_output_to_eps(eps, y0, sigma, "flow")


def test_classifier_free_guidance_algebra():
    _, eps_u, _ = _setup(2)
    eps_c = eps_u[::-1] + 0.5
    cfg = denoiser.classifier_free_guidance
    np.testing.assert_allclose(cfg(eps_u, eps_c, 1.0), eps_c, rtol=1e-6)
    np.testing.assert_allclose(cfg(eps_u, eps_c, 0.0), eps_u, rtol=1e-6)
    np.testing.assert_allclose(cfg(eps_u, eps_c, 100.0), eps_u + 100.0 * (eps_c - eps_u), rtol=1e-5)
    np.testing.assert_allclose(
        cfg(eps_u, eps_c, 7.5) - cfg(eps_u, eps_c, 2.5), 5.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5
    )


def test_cfg_commutes_with_the_v_conversion():
    y0, v_u, sigma = _setup(3)
    v_c = v_u * 0.5 - 0.2
    x = y0
    to_eps = lambda v: denoiser.model_output_to_eps(v, x, sigma, "v_prediction")
    cfg = denoiser.classifier_free_guidance
    np.testing.assert_allclose(
        cfg(to_eps(v_u), to_eps(v_c), 100.0), to_eps(cfg(v_u, v_c, 100.0)), rtol=1e-4, atol=1e-3
    )
