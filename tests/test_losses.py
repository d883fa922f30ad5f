"""Regularisers: the original's normalisation and schedule, the corrected center-depth form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax import losses


def test_emptiness_is_mean_over_k_times_n():
    rng = np.random.default_rng(0)
    k, n, s = 7, 5, 11  # S > k: the extra samples weigh 0, as past a ray's end
    w = np.zeros((n, s))
    w[:, :k] = rng.uniform(0, 0.2, size=(n, k))
    expected = np.mean(np.log(1 + 10 * w[:, :k]))  # torch: log(1 + 10 ws).mean() over [k, n]
    got = losses.emptiness_loss(jnp.asarray(w, jnp.float32), jnp.int32(k), scale=10.0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_emptiness_schedule_is_a_step_at_half_the_run():
    weights = [float(losses.emptiness_weight(s, 100)) for s in (0, 49, 50, 99)]
    assert weights == [1e4, 1e4, 2e5, 2e5]
    traced = jax.jit(lambda s: losses.emptiness_weight(s, 100, weight=2.0, multiplier=3.0))
    assert float(traced(10)) == 2.0 and float(traced(60)) == 6.0


def test_center_depth_pulls_the_object_to_the_middle():
    depth = np.full((64, 64), 10.0, np.float32)
    depth[7:57, 7:57] = 2.0  # the center is nearer
    got = losses.center_depth_loss(jnp.asarray(depth))
    border = (depth.sum() - depth[7:57, 7:57].sum()) / (64 * 64 - 50 * 50)
    np.testing.assert_allclose(got, -np.log(border - 2.0), rtol=1e-6)
    # Moving the center nearer lowers the loss: the gradient on the center is positive.
    grad = jax.grad(losses.center_depth_loss)(jnp.asarray(depth))
    assert float(grad[30, 30]) > 0 and float(grad[0, 0]) < 0
    assert losses.center_margin(64) == 7


def test_center_depth_finite_when_center_is_farther():
    depth = jnp.full((16, 16), 2.0).at[4:12, 4:12].set(10.0)
    value, grad = jax.value_and_grad(losses.center_depth_loss)(depth)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    with pytest.raises(ValueError, match="margin"):
        losses.center_depth_loss(depth, margin=8)
