"""Tests of the procedural scenes, grid files, and the testbed's dataset and held-out cameras."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax.camera import (
    NUM_VIEW_LABELS,
    VIEW_BACK,
    VIEW_FRONT,
    VIEW_OVERHEAD,
    VIEW_SIDE,
    index_camera,
    make_camera,
    sample_training_cameras,
)
from sjc_jax.grid import activate_density
from sjc_jax.render import RenderConfig, render_view
from sjc_jax.testbed import scenes

RES = 32
CONFIG = RenderConfig()
# A colour only the front (-x side) of each scene shows: beak, door, chest panel, logo.
FRONT_COLOURS = {
    "duck": (1.0, 0.4, 0.0),
    "house": (0.4, 0.2, 0.06),
    "robot": (0.95, 0.8, 0.1),
    "mug": (1.0, 0.85, 0.0),
}


@pytest.fixture(scope="module")
def grids():
    return {name: scenes.make_scene(name, resolution=RES) for name in scenes.list_scenes()}


def test_registry():
    names = scenes.list_scenes()
    assert len(names) >= 3
    assert set(names) == set(scenes.SCENES) == set(FRONT_COLOURS)


@pytest.mark.parametrize("name", scenes.list_scenes())
def test_scene_shapes_values_and_extent(grids, name):
    grid = grids[name]
    chex.assert_shape(grid.density, (RES, RES, RES))
    chex.assert_shape(grid.features, (RES, RES, RES, 3))
    res_bg = scenes.BACKGROUND_RESOLUTION
    chex.assert_shape(grid.background, (res_bg, res_bg, 3))
    chex.assert_shape(grid.density_scale, ())
    chex.assert_tree_all_finite(grid)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(grid))
    features = np.asarray(grid.features)
    assert features.min() >= 0.0 and features.max() <= 1.0
    np.testing.assert_array_equal(
        np.asarray(grid.background), np.broadcast_to(scenes.BACKGROUND_RGB, grid.background.shape)
    )
    sigma = np.asarray(activate_density(grid.density, grid.density_scale))
    voxel = 2.0 / RES
    # Inside: an optical depth of about 2 per voxel; empty space: ~0.
    assert sigma.max() * voxel > 1.9
    assert sigma.min() < 1e-4
    for corner in [(0, 0, 0), (-1, -1, -1), (0, -1, 0), (-1, 0, -1)]:
        assert sigma[corner] < 1e-4
    centers = scenes.voxel_centers(RES)
    radius = np.linalg.norm(centers, axis=-1)
    assert sigma[radius > 0.7 + 2 * voxel].max() < 0.1, "object reaches beyond radius 0.7"
    occupied = (sigma * voxel > 0.5).mean()
    assert 0.02 < occupied < 0.5


def test_density_ramp_matches_signed_distance():
    """Raw density is linear in the signed distance over RAMP_VOXELS voxels, from RAW_OUTSIDE to an
    optical depth of OPTICAL_DEPTH_PER_VOXEL per voxel inside (checked on a sphere)."""
    res = 40
    voxel = 2.0 / res
    centers = scenes.voxel_centers(res)
    distance = np.linalg.norm(centers, axis=-1) - 0.5
    grid = scenes.scene_from_parts([(distance, np.array([0.2, 0.4, 0.6]))], voxel)
    raw_inside = scenes.OPTICAL_DEPTH_PER_VOXEL / voxel + 1.0
    ramp = scenes.RAMP_VOXELS * voxel
    want = np.interp(-distance, [-ramp / 2, ramp / 2], [scenes.RAW_OUTSIDE, raw_inside])
    np.testing.assert_allclose(np.asarray(grid.density), want, rtol=1e-5, atol=1e-4)
    sigma = activate_density(grid.density, grid.density_scale)
    np.testing.assert_allclose(sigma.max() * voxel, scenes.OPTICAL_DEPTH_PER_VOXEL, rtol=1e-5)
    line = np.asarray(grid.density)[:, res // 2, res // 2]
    intermediate = (line > scenes.RAW_OUTSIDE + 1) & (line < raw_inside - 1)
    assert intermediate.sum() >= 4  # a few voxels at each crossing of the sphere, not a jump
    np.testing.assert_array_equal(np.asarray(grid.features)[0, 0, 0], np.float32([0.2, 0.4, 0.6]))


@pytest.mark.parametrize("name", scenes.list_scenes())
def test_front_differs_from_back(grids, name):
    """Mirroring x -> -x changes the scene, and the front camera (on -x, SJC azimuth 0) sees the
    scene's front colour while the back camera (on +x) does not."""
    grid = grids[name]
    sigma = np.asarray(activate_density(grid.density, grid.density_scale))
    occupancy = sigma * (2.0 / RES) > 0.5
    features = np.asarray(grid.features)
    mirrored_differs = np.abs(features - features[::-1]).max(-1) > 0.2
    mirrored_occupancy = occupancy != occupancy[::-1]
    assert (occupancy & (mirrored_differs | mirrored_occupancy)).sum() > 20

    grid = scenes.make_scene(name, resolution=64)  # small parts need the default resolution
    size = 32
    front = make_camera(jnp.array([-1.5, 0.3, 0.0]), fov_x_deg=60.0, height=size, width=size)
    back = make_camera(jnp.array([1.5, 0.3, 0.0]), fov_x_deg=60.0, height=size, width=size)
    render = jax.jit(lambda g, c: render_view(g, c, CONFIG).image)
    colour = np.asarray(FRONT_COLOURS[name])

    def matches(camera):
        image = np.asarray(render(grid, camera))
        return (np.abs(image - colour).max(-1) < 0.12).sum()

    assert matches(front) >= 4, "the front colour is not visible from the front camera"
    assert matches(back) <= matches(front) // 4


