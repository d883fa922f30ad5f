"""sjc-jax: Score Jacobian Chaining in pure JAX.

The core, re-exported here: the scene (`VoxelGrid`, `init_grid`), cameras (`Camera`,
`sample_training_cameras`, `generate_rays`), the renderer (`RenderConfig`, `render_rays`,
`render_view`), the score (`paas_gradient`, `sds_gradient`) and the SJC step (`SJCConfig`,
`TrainState`, `init_state`, `make_step`). Model loading lives in `sjc_jax.diffusion` (imported
on demand: it pulls in diffusers and transformers).
"""

from sjc_jax.camera import Camera, generate_rays, make_camera, sample_training_cameras
from sjc_jax.grid import VoxelGrid, init_grid
from sjc_jax.render import RenderConfig, RenderOutput, RenderView, render_rays, render_view
from sjc_jax.score import paas_gradient, sds_gradient
from sjc_jax.sjc import SJCConfig, TrainState, init_state, make_step

__version__ = "0.1.0"

__all__ = [
    "Camera",
    "RenderConfig",
    "RenderOutput",
    "RenderView",
    "SJCConfig",
    "TrainState",
    "VoxelGrid",
    "generate_rays",
    "init_grid",
    "init_state",
    "make_camera",
    "make_step",
    "paas_gradient",
    "render_rays",
    "render_view",
    "sample_training_cameras",
    "sds_gradient",
]
