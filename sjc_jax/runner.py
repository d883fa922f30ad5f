"""The run loop: a directory in, artifacts out, resumable after any interruption.

A run directory holds ``config.json`` (written first), ``metrics.jsonl`` (one line per step),
``previews/`` (a fixed camera every 1 % of the run: decoded image and depth), ``checkpoints/``
(atomic, every ``checkpoint_every`` steps and at the end) and ``final/`` (``grid.npz``,
``turntable.mp4``, ``depth.mp4``, ``mesh.ply`` and, for the testbed, ``eval.json``).

Metrics are fetched from the device every ``log_every`` steps (the loop's only host syncs). A
non-finite grid stops the run with `NonFiniteError`; only finite states are ever checkpointed,
so the last checkpoint stays good. Ctrl-C writes a checkpoint of the current state and raises
`Interrupted`. `run(..., resume=True)` continues from the latest checkpoint and ends with the same
grid as an uninterrupted run (the step is a pure function of the train state).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sjc_jax import checkpoint, export
from sjc_jax.camera import Camera, make_camera, sjc_eye, turntable_path
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.grid import activate_density
from sjc_jax.render import render_view
from sjc_jax.scenes import render_views, save_grid_file
from sjc_jax.sjc import SJCConfig, TrainState, init_state, make_step


class RunError(ValueError):
    """A run cannot start or go on (bad output directory, nothing to resume, ...)."""


class NonFiniteError(RunError):
    """The grid became non-finite; the last good checkpoint is kept."""


class Interrupted(RunError):
    """The run was interrupted (Ctrl-C / SIGTERM); a checkpoint of its state was written."""


def _write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file in the same directory, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_to_dict(config: SJCConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> SJCConfig:
    """`SJCConfig` from a dict, refusing unknown keys (a config.json of another version)."""
    fields = {f.name for f in dataclasses.fields(SJCConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise RunError(f"unknown config fields {unknown}")
    return SJCConfig(**values)


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


def preview_camera(size: int, radius: float) -> Camera:
    """The fixed preview view: between front and side, 20 deg above the horizon, fov 60."""
    eye = sjc_eye(jnp.deg2rad(30.0), jnp.deg2rad(70.0), radius)
    return make_camera(eye, fov_x_deg=60.0, height=size, width=size)


def _to_rgb(denoiser: Denoiser, images: np.ndarray) -> np.ndarray:
    """Model-space images ``[B, H, W, C]`` -> displayable RGB in [0, 1]."""
    return np.asarray(denoiser.decode(jnp.asarray(images)), np.float32)


class _Artifacts:
    """Rendering for previews, videos and meshes (compiled once per run, outside the step)."""

    def __init__(self, config: SJCConfig, denoiser: Denoiser, size: int):
        self.config, self.denoiser, self.size = config, denoiser, size
        render_config = config.render_config()
        self._render = jax.jit(lambda grid, cam: render_view(grid, cam, render_config))

    def preview(self, grid, path: Path) -> None:
        view = self._render(grid, preview_camera(self.size, self.config.radius))
        rgb = _to_rgb(self.denoiser, np.asarray(view.image)[None])[0]
        depth = export.colorize_depth(np.asarray(view.depth), near=0.3, far=10.0)
        scale = rgb.shape[0] // depth.shape[0]  # the VAE decodes at 8x the latent size
        depth = np.repeat(np.repeat(depth, scale, 0), scale, 1)
        export.save_png(path, np.concatenate([rgb, depth], axis=1))

    def videos(self, grid, final: Path) -> None:
        cams = turntable_path(
            num_frames=self.config.video_frames,
            radius=self.config.radius,
            height=self.size,
            width=self.size,
        )
        # One render_rays call per chunk of cameras (a vmap of render_view would run every
        # packed-lookup tier of its lax.switch).
        images, depths, _ = render_views(grid, cams, self.config.render_config(), chunk_size=10)
        rgb = np.concatenate(
            [
                _to_rgb(self.denoiser, np.asarray(images[i : i + 10]))
                for i in range(0, len(images), 10)
            ]
        )
        depths = np.asarray(depths)
        export.save_video(final / "turntable.mp4", rgb)
        export.save_video(final / "depth.mp4", export.colorize_depth(depths, near=0.3, far=10.0))

    def mesh(self, grid, final: Path) -> None:
        config = self.config
        density = np.asarray(
            activate_density(grid.density, grid.density_scale, config.density_shift)
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
            threshold=config.mesh_threshold,
            step_ratio=config.step_ratio,
        )
        export.save_mesh(final / "mesh.ply", mesh)


def views_mesh(config: SJCConfig) -> Mesh | None:
    """A mesh over all devices for the step's views when they split evenly, else None."""
    devices = jax.devices()
    if len(devices) == 1:
        return None
    if config.views_per_step % len(devices):
        warnings.warn(
            f"using 1 of {len(devices)} devices: --views-per-step {config.views_per_step} is not "
            f"a multiple of {len(devices)}",
            stacklevel=2,
        )
        return None
    return Mesh(np.array(devices), ("views",))


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past ``last_step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _is_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def run(
    config: SJCConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    build_denoiser: Callable[[SJCConfig], tuple[Denoiser, Any]] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run SJC (or the testbed) into ``out_dir``; returns a summary dict.

    Args:
      config: the run's settings (with ``resume``, the ones saved in ``out_dir`` are used).
      out_dir: the run directory.
      resume: continue the run in ``out_dir`` from its latest checkpoint.
      build_denoiser: ``config -> (denoiser, testbed_or_None)``; default `load_denoiser`.
      progress: show a tqdm bar.
      stop_after: stop (with a checkpoint) after this many steps of this call; for tests.
    """
    out = prepare_output(out_dir)
    config_path = out / "config.json"
    ckpt_dir = out / "checkpoints"
    if resume:
        if not config_path.exists():
            raise RunError(f"nothing to resume in {str(out)!r}: no config.json")
        config = config_from_dict(json.loads(config_path.read_text()))
        if checkpoint.latest_step(ckpt_dir) is None:
            raise RunError(f"nothing to resume in {str(out)!r}: no checkpoint yet")
    else:
        if checkpoint.latest_step(ckpt_dir) is not None:
            raise RunError(
                f"{str(out)!r} already holds a run; continue it with --resume {str(out)!r} or "
                "choose another --out"
            )
        _write_json(config_path, config_to_dict(config))
    (out / "previews").mkdir(exist_ok=True)

    denoiser, testbed = (build_denoiser or load_denoiser)(config)
    size = config.image_size or denoiser.resolution
    background = None if testbed is None else testbed.background
    state = init_state(config, denoiser.channels, background=background)
    step_fn = make_step(config, denoiser, mesh=views_mesh(config))
    metrics_path = out / "metrics.jsonl"
    if resume:
        state = checkpoint.restore_checkpoint(ckpt_dir, state)
        _truncate_metrics(metrics_path, int(state.step))
    artifacts = _Artifacts(config, denoiser, size)
    preview_every = max(1, config.steps // config.num_previews)

    start = int(state.step)
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    pending: list[tuple[int, dict]] = []
    t_start = time.perf_counter()
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not progress,
        dynamic_ncols=True,
        desc=config.prompt or denoiser.name,
    )

    def save(state: TrainState) -> None:
        if not _is_finite(state.grid):
            return
        step = int(state.step)
        if checkpoint.latest_step(ckpt_dir) != step:
            checkpoint.save_checkpoint(ckpt_dir, step, state, keep=config.keep_checkpoints)

    def flush(metrics_file) -> None:
        fetched = jax.device_get(pending)
        for step, m in fetched:
            record = {"step": step, **{k: v.item() for k, v in m.items()}}
            metrics_file.write(json.dumps(record) + "\n")
            if not record["finite"]:
                metrics_file.flush()
                raise NonFiniteError(
                    f"the grid became non-finite at step {step}; the last good checkpoint is in "
                    f"{str(ckpt_dir)!r} (try a lower --lr)"
                )
        metrics_file.flush()
        if fetched:
            last = fetched[-1][1]
            bar.set_postfix(
                sigma=f"{last['sigma']:.3f}",
                empty=f"{last['emptiness']:.4f}",
                opacity=f"{last['opacity']:.3f}",
                refresh=False,
            )
        pending.clear()

    try:
        with open(metrics_path, "a") as metrics_file:
            for i in range(start, end):
                state, metrics = step_fn(state, denoiser.params)
                pending.append((i + 1, metrics))
                bar.update()
                done = i + 1
                if done % config.log_every == 0 or done == end:
                    flush(metrics_file)
                if done % preview_every == 0:
                    artifacts.preview(state.grid, out / "previews" / f"step_{done:08d}.png")
                if done % config.checkpoint_every == 0 or done == end:
                    flush(metrics_file)
                    save(state)
    except KeyboardInterrupt:
        save(state)
        raise Interrupted(
            f"interrupted at step {int(state.step)}; continue with --resume {str(out)!r}"
        ) from None
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {"steps": int(state.step), "seconds": elapsed, "out": str(out)}
    if int(state.step) < config.steps:
        return summary

    final = out / "final"
    final.mkdir(exist_ok=True)
    grid = jax.device_get(state.grid)
    save_grid_file(
        final / "grid.npz",
        grid,
        aabb=config.render_config().aabb,
        feature_space=denoiser.feature_space,
    )
    artifacts.preview(grid, final / "view.png")
    artifacts.videos(grid, final)
    artifacts.mesh(grid, final)
    if testbed is not None:
        from sjc_jax import testbed as testbed_lib

        evaluation = testbed_lib.evaluate(grid, testbed, config)
        _write_json(final / "eval.json", evaluation)
        summary["eval"] = evaluation
    return summary


def load_denoiser(config: SJCConfig) -> tuple[Denoiser, Any]:
    """The model of a config: ``(denoiser, testbed)``; testbed is None for diffusion models."""
    if config.model == "testbed":
        from sjc_jax import testbed

        ground_truth, aabb, _ = testbed.load_scene(config.scene)
        tb = testbed.build_testbed(config, ground_truth, key=jax.random.key(config.seed), aabb=aabb)
        return tb.denoiser, tb
    from sjc_jax.diffusion.stable_diffusion import load_stable_diffusion

    denoiser = load_stable_diffusion(
        config.model,
        prompt=config.prompt,
        revision=config.revision,
        dtype=config.dtype,
        guidance_scale=config.guidance_scale,
        view_augmentation=config.view_augmentation,
        negative_prompt=config.negative_prompt,
        attention=config.attention,
    )
    return denoiser, None


__all__ = [
    "Interrupted",
    "NonFiniteError",
    "RunError",
    "config_from_dict",
    "config_to_dict",
    "load_denoiser",
    "run",
]
