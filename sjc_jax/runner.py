"""The run loop: a directory in, artifacts out, resumable after any interruption.

Two layers:

* `run_loop` is generic: it steps a state with any jitted step function, fetches metrics every
  ``log_every`` steps (the loop's only host syncs), checkpoints every ``checkpoint_every`` steps
  and at the end, calls hooks (``every`` steps, with the state) for everything else, and serves a
  stop request between steps.
* `run` is the lift of one config into a run directory: it builds the model through its kind
  (`sjc_jax.models`), the step with the research choices given as values (an ``estimator=``
  passed here reaches `sjc.make_step` unchanged), and the hooks of the artifacts (previews,
  final grid, videos, mesh, the model kind's evaluation).

A run directory (`sjc_jax.rundir`) holds ``config.json`` (nested by section), ``metrics.jsonl``
(one line per step, each step exactly once), ``previews/`` (a fixed camera every 1 % of the run:
decoded image and depth), ``checkpoints/`` (`sjc_jax.checkpoint`), ``tensorboard/`` (event files
of the metrics and previews) and ``final/`` (``grid.npz``, ``view.png``, ``turntable.mp4``,
``depth.mp4``, the mesh as ``mesh.ply``, ``mesh.glb`` and a textured ``mesh.obj``,
``metrics.png`` and, when the model kind evaluates, ``eval.json``; written into ``final.tmp-*``
and renamed, so a ``final/`` is always complete).

`run` owns its directory. Everything is validated before anything is written: the directory
(`rundir.check_new` / `rundir.check_resume`), the config, the model (built first: a bad
``--scene`` or model path fails here) and the memory the run needs (`sjc_jax.resources`). Only
then is the directory created and locked (`rundir.RunLock`, for the run's lifetime) and
``config.json`` written.

Faults:

* Ctrl-C / SIGTERM (`sjc_jax.interrupts`): the step in flight finishes, metrics are flushed up to
  it, one checkpoint of it is written, and `Interrupted` is raised once the write has ended
  (further signals wait for it). During the final artifacts the run stops between two of them;
  the checkpoint of the last step exists already.
* A non-finite grid raises `NonFiniteError`; only finite states are checkpointed, so the last
  checkpoint stays good.
* A full disk raises `DiskFullError`; a checkpoint becomes visible only once complete and old
  ones are pruned only after a new one is, so the last good checkpoint is kept.
* Resume (`run(..., resume=True)`) restores the newest checkpoint that passes validation (it is
  read whole, and must hold its own step and a finite grid), moving unusable ones aside with one
  warning line; with none usable, the run restarts from step 0 (a run is a pure function of its
  seed). ``metrics.jsonl`` is cut back to the restored step. The final grid is bitwise that of an
  uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sjc_jax import checkpoint, files, interrupts, resources, rundir
from sjc_jax.artifacts import Artifacts, read_eval, write_final
from sjc_jax.config import SJCConfig
from sjc_jax.devices import accelerator_warning, describe_backend
from sjc_jax.models import Model, build_model
from sjc_jax.progress import progress_bar
from sjc_jax.prompts import short_prompt
from sjc_jax.rundir import RunError
from sjc_jax.sjc import TrainState, init_state, make_step, step_function, views_mesh
from sjc_jax.tensorboard import TensorBoardWriter


class NonFiniteError(RunError):
    """The grid became non-finite; the last good checkpoint is kept."""


class Interrupted(RunError):
    """The run was interrupted (Ctrl-C / SIGTERM); a checkpoint of its last step was written."""


class DiskFullError(RunError):
    """A write failed for lack of space; the last good checkpoint is kept."""


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


# --- the generic loop ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(state)`` after every ``every``-th step of the loop (``fn`` must not keep ``state``:
    the next step donates its buffers)."""

    every: int
    fn: Callable[[TrainState], None]


