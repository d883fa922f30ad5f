"""Many lifts at once: N independent runs as one state with a leading lift axis, one jitted step.

A batch of lifts shares every static choice (grid and render sizes, views per step, estimator,
sigma schedule, step count, ...) and may differ in:

* the seed and the scene / prompt: they enter through the state (grid, key) and the denoiser's
  params, stacked on a leading lift axis (a params leaf equal in every lift stays unstacked);
* the traced scalars `TRACED`: each lift's value reaches the step as a traced ``[N]`` array,
  and the research choices are rebuilt from it inside the vmapped body
  (``sjc.*_from_config(config, scalars)``). A field equal in every lift stays a Python
  constant, exactly as in a separate run.

`make_batched_step` is ``jax.jit(jax.vmap(step))`` of `sjc.step_function`'s single-lift step;
with a 2-D ``("lifts", "views")`` mesh (`sweep_mesh`) the lift axis is split over the first
mesh axis (vmap's ``spmd_axis_name``) and each lift's views over the second.

Equal to separate runs: the per-lift results are those of `sjc.make_step` run by run, bitwise on
the CPU where the vmapped kernels compute the same sums (measured in tests/test_sweep.py); a
traced scalar can round differently from the constant a separate run folds (e.g. ``weight *
multiplier`` in float32 instead of float64), which is float32 round-off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sjc_jax import sjc
from sjc_jax.config import SJCConfig
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.sjc import TrainState

Array = jax.Array

# Fields that may differ between the lifts of a batch as traced values (t_min / t_max only
# with the random or annealed schedule: the others build a table from them).
TRACED = (
    "lr",
    "background_lr",
    "guidance_scale",
    "emptiness_weight",
    "emptiness_scale",
    "emptiness_multiplier",
    "center_depth_weight",
    "t_min",
    "t_max",
)
_INTEGER = ("t_min", "t_max")
LIFT_AXIS = "lift"  # the vmap axis of a batch (named: the renderer shares its lookup size on it)
# Fields that may differ through the state and the params.
PER_LIFT = ("seed", "scene", "prompt", "negative_prompt")
_TRACED_BOUNDS_SCHEDULES = ("random", "annealed")


def varying_fields(configs: Sequence[SJCConfig]) -> tuple[str, ...]:
    """The traced fields whose value differs between ``configs``; raises if a static one does.

    Raises:
      ValueError: one line naming the fields a batch must share.
    """
    if not configs:
        raise ValueError("a batch needs at least one lift")
    flats = [c.to_flat() for c in configs]
    differ = [k for k in flats[0] if any(f[k] != flats[0][k] for f in flats[1:])]
    allowed = set(PER_LIFT) | set(TRACED)
    if configs[0].score.sigma_schedule not in _TRACED_BOUNDS_SCHEDULES:
        allowed -= {"t_min", "t_max"}
    static = sorted(set(differ) - allowed)
    if static:
        raise ValueError(
            f"the lifts of a batch must share {static} (static choices); "
            f"they may differ in {sorted(allowed)}"
        )
    return tuple(k for k in TRACED if k in differ)


def lift_scalars(configs: Sequence[SJCConfig], names: Sequence[str]) -> dict[str, np.ndarray]:
    """``{name: [N]}`` of the lifts' values (int32 for timesteps, float32 otherwise)."""
    flats = [c.to_flat() for c in configs]
    return {
        name: np.asarray([f[name] for f in flats], np.int32 if name in _INTEGER else np.float32)
        for name in names
    }


def base_config(configs: Sequence[SJCConfig]) -> SJCConfig:
    """The config the batch's step is built from: the first lift's, with the center-depth
    regulariser on when any lift uses it (a lift's weight 0 then adds an exact 0)."""
    weight = max(c.regularizers.center_depth_weight for c in configs)
    return configs[0].replace(center_depth_weight=weight)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))


def stack(trees: Sequence[Any], *, share: bool = True) -> tuple[Any, Any]:
    """Stack pytrees of one structure on a new leading axis; returns ``(stacked, in_axes)``.

    With ``share`` a leaf equal in every tree is kept once (its in_axes None): SD's UNet weights
    or the testbed's background are not copied N times. Stacked leaves are host arrays.

    Raises:
      ValueError: the trees differ in structure or in a stacked leaf's shape.
    """
    leaves, treedefs = zip(*(jax.tree_util.tree_flatten(t) for t in trees), strict=True)
    if any(d != treedefs[0] for d in treedefs[1:]):
        raise ValueError("the lifts' params differ in structure; a batch needs one model kind")
    out, axes = [], []
    for column in zip(*leaves, strict=True):
        if share and all(_same(column[0], leaf) for leaf in column[1:]):
            out.append(column[0])
            axes.append(None)
            continue
        shapes = {np.shape(leaf) for leaf in column}
        if len(shapes) > 1:
            raise ValueError(f"the lifts' params differ in shape ({sorted(shapes)})")
        out.append(np.stack([np.asarray(leaf) for leaf in column]))
        axes.append(0)
    return (
        jax.tree_util.tree_unflatten(treedefs[0], out),
        jax.tree_util.tree_unflatten(treedefs[0], axes),
    )


