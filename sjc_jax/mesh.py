"""The mesh of a lift: the iso-level chosen from the lift itself, and small pieces removed.

A lift's density has no natural surface level: SJC's grids reach opacity through a few voxels
of moderate density rather than a step, so a fixed level (``ln 2 / delta``, the density at which
one render step is half opaque) cuts the object into pieces or misses it altogether (a learned
lift's peak density can be below it). The rule here takes the level whose silhouettes match the
lift's own rendered silhouettes:

* The volume's silhouette along a grid axis is where its opacity, ``1 - exp(-sum(sigma) * s)``
  over the voxels of a column (``s`` the voxel edge along the axis, a Riemann sum of the optical
  depth), exceeds one half: what a render shows as the object.
* The iso-surface at level ``L`` covers the columns whose largest density exceeds ``L``.
* The level is the one of `LEVELS` candidates (geometric between a thousandth of the peak density
  and the peak) whose silhouettes along the three axes have the highest IoU with the volume's;
  among levels within `IOU_TOLERANCE` of the best, the highest (the thinnest surface that still
  covers what the renders show).
* A hazy lift (the learned model's) can match its silhouettes best at a level where the object
  falls apart; the level is then lowered, through the candidates, to the highest one at which
  the largest 6-connected component of the voxels above it holds `MIN_LARGEST_SHARE` of them
  (the silhouette IoU reported is that level's).

Inside, a lift is often hollow: once its shell is opaque nothing trains the voxels behind it, so
an iso-surface also wraps the inner side of the shell and the random density inside (half of the
testbed duck's mesh area lay inside the true duck). Voxels that are hidden from all six axis
directions, behind an optical depth of more than ``ln 2`` (opacity one half) on both sides along
every axis, are therefore filled (`hidden_voxels`) before marching cubes: no render along an axis
sees them, and the object is taken to be solid there.

Then connected pieces (sharing a vertex) with fewer than `MIN_PIECE_FRACTION` of the largest
piece's faces are removed: floaters the renders do not show as part of the object.

Conventions: density grids ``[X, Y, Z]`` with world x on the first axis, voxel ``i`` centred at
``lo + (i + 0.5) * size`` (as `sjc_jax.grid`); densities are activated (`grid.activate_density`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import trimesh
from skimage import measure

from sjc_jax.grid import DEFAULT_AABB, activate_density

LEVELS = 96  # candidate levels of `choose_level`
IOU_TOLERANCE = 0.002  # levels this close to the best silhouette IoU count as equally good
MIN_PIECE_FRACTION = 0.05  # pieces smaller than this fraction of the largest are removed
MIN_LARGEST_SHARE = 0.9  # `choose_level` lowers the level until one component holds this share
# The rule's name, as eval.json and mesh.json report it.
RULE = "silhouette"


def default_density_threshold(aabb, resolution, *, step_ratio: float = 0.5) -> float:
    """The surface level ``ln 2 / delta`` of activated density used by `extract_mesh`.

    ``delta = step_ratio * mean(voxel size)`` is the renderer's sample spacing (half a voxel by
    default, 0.01 for SJC's 100^3 grid in [-1, 1]^3, giving 69.3). At this density one sample
    has opacity ``1 - exp(-sigma * delta) = 0.5``: the surface is where a single step along a
    ray becomes half opaque, which is what the rendered silhouettes show.
    """
    aabb = np.asarray(aabb, np.float64)
    size = (aabb[1] - aabb[0]) / np.asarray(resolution, np.float64)
    return math.log(2.0) / (step_ratio * float(size.mean()))


def _empty_mesh() -> trimesh.Trimesh:
    return trimesh.Trimesh(
        vertices=np.zeros((0, 3)), faces=np.zeros((0, 3), np.int64), process=False
    )


def _vertex_colors(points: np.ndarray, colors: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Opacity-weighted trilinear lookup of ``colors [X, Y, Z, 3]`` at index points ``[N, 3]``.

    Corners are clamped into the grid. Each corner weighs ``trilinear * alpha`` (its opacity),
    so the empty voxels just outside the surface, whose appearance was never trained (random in
    SJC), do not bleed into the surface colour; where all corners are empty it falls back to
    plain trilinear weights.
    """
    resolution = np.asarray(colors.shape[:3])
    points = np.clip(points, 0.0, resolution - 1.0)
    base = np.minimum(np.floor(points).astype(np.int64), np.maximum(resolution - 2, 0))
    frac = points - base
    total = np.zeros((len(points), 3))
    plain = np.zeros((len(points), 3))
    weight_sum = np.zeros(len(points))
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = np.minimum(base + offset, resolution - 1)
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=-1)
        value = colors[idx[:, 0], idx[:, 1], idx[:, 2]]
        opacity = weight * alpha[idx[:, 0], idx[:, 1], idx[:, 2]]
        total += opacity[:, None] * value
        weight_sum += opacity
        plain += weight[:, None] * value
    covered = weight_sum > 1e-12
    out = np.where(covered[:, None], total / np.where(covered, weight_sum, 1.0)[:, None], plain)
    return np.clip(out, 0.0, 1.0)


