"""Grid files: exact round trips, one-line errors naming the file, atomic writes."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax import grid_io
from sjc_jax.grid import init_grid
from sjc_jax.testbed import scenes


@pytest.fixture(scope="module")
def grids():
    return {name: scenes.make_scene(name, resolution=16) for name in ("duck", "house", "mug")}


def test_grid_file_round_trip_is_exact(grids, tmp_path):
    grid = grids["mug"]
    path = tmp_path / "scene.npz"
    aabb = ((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
    grid_io.save_grid_file(path, grid, aabb=aabb, feature_space="rgb")
    loaded, loaded_aabb, space = grid_io.load_grid_file(path)
    assert space == "rgb"
    np.testing.assert_array_equal(loaded_aabb, np.asarray(aabb))
    chex.assert_trees_all_equal(loaded, grid, strict=True)
    with np.load(path) as data:
        assert sorted(data.files) == sorted(grid_io.GRID_FILE_KEYS)
    assert os.listdir(tmp_path) == ["scene.npz"]


def test_grid_file_sd_latent_and_overwrite(tmp_path):
    grid = init_grid(jax.random.key(0), resolution=(5, 6, 7), channels=4, background_resolution=3)
    grid = grid.replace(density_scale=jnp.float32(0.25))
    path = str(tmp_path / "latent.npz")
    grid_io.save_grid_file(path, scenes.make_scene("duck", resolution=8), feature_space="rgb")
    grid_io.save_grid_file(path, grid, aabb=((-2, -1, -1), (2, 1, 3)), feature_space="sd-latent")
    loaded, aabb, space = grid_io.load_grid_file(path)
    assert space == "sd-latent"
    np.testing.assert_array_equal(aabb, [[-2, -1, -1], [2, 1, 3]])
    chex.assert_trees_all_equal(loaded, grid, strict=True)


def _valid_arrays(grid):
    return {
        "density": np.asarray(grid.density),
        "features": np.asarray(grid.features),
        "background": np.asarray(grid.background),
        "density_scale": np.asarray(grid.density_scale),
        "aabb": np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]),
        "feature_space": np.array("rgb"),
    }


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.pop("features"), "missing \\['features'\\]"),
        (lambda a: a.update(extra=np.zeros(3)), "unexpected \\['extra'\\]"),
        (lambda a: a.update(features=a["features"][..., :2]), "features must be"),
        (lambda a: a.update(features=a["features"][:-1]), "features must be"),
        (lambda a: a.update(density=a["density"][0]), "density must be"),
        (lambda a: a.update(background=a["background"][..., :1]), "background must be"),
        (lambda a: a.update(density_scale=np.zeros(2, np.float32)), "density_scale"),
        (lambda a: a.update(aabb=np.zeros((2, 3))), "aabb"),
        (lambda a: a.update(aabb=np.zeros(3)), "aabb"),
        (lambda a: a.update(density=a["density"].astype(np.int32)), "density must be floating"),
        (lambda a: a["features"].__setitem__((0, 0, 0, 0), np.nan), "features has non-finite"),
        (lambda a: a["density"].__setitem__((1, 1, 1), np.inf), "density has non-finite"),
        (lambda a: a.update(feature_space=np.array("xyz")), "feature_space must be one of"),
        (lambda a: a.update(feature_space=np.array(["rgb"])), "feature_space must be a string"),
        (lambda a: a.update(feature_space=np.array("sd-latent")), "features must be"),
    ],
)
def test_bad_grid_files_give_clear_errors(grids, tmp_path, change, match):
    arrays = {k: np.array(v) for k, v in _valid_arrays(grids["duck"]).items()}
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match) as info:
        grid_io.load_grid_file(path)
    assert str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not a zip file")
    with pytest.raises(ValueError, match="not an .npz archive") as info:
        grid_io.load_grid_file(text)
    assert str(text) in str(info.value)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="not an .npz"):
        grid_io.load_grid_file(single)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, density=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="cannot be read"):
        grid_io.load_grid_file(pickled)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        grid_io.load_grid_file(tmp_path / "missing.npz")


def test_saving_an_invalid_grid_writes_nothing(grids, tmp_path):
    path = tmp_path / "grid.npz"
    bad = grids["duck"].replace(density=grids["duck"].density.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="density has non-finite"):
        grid_io.save_grid_file(path, bad, feature_space="rgb")
    with pytest.raises(ValueError, match="features must be"):
        grid_io.save_grid_file(path, grids["duck"], feature_space="sd-latent")
    with pytest.raises(ValueError, match="aabb"):
        grid_io.save_grid_file(
            path, grids["duck"], aabb=((1, 1, 1), (0, 0, 0)), feature_space="rgb"
        )
    assert os.listdir(tmp_path) == []


def test_save_is_atomic(grids, tmp_path, monkeypatch):
    """A failure in the middle of writing leaves the old file intact and no temporary file."""
    path = tmp_path / "grid.npz"
    grid_io.save_grid_file(path, grids["duck"], feature_space="rgb")
    before = path.read_bytes()

    def broken_savez(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        grid_io.save_grid_file(path, grids["house"], feature_space="rgb")
    assert os.listdir(tmp_path) == ["grid.npz"]
    assert path.read_bytes() == before
    fresh = tmp_path / "fresh.npz"
    with pytest.raises(OSError, match="disk full"):
        grid_io.save_grid_file(fresh, grids["house"], feature_space="rgb")
    assert os.listdir(tmp_path) == ["grid.npz"]


def test_rgb_logit_grids_and_their_activation(grids, tmp_path):
    """A sigmoid lift's grid file says so (``rgb-logit``); the mesh colours are the sigmoid."""
    from sjc_jax.mesh import grid_mesh

    assert grid_io.grid_feature_space("rgb", "none") == "rgb"
    assert grid_io.grid_feature_space("rgb", "sigmoid") == "rgb-logit"
    assert grid_io.grid_feature_space("sd-latent", "none") == "sd-latent"
    with pytest.raises(ValueError, match="applies to RGB models"):
        grid_io.grid_feature_space("sd-latent", "sigmoid")
    grid = grids["duck"]
    logits = grid.replace(features=jnp.log(grid.features + 0.05) - jnp.log(1.05 - grid.features))
    path = tmp_path / "lift.npz"
    grid_io.save_grid_file(path, logits, feature_space="rgb-logit")
    loaded, _, space = grid_io.load_grid_file(path)
    assert space == "rgb-logit"
    chex.assert_trees_all_equal(loaded, logits, strict=True)
    settings = dict(aabb=((-1.0, -1.0, -1.0), (1.0, 1.0, 1.0)), density_shift=0.0)
    plain, _ = grid_mesh(grid, feature_space="rgb", **settings)
    squashed, _ = grid_mesh(loaded, feature_space="rgb-logit", **settings)
    np.testing.assert_array_equal(squashed.vertices, plain.vertices)
    # sigmoid(logit((f + 0.05) / 1.1)) = (f + 0.05) / 1.1 at the vertices (colours in 8 bits)
    expected = (np.asarray(plain.visual.vertex_colors[:, :3], np.float64) / 255 + 0.05) / 1.1
    got = np.asarray(squashed.visual.vertex_colors[:, :3], np.float64) / 255
    np.testing.assert_allclose(got, expected, atol=1.5 / 255)
