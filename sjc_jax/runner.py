"""The run command: one config lifted into a run directory, on the run engine.

`run` builds the model through its kind (`sjc_jax.models`), the step with the research choices
given as values (an ``estimator=`` passed here reaches `sjc.make_step` unchanged), and the hooks
of the artifacts (previews, final grid, videos, mesh, the model kind's evaluation). Everything
around the steps is `sjc_jax.engine`'s, shared with ``sweep`` and ``train-model``: validation
and the memory check before anything is written, the directory's lock, checkpoints and their
validated restore, stop requests and the full disk (`run_loop` and `Hook` are re-exported from
there).

A run directory (`sjc_jax.rundir`) holds ``config.json`` (nested by section), ``metrics.jsonl``
(one line per step, each step exactly once), ``previews/`` (a fixed camera every 1 % of the run:
decoded image and depth), ``checkpoints/`` (`sjc_jax.checkpoint`), ``tensorboard/`` (event files
of the metrics and previews) and ``final/`` (``grid.npz``, ``view.png``, ``turntable.mp4``,
``depth.mp4``, the mesh as ``mesh.ply``, ``mesh.glb`` and a textured ``mesh.obj``,
``metrics.png`` and, when the model kind evaluates, ``eval.json``; written into ``final.tmp-*``
and renamed, so a ``final/`` is always complete).

Everything is validated before anything is written: the directory (`rundir.check_new` /
`rundir.check_resume`), the config, the model (built first: a bad ``--scene`` or model path
fails here) and the memory the run needs. Only then is the directory created and locked and
``config.json`` written.

Faults (`sjc_jax.engine`): Ctrl-C / SIGTERM finish the step in flight, checkpoint it and raise
`Interrupted` (during the final artifacts the run stops between two of them); a non-finite grid
raises `NonFiniteError` (only finite states are checkpointed); a full disk raises
`DiskFullError`, the last good checkpoint kept. Resume restores the newest checkpoint that passes
validation (with none usable, the run restarts from step 0: a run is a pure function of its
seed) and cuts ``metrics.jsonl`` back to it. The final grid is bitwise that of an uninterrupted
run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import optax

from sjc_jax import checkpoint, engine, files, interrupts, resources, rundir
from sjc_jax.artifacts import Artifacts, read_eval, write_final
from sjc_jax.config import SJCConfig
from sjc_jax.devices import accelerator_warning, describe_backend
from sjc_jax.engine import DiskFullError, Hook, Interrupted, NonFiniteError, run_loop
from sjc_jax.models import Model, build_model
from sjc_jax.prompts import short_prompt
from sjc_jax.rundir import RunError
from sjc_jax.sjc import TrainState, init_state, make_step, step_function, views_mesh
from sjc_jax.tensorboard import TensorBoardWriter


def config_to_dict(config: SJCConfig) -> dict[str, Any]:
    """The ``config.json`` form of a config (nested by section)."""
    return config.to_dict()


def config_from_dict(values: dict[str, Any]) -> SJCConfig:
    """`SJCConfig` from a ``config.json`` dict (nested or flat), as a `RunError` if it is bad."""
    try:
        return SJCConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise RunError(f"bad config: {err}") from None


def write_board_summary(
    out: Path, step: int, config: SJCConfig, evaluation: dict[str, Any] | None
) -> None:
    """A finished run's TensorBoard summary: the evaluation (``eval.json``; without one, the
    mesh's ``final/mesh.json``) as ``eval/...`` scalars and the config as hyper-parameters."""
    if evaluation is None:
        try:
            evaluation = {"mesh": json.loads((out / rundir.FINAL / rundir.MESH_INFO).read_text())}
        except (OSError, ValueError):
            evaluation = {}
    with TensorBoardWriter(out / rundir.TENSORBOARD) as board:
        board.summary(step, config.to_flat(), evaluation)


def _mesh_for(config: SJCConfig):
    mesh = views_mesh(config.run.views_per_step)
    devices = jax.device_count()
    if mesh is None and devices > 1:
        warnings.warn(
            f"using 1 of {devices} devices: --views-per-step {config.run.views_per_step} is not "
            f"a multiple of {devices}",
            stacklevel=3,
        )
    return mesh


# --- the run directory -----------------------------------------------------------------------