def _is_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def run_loop(
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]],
    state: TrainState,
    params: Any,
    *,
    end: int,
    log_every: int,
    checkpoint_every: int,
    save: Callable[[TrainState], None],
    on_metrics: Callable[[list[dict[str, Any]]], None],
    hooks: Sequence[Hook] = (),
    bar: Any = None,
    should_stop: Callable[[], bool] | None = None,
    start: int | None = None,
) -> TrainState:
    """Step ``state`` up to step ``end``; returns the last state.

    Args:
      step_fn: ``(state, params) -> (state, metrics)`` (donates the state).
      state: where to start (its ``step``).
      params: the model's params, the step's second argument.
      end: the step count to stop at.
      log_every: metrics are fetched from the device every this many steps and at the end.
      checkpoint_every: ``save(state)`` every this many steps and at the end.
      save: writes a checkpoint of a state (called with metrics fetched up to it, before the
        next step donates the state).
      on_metrics: receives the fetched records ``{"step": i, name: float, ...}`` in order (a
        batch of lifts' metrics are lists, one value a lift); raise
        in it to stop the loop (e.g. `NonFiniteError`).
      hooks: called after their steps, in order.
      bar: a progress bar to advance (`sjc_jax.progress`), or None.
      should_stop: asked after every step (and once before the first); when it answers True the
        loop flushes the metrics, saves the state (unless just saved) and raises `Interrupted`.
      start: the state's step, when read from the state is not possible here (a batch of lifts
        spread over processes); None reads ``state.step``.

    Raises:
      Interrupted: when ``should_stop()``, after the metrics and the save of the last step.
    """
    pending: list[tuple[int, dict]] = []
    stop = should_stop or (lambda: False)

    def flush() -> None:
        fetched = jax.device_get(pending)
        pending.clear()
        if fetched:
            on_metrics([{"step": i, **{k: v.tolist() for k, v in m.items()}} for i, m in fetched])

    start = int(state.step) if start is None else start
    if start < end and stop():
        raise Interrupted(f"interrupted at step {start}")
    for i in range(start, end):
        state, metrics = step_fn(state, params)
        done = i + 1
        pending.append((done, metrics))
        if bar is not None:
            bar.update()
        if done % log_every == 0 or done == end:
            flush()
        for hook in hooks:
            if done % hook.every == 0:
                hook.fn(state)
        saved = done % checkpoint_every == 0 or done == end
        if saved:
            flush()
            save(state)
        if done < end and stop():
            flush()
            if not saved:
                save(state)
            raise Interrupted(f"interrupted at step {done}")
    return state


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
    device = jax.devices()[0]
    needed = resources.estimate(
        config,
        shapes,
        channels=denoiser.channels,
        image_size=size,
        devices=1 if mesh is None else mesh.size,
    )
    resources.check_fits(
        needed,
        available=resources.available_bytes(device),
        resolution=config.render.grid_resolution,
        where=resources.where(device),
    )


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


def _interrupted_before(out: Path, resume: bool) -> str:
    if resume:
        return f"interrupted before continuing; continue with --resume {str(out)!r}"
    return "interrupted before the first step; nothing was written"


def _resume_hint(out: Path) -> str:
    return f"continue with --resume {str(out)!r}"


def _last_good(ckpt_dir: Path) -> str:
    step = checkpoint.latest_step(ckpt_dir)
    if step is None:
        return "no checkpoint was written before it"
    return f"the last good checkpoint (step {step}) is kept in {str(ckpt_dir)!r}"


