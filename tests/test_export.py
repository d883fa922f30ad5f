"""Tests of sjc_jax.export: PNG, video, depth colouring, marching-cubes meshes, mesh files and
the metrics plot."""

from __future__ import annotations

import math
import warnings

import imageio.v3 as imageio
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from sjc_jax.export import (
    MESH_FILES,
    colorize_depth,
    save_mesh,
    save_mesh_files,
    save_metrics_plot,
    save_png,
    save_video,
    to_uint8,
    viridis,
)
from sjc_jax.mesh import default_density_threshold, extract_mesh

# Subprocesses (ffmpeg, the killed child) are fork+exec; JAX's at-fork warning does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
LUMA = np.array([0.2126, 0.7152, 0.0722])


def _no_temporaries(directory) -> None:
    assert not [p.name for p in directory.iterdir() if ".tmp" in p.name]


def test_to_uint8_clips_and_rounds():
    x = np.array([-0.5, 0.0, 0.5 / 255, 0.7 / 255, 0.5, 1.0, 2.0, np.nan], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 0, 1, 128, 255, 255, 0])
    assert to_uint8(jnp.ones((2, 2, 3))).dtype == np.uint8
    u = np.arange(6, dtype=np.uint8)
    assert to_uint8(u) is u
    with pytest.raises(ValueError, match="images"):
        to_uint8(np.arange(3))


@pytest.mark.parametrize("channels", [3, 1])
def test_png_round_trip(tmp_path, channels):
    rng = np.random.default_rng(0)
    image = rng.random((5, 7, channels)).astype(np.float32)
    path = save_png(tmp_path / "sub" / "image.png", image)
    loaded = imageio.imread(path)
    expected = to_uint8(image)
    np.testing.assert_array_equal(loaded, expected[..., 0] if channels == 1 else expected)
    _no_temporaries(path.parent)
    with pytest.raises(ValueError, match="image"):
        save_png(tmp_path / "bad.png", np.zeros((2, 2, 2)))


def test_viridis_matches_matplotlib_reference_values():
    # matplotlib's _viridis_data at indices 0, 64, 128, 191, 255.
    reference = np.array(
        [
            [0.267004, 0.004874, 0.329415],
            [0.229739, 0.322361, 0.545706],
            [0.127568, 0.566949, 0.550556],
            [0.369214, 0.788888, 0.382914],
            [0.993248, 0.906157, 0.143936],
        ]
    )
    t = np.array([0, 64, 128, 191, 255]) / 255
    np.testing.assert_allclose(viridis(t), reference, atol=0.02)


def test_colorize_depth_is_monotone_and_finite():
    depth = np.linspace(0.5, 10.0, 200).reshape(10, 20)
    rgb = colorize_depth(depth)
    assert rgb.shape == (10, 20, 3) and rgb.dtype == np.float32
    assert np.all(np.isfinite(rgb)) and rgb.min() >= 0 and rgb.max() <= 1
    luma = rgb.reshape(-1, 3) @ LUMA
    assert np.all(np.diff(luma) < 0), "farther must be darker"
    # The background depth (10) shows as the far colour, near as the near colour.
    np.testing.assert_allclose(rgb[-1, -1], viridis(0.0), atol=1e-6)
    np.testing.assert_allclose(rgb[0, 0], viridis(1.0), atol=1e-6)


def test_colorize_depth_sequences_and_edge_cases():
    frames = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 2.0)])
    frames[:, 0, 0] = 10.0
    rgb = colorize_depth(frames)
    assert rgb.shape == (2, 4, 4, 3)
    # One normalisation for the whole sequence: frame 0 (nearer) is brighter than frame 1.
    assert rgb[0, 1, 1] @ LUMA > rgb[1, 1, 1] @ LUMA
    weird = np.array([[np.nan, np.inf], [0.0, 3.0]])
    assert np.all(np.isfinite(colorize_depth(weird)))
    np.testing.assert_allclose(colorize_depth(weird)[0, 0], viridis(0.0), atol=1e-6)
    flat = colorize_depth(np.full((3, 3), 10.0))
    np.testing.assert_allclose(flat, np.broadcast_to(viridis(0.0), (3, 3, 3)), atol=1e-6)
    explicit = colorize_depth(np.array([[1.0, 2.0, 5.0]]), near=1.0, far=2.0)
    np.testing.assert_allclose(explicit[0, 2], explicit[0, 1], atol=1e-6)
    with pytest.raises(ValueError, match="depth"):
        colorize_depth(np.zeros(5))


