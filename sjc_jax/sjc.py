"""The train state and the jitted score-distillation step, with every research choice a value.

One step (top to bottom, pure): split the key -> draw B cameras with view labels (camera
sampler) -> draw sigma (sigma sampler) -> render the views under `jax.vjp` (images, and the
regularisers' mean as a scalar) -> image-space cotangent from the estimator (the denoiser is
never differentiated) -> pull ``(cotangent, 1)`` back through the renderer's VJP -> optax update.

`make_step(config, denoiser, *, estimator=..., camera_sampler=..., sigma_sampler=...,
regularizers=..., optimizer=..., mesh=...)` takes any of them as values (`make_lift` makes the
step together with its `init_state`, so both get the same optimiser and estimator); each one
left out is built from the config by the ``*_from_config`` functions below (SJC's choices by
default), which pass every factory only the scalars it needs. The step is built once per run;
sigma, the loss weights and the step count are traced, so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from sjc_jax import estimators, losses, optim, samplers
from sjc_jax.config import SJCConfig
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.grid import VoxelGrid, init_grid
from sjc_jax.render import ViewBatch, render_cameras

Array = jax.Array
Step = Callable[["TrainState", Any], tuple["TrainState", dict[str, Array]]]


@struct.dataclass
class TrainState:
    """What a run carries from step to step (a pytree; checkpointed whole)."""

    step: Array  # [] int32, steps taken
    grid: VoxelGrid
    opt_state: Any  # optax state of the optimiser
    key: Array  # [2] uint32 raw key data of the run's PRNG stream
    estimator_state: Any = ()  # a `StatefulEstimator`'s state; () for plain estimators


# --- the research choices of a config, as values ---------------------------------------------


def _value(section: Any, name: str, scalars: Mapping[str, Any] | None) -> Any:
    """``scalars[name]`` when given (a traced per-lift value of a batch), else the config's."""
    return getattr(section, name) if scalars is None or name not in scalars else scalars[name]


def estimator_from_config(
    config: SJCConfig, scalars: Mapping[str, Any] | None = None
) -> estimators.Estimator:
    """The config's estimator (``config.score``), built with the scalars it needs.

    The factory and the fields its keywords read come from `sjc_jax.estimators.ESTIMATORS`.

    ``scalars`` (here and in the other ``*_from_config``) overrides fields by name with values
    that may be traced (`sjc_jax.sweep` passes each lift's own); the config was validated with
    its concrete values first.
    """
    s = config.score
    registered = estimators.ESTIMATORS[s.estimator]
    return registered.factory(
        **{keyword: _value(s, name, scalars) for keyword, name in registered.fields.items()}
    )


def sigma_sampler_from_config(
    config: SJCConfig, scalars: Mapping[str, Any] | None = None
) -> samplers.SigmaSampler:
    """The config's noise-level schedule (``config.score.sigma_schedule``)."""
    s, steps = config.score, config.run.steps
    t_min, t_max = _value(s, "t_min", scalars), _value(s, "t_max", scalars)
    if s.sigma_schedule == "random":
        return samplers.random_sigma(t_min=t_min, t_max=t_max)
    if s.sigma_schedule == "annealed":
        return samplers.annealed_sigma(t_min=t_min, t_max=t_max, num_steps=steps)
    if s.sigma_schedule == "fixed":
        return samplers.fixed_sigma(timestep=s.t_max)
    return samplers.dreamtime_sigma(t_min=s.t_min, t_max=s.t_max, num_steps=steps)


def camera_sampler_from_config(config: SJCConfig, image_size: int) -> samplers.CameraSampler:
    """The config's training cameras at ``image_size`` (the config's, or the model's if None)."""
    c = config.camera
    return samplers.sjc_cameras(
        image_size=config.render.image_size or image_size,
        radius=c.radius,
        max_v_deg=c.max_v_deg,
        fov_range_deg=(c.fov_min_deg, c.fov_max_deg),
        overhead_deg=c.overhead_deg,
        view_augmentation=c.view_augmentation,
    )


