"""Score Jacobian Chaining: the configuration, the train state and the jitted SJC step.

One step (top to bottom, pure): split the key -> draw B training cameras with view labels ->
render them under `jax.vjp` (image, and the regularisers as a scalar) -> draw sigma -> PAAS
image-space gradient ``g`` from the denoiser (never differentiated) -> pull ``(-g, 1)`` back
through the renderer's VJP -> optax Adamax update. `make_step` builds it once per run; sigma,
the emptiness weight and the step count are traced, so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import PartitionSpec

from sjc_jax import losses
from sjc_jax.camera import generate_rays, sample_training_cameras
from sjc_jax.diffusion import schedule
from sjc_jax.diffusion.attention import ATTENTION_KINDS
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.grid import VoxelGrid, init_grid
from sjc_jax.render import RenderConfig, intersect_rays, render_rays, step_size, view_sample_count
from sjc_jax.score import SCALES, paas_gradient_from_noise

Array = jax.Array

SIGMA_SCHEDULES = ("random", "annealed")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class SJCConfig:
    """Every setting of a run; the defaults reproduce the original SJC (SJC_REFERENCE.md)."""

    # --- what to lift
    prompt: str = ""  # text prompt (SD models); view prefixes are added per camera
    model: str = "testbed"  # hub id or local diffusers directory, or "testbed"
    revision: str | None = None  # hub revision of the model
    dtype: str = "float32"  # UNet compute dtype: float32 or bfloat16
    attention: str = "auto"  # UNet attention kernel: auto, diffusers, xla or cudnn
    scene: str | None = None  # testbed: a built-in scene name or a grid file (.npz)
    # --- run
    steps: int = 10000  # optimisation steps
    seed: int = 0  # the whole run is reproducible from it
    views_per_step: int = 1  # B views rendered and scored per step (1 = SJC)
    # --- voxel grid and renderer
    grid_resolution: int = 100  # voxels per axis
    background_resolution: int = 4  # side of the learned background texture
    image_size: int | None = None  # render H = W; None = the model's resolution (64 for SD)
    step_ratio: float = 0.5  # march step in voxels
    density_shift: float = -1.0  # softplus(raw * exp(d_scale) + shift)
    weight_threshold: float = 1e-4  # features count where w > this
    background_depth: float = 10.0  # depth of the background
    # --- cameras
    radius: float = 1.5  # camera distance from the origin
    fov_min_deg: float = 40.0  # training fov_x ~ U[fov_min, fov_max)
    fov_max_deg: float = 70.0
    max_v_deg: float = 100.0  # polar draw v ~ U[0, max_v) deg
    overhead_deg: float = 30.0  # v below this is an "overhead view"
    view_augmentation: bool = True  # view-dependent prompts / labels
    # --- score
    guidance_scale: float = 100.0  # classifier-free guidance scale (SD)
    negative_prompt: str = ""  # unconditional text of CFG
    t_min: int = 10  # sigma is drawn from timesteps t_min..t_max of the model's table
    t_max: int = 969
    sigma_schedule: str = "random"  # random (SJC) or annealed
    var_red: bool = True  # Eq. 16 (True, SJC default) or Eq. 15
    noise_samples: int = 1  # Monte Carlo noise samples per view (1 = SJC)
    score_scale: str = "sigma"  # divide by sigma (SJC code) or sigma2 (the score itself)
    # --- optimiser (Adamax)
    lr: float = 0.05  # density, features and d_scale
    background_lr: float = 1e-4  # background texture (0 freezes it)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # --- regularisers
    emptiness_weight: float = 1e4
    emptiness_scale: float = 10.0  # B in log(1 + B w)
    emptiness_multiplier: float = 20.0  # applied from emptiness_step * steps on
    emptiness_step: float = 0.5
    center_depth_weight: float = 0.0  # 0 = off (the original's default); 10-100 in its README
    # --- artifacts
    num_previews: int = 100  # previews over the run (every 1 %)
    checkpoint_every: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    log_every: int = 10  # steps between metric fetches (the only host syncs of the loop)
    video_frames: int = 100  # frames of the final videos
    mesh_threshold: float | None = None  # density level of the mesh; None = ln 2 / delta
    # --- testbed (model="testbed")
    testbed_views: int = 100  # labelled renders of the ground-truth scene
    testbed_eval_views: int = 8  # held-out cameras per elevation ring in eval.json

    def __post_init__(self):
        positive = (
            "steps",
            "views_per_step",
            "grid_resolution",
            "background_resolution",
            "noise_samples",
            "num_previews",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "video_frames",
            "testbed_views",
            "testbed_eval_views",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {self.image_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(
                f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {self.sigma_schedule!r}"
            )
        if self.score_scale not in SCALES:
            raise ValueError(f"score_scale must be one of {SCALES}, got {self.score_scale!r}")
        if not 0 <= self.t_min <= self.t_max:
            raise ValueError(
                f"need 0 <= t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}"
            )
        if not 0 < self.fov_min_deg <= self.fov_max_deg < 180:
            raise ValueError(
                f"need 0 < fov_min_deg <= fov_max_deg < 180, got {self.fov_min_deg}, "
                f"{self.fov_max_deg}"
            )
        for name in ("radius", "lr", "step_ratio", "max_v_deg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "background_lr",
            "emptiness_weight",
            "center_depth_weight",
            "weight_threshold",
            "emptiness_scale",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.emptiness_step <= 1:
            raise ValueError(f"emptiness_step must lie in [0, 1], got {self.emptiness_step}")

    def camera_distribution(self) -> dict[str, Any]:
        """The keyword arguments of `sample_training_cameras` for this config's cameras."""
        return dict(
            radius=self.radius,
            max_v_deg=self.max_v_deg,
            fov_range_deg=(self.fov_min_deg, self.fov_max_deg),
            overhead_deg=self.overhead_deg,
        )

    def render_config(self) -> RenderConfig:
        return RenderConfig(
            step_ratio=self.step_ratio,
            density_shift=self.density_shift,
            weight_threshold=self.weight_threshold,
            background_depth=self.background_depth,
        )