def _planned_config(
    config: SJCConfig | None, out: Path, *, resume: bool, steps: int | None, locked: bool = False
) -> tuple[SJCConfig, bool]:
    """The run's config and whether ``config.json`` must be (re)written; checks, writes nothing."""
    if not resume:
        if config is None:
            raise RunError("a new run needs a config (config=None only with resume=True)")
        rundir.check_new(out, locked=locked)
        return config, True
    rundir.check_resume(out, locked=locked)
    try:
        values = json.loads((out / rundir.CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"bad config: cannot read {str(out / rundir.CONFIG)!r}: {err}") from None
    saved = config_from_dict(values)
    if steps is None or steps == saved.run.steps:
        return saved, False
    taken = checkpoint.latest_step(out / rundir.CHECKPOINTS) or 0
    if isinstance(steps, int) and 0 < steps < taken:
        raise RunError(f"--steps {steps} is below the {taken} steps already taken")
    try:
        return saved.replace(steps=steps), True
    except ValueError as err:
        raise RunError(str(err)) from None


def _check_memory(config: SJCConfig, model: Model, size: int, state_kwargs: dict, mesh) -> None:
    """Refuse (one line) a run whose grid, optimiser state and step cannot fit on the device."""
    denoiser = model.denoiser
    shapes = jax.eval_shape(
        lambda: init_state(config, denoiser.channels, background=model.background, **state_kwargs)
    )
    needed = resources.estimate(
        config,
        shapes,
        channels=denoiser.channels,
        image_size=size,
        devices=1 if mesh is None else mesh.size,
    )
    engine.check_memory(needed, resolution=config.render.grid_resolution)


def _check_step(config: SJCConfig, model: Model, state_kwargs: dict, choices: dict, mesh) -> None:
    """Trace the run's step abstractly (`jax.eval_shape`, nothing computed or compiled).

    What only tracing finds (a timestep past the model's table, a condition the model cannot
    take) is refused here, before the run directory exists, rather than at the first step.
    """
    denoiser = model.denoiser
    try:
        step = step_function(config, denoiser, mesh=mesh, **choices)
        state = jax.eval_shape(
            lambda: init_state(
                config, denoiser.channels, background=model.background, **state_kwargs
            )
        )
        jax.eval_shape(step, state, denoiser.params)
    except (TypeError, OverflowError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"the step cannot be built for this config: {first}") from None


class _NonFinite(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def run(
    config: SJCConfig | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    model: Model | None = None,
    estimator: Any = None,
    camera_sampler: Any = None,
    sigma_sampler: Any = None,
    regularizers: Sequence[Any] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    steps: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    stop: interrupts.StopRequest | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Lift ``config`` into ``out_dir``; returns a summary dict.

    Args:
      config: the run's settings (None with ``resume``: the ones saved in ``out_dir`` are used).
      out_dir: the run directory: new (missing or empty) unless ``resume``.
      resume: continue the run in ``out_dir`` from its newest usable checkpoint (from step 0 if
        it has none); a finished run only gets its missing ``final/`` written.
      steps: with ``resume``, a new total step count (at least the steps already taken): extends
        a finished or interrupted run; ``config.json`` is updated. Schedules that depend on the
        run's length (the emptiness ramp, annealed sigma) follow the new total from here on.
      model: the model (default: built from ``config`` by its kind, `sjc_jax.models`).
      estimator, camera_sampler, sigma_sampler, regularizers, optimizer: research choices as
        values, passed to `sjc.make_step` (None: built from the config). A resumed run must be
        given the same values.
      progress: show the progress (a tqdm bar on a terminal, plain lines elsewhere).
      stop_after: stop (with a checkpoint) after this many steps of this call; for tests.
      stop: where Ctrl-C / SIGTERM are recorded (`interrupts.StopRequest`, its handlers installed
        by the caller); None installs SIGINT and SIGTERM handlers for the call (main thread).
      log: receives one-line notes once the run is set up (the JAX backend and devices, a
        warning when an accelerator goes unused); None = silent.

    Raises:
      RunError: the directory, config or resources are unsuitable (nothing was written), or
        `Interrupted`, `NonFiniteError`, `DiskFullError` (the run can be resumed).
      ValueError: a bad model, scene or research choice (nothing was written).
    """
    out = Path(out_dir)
    with interrupts.handling(stop) as stop:

        def plan() -> tuple:
            planned, write_config = _planned_config(config, out, resume=resume, steps=steps)
            built = model
            if built is None:
                resources.check_before_build([planned])
                built = build_model(planned)
            size = planned.render.image_size or built.denoiser.resolution
            state_kwargs = dict(optimizer=optimizer, estimator=estimator, denoiser=built.denoiser)
            choices = dict(
                estimator=estimator,
                camera_sampler=camera_sampler,
                sigma_sampler=sigma_sampler,
                regularizers=regularizers,
                optimizer=optimizer,
            )
            mesh = _mesh_for(planned)
            _check_memory(planned, built, size, state_kwargs, mesh)
            _check_step(planned, built, state_kwargs, choices, mesh)
            return planned, write_config, built, size, state_kwargs, choices, mesh

        config, write_config, model, size, state_kwargs, choices, mesh = engine.prepare(
            plan, stop, out, resume=resume, command="run"
        )
        with engine.owned(out, ckpt_dir=out / rundir.CHECKPOINTS, marker=rundir.CONFIG):
            # Checked again under the lock: another run may have started here meanwhile.
            again, _ = _planned_config(
                None if resume else config, out, resume=resume, steps=steps, locked=True
            )
            if again != config:
                raise RunError(f"{str(out)!r} changed while this run was starting; try again")
            return _run_locked(
                config,
                out,
                write_config=write_config,
                resume=resume,
                model=model,
                size=size,
                mesh=mesh,
                state_kwargs=state_kwargs,
                make_step_kwargs=choices,
                progress=progress,
                stop_after=stop_after,
                stop=stop,
                log=log,
            )


def _run_locked(
    config: SJCConfig,
    out: Path,
    *,
    write_config: bool,
    resume: bool,
    model: Model,
    size: int,
    mesh,
    state_kwargs: dict,
    make_step_kwargs: dict,
    progress: bool,
    stop_after: int | None,
    stop: interrupts.StopRequest,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """`run` once the directory is validated and locked."""
    ckpt_dir = out / rundir.CHECKPOINTS
    metrics_path = out / rundir.METRICS
    if write_config:
        files.write_json(out / rundir.CONFIG, config_to_dict(config))
    (out / rundir.PREVIEWS).mkdir(exist_ok=True)

    denoiser = model.denoiser
    state = init_state(config, denoiser.channels, background=model.background, **state_kwargs)
    step_fn = make_step(config, denoiser, mesh=mesh, **make_step_kwargs)
    checkpoints = engine.Checkpoints(
        ckpt_dir,
        keep=config.run.keep_checkpoints,
        step_of=lambda state: int(state.step),
        finite_part=lambda state: state.grid,
    )
    if resume:
        state = checkpoints.restore(state)
        rundir.truncate_metrics(metrics_path, int(state.step))
        if log is not None:
            log(engine.resumed_line(int(state.step)))
    total = config.run.steps
    start = int(state.step)
    resumed = {"resumed_from": start} if resume else {}
    if start == total and (out / rundir.FINAL).is_dir():
        summary = {"steps": total, "seconds": 0.0, "out": str(out), **resumed, "finished": True}
        evaluation = read_eval(out)
        return summary if evaluation is None else {**summary, "eval": evaluation}

    if log is not None:
        log(describe_backend())
        warning = accelerator_warning()
        if warning:
            log(f"warning: {warning}")
    artifacts = Artifacts(config, denoiser, size)
    end = total if stop_after is None else min(total, start + stop_after)
    t_start = time.perf_counter()
    bar = engine.progress(
        total=total,
        initial=start,
        enabled=progress,
        desc=short_prompt(config.model.prompt) if config.model.prompt else denoiser.name,
    )

    preview_every = max(1, total // config.run.num_previews)
    board = TensorBoardWriter(out / rundir.TENSORBOARD, purge_step=start if resume else None)

    def preview(state: TrainState) -> None:
        step = int(state.step)
        picture = artifacts.preview(state.grid, out / rundir.PREVIEWS / f"step_{step:08d}.png")
        board.image(step, "preview", picture)

    previews = Hook(preview_every, preview)
    try:
        with (
            engine.stopping(stop, out, "run"),
            checkpoints,
            board,
            open(metrics_path, "a") as metrics_file,
        ):

            def on_metrics(records: list[dict[str, Any]]) -> None:
                for record in records:
                    metrics_file.write(json.dumps(record) + "\n")
                    board.scalars(record["step"], record)
                    if not record["finite"]:
                        metrics_file.flush()
                        raise _NonFinite(record["step"])
                metrics_file.flush()
                last = records[-1]
                bar.set_postfix(
                    sigma=f"{last['sigma']:.3f}",
                    empty=f"{last.get('emptiness', 0.0):.4f}",
                    opacity=f"{last['opacity']:.3f}",
                    refresh=False,
                )

            state = run_loop(
                step_fn,
                state,
                denoiser.params,
                end=end,
                log_every=config.run.log_every,
                checkpoint_every=config.run.checkpoint_every,
                save=checkpoints.save,
                on_metrics=on_metrics,
                hooks=(previews,),
                bar=bar,
                should_stop=lambda: stop.requested,
            )
    except _NonFinite as err:
        raise NonFiniteError(
            f"the grid became non-finite at step {err.step}; {checkpoints.last_good()} "
            "(try a lower --lr)"
        ) from None
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {"steps": int(state.step), "seconds": elapsed, "out": str(out), **resumed}
    if int(state.step) < total:
        return summary

    grid = jax.device_get(state.grid)
    before_part = engine.stop_between_parts(stop, out, "run", total)
    evaluation = write_final(out, grid, artifacts, evaluate=model.evaluate, before_part=before_part)
    write_board_summary(out, total, config, evaluation)
    if model.evaluate is not None:
        summary["eval"] = evaluation
    return summary


__all__ = [
    "write_board_summary",
    "Artifacts",
    "DiskFullError",
    "Hook",
    "Interrupted",
    "NonFiniteError",
    "RunError",
    "config_from_dict",
    "config_to_dict",
    "run",
    "run_loop",
]
