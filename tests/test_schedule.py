import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax.diffusion import schedule


def test_sd_v1_table_values():
    s = schedule.ddpm_sigmas()
    assert s.shape == (1000,) and s.dtype == np.float32
    np.testing.assert_allclose(s[0], 0.029167, rtol=1e-5)
    np.testing.assert_allclose(s[999], 14.6146, rtol=1e-5)
    np.testing.assert_allclose(s[10], 0.098291, rtol=1e-5)
    np.testing.assert_allclose(s[969], 12.228761, rtol=1e-6)
    assert np.all(np.diff(s) > 0)


def test_linear_schedule_matches_float64_reference():
    s = schedule.ddpm_sigmas(
        beta_start=1e-4, beta_end=0.02, num_train_timesteps=50, beta_schedule="linear"
    )
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 50))
    np.testing.assert_allclose(s, np.sqrt((1 - abar) / abar), rtol=1e-6)


def test_unknown_beta_schedule_refused():
    with pytest.raises(ValueError, match="beta_schedule"):
        schedule.ddpm_sigmas(beta_schedule="squaredcos_cap_v2")


def test_from_scheduler_config():
    cfg = {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
    }
    np.testing.assert_array_equal(
        schedule.sigmas_from_scheduler_config(cfg), schedule.ddpm_sigmas()
    )
    betas = [0.1, 0.2, 0.3]
    abar = np.cumprod(1 - np.array(betas))
    np.testing.assert_allclose(
        schedule.sigmas_from_scheduler_config({"trained_betas": betas}),
        np.sqrt((1 - abar) / abar),
        rtol=1e-6,
    )


def test_sigma_to_timestep_nearest_and_jittable():
    s = schedule.ddpm_sigmas()
    t = jnp.array([0, 10, 500, 969, 999])
    np.testing.assert_array_equal(jax.jit(schedule.sigma_to_timestep)(s, s[t]), t)
    # Midway between two entries (slightly below) snaps to the lower one; far outside to the ends.
    mid = 0.5 * (s[100] + s[101]) - 1e-5
    assert int(schedule.sigma_to_timestep(s, mid)) == 100
    np.testing.assert_array_equal(schedule.sigma_to_timestep(s, jnp.array([1e-6, 1e6])), [0, 999])


def test_random_sigma_bounds_and_coverage():
    s = schedule.ddpm_sigmas()
    draw = jax.jit(lambda k: schedule.random_sigma(k, s, t_min=10, t_max=969, shape=(20000,)))
    sig = np.asarray(draw(jax.random.key(0)))
    t = np.asarray(schedule.sigma_to_timestep(s, sig))
    assert t.min() == 10 and t.max() == 969
    assert len(np.unique(t)) > 900
    np.testing.assert_allclose(t.mean(), (10 + 969) / 2, atol=5)
    # A scalar draw by default.
    assert schedule.random_sigma(jax.random.key(1), s).shape == ()


def test_random_sigma_bad_bounds():
    s = schedule.ddpm_sigmas()
    with pytest.raises(ValueError, match="t_min"):
        schedule.random_sigma(jax.random.key(0), s, t_min=500, t_max=10)
    with pytest.raises(ValueError, match="t_min"):
        schedule.random_sigma(jax.random.key(0), s, t_max=1000)


def test_annealed_sigma_decreases_without_recompiles():
    s = schedule.ddpm_sigmas()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def draw(key, step):
        return schedule.annealed_sigma(key, step, 101, s, t_min=10, t_max=969, jitter=0.0)

    keys = jax.random.split(jax.random.key(0), 101)
    sig = np.array([float(draw(keys[i], jnp.int32(i))) for i in range(101)])
    np.testing.assert_allclose(sig[0], s[969])
    np.testing.assert_allclose(sig[-1], s[10])
    assert np.all(np.diff(sig) <= 0)


def test_annealed_sigma_jitter_stays_in_bounds():
    s = schedule.ddpm_sigmas()
    t = schedule.annealed_timestep(
        jax.random.key(0), 0, 10, 1000, t_min=10, t_max=969, jitter=0.1, shape=(1000,)
    )
    t = np.asarray(t)
    assert t.min() >= 969 - 96 and t.max() == 969
    mid = schedule.annealed_sigma(jax.random.key(1), 5, 11, s, jitter=0.05, shape=(4,))
    assert mid.shape == (4,)
