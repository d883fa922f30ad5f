"""Artifacts of a run: pictures, videos, depth maps, meshes and the metrics plot.

Host-side numpy code (jax arrays are accepted and copied to the host). Every writer is atomic:
it writes ``.<name>.<random>.tmp<suffix>`` in the destination directory, fsyncs it and
`os.replace`-s it onto ``path``, so a reader (or a killed run) never sees a half-written file.
Parent directories are created.

Conventions of this module:

* Images are ``[H, W, C]`` floats in [0, 1] (or uint8), videos ``[T, H, W, C]``.
* Voxel grids are ``[X, Y, Z(, C)]`` with world x on the first axis; voxel ``i`` is centred at
  ``lo + (i + 0.5) * size`` with ``size = (hi - lo) / resolution`` (as in `sjc_jax.grid`).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import imageio.v2 as imageio_v2
import imageio.v3 as imageio
import numpy as np
import trimesh

from sjc_jax.files import atomic_path

# Videos: frames smaller than this (in pixels, shorter side) are upscaled by nearest neighbour,
# and both sides are padded to a multiple of the H.264 macro block, so players cope. 384 px: a
# 32 px testbed turntable is seen at a size one can judge (the report shows it at this size).
MIN_VIDEO_SIDE = 384
MACRO_BLOCK = 16
# Pictures (view.png, the previews): upscaled by nearest neighbour to at least this side.
MIN_PICTURE_SIDE = 256

# Polynomial fit of matplotlib's viridis (Matt Zucker, shadertoy WlfXRN): degree 6 per channel,
# coefficients from the constant term up. Perceptually uniform with monotone lightness.
_VIRIDIS = np.array(
    [
        [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
        [0.1050930431085774, 1.404613529898575, 1.384590162594685],
        [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
        [-4.634230498983486, -5.799100973351585, -19.33244095627987],
        [6.228269936347081, 14.17993336680509, 56.69055260068105],
        [4.776384997670288, -13.74514537774601, -65.35303263337234],
        [-5.435455855934631, 4.645852612178535, 26.3124352495832],
    ]
)


def to_uint8(images) -> np.ndarray:
    """Quantise float images in [0, 1] (any shape) to uint8: clip, scale by 255, round.

    NaN becomes 0. uint8 input is returned unchanged.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {images.dtype}")
    images = np.nan_to_num(images.astype(np.float32), nan=0.0)
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def upscale_nearest(image, min_side: int = MIN_PICTURE_SIDE) -> np.ndarray:
    """``image [H, W, ...]`` repeated by the smallest integer factor that makes ``min(H, W) >=
    min_side`` (nearest neighbour: each pixel stays a sharp square); unchanged if large enough."""
    image = np.asarray(image)
    scale = max(1, math.ceil(min_side / max(1, min(image.shape[:2]))))
    if scale == 1:
        return image
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def save_png(path: str | os.PathLike, image) -> Path:
    """Write an image ``[H, W, 3]``, ``[H, W, 4]``, ``[H, W, 1]`` or ``[H, W]`` as a PNG.

    Args:
      path: destination file.
      image: float in [0, 1] or uint8.

    Returns:
      ``path`` as a `Path`.
    """
    image = to_uint8(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise ValueError(f"image must be [H, W], [H, W, 1|3|4], got shape {image.shape}")
    with atomic_path(path) as tmp:
        imageio.imwrite(tmp, image, extension=".png")
    return Path(path)


def viridis(t) -> np.ndarray:
    """The viridis colour map: ``t [...]`` in [0, 1] (clipped) to RGB ``[..., 3]`` in [0, 1]."""
    t = np.clip(np.asarray(t, np.float64), 0.0, 1.0)[..., None]
    rgb = np.zeros(t.shape[:-1] + (3,))
    for coefficients in _VIRIDIS[::-1]:
        rgb = rgb * t + coefficients
    return np.clip(rgb, 0.0, 1.0)


def colorize_depth(depth, *, near: float | None = None, far: float | None = None) -> np.ndarray:
    """Colour a depth map ``[H, W]`` or a sequence ``[T, H, W]`` as RGB ``[..., 3]`` float32.

    Depth is mapped in inverse depth (disparity), ``s = (1/d - 1/far) / (1/near - 1/far)``,
    through viridis: near is bright yellow, far dark blue-violet. Inverse depth spends the colour
    range on the object rather than on the empty space between it and the background (SJC
    renders background depth 10, about 4x the object's depth), which therefore shows as the far
    colour. One normalisation is used for all frames, so colours are comparable over a video.

    Args:
      depth: distances along the ray, ``[H, W]`` or ``[T, H, W]``; non-finite values show as far.
      near: depth shown as the near colour; default the smallest finite depth (floored at
        ``far / 1000`` to keep the disparity finite).
      far: depth shown as the far colour; default the largest finite depth.

    Returns:
      float32 RGB in [0, 1], shape ``depth.shape + (3,)``; all far colour if ``far <= near``.
    """
    depth = np.asarray(depth, np.float64)
    if depth.ndim not in (2, 3):
        raise ValueError(f"depth must be [H, W] or [T, H, W], got shape {depth.shape}")
    finite = np.isfinite(depth)
    if far is None:
        far = float(depth[finite].max()) if finite.any() else 1.0
    if near is None:
        near = float(depth[finite].min()) if finite.any() else far
    if not (np.isfinite(near) and np.isfinite(far) and far > 0):
        raise ValueError(f"near and far must be finite with far > 0, got near={near}, far={far}")
    if far <= near:
        return viridis(np.zeros(depth.shape)).astype(np.float32)
    near = max(near, far * 1e-3)
    clipped = np.clip(np.where(finite, depth, far), near, far)
    s = (1.0 / clipped - 1.0 / far) / (1.0 / near - 1.0 / far)
    return viridis(s).astype(np.float32)


def _video_frames(frames) -> np.ndarray:
    """uint8 ``[T, H', W', 3]``: upscaled to `MIN_VIDEO_SIDE` and padded to `MACRO_BLOCK`."""
    frames = to_uint8(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] < 1:
        raise ValueError(
            f"frames must be [T, H, W, 3], [T, H, W, 1] or [T, H, W] with T >= 1, "
            f"got shape {frames.shape}"
        )
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = np.stack([upscale_nearest(frame, MIN_VIDEO_SIDE) for frame in frames])
    pad_h = -frames.shape[1] % MACRO_BLOCK
    pad_w = -frames.shape[2] % MACRO_BLOCK
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def save_video(path: str | os.PathLike, frames, *, fps: float = 20) -> Path:
    """Write frames ``[T, H, W, 3]`` (float in [0, 1] or uint8) as an H.264 mp4.

    libx264, yuv420p, CRF 18, faststart: plays in browsers and common players. Frames whose
    shorter side is below `MIN_VIDEO_SIDE` are upscaled by an integer factor (nearest
    neighbour, so 8x8 and 64x64 renders stay crisp), then the bottom/right edges are replicated
    to a multiple of 16 pixels.

    Args:
      path: destination ``.mp4`` file.
      frames: ``[T, H, W, 3]`` (or ``[T, H, W, 1]`` / ``[T, H, W]`` grey), T >= 1.
      fps: frames per second.

    Returns:
      ``path`` as a `Path`.
    """
    if not (isinstance(fps, (int, float)) and fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    frames = _video_frames(frames)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # ffmpeg is spawned with fork+exec; JAX's at-fork warning does not apply to it.
        warnings.filterwarnings(
            "ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning
        )
        writer = imageio_v2.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,
            quality=None,
            output_params=["-crf", "18", "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
    return Path(path)


def save_mesh(path: str | os.PathLike, mesh: trimesh.Trimesh) -> Path:
    """Write ``mesh`` as binary PLY (``.ply``) or glTF binary (``.glb``), by suffix, atomically.

    Vertex colours are kept in both formats. An empty mesh writes a valid empty file.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".ply":
        data = mesh.export(file_type="ply", encoding="binary")
    elif suffix == ".glb":
        data = mesh.export(file_type="glb")
    else:
        raise ValueError(f"path must end in .ply or .glb, got {str(path)!r}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


# The files `save_mesh_files` writes into a run's final directory.
MESH_FILES = ("mesh.ply", "mesh.glb", "mesh.obj", "mesh.mtl", "mesh_texture.png")


def save_textured_obj(
    path: str | os.PathLike, mesh: trimesh.Trimesh, *, resolution: int = 1024
) -> list[Path]:
    """Write ``mesh`` as a Wavefront OBJ with a baked texture: ``NAME.obj``, ``NAME.mtl`` and
    ``NAME_texture.png`` beside it (``path`` is the ``.obj``); returns the three paths.

    The UV atlas is xatlas' (`sjc_jax.texture.uv_atlas`, about ``resolution`` texels a side);
    the texture interpolates the vertex colours over each triangle. Vertices are split along
    chart seams, so the OBJ has more vertices than ``mesh`` (same positions, same faces). An
    empty mesh writes an OBJ without faces and a 1 x 1 texture.
    """
    from sjc_jax import texture

    path = Path(path)
    if path.suffix.lower() != ".obj":
        raise ValueError(f"path must end in .obj, got {str(path)!r}")
    mtl, png = path.with_suffix(".mtl"), path.with_name(f"{path.stem}_texture.png")
    if len(mesh.faces):
        rgb = np.asarray(mesh.visual.vertex_colors)[:, :3] / 255.0
        vmapping, faces, uv, size = texture.uv_atlas(
            mesh.vertices, mesh.faces, resolution=resolution
        )
        image = texture.bake_vertex_colors(uv, faces, rgb[vmapping], size)
        vertices = np.asarray(mesh.vertices)[vmapping]
    else:
        vertices, uv, faces = np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((0, 3), np.int64)
        image = np.full((1, 1, 3), 0.5)
    lines = [
        f"# sjc-jax mesh: {len(vertices)} vertices, {len(faces)} faces",
        f"mtllib {mtl.name}",
        "o mesh",
        *(f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices),
        *(f"vt {u:.6f} {v:.6f}" for u, v in uv),
        "usemtl material_0",
        *(f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in faces + 1),
    ]
    material = ["newmtl material_0", "Ka 1 1 1", "Kd 1 1 1", "Ks 0 0 0", "d 1", "illum 1",
                f"map_Kd {png.name}"]  # fmt: skip
    save_png(png, image)
    for target, text in ((mtl, material), (path, lines)):
        with atomic_path(target) as tmp:
            tmp.write_text("\n".join(text) + "\n")
    return [path, mtl, png]


def save_mesh_files(final_dir: str | os.PathLike, mesh: trimesh.Trimesh) -> dict[str, Path]:
    """Write `MESH_FILES` into ``final_dir``: ``mesh.ply`` and ``mesh.glb`` (vertex colours),
    ``mesh.obj`` + ``mesh.mtl`` + ``mesh_texture.png`` (UV atlas, baked texture).

    Returns ``{file name: path}``.
    """
    final = Path(final_dir)
    paths = [save_mesh(final / "mesh.ply", mesh), save_mesh(final / "mesh.glb", mesh)]
    paths += save_textured_obj(final / "mesh.obj", mesh)
    return {p.name: p for p in paths}


# Metrics that are not curves (the view label drawn, the finiteness flag).
NOT_CURVES = ("step", "label", "finite")


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the finite values among the last ``window`` at each point from ``window - 1``."""
    kernel = np.ones(window) / window
    valid = np.convolve(np.isfinite(values), kernel, mode="valid")
    return np.convolve(np.nan_to_num(values), kernel, mode="valid") / np.maximum(valid, 1e-9)


def metric_figure(panels: int, *, width: float = 4.0, height: float = 2.6, cols: int = 3):
    """An Agg figure for ``panels`` metric panels: ``(figure, rows, cols)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(cols, panels))
    rows = math.ceil(panels / cols)
    figure = Figure(figsize=(width * cols, height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, rows, cols


def style_metric_axes(axes, title: str) -> None:
    """A metric panel's title, step axis, small ticks and grid."""
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("step", fontsize=8)
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3)


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def metrics_png(
    records: Sequence[Mapping[str, float]], *, keys: Sequence[str] | None = None
) -> bytes:
    """The PNG of `save_metrics_plot` as bytes (see there)."""
    if not records:
        raise ValueError("records is empty: no metrics to plot")
    if keys is None:
        numeric = [
            k
            for k in dict.fromkeys(k for r in records for k in r)
            if k not in NOT_CURVES and isinstance(records[-1].get(k), (int, float))
        ]
        if not numeric:
            raise ValueError("records have no numeric metric besides step")
        varying = [k for k in numeric if len({r.get(k) for r in records}) > 1]
        keys = varying or numeric
    steps = np.array([r.get("step", i) for i, r in enumerate(records)], np.float64)
    figure, rows, cols = metric_figure(len(keys))
    window = max(1, len(records) // 50)
    for i, key in enumerate(keys):
        axes = figure.add_subplot(rows, cols, i + 1)
        values = np.array([float(r.get(key, np.nan)) for r in records])
        axes.plot(steps, values, color="tab:blue", alpha=0.3 if window > 1 else 1.0, lw=0.8)
        if window > 1:
            axes.plot(steps[window - 1 :], running_mean(values, window), color="tab:blue", lw=1.5)
        style_metric_axes(axes, key)
    return figure_png(figure)


def save_metrics_plot(
    path: str | os.PathLike,
    records: Sequence[Mapping[str, float]],
    *,
    keys: Sequence[str] | None = None,
) -> Path:
    """Plot the curves of ``metrics.jsonl`` records (one dict per step, with ``step``) as a PNG.

    One panel per metric (``keys``, default every numeric one but ``step``, ``label`` and
    ``finite`` that is not constant over the run, in the records' order): the raw values faint,
    a running mean over about 2 % of the run on top (sigma is random per step in SJC: the mean
    shows its schedule).
    """
    data = metrics_png(records, keys=keys)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
