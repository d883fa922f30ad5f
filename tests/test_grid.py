"""Voxel grid: initialisation, trilinear lookup against float64 numpy, density activation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax.grid import VoxelGrid, activate_density, init_grid, trilinear

AABB = ((-1.0, -0.5, -2.0), (1.0, 1.5, 2.0))


def numpy_trilinear(values, points, aabb):
    """Independent float64 version: loop over points and corners, explicit bounds checks."""
    values = np.asarray(values, np.float64)
    lo, hi = (np.asarray(b, np.float64) for b in aabb)
    res = np.array(values.shape[:3])
    size = (hi - lo) / res
    out = np.zeros((len(points),) + values.shape[3:])
    for n, p in enumerate(np.asarray(points, np.float64)):
        u = (p - lo) / size - 0.5  # voxel i centred at lo + (i + 0.5) size
        i0 = np.floor(u).astype(int)
        f = u - i0
        for corner in np.ndindex(2, 2, 2):
            idx = i0 + np.array(corner)
            if np.any(idx < 0) or np.any(idx >= res):
                continue  # zero padding
            w = np.prod(np.where(np.array(corner) == 1, f, 1 - f))
            out[n] += w * values[tuple(idx)]
    return out


def test_init_grid_matches_original():
    grid = init_grid(jax.random.key(0), resolution=(6, 5, 4), channels=4, background_resolution=4)
    chex.assert_shape(
        [grid.density, grid.features, grid.background, grid.density_scale],
        [(6, 5, 4), (6, 5, 4, 4), (4, 4, 4), ()],
    )
    chex.assert_type([grid.density, grid.features], jnp.float32)
    np.testing.assert_array_equal(grid.density, 0.0)
    assert float(grid.density_scale) == 0.0
    big = init_grid(jax.random.key(1), resolution=40)
    assert abs(float(big.features.mean())) < 0.01 and abs(float(big.features.std()) - 1) < 0.01
    assert grid.resolution == (6, 5, 4) and grid.channels == 4
    with pytest.raises(ValueError, match="resolution"):
        init_grid(jax.random.key(0), resolution=0)
    with pytest.raises(ValueError, match="channels"):
        init_grid(jax.random.key(0), channels=0)


class TrilinearTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_against_numpy_with_outside_corners(self):
        values = jax.random.normal(jax.random.key(0), (5, 4, 3, 2))
        lo, hi = np.array(AABB[0]), np.array(AABB[1])
        rng = np.random.default_rng(0)
        inside = rng.uniform(lo, hi, size=(200, 3))
        # Points in the half-voxel shell, on the box faces, and outside the box entirely.
        shell = lo + (hi - lo) * rng.choice([0.0, 0.01, 0.99, 1.0, -0.1, 1.1], size=(100, 3))
        points = np.concatenate([inside, shell]).astype(np.float32)
        got = self.variant(lambda v, p: trilinear(v, p, AABB))(values, points)
        np.testing.assert_allclose(got, numpy_trilinear(values, points, AABB), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_voxel_centres_are_exact(self):
        values = jax.random.normal(jax.random.key(1), (4, 4, 4))
        centres = np.stack(np.meshgrid(*[-1 + (np.arange(4) + 0.5) * 0.5] * 3, indexing="ij"), -1)
        got = self.variant(lambda v, p: trilinear(v, p))(values, centres.reshape(-1, 3))
        np.testing.assert_allclose(got, np.asarray(values).reshape(-1), atol=1e-6)


def test_density_activation():
    raw = jnp.array([-1e4, -5.0, 0.0, 3.0, 1e4])
    got = activate_density(raw, jnp.log(2.0), -1.0)
    expected = np.logaddexp(0.0, np.array([-1e4, -5.0, 0.0, 3.0, 1e4]) * 2 - 1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    grads = jax.grad(lambda r: jnp.sum(activate_density(r, jnp.float32(0.0))))(raw)
    chex.assert_tree_all_finite(grads)


def test_voxelgrid_is_a_pytree():
    grid = init_grid(jax.random.key(0), resolution=3, channels=2, background_resolution=2)
    leaves = jax.tree_util.tree_leaves(grid)
    assert len(leaves) == 4
    doubled = jax.tree_util.tree_map(lambda x: 2 * x, grid)
    assert isinstance(doubled, VoxelGrid)