def _restore(ckpt_dir: Path, state: TrainState) -> TrainState:
    """The newest usable checkpoint (one warning line if others were moved aside), or ``state``."""
    skipped: list[str] = []

    def check(step: int, restored: TrainState) -> None:
        if int(restored.step) != step:
            raise checkpoint.UnusableCheckpoint(
                f"the checkpoint of step {step} holds step {int(restored.step)}"
            )
        if not _is_finite(restored.grid):
            raise checkpoint.UnusableCheckpoint(f"the checkpoint of step {step} is not finite")

    def on_unusable(step: int, reason: str, moved: Path) -> None:
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        skipped.append(f"{reason}, moved to {str(moved)!r}")

    step, restored = checkpoint.restore_latest_usable(
        ckpt_dir, state, check=check, on_unusable=on_unusable
    )
    if skipped:
        start = f"from step {step}" if step is not None else "from step 0 (no usable checkpoint)"
        warnings.warn(f"resuming {start}: {'; '.join(skipped)}", stacklevel=3)
    return state if restored is None else restored


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
        try:
            with stop.immediately():
                config, write_config = _planned_config(config, out, resume=resume, steps=steps)
                if model is None:
                    resources.check_before_build([config])
                    model = build_model(config)
                size = config.render.image_size or model.denoiser.resolution
                state_kwargs = dict(
                    optimizer=optimizer, estimator=estimator, denoiser=model.denoiser
                )
                choices = dict(
                    estimator=estimator,
                    camera_sampler=camera_sampler,
                    sigma_sampler=sigma_sampler,
                    regularizers=regularizers,
                    optimizer=optimizer,
                )
                mesh = _mesh_for(config)
                _check_memory(config, model, size, state_kwargs, mesh)
                _check_step(config, model, state_kwargs, choices, mesh)
        except KeyboardInterrupt:
            raise Interrupted(_interrupted_before(out, resume)) from None
        if stop.requested:  # raised inside the block and swallowed by a library
            raise Interrupted(_interrupted_before(out, resume))
        try:
            with rundir.RunLock(out):
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
        except Exception as err:
            if isinstance(err, RunError) or not files.is_disk_full(err):
                raise
            then = _resume_hint(out) if (out / rundir.CONFIG).is_file() else "run it again"
            raise DiskFullError(
                f"no space left on the device of {str(out)!r}; "
                f"{_last_good(out / rundir.CHECKPOINTS)}; free some space and {then}"
            ) from None


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
    if resume:
        state = _restore(ckpt_dir, state)
        rundir.truncate_metrics(metrics_path, int(state.step))
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
    bar = progress_bar(
        total=total,
        initial=start,
        enabled=progress,
        desc=short_prompt(config.model.prompt) if config.model.prompt else denoiser.name,
    )
    writer = checkpoint.CheckpointWriter(ckpt_dir, keep=config.run.keep_checkpoints)

    def save(state: TrainState) -> None:
        if not _is_finite(state.grid):
            return
        step = int(state.step)
        if not checkpoint.is_complete(checkpoint.step_directory(ckpt_dir, step)):
            writer.save(step, state)

    def should_stop() -> bool:
        return stop.requested

    preview_every = max(1, total // config.run.num_previews)
    board = TensorBoardWriter(out / rundir.TENSORBOARD, purge_step=start if resume else None)

    def preview(state: TrainState) -> None:
        step = int(state.step)
        picture = artifacts.preview(state.grid, out / rundir.PREVIEWS / f"step_{step:08d}.png")
        board.image(step, "preview", picture)

    previews = Hook(preview_every, preview)
    try:
        with writer, board, open(metrics_path, "a") as metrics_file:

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
                save=save,
                on_metrics=on_metrics,
                hooks=(previews,),
                bar=bar,
                should_stop=should_stop,
            )
    except Interrupted as err:
        raise Interrupted(f"{err} ({stop.name}); {_resume_hint(out)}") from None
    except _NonFinite as err:
        raise NonFiniteError(
            f"the grid became non-finite at step {err.step}; {_last_good(ckpt_dir)} "
            "(try a lower --lr)"
        ) from None
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {"steps": int(state.step), "seconds": elapsed, "out": str(out), **resumed}
    if int(state.step) < total:
        return summary

    grid = jax.device_get(state.grid)

    def before_part() -> None:
        if stop.requested:
            raise Interrupted(
                f"interrupted while writing the final artifacts at step {total} ({stop.name}); "
                f"{_resume_hint(out)}"
            )

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
