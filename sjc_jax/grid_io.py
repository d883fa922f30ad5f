"""Grid files: a `VoxelGrid` with its box and feature space in one ``.npz``.

The format (a public contract, read by the testbed's ``--scene`` and written by every run as
``final/grid.npz``): ``density [X, Y, Z]``, ``features [X, Y, Z, C]``, ``background [Hb, Wb,
C]``, ``density_scale []`` (float32), ``aabb [2, 3]`` (float64, ``((xlo, ylo, zlo), (xhi, yhi,
zhi))``) and the string ``feature_space``: ``"rgb"`` (C = 3, RGB as it is), ``"rgb-logit"``
(C = 3, RGB before a sigmoid: a lift rendered with ``feature_activation="sigmoid"``, whose
appearance at a point is ``sigmoid`` of the trilinearly interpolated features) or ``"sd-latent"``
(C = 4). No other keys; every value finite.
"""

from __future__ import annotations

import os
import zipfile

import jax.numpy as jnp
import numpy as np

from sjc_jax.files import atomic_path
from sjc_jax.grid import DEFAULT_AABB, VoxelGrid

FEATURE_SPACES = ("rgb", "rgb-logit", "sd-latent")
GRID_FILE_KEYS = ("density", "features", "background", "density_scale", "aabb", "feature_space")
FEATURE_CHANNELS = {"rgb": 3, "rgb-logit": 3, "sd-latent": 4}


def grid_feature_space(denoiser_space: str, feature_activation: str) -> str:
    """The grid file's ``feature_space`` of a lift: its denoiser's space under the renderer's
    ``feature_activation`` (``"rgb"`` under ``"sigmoid"`` is ``"rgb-logit"``)."""
    if feature_activation == "none":
        return denoiser_space
    if (denoiser_space, feature_activation) == ("rgb", "sigmoid"):
        return "rgb-logit"
    raise ValueError(
        f"feature_activation {feature_activation!r} applies to RGB models, not {denoiser_space!r}"
    )


def _check_grid_arrays(arrays: dict, source: str) -> tuple[VoxelGrid, np.ndarray, str]:
    """Validate grid-file arrays; returns (float32 grid, float64 aabb [2, 3], feature_space)."""

    def fail(problem: str):
        raise ValueError(f"{source}: {problem}")

    missing = [k for k in GRID_FILE_KEYS if k not in arrays]
    extra = sorted(set(arrays) - set(GRID_FILE_KEYS))
    if missing or extra:
        fail(f"expected keys {list(GRID_FILE_KEYS)}; missing {missing}, unexpected {extra}")
    space = arrays["feature_space"]
    if space.shape != () or space.dtype.kind not in "US":
        fail(f"feature_space must be a string scalar, got {space.dtype} {space.shape}")
    space = str(space[()].decode() if space.dtype.kind == "S" else space[()])
    if space not in FEATURE_SPACES:
        fail(f"feature_space must be one of {list(FEATURE_SPACES)}, got {space!r}")
    numeric = {k: arrays[k] for k in GRID_FILE_KEYS if k != "feature_space"}
    for key, value in numeric.items():
        if value.dtype.kind != "f":
            fail(f"{key} must be floating point, got {value.dtype}")
        if not np.all(np.isfinite(value)):
            fail(f"{key} has non-finite values")
    density, features, background = numeric["density"], numeric["features"], numeric["background"]
    if density.ndim != 3 or min(density.shape) < 1:
        fail(f"density must be [X, Y, Z], got shape {density.shape}")
    channels = FEATURE_CHANNELS[space]
    if features.shape != density.shape + (channels,):
        fail(
            f"features must be {list(density.shape) + [channels]} for {space!r}, got shape "
            f"{features.shape}"
        )
    if background.ndim != 3 or background.shape[-1] != channels or min(background.shape) < 1:
        fail(f"background must be [Hb, Wb, {channels}], got shape {background.shape}")
    if numeric["density_scale"].shape != ():
        fail(f"density_scale must be a scalar, got shape {numeric['density_scale'].shape}")
    aabb = np.asarray(numeric["aabb"], np.float64)
    if aabb.shape != (2, 3) or np.any(aabb[1] <= aabb[0]):
        fail(f"aabb must be [2, 3] with hi > lo, got {aabb.tolist()}")
    grid = VoxelGrid(
        density=jnp.asarray(density, jnp.float32),
        features=jnp.asarray(features, jnp.float32),
        background=jnp.asarray(background, jnp.float32),
        density_scale=jnp.asarray(numeric["density_scale"], jnp.float32),
    )
    return grid, aabb, space


def save_grid_file(path, grid: VoxelGrid, *, aabb=DEFAULT_AABB, feature_space: str) -> None:
    """Write a grid file (``.npz``, the module docstring) atomically (`sjc_jax.files.atomic_path`).

    The arrays are validated as `load_grid_file` would and written as float32 (aabb float64).

    Args:
      path: destination (written as given; no ``.npz`` is appended).
      grid: the scene; density ``[X, Y, Z]``, features ``[X, Y, Z, C]``, background ``[Hb, Wb, C]``.
      aabb: ``((xlo, ylo, zlo), (xhi, yhi, zhi))`` box the grid covers.
      feature_space: ``"rgb"`` or ``"rgb-logit"`` (C = 3), or ``"sd-latent"`` (C = 4).
    """
    path = os.fspath(path)
    arrays = {
        "density": np.asarray(grid.density, np.float32),
        "features": np.asarray(grid.features, np.float32),
        "background": np.asarray(grid.background, np.float32),
        "density_scale": np.asarray(grid.density_scale, np.float32),
        "aabb": np.asarray(aabb, np.float64),
        "feature_space": np.asarray(str(feature_space)),
    }
    _check_grid_arrays(arrays, f"grid to save to {path}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _check_array_sizes(path: str) -> None:
    """Refuse an archive whose array headers claim more bytes than its members hold.

    Read from each ``.npy`` member's header alone, before any array is allocated: a few MB file
    claiming a 40000^3 array would otherwise be allocated in full and then fail to fill.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    header = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }.get(version)
                    if header is None:  # numpy's loader names the unsupported version
                        continue
                    shape, _, dtype = header(member)
                    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if claimed > info.file_size:
                        key = info.filename.removesuffix(".npy")
                        raise ValueError(
                            f"grid file {path}: {key} claims shape {tuple(shape)} "
                            f"({claimed} bytes) but its member holds {info.file_size} bytes"
                        )
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"grid file {path}: cannot be read as .npz ({e})") from e
    except ValueError as e:
        if str(e).startswith(f"grid file {path}:"):
            raise
        raise ValueError(f"grid file {path}: cannot be read as .npz ({e})") from e


def load_grid_file(path) -> tuple[VoxelGrid, np.ndarray, str]:
    """Read and validate a grid file.

    Returns:
      ``(grid, aabb, feature_space)``: a float32 `VoxelGrid`, the box ``[2, 3]`` (float64) and
      ``"rgb"`` or ``"sd-latent"``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: naming the file and the problem (not an npz, missing or unexpected keys, bad
        shapes, dtypes, non-finite values, unknown feature space).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"grid file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"grid file {path}: not an .npz archive")
    _check_array_sizes(path)
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                arrays = {key: data[key] for key in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"grid file {path}: cannot be read as .npz ({e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"grid file {path}: not an .npz archive (a single .npy array)")
    return _check_grid_arrays(arrays, f"grid file {path}")
