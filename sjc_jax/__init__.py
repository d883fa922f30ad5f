"""sjc-jax: Score Jacobian Chaining in pure JAX.

The core, re-exported here: the scene (`VoxelGrid`, `init_grid`), cameras (`Camera`,
`sample_training_cameras`, `generate_rays`), the renderer (`RenderConfig`, `render_rays`,
`render_view`, `render_cameras`), the run config (`SJCConfig`) and the step (`TrainState`,
`make_lift`, or its halves `init_state` and `make_step`). The research choices a step takes as
values live in their modules: `sjc_jax.estimators` (SJC, SDS, NFSD, CSD), `sjc_jax.samplers`
(cameras, noise levels), `sjc_jax.losses` (regularisers), `sjc_jax.optim` (the optimiser). Model
loading lives in `sjc_jax.diffusion` (imported on demand: it pulls in diffusers and
transformers).
"""

import importlib

# Where each re-exported name lives. Resolved on first use (PEP 562), so that importing the
# package (``python -m sjc_jax`` does) is instant and the command line can install its Ctrl-C
# handling before JAX loads; ``from sjc_jax import SJCConfig`` works as usual.
_EXPORTS = {
    "Camera": "sjc_jax.camera",
    "generate_rays": "sjc_jax.camera",
    "make_camera": "sjc_jax.camera",
    "sample_training_cameras": "sjc_jax.camera",
    "SJCConfig": "sjc_jax.config",
    "VoxelGrid": "sjc_jax.grid",
    "init_grid": "sjc_jax.grid",
    "RenderConfig": "sjc_jax.render",
    "RenderOutput": "sjc_jax.render",
    "RenderView": "sjc_jax.render",
    "ViewBatch": "sjc_jax.render",
    "render_cameras": "sjc_jax.render",
    "render_rays": "sjc_jax.render",
    "render_view": "sjc_jax.render",
    "TrainState": "sjc_jax.sjc",
    "Lift": "sjc_jax.sjc",
    "init_state": "sjc_jax.sjc",
    "make_lift": "sjc_jax.sjc",
    "make_step": "sjc_jax.sjc",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "Camera",
    "Lift",
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
    "make_lift",
    "make_step",
    "render_cameras",
    "render_rays",
    "render_view",
    "sample_training_cameras",
]
