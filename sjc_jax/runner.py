"""The run loop: a directory in, artifacts out, resumable after any interruption.

Two layers:

* `run_loop` is generic: it steps a state with any jitted step function, fetches metrics every
  ``log_every`` steps (the loop's only host syncs), checkpoints every ``checkpoint_every`` steps
  and at the end, and calls hooks (``every`` steps, with the state) for everything else.
* `run` is the lift of one config into a run directory: it builds the model through its kind
  (`sjc_jax.models`), the step with the research choices given as values (an ``estimator=``
  passed here reaches `sjc.make_step` unchanged), and the hooks of the artifacts (previews,
  final grid, videos, mesh, the model kind's evaluation).

A run directory holds ``config.json`` (written first; nested by section), ``metrics.jsonl`` (one
line per step), ``previews/`` (a fixed camera every 1 % of the run: decoded image and depth),
``checkpoints/`` (atomic), ``tensorboard/`` (event files of the metrics and previews) and
``final/`` (``grid.npz``, ``view.png``, ``turntable.mp4``, ``depth.mp4``, the mesh as
``mesh.ply``, ``mesh.glb`` and a textured ``mesh.obj``, ``metrics.png`` and, when the model kind
evaluates, ``eval.json``).

A non-finite grid stops the run with `NonFiniteError`; only finite states are ever checkpointed,
so the last checkpoint stays good. Ctrl-C writes a checkpoint of the last completed step and
raises `Interrupted`. `run(..., resume=True)` continues from the latest checkpoint and ends with
the same grid as an uninterrupted run (the step is a pure function of the train state).
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
import numpy as np
import optax
from tqdm.auto import tqdm

from sjc_jax import checkpoint, export, files
from sjc_jax.camera import Camera, make_camera, sjc_eye, turntable_path
from sjc_jax.config import SJCConfig
from sjc_jax.devices import accelerator_warning, describe_backend
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.grid import activate_density
from sjc_jax.grid_io import save_grid_file
from sjc_jax.models import Model, build_model
from sjc_jax.prompts import short_prompt
from sjc_jax.render import render_view
from sjc_jax.sjc import TrainState, init_state, make_step, views_mesh
from sjc_jax.tensorboard import TensorBoardWriter
from sjc_jax.testbed.scenes import render_views


class RunError(ValueError):
    """A run cannot start or go on (bad output directory, nothing to resume, ...)."""


class NonFiniteError(RunError):
    """The grid became non-finite; the last good checkpoint is kept."""


class Interrupted(RunError):
    """The run was interrupted (Ctrl-C / SIGTERM); a checkpoint of its state was written."""


def config_to_dict(config: SJCConfig) -> dict[str, Any]:
    """The ``config.json`` form of a config (nested by section)."""
    return config.to_dict()


def config_from_dict(values: dict[str, Any]) -> SJCConfig:
    """`SJCConfig` from a ``config.json`` dict (nested or flat), as a `RunError` if it is bad."""
    try:
        return SJCConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise RunError(f"bad config: {err}") from None


def prepare_output(out_dir: str | os.PathLike) -> Path:
    """Create ``out_dir`` and check it is writable (one clear error otherwise)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or str(err)
        raise RunError(f"cannot write to output directory {str(out)!r}: {reason}") from None
    return out


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
) -> TrainState:
    """Step ``state`` up to step ``end``; returns the last state.

    Args:
      step_fn: ``(state, params) -> (state, metrics)`` (donates the state).
      state: where to start (its ``step``).
      params: the model's params, the step's second argument.
      end: the step count to stop at.
      log_every: metrics are fetched from the device every this many steps and at the end.
      checkpoint_every: ``save(state)`` every this many steps and at the end.
      save: writes a checkpoint of a state (called with metrics fetched up to it).
      on_metrics: receives the fetched records ``{"step": i, name: float, ...}`` in order; raise
        in it to stop the loop (e.g. `NonFiniteError`).
      hooks: called after their steps, in order.
      bar: a tqdm bar to advance, or None.

    Raises:
      Interrupted: on KeyboardInterrupt, after saving the last completed step.
    """
    pending: list[tuple[int, dict]] = []

    def flush() -> None:
        fetched = jax.device_get(pending)
        pending.clear()
        if fetched:
            on_metrics([{"step": i, **{k: v.item() for k, v in m.items()}} for i, m in fetched])

    try:
        for i in range(int(state.step), end):
            state, metrics = step_fn(state, params)
            pending.append((i + 1, metrics))
            if bar is not None:
                bar.update()
            done = i + 1
            if done % log_every == 0 or done == end:
                flush()
            for hook in hooks:
                if done % hook.every == 0:
                    hook.fn(state)
            if done % checkpoint_every == 0 or done == end:
                flush()
                save(state)
    except KeyboardInterrupt:
        flush()
        save(state)
        raise Interrupted(f"interrupted at step {int(state.step)}") from None
    return state


