"""The ground-truth testbed: known scenes, the exact empirical denoiser, the preset, evaluation.

* `sjc_jax.testbed.scenes`: procedural scenes (duck, house, robot, mug), labelled renders and
  held-out cameras;
* `sjc_jax.testbed.empirical`: the exact posterior-mean denoiser of a labelled image set;
* `sjc_jax.testbed.core`: the preset (`testbed_config`), `load_scene`, `scene_render_config`,
  `build_testbed`, `lift` and `evaluate` (re-exported here).
"""

from sjc_jax.testbed.core import (
    DEFAULT_SCENES,
    MAX_PSNR,
    SCENE_RESOLUTION,
    WORLD_BACKGROUND_RESOLUTION,
    Testbed,
    build_bytes,
    build_testbed,
    check_scene,
    evaluate,
    evaluate_mesh,
    initial_grid,
    lift,
    load_scene,
    make_denoiser,
    psnr,
    scene_render_config,
    silhouette_iou,
    testbed_config,
    truth_mesh,
    world_background,
)

__all__ = [
    "DEFAULT_SCENES",
    "MAX_PSNR",
    "SCENE_RESOLUTION",
    "WORLD_BACKGROUND_RESOLUTION",
    "Testbed",
    "build_bytes",
    "build_testbed",
    "check_scene",
    "evaluate",
    "evaluate_mesh",
    "initial_grid",
    "lift",
    "load_scene",
    "make_denoiser",
    "psnr",
    "scene_render_config",
    "silhouette_iou",
    "testbed_config",
    "truth_mesh",
    "world_background",
]
