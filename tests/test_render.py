"""The renderer against an independent float64 numpy transcription of the original (torch) one.

The reference below follows docs/original.md section 1 literally: torch layout ``[C, Z, Y, X]``,
``grid_sample`` semantics (normalised coordinates, ``align_corners=False``, zero padding), a
per-view sample count k, ``T = cumprod(1 - alpha)``, the ``w > 1e-4`` feature mask, the spherical
background map and the background depth of 10.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from sjc_jax import camera as cam
from sjc_jax import render
from sjc_jax.grid import VoxelGrid, init_grid

AABB = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


# ----------------------------------------------------------------------------- numpy reference
def grid_sample_3d(volume, coords):
    """torch grid_sample, 5-D, align_corners=False, zero padding. volume [C, D, H, W], coords
    [P, 3] normalised (x -> W, y -> H, z -> D). Returns [P, C]."""
    c, d, h, w = volume.shape
    sizes = np.array([w, h, d], np.float64)
    pix = ((coords + 1) * sizes - 1) / 2
    base = np.floor(pix)
    frac = pix - base
    base = base.astype(np.int64)
    out = np.zeros((coords.shape[0], c))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                ix, iy, iz = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                wgt = (
                    (frac[:, 0] if dx else 1 - frac[:, 0])
                    * (frac[:, 1] if dy else 1 - frac[:, 1])
                    * (frac[:, 2] if dz else 1 - frac[:, 2])
                )
                inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h) & (iz >= 0) & (iz < d)
                vals = np.zeros((coords.shape[0], c))
                vals[inside] = volume[:, iz[inside], iy[inside], ix[inside]].T
                out += wgt[:, None] * vals
    return out


def grid_sample_2d(texture, uv):
    """torch grid_sample, 4-D, align_corners=False, zero padding. texture [C, H, W], uv [P, 2] in
    [-1, 1] (u -> W, v -> H)."""
    c, h, w = texture.shape
    px = ((uv[:, 0] + 1) * w - 1) / 2
    py = ((uv[:, 1] + 1) * h - 1) / 2
    x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - x0, py - y0
    out = np.zeros((uv.shape[0], c))
    for dx in (0, 1):
        for dy in (0, 1):
            ix, iy = x0 + dx, y0 + dy
            wgt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
            vals = np.zeros((uv.shape[0], c))
            vals[inside] = texture[:, iy[inside], ix[inside]].T
            out += wgt[:, None] * vals
    return out


def reference_render(
    grid, ro, rd, density_shift=-1.0, thres=1e-4, fixed_mask=None, activation="none"
):
    """The original renderer in float64. grid: dict of numpy arrays in OUR layout; converted here to
    the torch layout. ``activation="sigmoid"`` squashes each interpolated feature sample (not in
    the original). Returns (rgb [N, C], depth [N], weights [k, N], k, mask)."""
    density = np.transpose(grid["density"], (2, 1, 0))[None].astype(np.float64)  # [1, Z, Y, X]
    color = np.transpose(grid["features"], (3, 2, 1, 0)).astype(np.float64)  # [C, Z, Y, X]
    bg = np.transpose(grid["background"], (2, 0, 1)).astype(np.float64)  # [C, Hb, Wb]
    d_scale = float(grid["density_scale"])
    n = ro.shape[0]
    # ray/box
    rd_safe = rd.copy()
    rd_safe[rd_safe == 0] = 1e-6
    ts = (AABB.T[None] - ro[:, :, None]) / rd_safe[:, :, None]  # [n, 3, 2]
    t_min = np.maximum(ts.min(-1).max(-1), 0)
    t_max = np.maximum(ts.max(-1).min(-1), 0)
    # step and k
    step = float(np.float32(np.mean((AABB[1] - AABB[0]) / np.array(density.shape[1:][::-1])) * 0.5))
    k = int(np.max(t_max - t_min) / step) + 1
    ticks = step * np.arange(k)[:, None]  # [k, 1]
    dists = t_min[None] + ticks  # [k, n]
    pts = ro[None] + rd[None] * dists[..., None]  # [k, n, 3]
    mask = ticks < (t_max - t_min)[None]
    coords = (pts - AABB[0]) / (AABB[1] - AABB[0]) * 2 - 1
    sigma = np.zeros((k, n))
    raw = grid_sample_3d(density, coords[mask])[:, 0] * np.exp(d_scale) + density_shift
    sigma[mask] = np.logaddexp(raw, 0.0)
    alpha = 1 - np.exp(-sigma * step)
    trans = np.ones_like(alpha)
    trans[1:] = np.cumprod(1 - alpha, axis=0)[:-1]
    weights = alpha * trans
    fmask = weights > thres if fixed_mask is None else fixed_mask
    colors = np.zeros((k, n, color.shape[0]))
    colors[fmask] = grid_sample_3d(color, coords[fmask])
    if activation == "sigmoid":
        colors[fmask] = 1.0 / (1.0 + np.exp(-colors[fmask]))
    bg_weight = 1 - weights.sum(0)
    rgb = (weights[..., None] * colors).sum(0)
    x, y, z = rd.T
    u = np.arctan2(np.sqrt(x**2 + y**2), z) / np.pi
    v = np.arctan2(y, x) / (2 * np.pi) + 0.5
    uv = np.stack([u, v], -1) * 2 - 1
    rgb = rgb + bg_weight[:, None] * grid_sample_2d(bg, uv)
    depth = (weights * dists).sum(0) + bg_weight * 10.0
    return rgb, depth, weights, k, fmask


# ----------------------------------------------------------------------------- fixtures
def random_grid(key, res=(9, 8, 7), channels=4, scale=3.0, bg=(4, 4)):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return VoxelGrid(
        density=scale * jax.random.normal(k1, res),
        features=jax.random.normal(k2, (*res, channels)),
        background=jax.random.normal(k3, (*bg, channels)),
        density_scale=0.3 * jax.random.normal(k4, ()),
    )


def as_numpy(grid):
    return {f: np.asarray(getattr(grid, f), np.float64) for f in VoxelGrid.__dataclass_fields__}


def rays_of(eye, fov=60.0, size=8, target=None):
    camera = cam.make_camera(
        np.asarray(eye, np.float32), fov_x_deg=fov, height=size, width=size, target=target
    )
    o, d = cam.generate_rays(camera)
    return np.asarray(o), np.asarray(d)


CAMERAS = {
    "outside": dict(eye=(1.1, 0.7, -1.2), fov=70.0),
    # The eye is inside the box (|x|, |y|, |z| < 1): t_min clamps at 0.
    "inside": dict(eye=(0.3, -0.2, 0.5), fov=90.0, target=(1.0, 0.4, -1.0)),
    # A wide view from afar: many rays miss the box and render pure background.
    "misses": dict(eye=(0.0, 0.5, 3.5), fov=100.0),
}


def pad_weights(w_ref, budget):
    out = np.zeros((w_ref.shape[1], budget))
    out[:, : w_ref.shape[0]] = w_ref.T
    return out


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", sorted(CAMERAS))
@pytest.mark.parametrize("tiers", [(), (0.3, 0.6, 0.9)])
def test_matches_reference(name, tiers):
    grid = random_grid(jax.random.key(0))
    ro, rd = rays_of(**CAMERAS[name])
    config = render.RenderConfig(compact_tiers=tiers, background_wrap=False)
    out = jax.jit(lambda g, o, d: render.render_rays(g, o, d, None, None, config))(grid, ro, rd)
    rgb, depth, weights, k, _ = reference_render(
        as_numpy(grid), ro.astype(np.float64), rd.astype(np.float64)
    )
    assert int(out.num_samples) == k
    budget = render.sample_budget(config, grid.density.shape)
    chex.assert_shape(out.weights, (ro.shape[0], budget))
    np.testing.assert_allclose(out.weights, pad_weights(weights, budget), atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(out.features, rgb, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out.depth, depth, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out.opacity, weights.sum(0), atol=2e-6)


def test_misses_render_background():
    grid = random_grid(jax.random.key(1))
    ro, rd = rays_of(**CAMERAS["misses"])
    t0, t1 = render.intersect_rays(ro, rd)
    miss = np.asarray(t1 <= t0)
    assert miss.any() and not miss.all()
    out = jax.jit(render.render_rays)(grid, ro, rd)
    np.testing.assert_array_equal(np.asarray(out.weights)[miss], 0.0)
    np.testing.assert_allclose(np.asarray(out.depth)[miss], 10.0)


def test_sjc_defaults():
    config = render.RenderConfig()
    assert config.background_wrap  # the one default that is not the original's
    assert render.step_size(config, (100, 100, 100)) == 0.009999999776482582
    assert render.sample_budget(config, (100, 100, 100)) == 347
    assert hash(config) == hash(render.RenderConfig())
    with pytest.raises(ValueError, match="aabb"):
        render.RenderConfig(aabb=((1, 1, 1), (0, 0, 0)))
    with pytest.raises(ValueError, match="compact_tiers"):
        render.RenderConfig(compact_tiers=(1.5,))


def test_render_view_shapes_and_k_range():
    grid = init_grid(jax.random.key(0), resolution=16, channels=4)
    cams, _ = cam.sample_training_cameras(jax.random.key(2), 3, height=12, width=10)
    render_view = jax.jit(render.render_view)
    for i in range(3):
        view = render_view(grid, cam.index_camera(cams, i))
        chex.assert_shape([view.image, view.depth, view.opacity], [(12, 10, 4), (12, 10), (12, 10)])
        chex.assert_tree_all_finite(view)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("tiers", [(), (0.3, 0.6, 0.9)])
def test_sigmoid_features_match_reference(tiers):
    """``feature_activation="sigmoid"``: each interpolated feature sample squashed, the
    background and density untouched."""
    grid = random_grid(jax.random.key(1), channels=3, scale=2.0)
    ro, rd = rays_of(**CAMERAS["outside"])
    config = render.RenderConfig(
        compact_tiers=tiers, background_wrap=False, feature_activation="sigmoid"
    )
    out = jax.jit(lambda g, o, d: render.render_rays(g, o, d, None, None, config))(grid, ro, rd)
    rgb, depth, weights, _, _ = reference_render(
        as_numpy(grid), ro.astype(np.float64), rd.astype(np.float64), activation="sigmoid"
    )
    plain, *_ = reference_render(as_numpy(grid), ro.astype(np.float64), rd.astype(np.float64))
    assert np.abs(rgb - plain).max() > 0.1  # the activation changes the picture
    np.testing.assert_allclose(out.features, rgb, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out.depth, depth, atol=2e-5, rtol=1e-5)


def test_unknown_feature_activation_refused():
    with pytest.raises(ValueError, match="feature_activation must be one of"):
        render.RenderConfig(feature_activation="relu")


def _loss_fns(config, ro, rd):
    def outputs(g):
        out = render.render_rays(g, ro, rd, None, None, config)
        k = out.num_samples.astype(jnp.float32)
        emptiness = jnp.sum(jnp.log1p(10.0 * out.weights)) / (k * ro.shape[0])
        return out.features, out.depth, emptiness

    return outputs


@pytest.mark.parametrize(
    "name, activation", [("outside", "none"), ("inside", "none"), ("outside", "sigmoid")]
)
def test_gradients_match_reference(name, activation):
    """VJPs of image, depth and emptiness against float64 central differences of the reference,
    with the feature mask held at its value (it is not differentiated, as in the original)."""
    grid = random_grid(jax.random.key(3), res=(5, 4, 6), channels=3, scale=2.0, bg=(3, 4))
    ro, rd = rays_of(**CAMERAS[name], size=5)
    config = render.RenderConfig(background_wrap=False, feature_activation=activation)
    outputs = _loss_fns(config, ro, rd)
    rng = np.random.default_rng(0)
    co_rgb = rng.normal(size=(ro.shape[0], 3))
    co_depth = rng.normal(size=ro.shape[0])
    np_grid = as_numpy(grid)
    *_, k, fmask = reference_render(np_grid, ro.astype(np.float64), rd.astype(np.float64))

    def ref_objective(g):
        rgb, depth, w, kk, _ = reference_render(
            g, ro.astype(np.float64), rd.astype(np.float64), fixed_mask=fmask,
            activation=activation,
        )  # fmt: skip
        assert kk == k
        empt = np.sum(np.log1p(10 * w)) / (k * ro.shape[0])
        return np.sum(rgb * co_rgb) + np.sum(depth * co_depth) + 3.0 * empt

    def jax_objective(g):
        rgb, depth, empt = outputs(g)
        return jnp.sum(rgb * co_rgb) + jnp.sum(depth * co_depth) + 3.0 * empt

    grads = jax.jit(jax.grad(jax_objective))(grid)
    eps = 1e-6
    for field in VoxelGrid.__dataclass_fields__:
        base = np_grid[field]
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            plus, minus = dict(np_grid), dict(np_grid)
            plus[field] = base.copy()
            minus[field] = base.copy()
            plus[field][idx] += eps
            minus[field][idx] -= eps
            fd[idx] = (ref_objective(plus) - ref_objective(minus)) / (2 * eps)
        scale = max(1.0, np.abs(fd).max())
        np.testing.assert_allclose(getattr(grads, field), fd, atol=2e-4 * scale, err_msg=field)


def test_check_grads_smooth_config():
    """jax.test_util.check_grads (forward and reverse) with the hard mask off (weight_threshold 0),
    where the renderer is smooth in every field."""
    grid = random_grid(jax.random.key(4), res=(4, 4, 4), channels=2, scale=1.0, bg=(2, 2))
    ro, rd = rays_of(**CAMERAS["outside"], size=3)
    config = render.RenderConfig(weight_threshold=0.0)

    def f(density, features, background, density_scale):
        g = VoxelGrid(density, features, background, density_scale)
        out = render.render_rays(g, ro, rd, None, None, config)
        return jnp.concatenate([out.features.ravel(), out.depth])

    check_grads(
        jax.jit(f),
        tuple(grid.__dict__[k] for k in VoxelGrid.__dataclass_fields__),
        order=1,
        modes=("rev",),
        eps=1e-2,
        atol=5e-2,
        rtol=5e-2,
    )


def test_vjp_equals_gradient_of_dot_product():
    grid = random_grid(jax.random.key(5))
    ro, rd = rays_of(**CAMERAS["outside"])
    cot = jax.random.normal(jax.random.key(6), (ro.shape[0], 4))

    @jax.jit
    def via_vjp(g):
        _, vjp_fn = jax.vjp(lambda g: render.render_rays(g, ro, rd).features, g)
        return vjp_fn(cot)[0]

    via_grad = jax.jit(jax.grad(lambda g: jnp.sum(render.render_rays(g, ro, rd).features * cot)))(
        grid
    )
    via_vjp = via_vjp(grid)
    chex.assert_trees_all_close(via_vjp, via_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("raw", [1e4, -1e4])
def test_finite_at_extreme_density(raw):
    grid = random_grid(jax.random.key(7))
    grid = grid.replace(density=jnp.full_like(grid.density, raw))
    ro, rd = rays_of(**CAMERAS["misses"])

    def objective(g):
        out = render.render_rays(g, ro, rd)
        return jnp.sum(out.features) + jnp.sum(out.depth) + jnp.sum(jnp.log1p(10 * out.weights))

    value, grads = jax.jit(jax.value_and_grad(objective))(grid)
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)


# ----------------------------------------------------------------------------- kernels
class KernelVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_intersect_box(self):
        fn = self.variant(lambda o, d: render.intersect_box(o, d, render.RenderConfig().aabb))
        t0, t1 = fn(jnp.array([-3.0, 0.0, 0.0]), jnp.array([1.0, 0.0, 0.0]))
        np.testing.assert_allclose([t0, t1], [2.0, 4.0], rtol=1e-6)
        t0, t1 = fn(jnp.array([0.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0]))
        np.testing.assert_allclose([t0, t1], [0.0, 1.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_composite_closed_form(self):
        """A constant density sigma over L samples: w_i = (1 - e^{-s d}) e^{-i s d}."""
        sigma = jnp.full(6, 2.0)
        feats = jnp.ones((6, 1))
        fn = self.variant(
            lambda s, f: render.composite_ray(
                s,
                f,
                jnp.arange(6.0),
                jnp.zeros(1),
                delta=0.1,
                weight_threshold=0.0,
                background_depth=10.0,
            )
        )
        rgb, _, weights, opacity = fn(sigma, feats)
        expected = (1 - np.exp(-0.2)) * np.exp(-0.2 * np.arange(6))
        np.testing.assert_allclose(weights, expected, rtol=1e-6)
        np.testing.assert_allclose(opacity, 1 - np.exp(-1.2), rtol=1e-6)
        np.testing.assert_allclose(rgb, [1 - np.exp(-1.2)], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_query_field_matches_trilinear(self):
        from sjc_jax.grid import trilinear

        grid = random_grid(jax.random.key(8))
        pts = jax.random.uniform(jax.random.key(9), (50, 3), minval=-1.0, maxval=1.0)
        raw, feats = self.variant(lambda g, p: render.query_field(g, p, AABB))(grid, pts)
        np.testing.assert_allclose(raw, trilinear(grid.density, pts), atol=1e-5)
        np.testing.assert_allclose(feats, trilinear(grid.features, pts), atol=1e-5)


# ----------------------------------------------------------------------------- background seam
def test_wrapped_bilinear_matches_periodic_reference():
    """wrap=True against numpy: rows (v, azimuth) periodic, columns (u, polar) clamped."""
    texture = np.asarray(jax.random.normal(jax.random.key(8), (5, 3, 2)), np.float64)
    uv = np.asarray(jax.random.uniform(jax.random.key(9), (64, 2)), np.float64)
    uv[:4] = [[0.0, 0.0], [1.0, 1.0], [0.5, 0.99], [0.02, 0.01]]
    height, width = texture.shape[:2]
    tiled = np.concatenate([texture[-1:], texture, texture[:1]], 0)  # one row of wrap each side
    tiled = np.concatenate([tiled[:, :1], tiled, tiled[:, -1:]], 1)  # one column of edge
    want = []
    for u, v in uv:
        col = np.clip(u * width - 0.5, 0, width - 1) + 1
        row = v * height - 0.5 + 1
        c0, r0 = int(np.floor(col)), int(np.floor(row))
        fc, fr = col - c0, row - r0
        want.append(
            (1 - fr) * ((1 - fc) * tiled[r0, c0] + fc * tiled[r0, c0 + 1])
            + fr * ((1 - fc) * tiled[r0 + 1, c0] + fc * tiled[r0 + 1, c0 + 1])
        )
    got = jax.vmap(lambda p: render.bilinear(jnp.asarray(texture, jnp.float32), p, wrap=True))(
        jnp.asarray(uv, jnp.float32)
    )
    np.testing.assert_allclose(got, np.array(want), atol=1e-5)


@pytest.mark.parametrize("wrap", [True, False])
def test_constant_background_has_no_seam(wrap):
    """An empty grid over a constant background renders that constant everywhere with the
    wrapped lookup; the original's zero padding darkens a row at the azimuth wrap (the seam
    the turntables showed), which this view crosses."""
    grid = random_grid(jax.random.key(10), res=(4, 4, 4), channels=3, bg=(16, 16))
    grid = grid.replace(density=jnp.full_like(grid.density, -1e4), background=jnp.ones((16, 16, 3)))
    camera = cam.make_camera(np.float32([1.5, 0.3, 0.0]), fov_x_deg=60.0, height=32, width=32)
    config = render.RenderConfig(background_wrap=wrap)
    image = np.asarray(jax.jit(render.render_view, static_argnums=2)(grid, camera, config).image)
    darkest = image.min(axis=(1, 2))  # per row
    if wrap:
        np.testing.assert_allclose(image, 1.0, atol=1e-5)
    else:
        assert darkest.min() < 0.9  # the seam the wrapped lookup removes