@struct.dataclass
class TrainState:
    """What a run carries from step to step (a pytree; checkpointed whole)."""

    step: Array  # [] int32, steps taken
    grid: VoxelGrid
    opt_state: Any  # optax state of `make_optimizer`
    key: Array  # [2] uint32 raw key data of the run's PRNG stream


def make_optimizer(config: SJCConfig) -> optax.GradientTransformation:
    """Adamax with the original's per-field learning rates (background apart)."""

    def adamax(lr):
        return optax.adamax(lr, b1=config.b1, b2=config.b2, eps=config.eps)

    labels = VoxelGrid(density="field", features="field", background="bg", density_scale="field")
    return optax.multi_transform(
        {"field": adamax(config.lr), "bg": adamax(config.background_lr)}, labels
    )


def init_state(config: SJCConfig, channels: int, *, background: Array | None = None) -> TrainState:
    """Initial state from ``config.seed``: a fresh grid as the original.

    ``background [Hb, Wb, C]`` replaces the random background texture (the testbed's known
    background; freeze it with ``background_lr=0``).
    """
    key_grid, key_run = jax.random.split(jax.random.key(config.seed))
    grid = init_grid(
        key_grid,
        resolution=config.grid_resolution,
        channels=channels,
        background_resolution=config.background_resolution,
    )
    if background is not None:
        if background.ndim != 3 or background.shape[-1] != channels:
            raise ValueError(f"background must be [Hb, Wb, {channels}], got {background.shape}")
        grid = grid.replace(background=jnp.asarray(background, jnp.float32))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        grid=grid,
        opt_state=make_optimizer(config).init(grid),
        key=jax.random.key_data(key_run),
    )


def _draw_sigma(config: SJCConfig, key: Array, step: Array, sigmas, batch: int) -> Array:
    if config.sigma_schedule == "random":
        return schedule.random_sigma(
            key, sigmas, t_min=config.t_min, t_max=config.t_max, shape=(batch,)
        )
    return schedule.annealed_sigma(
        key, step, config.steps, sigmas, t_min=config.t_min, t_max=config.t_max, shape=(batch,)
    )


def _chained_gradient(
    config: SJCConfig,
    denoiser: Denoiser,
    size: int,
    grid: VoxelGrid,
    params: Any,
    cameras,
    labels: Array,
    sigma: Array,
    noise: Array,
    empty_w: Array,
) -> tuple[VoxelGrid, dict[str, Array]]:
    """Gradient contribution of ``b`` of the step's ``B`` views (all of them on one device).

    ``cameras`` batched ``[b]``, ``labels, sigma [b]``, ``noise [n, b, H, W, C]``. Returns the
    grid gradient ``sum_v J_v^T (-g_v)`` plus the regularisers' gradient (their means over the
    step's B views, so per-device contributions add up), and sums for the metrics.
    """
    render_config = config.render_config()
    views, channels, total = labels.shape[0], denoiser.channels, config.views_per_step
    origins, directions = jax.vmap(generate_rays)(cameras)  # [b, HW, 3]
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    t_min, t_max = intersect_rays(origins, directions, render_config.aabb)
    delta = step_size(render_config, grid.density.shape)
    k = view_sample_count(t_min.reshape(views, -1), t_max.reshape(views, -1), delta)

    def render_and_regularise(grid):
        out = render_rays(grid, origins, directions, t_min, t_max, render_config)
        images = out.features.reshape(views, size, size, channels)
        weights = out.weights.reshape(views, size * size, -1)
        empty = jnp.sum(
            jax.vmap(lambda w, kk: losses.emptiness_loss(w, kk, scale=config.emptiness_scale))(
                weights, k
            )
        )
        reg = empty_w * empty / total
        center = jnp.zeros(())
        if config.center_depth_weight > 0:
            depth = out.depth.reshape(views, size, size)
            center = jnp.sum(jax.vmap(losses.center_depth_loss)(depth))
            reg = reg + config.center_depth_weight * center / total
        opacity = jnp.sum(jnp.mean(out.opacity.reshape(views, -1), axis=1))
        return (images, reg), (empty, center, opacity)

    (images, reg), vjp_fn, (empty, center, opacity) = jax.vjp(
        render_and_regularise, grid, has_aux=True
    )
    g = paas_gradient_from_noise(
        denoiser.apply,
        params,
        images,
        sigma,
        labels,
        noise,
        var_red=config.var_red,
        scale=config.score_scale,
    )
    # The chained score: J_render^T (-g) plus the regularisers' gradient, in one VJP.
    (grads,) = vjp_fn((-g, jnp.ones_like(reg)))
    sums = {
        "emptiness": empty,
        "center_depth": center,
        "opacity": opacity,
        "score_sq": jnp.sum(jnp.square(g)),
        "num_samples": jnp.max(k),
    }
    return grads, sums