def extract_mesh(
    density,
    colors,
    *,
    aabb=DEFAULT_AABB,
    threshold: float | None = None,
    step_ratio: float = 0.5,
    color_density=None,
) -> trimesh.Trimesh:
    """Marching-cubes surface of an activated density grid, with vertex colours.

    The volume is padded by one empty voxel on every side so the surface closes where the
    object touches the box. Vertices are mapped from voxel-centre index space to world
    coordinates (voxel ``i`` centred at ``lo + (i + 0.5) * size``, x the first axis) and clipped
    to the box; faces wind counter-clockwise seen from outside (normals point to lower density).

    Args:
      density: ``[X, Y, Z]`` activated density sigma (``grid.activate_density``), finite.
      colors: ``[X, Y, Z, 3]`` appearance in [0, 1] (decoded, or `latent_to_rgb_approx`).
      aabb: ``((xlo, ylo, zlo), (xhi, yhi, zhi))`` box covered by the grid.
      threshold: iso-level of density; default `default_density_threshold` (opacity 0.5 per
        render step).
      step_ratio: the renderer's step in voxels, used for the default threshold and for the
        opacity weighting of vertex colours.
      color_density: ``[X, Y, Z]`` the density whose opacity weighs the vertex colours; default
        ``density`` (`sjc_jax.mesh` meshes a filled density but weighs by the lift's own).

    Returns:
      A `trimesh.Trimesh` with uint8 RGBA vertex colours. If no voxel, or every voxel, exceeds
      the threshold there is no surface: a warning is emitted and an empty mesh returned.
    """
    density = np.asarray(density, np.float64)
    colors = np.asarray(colors, np.float64)
    aabb = np.asarray(aabb, np.float64)
    if density.ndim != 3 or min(density.shape) < 1:
        raise ValueError(f"density must be [X, Y, Z], got shape {density.shape}")
    if colors.shape != density.shape + (3,):
        raise ValueError(
            f"colors must be [X, Y, Z, 3] matching density {density.shape}, got {colors.shape}"
        )
    if aabb.shape != (2, 3) or not np.all(aabb[1] > aabb[0]):
        raise ValueError(f"aabb must be ((lo x, y, z), (hi x, y, z)) with hi > lo, got {aabb}")
    if not np.all(np.isfinite(density)):
        raise ValueError("density must be finite")
    if not step_ratio > 0:
        raise ValueError(f"step_ratio must be positive, got {step_ratio}")
    if threshold is None:
        threshold = default_density_threshold(aabb, density.shape, step_ratio=step_ratio)
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be positive, got {threshold}")

    occupied = density > threshold
    if not occupied.any() or occupied.all():
        state = "no" if not occupied.any() else "every"
        warnings.warn(
            f"extract_mesh: {state} voxel has density above {threshold:.4g}; "
            "there is no surface, returning an empty mesh",
            stacklevel=2,
        )
        return _empty_mesh()

    padded = np.pad(density, 1, mode="constant", constant_values=0.0)
    vertices, faces, _, _ = measure.marching_cubes(padded, level=threshold)
    index = vertices.astype(np.float64) - 1.0  # back to the unpadded voxel-centre indices
    size = (aabb[1] - aabb[0]) / np.asarray(density.shape, np.float64)
    # The surface between a boundary voxel and the padding lies up to one voxel outside the box;
    # the renderer sees nothing outside the box, so the mesh is clipped to it.
    world = np.clip(aabb[0] + (index + 0.5) * size, aabb[0], aabb[1])
    delta = step_ratio * float(size.mean())
    weigh = density if color_density is None else np.asarray(color_density, np.float64)
    if weigh.shape != density.shape:
        raise ValueError(f"color_density must have shape {density.shape}, got {weigh.shape}")
    alpha = -np.expm1(-weigh * delta)
    rgb = _vertex_colors(index, colors, alpha)
    rgb8 = np.rint(rgb.astype(np.float32) * 255.0).astype(np.uint8)  # as export.to_uint8
    rgba = np.concatenate([rgb8, np.full((len(rgb), 1), 255, np.uint8)], axis=-1)
    return trimesh.Trimesh(
        vertices=world.astype(np.float32),
        faces=faces[:, ::-1].astype(np.int64),  # skimage winds them inwards for this sign
        vertex_colors=rgba,
        process=False,
    )


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    """How a mesh was made, and what it is (written to ``final/mesh.json``)."""

    level: float  # the density level of marching cubes
    rule: str  # "silhouette" (`choose_level`) or "given" (a --mesh-threshold)
    silhouette_iou: float | None  # IoU of the level's silhouettes with the volume's (the rule)
    pieces_before: int  # connected pieces at the level
    pieces: int  # pieces kept
    faces: int  # faces kept
    largest_fraction: float  # faces of the largest kept piece / faces kept (0 if empty)
    largest_fraction_before: float  # the same before the small pieces were removed
    removed_faces: int  # faces of the removed pieces
    filled_voxels: int  # voxels below the level filled as hidden interior (`hidden_voxels`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def silhouettes(density, voxel_size) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per grid axis: the column maxima ``[.., ..]`` and the volume's silhouette (bool).

    Args:
      density: ``[X, Y, Z]`` activated density.
      voxel_size: ``[3]`` voxel edge per axis (world units).
    """
    density = np.asarray(density, np.float64)
    peaks, masks = [], []
    for axis in range(3):
        optical = density.sum(axis=axis) * float(voxel_size[axis])
        masks.append(-np.expm1(-optical) > 0.5)
        peaks.append(density.max(axis=axis))
    return peaks, masks


def choose_level(density, voxel_size) -> tuple[float | None, float | None]:
    """The level whose silhouettes match the volume's (see the module docstring).

    Returns:
      ``(level, iou)``; ``(None, None)`` when the volume is nowhere half opaque (nothing to
      match: no object by the renders' own account).
    """
    density = np.asarray(density, np.float64)
    peaks, masks = silhouettes(density, voxel_size)
    if not any(m.any() for m in masks):
        return None, None
    top = float(density.max())
    levels = np.geomspace(top * 1e-3, top, LEVELS, endpoint=False)
    inter = np.zeros(LEVELS)
    union = np.zeros(LEVELS)
    for peak, mask in zip(peaks, masks, strict=True):
        covered = peak[None] > levels[:, None, None]  # [L, A, B]
        inter += np.sum(covered & mask[None], axis=(1, 2))
        union += np.sum(covered | mask[None], axis=(1, 2))
    iou = inter / np.maximum(union, 1)
    good = np.flatnonzero(iou >= iou.max() - IOU_TOLERANCE)
    best = int(good[-1])
    for lower in range(best, -1, -1):  # a hazy lift: down to the highest level that connects
        if largest_share(density > levels[lower]) >= MIN_LARGEST_SHARE:
            return float(levels[lower]), float(iou[lower])
    return float(levels[best]), float(iou[best])


def largest_share(occupied) -> float:
    """The largest 6-connected component's share of the ``True`` voxels (0 if none)."""
    from scipy import ndimage

    labels, count = ndimage.label(occupied)  # face neighbours, as the mesh connects them
    if count == 0:
        return 0.0
    sizes = np.bincount(labels.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def hidden_voxels(density, voxel_size) -> np.ndarray:
    """Voxels ``[X, Y, Z]`` (bool) behind an optical depth above ``ln 2`` from both sides along
    every grid axis (the voxel's own excluded): hidden from the six axis directions."""
    density = np.asarray(density, np.float64)
    hidden = np.ones(density.shape, bool)
    for axis in range(3):
        optical = density * float(voxel_size[axis])
        before = np.cumsum(optical, axis=axis) - optical
        after = np.flip(np.cumsum(np.flip(optical, axis), axis=axis), axis) - optical
        hidden &= (before > math.log(2.0)) & (after > math.log(2.0))
    return hidden


def pieces(mesh: trimesh.Trimesh) -> np.ndarray:
    """The connected piece of each face ``[F]`` (faces sharing a vertex are connected)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    faces = np.asarray(mesh.faces)
    n = len(mesh.vertices)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, vertex_piece = connected_components(graph, directed=False)
    return vertex_piece[faces[:, 0]]


def remove_small_pieces(
    mesh: trimesh.Trimesh, *, min_fraction: float = MIN_PIECE_FRACTION
) -> tuple[trimesh.Trimesh, dict]:
    """Drop the pieces with fewer than ``min_fraction`` of the largest piece's faces.

    Returns the mesh (unused vertices removed, vertex colours kept) and ``{pieces_before,
    pieces, removed_faces, largest_fraction, largest_fraction_before}``.
    """
    if len(mesh.faces) == 0:
        return mesh, dict(
            pieces_before=0,
            pieces=0,
            removed_faces=0,
            largest_fraction=0.0,
            largest_fraction_before=0.0,
        )
    label = pieces(mesh)
    _, piece_of_face, sizes = np.unique(label, return_inverse=True, return_counts=True)
    keep_piece = sizes >= min_fraction * sizes.max()
    keep = keep_piece[piece_of_face]
    faces = np.asarray(mesh.faces)[keep]
    used = np.unique(faces)
    remap = np.full(len(mesh.vertices), -1, np.int64)
    remap[used] = np.arange(len(used))
    colors = np.asarray(mesh.visual.vertex_colors)[used]
    kept = trimesh.Trimesh(
        vertices=np.asarray(mesh.vertices)[used],
        faces=remap[faces],
        vertex_colors=colors,
        process=False,
    )
    return kept, dict(
        pieces_before=int(len(sizes)),
        pieces=int(keep_piece.sum()),
        removed_faces=int((~keep).sum()),
        largest_fraction=float(sizes.max() / keep.sum()),
        largest_fraction_before=float(sizes.max() / len(label)),
    )


def object_mesh(
    density, colors, *, aabb, threshold: float | None = None, step_ratio: float = 0.5
) -> tuple[trimesh.Trimesh, MeshInfo]:
    """The mesh of a lift: marching cubes at `choose_level` (or ``threshold``) of the density
    with its hidden interior filled (`hidden_voxels`), small pieces removed.

    Args:
      density: ``[X, Y, Z]`` activated density.
      colors: ``[X, Y, Z, 3]`` appearance in [0, 1].
      aabb: the box ``[2, 3]`` the grid covers.
      threshold: a density level to use instead of the rule (``--mesh-threshold``).
      step_ratio: the renderer's step in voxels (vertex colours weigh by its opacity).

    Returns:
      ``(mesh, info)``; an empty mesh (with a warning) when there is no surface.
    """
    density = np.asarray(density, np.float64)
    aabb = np.asarray(aabb, np.float64)
    size = (aabb[1] - aabb[0]) / np.asarray(density.shape, np.float64)
    iou, nothing = None, False
    if threshold is None:
        level, iou = choose_level(density, size)
        rule = RULE
        if level is None:
            warnings.warn(
                "the lift is nowhere half opaque: no silhouette to mesh, writing an empty mesh",
                stacklevel=2,
            )
            level, nothing = float(density.max()) + 1.0, True
    else:
        level, rule = float(threshold), "given"
    fill = hidden_voxels(density, size) & (density <= level)
    solid = np.where(fill, max(float(density.max()), 2.0 * level), density)
    with warnings.catch_warnings():
        if nothing:  # said above; extract_mesh's own "no voxel above" would repeat it
            warnings.simplefilter("ignore")
        mesh = extract_mesh(
            solid, colors, aabb=aabb, threshold=level, step_ratio=step_ratio, color_density=density
        )
    mesh, counts = remove_small_pieces(mesh)
    info = MeshInfo(
        level=level,
        rule=rule,
        silhouette_iou=iou,
        faces=int(len(mesh.faces)),
        filled_voxels=int(fill.sum()),
        **counts,
    )
    return mesh, info


def grid_mesh(
    grid,
    *,
    feature_space: str,
    aabb,
    density_shift: float = -1.0,
    step_ratio: float = 0.5,
    threshold: float | None = None,
) -> tuple[trimesh.Trimesh, MeshInfo]:
    """`object_mesh` of a `VoxelGrid`: its activated density, its features as colours.

    Colours: the RGB features clipped to [0, 1] (``feature_space="rgb"``), their sigmoid
    (``"rgb-logit"``) or the linear SD-latent-to-RGB approximation (``"sd-latent"``).
    """
    density = np.asarray(activate_density(grid.density, grid.density_scale, density_shift))
    feats = np.asarray(grid.features)
    if feature_space == "rgb":
        colors = np.clip(feats, 0.0, 1.0)
    elif feature_space == "rgb-logit":
        colors = 1.0 / (1.0 + np.exp(-feats.astype(np.float64)))
    else:
        from sjc_jax.diffusion.stable_diffusion import latent_to_rgb_approx

        colors = np.asarray(latent_to_rgb_approx(feats))
    return object_mesh(density, colors, aabb=aabb, threshold=threshold, step_ratio=step_ratio)


def mesh_settings(config) -> dict:
    """The keyword arguments of `grid_mesh` that a run's `SJCConfig` sets."""
    return dict(
        aabb=config.render_config().aabb,
        density_shift=config.render.density_shift,
        step_ratio=config.render.step_ratio,
        threshold=config.run.mesh_threshold,
    )


__all__ = [
    "IOU_TOLERANCE",
    "LEVELS",
    "MIN_PIECE_FRACTION",
    "MeshInfo",
    "choose_level",
    "largest_share",
    "grid_mesh",
    "hidden_voxels",
    "mesh_settings",
    "object_mesh",
    "pieces",
    "remove_small_pieces",
    "silhouettes",
]