@pytest.mark.parametrize(("size", "frames", "dtype"), [(8, 5, np.uint8), (64, 7, np.float32)])
def test_video_decodes_with_right_frame_count(tmp_path, size, frames, dtype):
    # A bright square moving to the right over a dark background.
    video = np.zeros((frames, size, size, 3), np.float32)
    for t in range(frames):
        video[t, size // 4 : size // 2, t * size // (2 * frames) : size // 2 + t] = 1.0
    video = to_uint8(video) if dtype == np.uint8 else video
    path = save_video(tmp_path / "v.mp4", video, fps=10)
    decoded = imageio.imread(path, index=None)
    side = max(size, 384)  # upscaled by nearest neighbour to at least 384 px
    assert decoded.shape == (frames, side, side, 3)
    # Content survives: nearest-neighbour downsampling of the decoded video matches the input.
    scale = side // size
    small = decoded[:, scale // 2 :: scale, scale // 2 :: scale].astype(np.float64) / 255
    assert np.abs(small - to_uint8(video) / 255).mean() < 0.05
    _no_temporaries(tmp_path)


def test_video_odd_sizes_and_grey(tmp_path):
    path = save_video(tmp_path / "odd.mp4", np.full((3, 129, 131), 0.5, np.float32))
    decoded = imageio.imread(path, index=None)
    assert decoded.shape == (3, 400, 400, 3)  # x3 to 387 x 393, padded to the macro block
    with pytest.raises(ValueError, match="frames"):
        save_video(tmp_path / "bad.mp4", np.zeros((0, 8, 8, 3)))
    with pytest.raises(ValueError, match="fps"):
        save_video(tmp_path / "bad.mp4", np.zeros((2, 8, 8, 3)), fps=0)
    assert not (tmp_path / "bad.mp4").exists()


def test_default_threshold_is_half_opacity_per_step():
    threshold = default_density_threshold(((-1, -1, -1), (1, 1, 1)), (100, 100, 100))
    np.testing.assert_allclose(threshold, math.log(2) / 0.01)
    np.testing.assert_allclose(-math.expm1(-threshold * 0.01), 0.5)


def _sphere(resolution, aabb, center, radius, peak=500.0):
    """Smooth sphere density [X, Y, Z] and world coordinates of the voxel centres."""
    aabb = np.asarray(aabb, np.float64)
    axes = [
        aabb[0, i] + (np.arange(resolution[i]) + 0.5) * (aabb[1, i] - aabb[0, i]) / resolution[i]
        for i in range(3)
    ]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    distance = np.linalg.norm(points - np.asarray(center), axis=-1)
    density = peak / (1.0 + np.exp((distance - radius) / 0.02))
    return density, points


def test_sphere_mesh_in_world_units_with_colours(tmp_path):
    # Anisotropic box and resolution, off-centre sphere: checks axis order and voxel centres.
    aabb = ((-1.0, -0.5, -1.5), (1.0, 1.5, 0.5))
    resolution = (40, 36, 44)
    center, radius = np.array([0.2, 0.4, -0.6]), 0.6
    density, points = _sphere(resolution, aabb, center, radius)
    lo, hi = np.asarray(aabb)
    colors = (points - lo) / (hi - lo)  # colour encodes the world position
    # Level peak / 2 sits exactly on the radius of this sigmoid profile.
    mesh = extract_mesh(density, colors, aabb=aabb, threshold=250.0)
    assert len(mesh.vertices) > 1000
    distance = np.linalg.norm(mesh.vertices - center, axis=-1)
    voxel = np.max((hi - lo) / np.asarray(resolution))
    assert np.abs(distance - radius).max() < 0.25 * voxel
    assert mesh.is_watertight
    assert mesh.volume > 0, "faces must wind outwards"
    np.testing.assert_allclose(mesh.volume, 4 / 3 * np.pi * radius**3, rtol=0.02)
    expected = to_uint8((mesh.vertices - lo) / (hi - lo))
    rgba = mesh.visual.vertex_colors
    assert rgba.shape == (len(mesh.vertices), 4)
    # Opacity weighting pulls colours inwards by a voxel at most.
    error = np.abs(rgba[:, :3].astype(int) - expected).max(axis=0)
    assert np.all(error <= 255 * voxel / (hi - lo) + 1), error
    assert np.all(rgba[:, 3] == 255)

    path = save_mesh(tmp_path / "mesh.ply", mesh)
    loaded = trimesh.load(path, force="mesh")
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, mesh.faces)
    np.testing.assert_array_equal(loaded.visual.vertex_colors, rgba)
    glb = trimesh.load(save_mesh(tmp_path / "mesh.glb", mesh), force="mesh")
    assert len(glb.faces) == len(mesh.faces)
    assert glb.visual.kind == "vertex"
    _no_temporaries(tmp_path)


def test_sphere_touching_the_box_closes_and_uses_default_threshold():
    aabb = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
    density, _ = _sphere((24, 24, 24), aabb, (0.0, 0.0, 0.0), radius=1.3)
    mesh = extract_mesh(density, np.full((24, 24, 24, 3), 0.5), aabb=aabb)
    assert mesh.is_watertight
    assert np.all(np.abs(mesh.vertices) <= 1.0 + 1e-6)


def test_vertex_colours_ignore_empty_voxels():
    aabb = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
    density, _ = _sphere((20, 20, 20), aabb, (0.0, 0.0, 0.0), radius=0.5)
    rng = np.random.default_rng(0)
    colors = rng.random((20, 20, 20, 3))  # untrained noise in empty space ...
    colors[density > 1.0] = (1.0, 0.0, 0.0)  # ... red where there is matter
    mesh = extract_mesh(density, colors, aabb=aabb, threshold=250.0)
    rgb = mesh.visual.vertex_colors[:, :3].astype(int)
    assert np.abs(rgb - [255, 0, 0]).max() <= 3


@pytest.mark.parametrize("fill", [0.0, 1e4])
def test_empty_or_full_volume_warns_and_writes_empty_file(tmp_path, fill):
    density = np.full((6, 6, 6), fill)
    with pytest.warns(UserWarning, match="no surface"):
        mesh = extract_mesh(density, np.zeros((6, 6, 6, 3)))
    assert len(mesh.vertices) == 0 and len(mesh.faces) == 0
    for name in ("empty.ply", "empty.glb"):
        path = save_mesh(tmp_path / name, mesh)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = trimesh.load(path)
        assert len(getattr(loaded, "vertices", [])) == 0
        assert path.stat().st_size > 0


def test_extract_mesh_rejects_bad_arguments():
    good = np.zeros((4, 4, 4))
    colors = np.zeros((4, 4, 4, 3))
    with pytest.raises(ValueError, match="density"):
        extract_mesh(np.zeros((4, 4)), colors)
    with pytest.raises(ValueError, match="colors"):
        extract_mesh(good, np.zeros((4, 4, 4, 4)))
    with pytest.raises(ValueError, match="aabb"):
        extract_mesh(good, colors, aabb=((1, 1, 1), (-1, -1, -1)))
    with pytest.raises(ValueError, match="density"):
        extract_mesh(np.full((4, 4, 4), np.nan), colors)
    with pytest.raises(ValueError, match="threshold"):
        extract_mesh(good, colors, threshold=-1.0)
    with pytest.raises(ValueError, match="path"):
        save_mesh("mesh.obj", trimesh.creation.box())


def test_mesh_files_round_trip_through_trimesh(tmp_path):
    aabb = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
    density, points = _sphere((32, 32, 32), aabb, (0.1, 0.0, -0.1), 0.6)
    mesh = extract_mesh(density, (points + 1) / 2, aabb=aabb, threshold=250.0)
    paths = save_mesh_files(tmp_path / "final", mesh)
    assert sorted(paths) == sorted(MESH_FILES)
    assert all(p.parent == tmp_path / "final" and p.stat().st_size > 0 for p in paths.values())
    _no_temporaries(tmp_path / "final")
    corners = mesh.vertices[mesh.faces]
    rgb = mesh.visual.vertex_colors[mesh.faces][..., :3].astype(float)

    glb = trimesh.load(paths["mesh.glb"], force="mesh", process=False)
    np.testing.assert_allclose(glb.vertices[glb.faces], corners, atol=1e-6)
    np.testing.assert_array_equal(glb.visual.vertex_colors[glb.faces][..., :3], rgb)

    obj = trimesh.load(paths["mesh.obj"], force="mesh", process=False)
    assert obj.visual.kind == "texture" and obj.visual.material.image is not None
    np.testing.assert_allclose(obj.vertices[obj.faces], corners, atol=1e-5)  # same triangles
    assert len(obj.vertices) >= len(mesh.vertices)  # split along chart seams
    # The texture read back at each vertex's UV gives the vertex colour.
    sampled = obj.visual.to_color().vertex_colors[obj.faces][..., :3].astype(float)
    error = np.abs(sampled - rgb)
    assert error.mean() < 2.0 and np.percentile(error, 99) < 12, (error.mean(), error.max())


def test_empty_mesh_files(tmp_path):
    with pytest.warns(UserWarning, match="no surface"):
        mesh = extract_mesh(np.zeros((4, 4, 4)), np.zeros((4, 4, 4, 3)))
    paths = save_mesh_files(tmp_path, mesh)
    assert sorted(paths) == sorted(MESH_FILES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = trimesh.load(paths["mesh.obj"])
    assert len(getattr(loaded, "faces", [])) == 0
    assert imageio.imread(paths["mesh_texture.png"]).shape == (1, 1, 3)


def test_metrics_plot(tmp_path):
    rng = np.random.default_rng(0)
    records = [
        {"step": i + 1, "sigma": float(rng.uniform(0.1, 12)), "label": i % 4, "finite": True,
         "emptiness": 1.0 / (i + 1), "score_norm": float(rng.normal(1, 0.1))}
        for i in range(300)
    ]  # fmt: skip
    path = save_metrics_plot(tmp_path / "metrics.png", records)
    image = imageio.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 1000  # 3 panels a row
    assert image[..., :3].std() > 10
    small = imageio.imread(save_metrics_plot(tmp_path / "one.png", records, keys=["sigma"]))
    assert small.shape[1] < image.shape[1]
    with pytest.raises(ValueError, match="records"):
        save_metrics_plot(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match="numeric"):
        save_metrics_plot(tmp_path / "x.png", [{"step": 1, "finite": True}])