def regularizers_from_config(
    config: SJCConfig, scalars: Mapping[str, Any] | None = None
) -> tuple[losses.Regularizer, ...]:
    """Emptiness always (the original), center depth when its weight is positive (in
    ``config``; a batch whose lifts differ in it passes the config of a positive one)."""
    r = config.regularizers
    regs = [
        losses.emptiness(
            weight=_value(r, "emptiness_weight", scalars),
            scale=_value(r, "emptiness_scale", scalars),
            multiplier=_value(r, "emptiness_multiplier", scalars),
            ramp_fraction=r.emptiness_step,
            num_steps=config.run.steps,
        )
    ]
    if r.center_depth_weight > 0:
        regs.append(losses.center_depth(weight=_value(r, "center_depth_weight", scalars)))
    return tuple(regs)


def optimizer_from_config(
    config: SJCConfig, scalars: Mapping[str, Any] | None = None
) -> optax.GradientTransformation:
    """The original's Adamax with the config's learning rates (`optim.sjc_adamax`)."""
    o = config.optimizer
    return optim.sjc_adamax(
        lr=_value(o, "lr", scalars),
        background_lr=_value(o, "background_lr", scalars),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
    )


# --- state and step ---------------------------------------------------------------------------


def init_state(
    config: SJCConfig,
    channels: int,
    *,
    background: Array | None = None,
    optimizer: optax.GradientTransformation | None = None,
    estimator: estimators.Estimator | estimators.StatefulEstimator | None = None,
    denoiser: Denoiser | None = None,
) -> TrainState:
    """Initial state from ``config.run.seed``: a fresh grid as the original.

    Args:
      config: grid sizes and the seed are read from it.
      channels: C of the features (4 for SD latents, 3 for RGB).
      background: ``[Hb, Wb, C]`` replaces the random background texture (the testbed's known
        background; freeze it with ``background_lr=0``).
      optimizer: the step's optimiser (default `optimizer_from_config`); pass the same one to
        `make_step`.
      estimator: a `StatefulEstimator` whose ``init`` makes the estimator state (with
        ``denoiser``); plain estimators need nothing here.
    """
    key_grid, key_run = jax.random.split(jax.random.key(config.run.seed))
    grid = init_grid(
        key_grid,
        resolution=config.render.grid_resolution,
        channels=channels,
        background_resolution=config.render.background_resolution,
    )
    if background is not None:
        if background.ndim != 3 or background.shape[-1] != channels:
            raise ValueError(f"background must be [Hb, Wb, {channels}], got {background.shape}")
        grid = grid.replace(background=jnp.asarray(background, jnp.float32))
    optimizer = optimizer_from_config(config) if optimizer is None else optimizer
    estimator_state = ()
    if isinstance(estimator, estimators.StatefulEstimator):
        if denoiser is None:
            raise ValueError("a StatefulEstimator needs the denoiser to initialise its state")
        key_run, key_est = jax.random.split(key_run)
        estimator_state = estimator.init(key_est, denoiser, denoiser.params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        grid=grid,
        opt_state=optimizer.init(grid),
        key=jax.random.key_data(key_run),
        estimator_state=estimator_state,
    )


class Lift(NamedTuple):
    """A lift's ``init`` and ``step``, made together from the same research choices.

    ``init(background=None) -> TrainState`` (`init_state`'s, with the lift's optimiser and
    estimator state) and ``step(state, params) -> (state, metrics)`` (`make_step`'s): the optax
    ``init`` / ``update`` pairing, so a state and a step cannot disagree on the optimiser or a
    stateful estimator.
    """

    init: Callable[..., TrainState]
    step: Step


def make_lift(
    config: SJCConfig,
    denoiser: Denoiser,
    *,
    estimator: estimators.Estimator | estimators.StatefulEstimator | None = None,
    optimizer: optax.GradientTransformation | None = None,
    **choices: Any,
) -> Lift:
    """``(init, step)`` of a lift: one estimator and one optimiser serve both.

    Args:
      config, denoiser: as `make_step`.
      estimator, optimizer: research choices as values (default: built from ``config``), given
        to both halves.
      choices: the step's other choices (``camera_sampler``, ``sigma_sampler``, ``regularizers``,
        ``mesh``; `step_function`).

    Example::

        init, step = sjc.make_lift(config, denoiser, estimator=estimators.sds())
        state = init()
        state, metrics = step(state, denoiser.params)
    """
    estimator = estimator_from_config(config) if estimator is None else estimator
    optimizer = optimizer_from_config(config) if optimizer is None else optimizer

    def init(background: Array | None = None) -> TrainState:
        return init_state(
            config,
            denoiser.channels,
            background=background,
            optimizer=optimizer,
            estimator=estimator,
            denoiser=denoiser,
        )

    step = make_step(config, denoiser, estimator=estimator, optimizer=optimizer, **choices)
    return Lift(init, step)


