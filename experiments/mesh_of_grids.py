"""The default mesh of saved lift grids, measured against the true surface.

For each grid file (e.g. the ``OUT/grids/*.npz`` that ``experiments/claims.py`` keeps) named
``ROW-SCENE-SEED.npz``: the mesh the run directory would get (`sjc_jax.mesh.grid_mesh` with the
learned preset's settings) and its distances to the true scene meshed by the same rule
(`sjc_jax.testbed.core.truth_mesh` / `evaluate_mesh`): pieces, largest piece, Chamfer, normal
consistency, F-score.

    PYTHONPATH=. .venv/bin/python experiments/mesh_of_grids.py runs/claims/grids/*.npz
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sjc_jax import learned  # noqa: E402
from sjc_jax.grid_io import load_grid_file  # noqa: E402
from sjc_jax.learned.model import load_model  # noqa: E402
from sjc_jax.testbed.core import evaluate_mesh, truth_mesh  # noqa: E402


def main(paths: list[str]) -> None:
    model = load_model(learned.resolve("learned"))
    truths = {}
    for path in paths:
        scene = os.path.basename(path)[: -len(".npz")].split("-")[-2]
        config = learned.learned_config(prompt=scene)
        if scene not in truths:
            grid, aabb = learned.ground_truth_of(model, scene)
            truths[scene] = truth_mesh(grid, aabb, config)
        grid = load_grid_file(path)[0]
        result = evaluate_mesh(grid, truths[scene], config)["mesh"]
        print(json.dumps({"grid": path, **result}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
