"""``python -m sjc_jax export RUN_DIR``: write a finished run's ``final/`` again from its grid.

The meshes (at the rule's level, or a given ``--mesh-threshold``), the view, the videos, the
curves, ``eval.json`` (testbed and learned runs: the model kind is built again from the run's
config, as the run built it) and ``index.html`` are made from ``final/grid.npz`` by the same
writers as a run's (`sjc_jax.artifacts.write_final`, published at once), under the run's lock.
The run's ``config.json``, metrics, checkpoints and TensorBoard events are left as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from sjc_jax import rundir
from sjc_jax.rundir import RunError


def _check_threshold(value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunError(f"--mesh-threshold must be a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise RunError(f"--mesh-threshold must be a positive finite density, got {value}")


def export_run(run_dir: str | os.PathLike, *, mesh_threshold: float | None = None) -> dict:
    """Write ``RUN_DIR/final/`` again from ``RUN_DIR/final/grid.npz``.

    Args:
      run_dir: a finished run's directory (``config.json`` and ``final/grid.npz``).
      mesh_threshold: a density level for the mesh; None = the run's own setting (the rule's
        level unless the run gave ``--mesh-threshold``).

    Returns:
      ``{"out", "mesh": final/mesh.json, "eval"?: eval.json}``.

    Raises:
      RunError: no such run, no ``final/grid.npz``, a bad config or grid file, a bad threshold,
        or another process holds the run (nothing was written).
    """
    from sjc_jax import grid_io
    from sjc_jax.artifacts import Artifacts, write_final
    from sjc_jax.models import build_model
    from sjc_jax.runner import config_from_dict

    out = Path(run_dir)
    _check_threshold(mesh_threshold)
    if not out.is_dir():
        raise RunError(f"{str(out)!r} is not a run directory")
    try:
        values = json.loads((out / rundir.CONFIG).read_text())
    except FileNotFoundError:
        raise RunError(f"{str(out)!r} has no {rundir.CONFIG}: not a run directory") from None
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read {out / rundir.CONFIG}: {err}") from None
    config = config_from_dict(values)
    grid_path = out / rundir.FINAL / "grid.npz"
    if not grid_path.is_file():
        raise RunError(f"{str(out)!r} has no final/grid.npz: the run has not finished")
    try:
        grid, _, feature_space = grid_io.load_grid_file(grid_path)
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read {grid_path}: {str(err).splitlines()[0]}") from None
    if mesh_threshold is not None:
        run = dataclasses.replace(config.run, mesh_threshold=float(mesh_threshold))
        config = dataclasses.replace(config, run=run)
    model = build_model(config)
    expected = grid_io.grid_feature_space(
        model.denoiser.feature_space, config.render.feature_activation
    )
    if expected != feature_space:
        raise RunError(
            f"{grid_path} holds {feature_space!r} features; the run's model and renderer make "
            f"{expected!r}"
        )
    size = config.render.image_size or model.denoiser.resolution
    with rundir.RunLock(out):
        evaluation = write_final(out, grid, Artifacts(config, model.denoiser, size),
                                 evaluate=model.evaluate)  # fmt: skip
    summary: dict[str, Any] = {"out": str(out)}
    summary["mesh"] = json.loads((out / rundir.FINAL / rundir.MESH_INFO).read_text())
    if evaluation is not None:
        summary["eval"] = evaluation
    return summary


__all__ = ["export_run"]