def _view_spec(mesh: jax.sharding.Mesh | None, batch: int):
    """The sharding constraint of the views axis (None without a mesh)."""
    if mesh is None:
        return None
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must have one axis, got {mesh.axis_names}")
    if batch % mesh.size:
        raise ValueError(
            f"views_per_step={batch} must be a multiple of the mesh's {mesh.size} devices"
        )
    return PartitionSpec(mesh.axis_names[0])


def make_step(config: SJCConfig, denoiser: Denoiser, **choices: Any) -> Step:
    """One jitted step ``(state, denoiser_params) -> (state, metrics)``; the state is donated.

    `step_function`'s step under ``jax.jit`` (the arguments are its; see there).
    """
    return jax.jit(step_function(config, denoiser, **choices), donate_argnums=0)


def step_function(
    config: SJCConfig,
    denoiser: Denoiser,
    *,
    estimator: estimators.Estimator | estimators.StatefulEstimator | None = None,
    camera_sampler: samplers.CameraSampler | None = None,
    sigma_sampler: samplers.SigmaSampler | None = None,
    regularizers: Sequence[losses.Regularizer] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    mesh: jax.sharding.Mesh | None = None,
    view_sharding: jax.sharding.Sharding | None = None,
    lift_axis: str | None = None,
    validate: bool = True,
) -> Step:
    """The step ``(state, denoiser_params) -> (state, metrics)``, not jitted (`make_step` jits
    it; `sjc_jax.sweep` vmaps it over lifts first).

    Args:
      config: read for the batch (``run.views_per_step``), the renderer and the defaults of every
        choice left out.
      denoiser: the model (`sjc_jax.diffusion.denoiser.Denoiser`); its ``params`` are the step's
        second argument, never baked in.
      estimator: ``(key, denoiser, params, images, sigma, labels) -> (cotangent, metrics)``
        (`sjc_jax.estimators`; default `estimator_from_config`, SJC's PAAS), or a
        `StatefulEstimator` (its state in ``TrainState.estimator_state``).
      camera_sampler: ``(key, B) -> (cameras, labels)`` (`sjc_jax.samplers`).
      sigma_sampler: ``(key, step, sigmas, B) -> sigma [B]``.
      regularizers: functions ``(views, step) -> (loss [b], metrics)`` (`sjc_jax.losses`).
      optimizer: an ``optax.GradientTransformation`` over the grid (pass the same one to
        `init_state`).
      view_sharding: a sharding constraint put on the rendered views (a batch of lifts splits
        each lift's views this way inside its vmap, instead of ``mesh``).
      lift_axis: the name of the vmap axis of a batch of lifts around this step (the renderer
        then shares its packed-lookup size over the batch: `RenderConfig.batch_axis`).
      validate: check the sigma sampler's bounds concretely here (a batch builds its lifts'
        steps from traced scalars, checked per lift before, and passes False).
      mesh: a one-axis mesh: the B views are split over its devices (the renderer and its VJP
        run per device in `jax.shard_map`; the estimator runs on the sharded batch under jit's
        partitioner; the grid is replicated and its gradient summed). B must be a multiple of
        the mesh size. The random draws are those of one device, so a run gives the same
        result (up to summation order) either way.

    Metrics are device scalars (fetch them in batches: fetching is a host sync): ``sigma``,
    ``label`` (of the first view), ``opacity``, ``score_norm`` (RMS of the cotangent),
    ``num_samples`` (the largest k), ``finite``, the regularisers' and the estimator's.

    Example (any estimator, no library edit)::

        def my_sds(key, denoiser, params, images, sigma, labels):
            z, noise = estimators.perturb(key, images, sigma)
            d = estimators.guided(denoiser, params, z, sigma, labels, 1.0)
            w = estimators.per_image(sigma**2 / (1 + sigma**2))
            return w * jnp.mean(estimators.noise_estimate(z, d, sigma) - noise, axis=0), {}

        step = make_step(config, denoiser, estimator=my_sds)
    """
    batch = config.run.views_per_step
    render_config = config.render_config()
    if lift_axis is not None:
        render_config = dataclasses.replace(render_config, batch_axis=lift_axis)
    estimator = estimators.as_stateful(
        estimator_from_config(config) if estimator is None else estimator
    )
    camera_sampler = camera_sampler or camera_sampler_from_config(config, denoiser.resolution)
    sigma_sampler = sigma_sampler or sigma_sampler_from_config(config)
    regularizers = tuple(regularizers_from_config(config) if regularizers is None else regularizers)
    optimizer = optimizer_from_config(config) if optimizer is None else optimizer
    sigmas = jnp.asarray(denoiser.sigmas, jnp.float32)
    if validate:  # refuse bad timestep bounds here, in one line, not at the first traced step
        jax.eval_shape(
            lambda key: sigma_sampler(key, jnp.zeros((), jnp.int32), sigmas, batch),
            jax.random.key(0),
        )
    spec = _view_spec(mesh, batch)

    def render_views(grid: VoxelGrid, cameras, step: Array):
        """Images ``[b, H, W, C]``, per-view weighted regulariser sums ``[b]``, metrics ``[b]``."""
        views: ViewBatch = render_cameras(grid, cameras, render_config)
        reg = jnp.zeros(views.num_samples.shape, jnp.float32)
        metrics = {"opacity": jnp.mean(views.opacity.reshape(views.opacity.shape[0], -1), 1)}
        for regularizer in regularizers:
            loss, reg_metrics = regularizer(views, step)
            reg, metrics = reg + loss, {**metrics, **reg_metrics}
        metrics["num_samples"] = views.num_samples
        return views.images, reg, metrics

    if spec is not None:
        render_views = jax.shard_map(
            render_views, mesh=mesh, in_specs=(PartitionSpec(), spec, PartitionSpec()),
            out_specs=(spec, spec, spec),
        )  # fmt: skip

    def step(state: TrainState, params: Any) -> tuple[TrainState, dict[str, Array]]:
        key_cam, key_sigma, key_estimator, key_next = jax.random.split(
            jax.random.wrap_key_data(state.key), 4
        )
        cameras, labels = camera_sampler(key_cam, batch)
        sigma = sigma_sampler(key_sigma, state.step, sigmas, batch)

        def objective(grid):
            images, reg, view_metrics = render_views(grid, cameras, state.step)
            return (images, jnp.sum(reg) / batch), view_metrics

        (images, reg), vjp_fn, view_metrics = jax.vjp(objective, state.grid, has_aux=True)
        if spec is not None:
            images = jax.lax.with_sharding_constraint(images, NamedSharding(mesh, spec))
        elif view_sharding is not None:
            images = jax.lax.with_sharding_constraint(images, view_sharding)
        cotangent, est_metrics, estimator_state = estimator.update(
            key_estimator, denoiser, params, images, sigma, labels, state.estimator_state
        )
        # The chained score: J_render^T cotangent plus the regularisers' gradient, in one VJP.
        (grads,) = vjp_fn((cotangent.astype(images.dtype), jnp.ones_like(reg)))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.grid)
        grid = optax.apply_updates(state.grid, updates)
        finite = jnp.all(
            jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(grid)])
        )
        num_samples = view_metrics.pop("num_samples")
        metrics = {
            "sigma": jnp.mean(sigma),
            "label": labels[0],
            **{name: jnp.mean(value) for name, value in view_metrics.items()},
            **est_metrics,
            "score_norm": jnp.sqrt(jnp.mean(jnp.square(cotangent))),
            "num_samples": jnp.max(num_samples),
            "finite": finite,
        }
        new_state = TrainState(
            step=state.step + 1,
            grid=grid,
            opt_state=opt_state,
            key=jax.random.key_data(key_next),
            estimator_state=estimator_state,
        )
        return new_state, metrics

    return step


def views_mesh(batch: int) -> jax.sharding.Mesh | None:
    """A mesh over all devices for ``batch`` views per step when they split evenly, else None."""
    devices = jax.devices()
    if len(devices) == 1 or batch % len(devices):
        return None
    return jax.sharding.Mesh(np.array(devices), ("views",))
