"""The artifacts of a lift: previews, and ``final/`` (grid file, view, videos, mesh files).

`Artifacts` renders and writes each of them (compiled once per run, outside the step);
`Artifacts.parts` lists the writers of ``final/`` so that the run loop can stop between two of
them. ``final/`` is written into ``final.tmp-<ns>/`` and published by renames (`publish_final`):
a reader, or a resume, only ever sees a complete ``final/``; `clear_unpublished` removes what a
killed run left of an unpublished one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax import export, files
from sjc_jax.camera import Camera, make_camera, sjc_eye, turntable_path
from sjc_jax.config import SJCConfig
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.grid_io import grid_feature_space, save_grid_file
from sjc_jax.mesh import grid_mesh, mesh_settings
from sjc_jax.render import render_view, render_views
from sjc_jax.rundir import FINAL, MESH_INFO


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
        self.grid_feature_space = grid_feature_space(
            denoiser.feature_space, config.render.feature_activation
        )
        render_config = config.render_config()
        self._render = jax.jit(lambda grid, cam: render_view(grid, cam, render_config))

    def preview(self, grid, path: Path) -> np.ndarray:
        """Save the preview (decoded image | depth) as a PNG; returns it ``[H, 2W, 3]``.

        Upscaled by nearest neighbour to at least `export.MIN_PICTURE_SIDE` pixels high.
        """
        view = self._render(grid, preview_camera(self.size, self.config.camera.radius))
        rgb = _to_rgb(self.denoiser, np.asarray(view.image)[None])[0]
        depth = export.colorize_depth(np.asarray(view.depth), near=0.3, far=10.0)
        scale = rgb.shape[0] // depth.shape[0]  # the VAE decodes at 8x the latent size
        depth = np.repeat(np.repeat(depth, scale, 0), scale, 1)
        picture = export.upscale_nearest(np.concatenate([rgb, depth], axis=1))
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
        """``mesh.ply``, ``.glb``, ``.obj`` (+ texture) and ``mesh.json`` (how it was made)."""
        mesh, info = grid_mesh(
            grid,
            feature_space=self.grid_feature_space,
            **mesh_settings(self.config),
        )
        export.save_mesh_files(final, mesh)
        files.write_json(final / MESH_INFO, info.to_dict())

    def grid_file(self, grid, final: Path) -> None:
        save_grid_file(
            final / "grid.npz",
            grid,
            aabb=self.config.render_config().aabb,
            feature_space=self.grid_feature_space,
        )

    def parts(self, grid, final: Path) -> list[Callable[[], None]]:
        """The writers of ``final/``, in order: grid file, view, videos, mesh."""
        return [
            lambda: self.grid_file(grid, final),
            lambda: self.preview(grid, final / "view.png"),
            lambda: self.videos(grid, final),
            lambda: self.mesh(grid, final),
        ]

    def final(self, grid, final: Path) -> None:
        """``final/``: grid file, view, videos and mesh (written in place)."""
        final.mkdir(exist_ok=True)
        for part in self.parts(grid, final):
            part()


def publish_final(out: Path, tmp: Path) -> None:
    """Replace ``out/final`` by the complete ``tmp`` (renames; a kill leaves one or the other)."""
    final = out / FINAL
    old = None
    if final.exists():
        old = out / f"final.old-{time.time_ns()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_final(
    out: Path,
    grid,
    artifacts: Artifacts,
    *,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    before_part: Callable[[], None] = lambda: None,
) -> dict[str, Any] | None:
    """A run directory's whole ``final/``, published at once, then its ``index.html``.

    The artifacts' parts (grid file, view, videos, mesh), ``metrics.png`` of ``metrics.jsonl``
    and, with ``evaluate``, ``eval.json`` are written into ``final.tmp-*`` and renamed
    (`publish_final`); ``before_part()`` is called before each (raise in it to stop). Returns the
    evaluation (None without ``evaluate``).
    """
    from sjc_jax import report, rundir

    clear_unpublished(out)
    tmp = out / f"final.tmp-{time.time_ns()}"
    tmp.mkdir()
    evaluation: dict[str, Any] = {}

    def write_metrics_plot() -> None:
        export.save_metrics_plot(tmp / "metrics.png", rundir.read_metrics(out / rundir.METRICS))

    def write_eval() -> None:
        evaluation.update(evaluate(grid))
        files.write_json(tmp / "eval.json", evaluation)

    parts = artifacts.parts(grid, tmp) + [write_metrics_plot]
    parts += [write_eval] if evaluate is not None else []
    for part in parts:
        before_part()
        part()
    publish_final(out, tmp)
    report.write_run_index(out)  # derived from final/ (a kill before it loses only the page)
    return evaluation if evaluate is not None else None


def clear_unpublished(out: Path) -> None:
    for entry in out.iterdir():
        if entry.name.startswith(("final.tmp-", "final.old-")) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def read_eval(out: Path) -> dict | None:
    path = out / FINAL / "eval.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


__all__ = [
    "Artifacts",
    "clear_unpublished",
    "preview_camera",
    "publish_final",
    "read_eval",
    "write_final",
]