def test_make_scene_default_resolution_and_errors():
    grid = scenes.make_scene("house")
    assert grid.resolution == (64, 64, 64)
    with pytest.raises(ValueError, match="name"):
        scenes.make_scene("teapot")
    with pytest.raises(ValueError, match="resolution"):
        scenes.make_scene("duck", resolution=4)


def test_sdf_primitives_against_known_distances():
    p = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    np.testing.assert_allclose(scenes.sphere(p, (0, 0, 0), 1.0), [1.0, -1.0, 4.0])
    np.testing.assert_allclose(scenes.box(p, (0, 0, 0), (1, 1, 1)), [1.0, -1.0, np.sqrt(13)])
    np.testing.assert_allclose(scenes.ellipsoid(p[:1], (0, 0, 0), (1, 1, 1)), [1.0])
    np.testing.assert_allclose(scenes.cylinder(p, (0, 0, 0), 1.0, 1.0, axis=0), [1.0, -1.0, 4.0])
    np.testing.assert_allclose(scenes.torus(p[1:2], (0, 0, 0), 2.0, 0.5, axis=1), [1.5])


# --- dataset and held-out cameras --------------------------------------------------------------


def test_render_dataset_matches_single_views(grids):
    grid = scenes.make_scene("robot", resolution=16)
    key = jax.random.key(3)
    images, labels, cameras = scenes.render_dataset(
        key, grid, num_views=5, image_size=12, render_config=CONFIG, chunk_size=2
    )
    chex.assert_shape(images, (5, 12, 12, 3))
    chex.assert_shape(labels, (5,))
    assert labels.dtype == jnp.int32
    chex.assert_tree_all_finite(images)
    ref_cameras, ref_labels = sample_training_cameras(key, 5, height=12, width=12)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(cameras.eye, ref_cameras.eye)
    render = jax.jit(lambda g, c: render_view(g, c, CONFIG).image)
    for i in range(5):
        want = render(grid, index_camera(cameras, i))
        np.testing.assert_allclose(images[i], want, atol=1e-5)


def test_render_views_chunking_does_not_matter():
    grid = scenes.make_scene("duck", resolution=16)
    cameras, _ = scenes.heldout_cameras(image_size=10, num_azimuths=3)
    a = scenes.render_views(grid, cameras, CONFIG, chunk_size=4)
    b = scenes.render_views(grid, cameras, CONFIG, chunk_size=6)
    chex.assert_shape(a, [(6, 10, 10, 3), (6, 10, 10), (6, 10, 10)])
    chex.assert_trees_all_close(a, b, atol=1e-5)
    assert float(a[2].max()) > 0.9 and float(a[2].min()) < 0.01  # object and empty pixels
    with pytest.raises(ValueError, match="chunk_size"):
        scenes.render_views(grid, cameras, CONFIG, chunk_size=0)


def test_heldout_cameras():
    cameras, labels = scenes.heldout_cameras()
    num = cameras.eye.shape[0]
    assert num >= 8
    chex.assert_shape(labels, (num,))
    again, again_labels = scenes.heldout_cameras()
    chex.assert_trees_all_equal((cameras, labels), (again, again_labels))
    eye = np.asarray(cameras.eye, np.float64)
    np.testing.assert_allclose(np.linalg.norm(eye, axis=-1), 1.5, rtol=1e-5)
    # Cameras look at the origin: their +z axis (backwards) points along the eye.
    np.testing.assert_allclose(
        np.asarray(cameras.rotation)[:, :, 2], eye / 1.5, atol=1e-5, err_msg="not aimed at origin"
    )
    assert len(np.unique(np.round(eye, 4), axis=0)) == num
    # Labels from the positions (SJC: azimuth 0 on -x, overhead when v < 30 deg).
    azimuth = np.rad2deg(np.pi - np.arctan2(eye[:, 2], eye[:, 0])) % 360
    polar = np.arccos(eye[:, 1] / 1.5)
    v_deg = np.rad2deg(np.pi / 2 * (1 - np.cos(polar)))
    quadrant = (((azimuth + 45) % 360) // 90).astype(int)
    expected = np.array([VIEW_FRONT, VIEW_SIDE, VIEW_BACK, VIEW_SIDE])[quadrant]
    expected = np.where(v_deg < 30, VIEW_OVERHEAD, expected)
    np.testing.assert_array_equal(labels, expected)
    assert set(np.asarray(labels).tolist()) == set(range(NUM_VIEW_LABELS))
    # None coincides with a training draw.
    train, _ = sample_training_cameras(jax.random.key(0), 2000)
    gaps = np.linalg.norm(eye[:, None] - np.asarray(train.eye)[None], axis=-1)
    assert gaps.min() > 1e-4
    with pytest.raises(ValueError, match="elevations_deg"):
        scenes.heldout_cameras(elevations_deg=(95.0,))
