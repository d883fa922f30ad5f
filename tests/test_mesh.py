"""The mesh rule of sjc_jax.mesh on synthetic grids with known spheres, and the mesh metrics of
sjc_jax.mesh_metrics against closed-form cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import trimesh

from sjc_jax import mesh as mesh_rule
from sjc_jax import mesh_metrics
from sjc_jax.mesh import default_density_threshold, extract_mesh

AABB = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
RES = 40
VOXEL = 2.0 / RES


def _centres():
    axis = -1.0 + (np.arange(RES) + 0.5) * VOXEL
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1)  # [R, R, R, 3]


def _sphere(radius, peak, centre=(0.0, 0.0, 0.0), ramp_voxels=2.0):
    """Density ``peak`` inside, falling linearly to 0 over ``ramp_voxels`` around the radius."""
    r = np.linalg.norm(_centres() - np.asarray(centre), axis=-1)
    return peak * np.clip((radius - r) / (ramp_voxels * VOXEL) + 0.5, 0.0, 1.0)


def _colors():
    return np.full((RES, RES, RES, 3), 0.5)


def _radii(mesh):
    return np.linalg.norm(np.asarray(mesh.vertices, np.float64), axis=-1)


def test_level_of_an_opaque_sphere_gives_its_surface():
    density = _sphere(0.5, peak=40.0)
    mesh, info = mesh_rule.object_mesh(density, _colors(), aabb=AABB)
    assert info.rule == "silhouette" and 0 < info.level < 40.0
    assert info.silhouette_iou > 0.97
    assert (info.pieces_before, info.pieces, info.largest_fraction) == (1, 1, 1.0)
    assert info.faces == len(mesh.faces) > 0
    assert abs(np.mean(_radii(mesh)) - 0.5) < VOXEL  # the sphere's surface, within a voxel


def test_a_faint_object_below_the_fixed_level_is_meshed():
    """A lift whose density stays below ``ln 2 / delta`` (a learned lift's) but whose columns
    are opaque: the fixed level finds nothing, the rule the sphere."""
    density = _sphere(0.5, peak=8.0, ramp_voxels=4.0)
    fixed = default_density_threshold(AABB, density.shape)
    assert density.max() < fixed
    mesh, info = mesh_rule.object_mesh(density, _colors(), aabb=AABB)
    assert info.pieces == 1 and info.faces > 1000
    assert abs(np.mean(_radii(mesh)) - 0.5) < VOXEL


def test_a_floater_is_removed():
    density = _sphere(0.5, peak=40.0)
    density[34:36, 34:36, 34:36] = 40.0  # a 2-voxel cube near the corner, opaque in its columns
    mesh, info = mesh_rule.object_mesh(density, _colors(), aabb=AABB)
    assert (info.pieces_before, info.pieces) == (2, 1)
    assert info.removed_faces > 0 and info.largest_fraction == 1.0
    assert info.largest_fraction_before == info.faces / (info.faces + info.removed_faces)
    assert _radii(mesh).max() < 0.5 + 2 * VOXEL  # nothing left near the corner
    assert np.asarray(mesh.visual.vertex_colors).shape == (len(mesh.vertices), 4)


def test_pieces_above_the_fraction_are_kept():
    density = _sphere(0.4, peak=40.0, centre=(-0.45, 0, 0)) + _sphere(
        0.3, peak=40.0, centre=(0.5, 0, 0)
    )
    _, info = mesh_rule.object_mesh(density, _colors(), aabb=AABB)
    assert (info.pieces_before, info.pieces, info.removed_faces) == (2, 2, 0)
    assert 0.5 < info.largest_fraction < 0.8


def test_given_level_and_nothing_opaque():
    density = _sphere(0.5, peak=40.0)
    _, info = mesh_rule.object_mesh(density, _colors(), aabb=AABB, threshold=20.0)
    assert (info.rule, info.level, info.silhouette_iou) == ("given", 20.0, None)
    faint = _sphere(0.5, peak=0.1)  # nowhere half opaque
    assert mesh_rule.choose_level(faint, np.full(3, VOXEL)) == (None, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh, info = mesh_rule.object_mesh(faint, _colors(), aabb=AABB)
    assert len(mesh.faces) == 0 and info.faces == 0 and info.pieces == 0
    assert [str(w.message) for w in caught if "mesh" in str(w.message)] == [
        "the lift is nowhere half opaque: no silhouette to mesh, writing an empty mesh"
    ]


# ----------------------------------------------------------------------------- mesh metrics
def _ball(radius, subdivisions=5):
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)


def test_concentric_spheres():
    """Distances are the radius gap both ways; normals agree; F is 0 or 1 around the gap."""
    inner, outer = _ball(0.5), _ball(0.55)
    got = mesh_metrics.compare_meshes(inner, outer, tau=0.04)
    assert got["chamfer"] == pytest.approx(0.05, abs=2e-3)
    assert got["normal_consistency"] > 0.999
    assert (got["f_score"], got["precision"], got["recall"]) == (0.0, 0.0, 0.0)
    assert mesh_metrics.compare_meshes(inner, outer, tau=0.06)["f_score"] == 1.0


def test_same_surface_and_a_half():
    ball = _ball(0.5)
    same = mesh_metrics.compare_meshes(ball, ball)
    assert same["chamfer"] < 0.01 and same["f_score"] == 1.0  # sampling spacing only
    keep = ball.triangles_center[:, 2] > 0
    half = trimesh.Trimesh(ball.vertices, ball.faces[keep], process=False)
    got = mesh_metrics.compare_meshes(half, ball, tau=0.04)
    # Precision 1; recall = the area with z > -tau (Archimedes: (R + tau) / 2R).
    recall = (0.5 + 0.04) / 1.0
    assert got["precision"] == 1.0
    assert got["recall"] == pytest.approx(recall, abs=0.02)
    assert got["f_score"] == pytest.approx(2 * recall / (1 + recall), abs=0.02)


def test_samples_are_uniform_by_area_with_unit_normals():
    square = trimesh.Trimesh(
        [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 0, 0], [4, 0, 0], [4, 1, 0]],
        [[0, 1, 2], [0, 2, 3], [4, 5, 6]],
        process=False,
    )  # a unit square, and a triangle of area 1 beside it
    points, normals = mesh_metrics.sample_surface(square, 40000)
    assert np.mean(points[:, 0] > 1.5) == pytest.approx(0.5, abs=0.01)
    np.testing.assert_allclose(np.abs(normals[:, 2]), 1.0)
    assert mesh_metrics.compare_meshes(trimesh.Trimesh(), square) is None


def test_a_hollow_shell_is_meshed_solid():
    """A sphere opaque only in a shell two voxels thick, empty inside (a lift's interior is
    never trained): the inner wall is hidden from every axis and filled, one surface remains."""
    shell = _sphere(0.5, peak=40.0) - _sphere(0.4, peak=40.0)
    hidden = mesh_rule.hidden_voxels(shell, np.full(3, VOXEL))
    r = np.linalg.norm(_centres(), axis=-1)
    assert hidden[r < 0.35].all() and not hidden[r > 0.55].any()
    mesh, info = mesh_rule.object_mesh(shell, _colors(), aabb=AABB)
    assert info.filled_voxels > 0 and info.pieces == 1
    assert _radii(mesh).min() > 0.5 - 2 * VOXEL  # no inner wall left
    unfilled = extract_mesh(shell, _colors(), aabb=AABB, threshold=info.level)
    assert _radii(unfilled).min() < 0.45  # without the fill, the inner wall


def test_a_hazy_lift_is_lowered_until_it_connects():
    """Two opaque balls joined by a faint neck (opacity 0.2 across it): the silhouettes match
    best above the neck's density, where the balls fall apart (the larger holds 80 % of the
    voxels); the level goes down until one component holds 90 %, and the mesh is one piece."""
    balls = _sphere(0.4, peak=40.0, centre=(-0.4, 0, 0)) + _sphere(
        0.25, peak=40.0, centre=(0.5, 0, 0)
    )
    centres = _centres()
    neck = (np.abs(centres[..., 0]) < 0.4) & (np.linalg.norm(centres[..., 1:], axis=-1) < 0.05)
    density = np.maximum(balls, np.where(neck, 2.0, 0.0))
    peaks, masks = mesh_rule.silhouettes(density, np.full(3, VOXEL))
    x = centres[:, 20, 20, 0]
    gap = (x > 0.05) & (x < 0.2)  # between the balls: the neck is not in the volume's silhouette
    assert gap.any() and not masks[1][gap, 20].any()
    apart = density > 2.0
    assert mesh_rule.largest_share(apart) < 0.9
    level, _ = mesh_rule.choose_level(density, np.full(3, VOXEL))
    assert level < 2.0 and mesh_rule.largest_share(density > level) >= 0.9
    _, info = mesh_rule.object_mesh(density, _colors(), aabb=AABB)
    assert info.pieces_before == info.pieces == 1
    assert mesh_rule.largest_share(np.zeros((3, 3, 3), bool)) == 0.0