def unstack(tree: Any, index: int) -> Any:
    """Lift ``index`` of a stacked pytree (host arrays)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x[index]), tree)


def sweep_mesh(num_lifts: int, views_per_step: int, devices=None) -> Mesh | None:
    """A ``("lifts", "views")`` mesh over ``devices`` (default all), None for one device.

    The lifts axis gets the largest divisor of the device count that divides ``num_lifts``; the
    views axis the largest divisor of the remaining devices that divides ``views_per_step``
    (devices left over stay idle).
    """
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) == 1:
        return None
    count = len(devices)
    lifts = max(d for d in range(1, count + 1) if count % d == 0 and num_lifts % d == 0)
    rest = count // lifts
    views = max(v for v in range(1, rest + 1) if rest % v == 0 and views_per_step % v == 0)
    return Mesh(np.array(devices[: lifts * views]).reshape(lifts, views), ("lifts", "views"))


def init_batched_state(
    configs: Sequence[SJCConfig], channels: int, *, backgrounds=None, **state_kwargs
) -> TrainState:
    """Each lift's `sjc.init_state` (its seed, its background), stacked on a leading axis."""
    backgrounds = backgrounds or [None] * len(configs)
    states = [
        sjc.init_state(c, channels, background=b, **state_kwargs)
        for c, b in zip(configs, backgrounds, strict=True)
    ]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def make_batched_step(
    configs: Sequence[SJCConfig],
    denoiser: Denoiser,
    params_axes: Any,
    *,
    mesh: Mesh | None = None,
    **choices: Any,
):
    """One jitted step ``(state, params) -> (state, metrics)`` of N lifts (state donated).

    Args:
      configs: the N lifts' configs (`varying_fields` decides what may differ); each is
        validated by building its own single-lift step first.
      denoiser: the model, one for the batch (its ``apply``); the params are the step's second
        argument, stacked by `stack` (``params_axes`` is its in_axes).
      mesh: a ``("lifts", "views")`` mesh (`sweep_mesh`) or None.
      choices: research choices as values (estimator, samplers, regularizers, optimizer) shared
        by every lift, as `sjc.make_step` takes them; left out they are built per lift from
        the config and the lift's traced scalars.

    Metrics are ``[N]`` device arrays (`sjc.make_step`'s, per lift).
    """
    for config in configs:  # each lift's concrete checks (timestep bounds, scales)
        sjc.step_function(config, denoiser, **choices)
    base = base_config(configs)
    names = varying_fields(configs)
    scalars = {k: jnp.asarray(v) for k, v in lift_scalars(configs, names).items()}
    if mesh is not None and mesh.shape["lifts"] > 1 and len(configs) % mesh.shape["lifts"]:
        raise ValueError(f"{len(configs)} lifts do not split over {mesh.shape['lifts']} devices")
    view_sharding = None
    if mesh is not None and mesh.shape["views"] > 1:
        view_sharding = NamedSharding(mesh, PartitionSpec("views"))

    def body(state: TrainState, params: Any, own: dict[str, Array]):
        built = {
            "estimator": lambda: sjc.estimator_from_config(base, own),
            "sigma_sampler": lambda: sjc.sigma_sampler_from_config(base, own),
            "regularizers": lambda: sjc.regularizers_from_config(base, own),
            "optimizer": lambda: sjc.optimizer_from_config(base, own),
        }
        kwargs = {k: choices[k] if k in choices else make() for k, make in built.items()}
        kwargs.update({k: v for k, v in choices.items() if k not in built})
        step = sjc.step_function(
            base,
            denoiser,
            validate=False,
            view_sharding=view_sharding,
            lift_axis=LIFT_AXIS,
            **kwargs,
        )
        return step(state, params)

    batched = jax.vmap(
        body,
        in_axes=(0, params_axes, 0),
        axis_name=LIFT_AXIS,
        spmd_axis_name="lifts" if mesh is not None else None,
    )
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())

    def step(state: TrainState, params: Any):
        state, metrics = batched(state, params, scalars)
        if replicated is not None:  # [N] scalars: on every process, for its lifts' logs
            metrics = jax.lax.with_sharding_constraint(metrics, replicated)
        return state, metrics

    return jax.jit(step, donate_argnums=0)
