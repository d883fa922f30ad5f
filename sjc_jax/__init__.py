"""sjc-jax: Score Jacobian Chaining in pure JAX.

The core, re-exported here: the scene (`VoxelGrid`, `init_grid`), cameras (`Camera`,
`sample_training_cameras`, `generate_rays`), the renderer (`RenderConfig`, `render_rays`,
`render_view`, `render_cameras`), the run config (`SJCConfig`) and the step (`TrainState`,
`init_state`, `make_step`). The research choices a step takes as values live in their modules:
`sjc_jax.estimators` (SJC, SDS, NFSD, CSD), `sjc_jax.samplers` (cameras, noise levels),
`sjc_jax.losses` (regularisers), `sjc_jax.optim` (the optimiser). Model loading lives in
`sjc_jax.diffusion` (imported on demand: it pulls in diffusers and transformers).
"""

from sjc_jax.camera import Camera, generate_rays, make_camera, sample_training_cameras
from sjc_jax.config import SJCConfig
from sjc_jax.grid import VoxelGrid, init_grid
from sjc_jax.render import (
    RenderConfig,
    RenderOutput,
    RenderView,
    ViewBatch,
    render_cameras,
    render_rays,
    render_view,
)
from sjc_jax.sjc import TrainState, init_state, make_step

__version__ = "0.1.0"

__all__ = [
    "Camera",
    "RenderConfig",
    "RenderOutput",
    "RenderView",
    "SJCConfig",
    "TrainState",
    "ViewBatch",
    "VoxelGrid",
    "generate_rays",
    "init_grid",
    "init_state",
    "make_camera",
    "make_step",
    "render_cameras",
    "render_rays",
    "render_view",
    "sample_training_cameras",
]
