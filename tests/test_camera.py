"""Cameras: look-at frames, ray directions, the SJC training distribution and its view labels."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax import camera as cam


def test_look_at_is_orthonormal_and_right_handed():
    eyes = jax.random.normal(jax.random.key(0), (64, 3)) * 2
    rot = cam.look_at(eyes)
    eye_t = np.einsum("nij,nik->njk", rot, rot)
    np.testing.assert_allclose(eye_t, np.broadcast_to(np.eye(3), eye_t.shape), atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    # The camera's +z axis points from the target to the eye; x stays horizontal.
    z = rot[..., 2]
    np.testing.assert_allclose(z, eyes / np.linalg.norm(eyes, axis=-1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(rot[..., 1, 0], 0.0, atol=1e-6)


def test_rays_unit_and_centre_ray_hits_target():
    target = np.array([0.2, -0.1, 0.3], np.float32)
    camera = cam.make_camera(
        np.array([1.0, 2.0, -1.5]), fov_x_deg=50.0, height=9, width=7, target=target
    )
    origins, dirs = cam.generate_rays(camera)
    chex.assert_shape([origins, dirs], [(63, 3), (63, 3)])
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=-1), 1.0, atol=1e-6)
    centre = dirs[4 * 7 + 3]  # row 4, col 3 of a 9 x 7 image
    to_target = target - np.asarray(camera.eye)
    np.testing.assert_allclose(centre, to_target / np.linalg.norm(to_target), atol=1e-6)


def test_pixel_convention_matches_original():
    """Row 0 is the top, columns grow to the right, the horizontal fov spans the pixel edges."""
    camera = cam.make_camera(np.array([0.0, 0.0, 3.0]), fov_x_deg=90.0, height=4, width=4)
    d = np.asarray(cam.pixel_directions(camera)).reshape(4, 4, 3)
    f = 2.0  # (W / 2) / tan(45 deg)
    np.testing.assert_allclose(d[0, 0], [(0 - 1.5) / f, (1.5) / f, -1], atol=1e-6)
    np.testing.assert_allclose(d[3, 2], [(2 - 1.5) / f, -(3 - 1.5) / f, -1], atol=1e-6)
    _, dirs = cam.generate_rays(camera)
    assert dirs[0, 1] > 0 and dirs[0, 0] < 0  # top-left looks up and left (-x from +z)


def test_training_distribution_and_label_shares():
    cams, labels = cam.sample_training_cameras(jax.random.key(0), 20000)
    shares = np.bincount(np.asarray(labels), minlength=4) / 20000
    expected = np.array([0.175, 0.35, 0.175, 0.30])
    np.testing.assert_allclose(shares, expected, atol=0.015)
    np.testing.assert_allclose(np.linalg.norm(cams.eye, axis=-1), 1.5, rtol=1e-5)
    fov = np.rad2deg(np.asarray(cams.fov_x))
    assert fov.min() >= 40 and fov.max() < 70
    # Area-uniform polar angle down to arccos(1 - 2 * 100/180) below +y: y >= 1.5 * cos(96.4 deg).
    assert np.asarray(cams.eye[:, 1]).min() >= 1.5 * np.cos(np.arccos(1 - 200 / 180)) - 1e-5
    # cos(polar) = 1 - 2 v / pi is uniform in (1 - 200/180, 1] (area-uniform), mean 4/9.
    np.testing.assert_allclose(np.mean(cams.eye[:, 1]) / 1.5, 4 / 9, atol=0.01)


def test_view_labels_by_the_original_rule():
    h = jnp.array([0.0, 44.9, 45.0, 134.9, 135.0, 224.9, 225.0, 314.9, 315.0, 10.0])
    v = jnp.array([50.0] * 9 + [29.0])
    got = np.asarray(cam.view_label(h, v))
    f, s, b, o = cam.VIEW_FRONT, cam.VIEW_SIDE, cam.VIEW_BACK, cam.VIEW_OVERHEAD
    np.testing.assert_array_equal(got, [f, f, s, s, b, b, s, s, f, o])
    # Azimuth 0 puts the camera on -x (the original's eye placement).
    eye = np.asarray(cam.sjc_eye(jnp.float32(0.0), jnp.float32(np.pi / 2), 1.5))
    np.testing.assert_allclose(eye, [-1.5, 0.0, 0.0], atol=1e-6)


def test_paths():
    spiral = cam.spiral_path()
    chex.assert_shape(spiral.eye, (100, 3))
    e = np.asarray(spiral.eye)
    np.testing.assert_allclose(e[-1], [1.5 * np.cos(np.deg2rad(1080)), 0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(e[0, 1], 1.5 * 0.99, rtol=1e-6)
    np.testing.assert_allclose(np.hypot(e[0, 0], e[0, 2]), 0.5, rtol=1e-5)  # min radius
    table = cam.turntable_path(num_frames=8, elevation_deg=0.0)
    np.testing.assert_allclose(np.linalg.norm(table.eye, axis=-1), 1.5, rtol=1e-6)
    np.testing.assert_allclose(table.eye[0], [-1.5, 0.0, 0.0], atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num"):
        cam.sample_training_cameras(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="radius"):
        cam.sample_training_cameras(jax.random.key(0), 2, radius=-1.0)