def make_step(
    config: SJCConfig, denoiser: Denoiser, *, mesh: jax.sharding.Mesh | None = None
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Array]]]:
    """One jitted SJC step ``(state, denoiser_params) -> (state, metrics)``; the state is donated.

    With a one-axis ``mesh`` the step's B views are split over its devices (data parallel: the
    grid and the model are replicated, each device renders and scores its views, the gradients
    are summed across devices); B must be a multiple of the mesh size. The random draws are the
    same as on one device, so a run gives the same result (up to summation order) either way.
    Metrics are device scalars (fetch them in batches: fetching is a host sync).
    """
    if config.t_max >= len(denoiser.sigmas):
        raise ValueError(
            f"t_max={config.t_max} is outside the model's noise table of {len(denoiser.sigmas)}"
        )
    size = config.image_size or denoiser.resolution
    if size != denoiser.resolution:
        raise ValueError(
            f"image_size={size} differs from the model's resolution {denoiser.resolution}"
        )
    batch, channels = config.views_per_step, denoiser.channels
    optimizer = make_optimizer(config)
    sigmas = jnp.asarray(denoiser.sigmas, jnp.float32)
    per_device = functools.partial(_chained_gradient, config, denoiser, size)
    local = per_device
    if mesh is not None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"mesh must have one axis, got {mesh.axis_names}")
        axis = mesh.axis_names[0]
        if batch % mesh.size:
            raise ValueError(
                f"views_per_step={batch} must be a multiple of the mesh's {mesh.size} devices"
            )

        def sharded(*args):
            grads, sums = per_device(*args)
            num_samples = jax.lax.pmax(sums.pop("num_samples"), axis)
            grads, sums = jax.lax.psum((grads, sums), axis)
            return grads, {**sums, "num_samples": num_samples}

        views, rep = PartitionSpec(axis), PartitionSpec()
        local = jax.shard_map(
            sharded,
            mesh=mesh,
            in_specs=(rep, rep, views, views, views, PartitionSpec(None, axis), rep),
            out_specs=(rep, rep),
        )

    def step(state: TrainState, params: Any) -> tuple[TrainState, dict[str, Array]]:
        key_cam, key_sigma, key_noise, key_next = jax.random.split(
            jax.random.wrap_key_data(state.key), 4
        )
        cameras, labels = sample_training_cameras(
            key_cam, batch, **config.camera_distribution(), height=size, width=size
        )
        if not config.view_augmentation:
            labels = jnp.zeros_like(labels)
        sigma = _draw_sigma(config, key_sigma, state.step, sigmas, batch)
        noise = jax.random.normal(
            key_noise, (config.noise_samples, batch, size, size, channels), jnp.float32
        )
        empty_w = losses.emptiness_weight(
            state.step,
            config.steps,
            weight=config.emptiness_weight,
            multiplier=config.emptiness_multiplier,
            ramp_fraction=config.emptiness_step,
        )
        grads, sums = local(state.grid, params, cameras, labels, sigma, noise, empty_w)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.grid)
        grid = optax.apply_updates(state.grid, updates)
        finite = jnp.all(
            jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(grid)])
        )
        elements = batch * size * size * channels
        metrics = {
            "sigma": jnp.mean(sigma),
            "label": labels[0],
            "emptiness": sums["emptiness"] / batch,
            "emptiness_weight": empty_w,
            "center_depth": sums["center_depth"] / batch,
            "opacity": sums["opacity"] / batch,
            "score_norm": jnp.sqrt(sums["score_sq"] / elements),
            "num_samples": sums["num_samples"],
            "finite": finite,
        }
        new_state = TrainState(
            step=state.step + 1, grid=grid, opt_state=opt_state, key=jax.random.key_data(key_next)
        )
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)