# --- the artifacts of a lift ----------------------------------------------------------------


def preview_camera(size: int, radius: float) -> Camera:
    """The fixed preview view: between front and side, 20 deg above the horizon, fov 60."""
    eye = sjc_eye(jnp.deg2rad(30.0), jnp.deg2rad(70.0), radius)
    return make_camera(eye, fov_x_deg=60.0, height=size, width=size)


def _to_rgb(denoiser: Denoiser, images: np.ndarray) -> np.ndarray:
    """Model-space images ``[B, H, W, C]`` -> displayable RGB in [0, 1]."""
    return np.asarray(denoiser.decode(jnp.asarray(images)), np.float32)


class Artifacts:
    """Previews, videos and meshes of a lift (compiled once per run, outside the step)."""

    def __init__(self, config: SJCConfig, denoiser: Denoiser, size: int):
        self.config, self.denoiser, self.size = config, denoiser, size
        render_config = config.render_config()
        self._render = jax.jit(lambda grid, cam: render_view(grid, cam, render_config))

    def preview(self, grid, path: Path) -> np.ndarray:
        """Save the preview (decoded image | depth) as a PNG; returns it ``[H, 2W, 3]``."""
        view = self._render(grid, preview_camera(self.size, self.config.camera.radius))
        rgb = _to_rgb(self.denoiser, np.asarray(view.image)[None])[0]
        depth = export.colorize_depth(np.asarray(view.depth), near=0.3, far=10.0)
        scale = rgb.shape[0] // depth.shape[0]  # the VAE decodes at 8x the latent size
        depth = np.repeat(np.repeat(depth, scale, 0), scale, 1)
        picture = np.concatenate([rgb, depth], axis=1)
        export.save_png(path, picture)
        return picture

    def videos(self, grid, final: Path) -> None:
        cams = turntable_path(
            num_frames=self.config.run.video_frames,
            radius=self.config.camera.radius,
            height=self.size,
            width=self.size,
        )
        images, depths, _ = render_views(grid, cams, self.config.render_config(), chunk_size=10)
        rgb = np.concatenate(
            [
                _to_rgb(self.denoiser, np.asarray(images[i : i + 10]))
                for i in range(0, len(images), 10)
            ]
        )
        export.save_video(final / "turntable.mp4", rgb)
        depths = export.colorize_depth(np.asarray(depths), near=0.3, far=10.0)
        export.save_video(final / "depth.mp4", depths)

    def mesh(self, grid, final: Path) -> None:
        config = self.config
        density = np.asarray(
            activate_density(grid.density, grid.density_scale, config.render.density_shift)
        )
        feats = np.asarray(grid.features)
        if self.denoiser.feature_space == "rgb":
            colors = np.clip(feats, 0.0, 1.0)
        else:
            from sjc_jax.diffusion.stable_diffusion import latent_to_rgb_approx

            colors = np.asarray(latent_to_rgb_approx(feats))
        mesh = export.extract_mesh(
            density,
            colors,
            aabb=config.render_config().aabb,
            threshold=config.run.mesh_threshold,
            step_ratio=config.render.step_ratio,
        )
        export.save_mesh_files(final, mesh)

    def final(self, grid, final: Path) -> None:
        """``final/``: grid file, view, videos and mesh files."""
        final.mkdir(exist_ok=True)
        save_grid_file(
            final / "grid.npz",
            grid,
            aabb=self.config.render_config().aabb,
            feature_space=self.denoiser.feature_space,
        )
        self.preview(grid, final / "view.png")
        self.videos(grid, final)
        self.mesh(grid, final)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past ``last_step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    with files.atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


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
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Lift ``config`` into ``out_dir``; returns a summary dict.

    Args:
      config: the run's settings (None with ``resume``: the ones saved in ``out_dir`` are used).
      out_dir: the run directory.
      resume: continue the run in ``out_dir`` from its latest checkpoint.
      steps: with ``resume``, a new total step count (at least the steps already taken): extends
        a finished or interrupted run; ``config.json`` is updated. Schedules that depend on the
        run's length (the emptiness ramp, annealed sigma) follow the new total from here on.
      model: the model (default: built from ``config`` by its kind, `sjc_jax.models`).
      estimator, camera_sampler, sigma_sampler, regularizers, optimizer: research choices as
        values, passed to `sjc.make_step` (None: built from the config). A resumed run must be
        given the same values.
      progress: show a tqdm bar.
      stop_after: stop (with a checkpoint) after this many steps of this call; for tests.
      log: receives one-line notes once the run is set up (the JAX backend and devices, a
        warning when an accelerator goes unused); None = silent.
    """
    out = prepare_output(out_dir)
    config_path = out / "config.json"
    ckpt_dir = out / "checkpoints"
    if resume:
        if not config_path.exists():
            raise RunError(f"nothing to resume in {str(out)!r}: no config.json")
        saved = config_from_dict(json.loads(config_path.read_text()))
        if checkpoint.latest_step(ckpt_dir) is None:
            raise RunError(f"nothing to resume in {str(out)!r}: no checkpoint yet")
        if steps is not None and steps != saved.run.steps:
            taken = checkpoint.latest_step(ckpt_dir)
            if steps < taken:
                raise RunError(f"--steps {steps} is below the {taken} steps already taken")
            saved = saved.replace(steps=steps)
            files.write_json(config_path, config_to_dict(saved))
        config = saved
    else:
        if checkpoint.latest_step(ckpt_dir) is not None:
            raise RunError(
                f"{str(out)!r} already holds a run; continue it with --resume {str(out)!r} or "
                "choose another --out"
            )
        files.write_json(config_path, config_to_dict(config))
    (out / "previews").mkdir(exist_ok=True)

    model = build_model(config) if model is None else model
    denoiser = model.denoiser
    size = config.render.image_size or denoiser.resolution
    state = init_state(
        config,
        denoiser.channels,
        background=model.background,
        optimizer=optimizer,
        estimator=estimator,
        denoiser=denoiser,
    )
    step_fn = make_step(
        config,
        denoiser,
        estimator=estimator,
        camera_sampler=camera_sampler,
        sigma_sampler=sigma_sampler,
        regularizers=regularizers,
        optimizer=optimizer,
        mesh=_mesh_for(config),
    )
    metrics_path = out / "metrics.jsonl"
    if resume:
        state = checkpoint.restore_checkpoint(ckpt_dir, state)
        _truncate_metrics(metrics_path, int(state.step))
    if log is not None:
        log(describe_backend())
        warning = accelerator_warning()
        if warning:
            log(f"warning: {warning}")
    artifacts = Artifacts(config, denoiser, size)
    total = config.run.steps
    start = int(state.step)
    end = total if stop_after is None else min(total, start + stop_after)
    t_start = time.perf_counter()
    bar = tqdm(
        total=total,
        initial=start,
        disable=not progress,
        dynamic_ncols=True,
        desc=short_prompt(config.model.prompt) if config.model.prompt else denoiser.name,
    )
    board = TensorBoardWriter(out / "tensorboard", purge_step=start if resume else None)

    def save(state: TrainState) -> None:
        if not _is_finite(state.grid):
            return
        step = int(state.step)
        if checkpoint.latest_step(ckpt_dir) != step:
            checkpoint.save_checkpoint(ckpt_dir, step, state, keep=config.run.keep_checkpoints)

    with open(metrics_path, "a") as metrics_file, board:

        def on_metrics(records: list[dict[str, Any]]) -> None:
            for record in records:
                metrics_file.write(json.dumps(record) + "\n")
                board.scalars(record["step"], record)
                if not record["finite"]:
                    metrics_file.flush()
                    raise NonFiniteError(
                        f"the grid became non-finite at step {record['step']}; the last good "
                        f"checkpoint is in {str(ckpt_dir)!r} (try a lower --lr)"
                    )
            metrics_file.flush()
            last = records[-1]
            bar.set_postfix(
                sigma=f"{last['sigma']:.3f}",
                empty=f"{last.get('emptiness', 0.0):.4f}",
                opacity=f"{last['opacity']:.3f}",
                refresh=False,
            )

        preview_every = max(1, total // config.run.num_previews)

        def preview(state: TrainState) -> None:
            step = int(state.step)
            picture = artifacts.preview(state.grid, out / "previews" / f"step_{step:08d}.png")
            board.image(step, "preview", picture)

        previews = Hook(preview_every, preview)
        try:
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
            )
        except Interrupted as err:
            raise Interrupted(f"{err}; continue with --resume {str(out)!r}") from None
        finally:
            bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {"steps": int(state.step), "seconds": elapsed, "out": str(out)}
    if int(state.step) < total:
        return summary

    grid = jax.device_get(state.grid)
    artifacts.final(grid, out / "final")
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    export.save_metrics_plot(out / "final" / "metrics.png", records)
    if model.evaluate is not None:
        evaluation = model.evaluate(grid)
        files.write_json(out / "final" / "eval.json", evaluation)
        summary["eval"] = evaluation
    return summary


__all__ = [
    "Artifacts",
    "Hook",
    "Interrupted",
    "NonFiniteError",
    "RunError",
    "config_from_dict",
    "config_to_dict",
    "run",
    "run_loop",
]
