"""UV atlases and baked textures: rasterisation against a brute-force point-in-triangle test."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from sjc_jax import texture


def _brute_force_bake(uv, faces, colors, size):
    """Every texel centre tested against every triangle, in float64 (tiny inputs only)."""
    height, width = size
    out = np.full((height, width, colors.shape[1]), np.nan)
    for row in range(height):
        for col in range(width):
            p = np.array([(col + 0.5) / width, 1 - (row + 0.5) / height])
            for face in faces:
                a, b, c = uv[face]
                m = np.array([b - a, c - a]).T
                if abs(np.linalg.det(m)) < 1e-12:
                    continue
                w1, w2 = np.linalg.solve(m, p - a)
                bary = np.array([1 - w1 - w2, w1, w2])
                if np.all(bary >= -1e-6):
                    out[row, col] = bary @ colors[face]
    return out


def test_bake_interpolates_vertex_colours_like_brute_force():
    rng = np.random.default_rng(0)
    uv = np.array([[0.05, 0.05], [0.9, 0.1], [0.2, 0.8], [0.95, 0.95], [0.5, 0.5]])
    faces = np.array([[0, 1, 4], [1, 3, 4], [4, 3, 2]])
    colors = rng.random((5, 3))
    size = (12, 10)
    baked = texture.bake_vertex_colors(uv, faces, colors, size, padding=0, background=-1.0)
    reference = _brute_force_bake(uv, faces, colors, size)
    covered = ~np.isnan(reference[..., 0])
    assert covered.sum() > 20
    np.testing.assert_allclose(baked[covered], reference[covered], atol=1e-9)
    outside = ~covered & (baked[..., 0] != -1.0)  # only centroid texels of thin faces
    assert outside.sum() <= len(faces)


def test_dilate_grows_charts_without_changing_them():
    tex = np.zeros((5, 5, 1))
    tex[2, 2] = 1.0
    filled = np.zeros((5, 5), bool)
    filled[2, 2] = True
    grown, mask = texture.dilate(tex, filled, steps=1)
    assert mask.sum() == 5 and grown[2, 2, 0] == 1.0
    np.testing.assert_array_equal(grown[[1, 3, 2, 2], [2, 2, 1, 3], 0], 1.0)
    assert grown[0, 0, 0] == 0.0


def test_uv_atlas_of_a_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    vmapping, faces, uv, (height, width) = texture.uv_atlas(
        sphere.vertices, sphere.faces, resolution=256
    )
    assert faces.shape == sphere.faces.shape and len(vmapping) == len(uv) >= len(sphere.vertices)
    np.testing.assert_array_equal(vmapping[faces], sphere.faces)  # the same triangles, in order
    assert uv.min() >= 0 and uv.max() <= 1 and 200 < height < 400 and 200 < width < 400
    # Charts do not overlap: each texel centre lies in at most one triangle.
    face, row, col, _ = texture._rasterize(uv, faces, (height, width))
    texels = row * width + col
    assert len(np.unique(texels)) == len(texels) > 0.3 * height * width
    with pytest.raises(ValueError, match="faces"):
        texture.uv_atlas(sphere.vertices, np.zeros((0, 3)))
