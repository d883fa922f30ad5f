"""UV atlases (xatlas) and textures baked from vertex colours, for textured mesh files.

Host-side numpy code. Conventions of this module:

* UVs are ``[N, 2]`` in [0, 1] with v up (OBJ / glTF-from-OBJ convention): texel ``(row, col)``
  of a ``[H, W, 3]`` texture is centred at ``u = (col + 0.5) / W``, ``v = 1 - (row + 0.5) / H``.
* An atlas splits vertices along chart seams: ``vmapping [N']`` gives the original vertex of
  each atlas vertex, and the atlas faces ``[F, 3]`` index atlas vertices (same face order).
"""

from __future__ import annotations

import numpy as np

# xatlas grows charts up to this many faces' area: large charts make its charting slow (a 34k
# face sphere takes 11 s unbounded, 0.8 s at 128 faces a chart; 68k faces 1.4 s).
FACES_PER_CHART = 128


def uv_atlas(
    vertices: np.ndarray, faces: np.ndarray, *, resolution: int = 1024, padding: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """A UV atlas of a triangle mesh by xatlas.

    Args:
      vertices: ``[N, 3]`` positions.
      faces: ``[F, 3]`` vertex indices, F >= 1.
      resolution: the texture size xatlas packs for (about ``resolution`` texels a side).
      padding: texels between charts.

    Returns:
      ``(vmapping [N'], atlas_faces [F, 3], uv [N', 2], (height, width))`` (module docstring).
    """
    import xatlas

    vertices = np.ascontiguousarray(vertices, np.float32)
    faces = np.ascontiguousarray(faces, np.uint32)
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"faces must be [F, 3] with F >= 1, got shape {faces.shape}")
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices, faces)
    charts = xatlas.ChartOptions()
    corners = vertices[faces]
    area = (
        0.5
        * np.linalg.norm(
            np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=-1
        ).sum()
    )
    charts.max_chart_area = float(area * FACES_PER_CHART / len(faces))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding = int(resolution), int(padding)
    atlas.generate(charts, pack)
    vmapping, atlas_faces, uv = atlas[0]
    return vmapping.astype(np.int64), atlas_faces.astype(np.int64), uv, (atlas.height, atlas.width)


def _rasterize(uv: np.ndarray, faces: np.ndarray, size: tuple[int, int]):
    """Texels whose centres lie in each UV triangle: ``(face [K], row [K], col [K], bary [K, 3])``.

    Vectorised over the faces' bounding boxes (charts of small triangles: a few texels each).
    """
    height, width = size
    pixel = np.stack([uv[:, 0] * width - 0.5, (1.0 - uv[:, 1]) * height - 0.5], axis=-1)
    tri = pixel[faces]  # [F, 3, 2] in texel-centre coordinates (x = col, y = row)
    lo = np.clip(np.floor(tri.min(axis=1)).astype(np.int64), 0, [width - 1, height - 1])
    hi = np.clip(np.ceil(tri.max(axis=1)).astype(np.int64), 0, [width - 1, height - 1])
    span = hi - lo + 1
    count = span[:, 0] * span[:, 1]
    face = np.repeat(np.arange(len(faces)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    col = lo[face, 0] + local % span[face, 0]
    row = lo[face, 1] + local // span[face, 0]
    a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
    p = np.stack([col, row], axis=-1).astype(np.float64)
    e1, e2, ep = b - a, c - a, p - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    safe = np.where(np.abs(det) > 1e-12, det, 1.0)
    w1 = (ep[:, 0] * e2[:, 1] - ep[:, 1] * e2[:, 0]) / safe
    w2 = (e1[:, 0] * ep[:, 1] - e1[:, 1] * ep[:, 0]) / safe
    bary = np.stack([1.0 - w1 - w2, w1, w2], axis=-1)
    inside = (np.abs(det) > 1e-12) & np.all(bary >= -1e-6, axis=-1)
    return face[inside], row[inside], col[inside], bary[inside]


def dilate(texture: np.ndarray, filled: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Grow the ``filled [H, W]`` texels of ``texture [H, W, C]`` by ``steps`` texels.

    Each step gives every empty texel next to filled ones the mean of its filled 4-neighbours,
    so bilinear filtering and mip-maps at chart borders read chart colours, not the background.
    """
    texture, filled = texture.copy(), filled.copy()
    for _ in range(steps):
        total = np.zeros_like(texture)
        count = np.zeros(filled.shape)
        for axis, shift in ((0, 1), (0, -1), (1, 1), (1, -1)):
            total += np.roll(texture * filled[..., None], shift, axis=axis)
            count += np.roll(filled, shift, axis=axis)
        grow = ~filled & (count > 0)
        texture[grow] = total[grow] / count[grow][:, None]
        filled |= grow
    return texture, filled


def bake_vertex_colors(
    uv: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray,
    size: tuple[int, int],
    *,
    background: float = 0.5,
    padding: int = 2,
) -> np.ndarray:
    """A ``[H, W, C]`` texture whose texels interpolate the vertex colours of each triangle.

    Args:
      uv: ``[N, 2]`` atlas UVs (module conventions).
      faces: ``[F, 3]`` indices into ``uv`` and ``colors``.
      colors: ``[N, C]`` vertex colours (any range; float result of the same range).
      size: ``(height, width)`` of the texture.
      background: the value of texels no chart reaches.
      padding: texels the charts are grown by (`dilate`).

    A triangle too thin to contain a texel centre still writes its centroid's texel.
    """
    uv, faces = np.asarray(uv, np.float64), np.asarray(faces, np.int64)
    colors = np.asarray(colors, np.float64)
    height, width = size
    texture = np.full((height, width, colors.shape[-1]), background, np.float64)
    filled = np.zeros((height, width), bool)
    centroid = uv[faces].mean(axis=1)
    c_col = np.clip((centroid[:, 0] * width).astype(np.int64), 0, width - 1)
    c_row = np.clip(((1.0 - centroid[:, 1]) * height).astype(np.int64), 0, height - 1)
    texture[c_row, c_col] = colors[faces].mean(axis=1)
    filled[c_row, c_col] = True
    face, row, col, bary = _rasterize(uv, faces, size)
    texture[row, col] = np.einsum("kj,kjc->kc", bary, colors[faces[face]])
    filled[row, col] = True
    return dilate(texture, filled, padding)[0]
