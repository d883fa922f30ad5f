"""A mesh against a true surface: symmetric Chamfer distance, normal consistency and F-score.

Both surfaces are sampled uniformly by area (`sample_surface`, a fixed seed, each point with its
face's unit normal); distances are Euclidean, to the nearest sample of the other surface
(scipy's k-d tree), in world units (the lift's box is ``[-1, 1]^3``, width 2):

* Chamfer: the mean of the two directed mean distances (predicted -> true, true -> predicted).
* Normal consistency: the mean over both directions of ``|n . n_nearest|`` (orientation-free).
* F-score at ``tau``: the harmonic mean of precision (share of predicted samples within ``tau``
  of the truth) and recall (share of true samples within ``tau`` of the prediction).
"""

from __future__ import annotations

import numpy as np
import trimesh

SAMPLES = 20000  # points sampled on each surface
F_SCORE_TAU = 0.04  # F-score distance: 2 % of the box width, about one voxel of the testbed's grid


def sample_surface(
    mesh: trimesh.Trimesh, count: int = SAMPLES, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` points ``[N, 3]`` uniform by area on ``mesh`` and their face normals ``[N, 3]``."""
    vertices = np.asarray(mesh.vertices, np.float64)
    faces = np.asarray(mesh.faces)
    if len(faces) == 0:
        raise ValueError("mesh has no faces to sample")
    corners = vertices[faces]  # [F, 3, 3]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    area = np.linalg.norm(cross, axis=-1)
    if not area.sum() > 0:
        raise ValueError("mesh has zero area")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = rng.random((2, count))
    swap = r1 + r2 > 1  # fold the unit square onto the triangle
    r1, r2 = np.where(swap, 1 - r1, r1), np.where(swap, 1 - r2, r2)
    a, b, c = corners[face, 0], corners[face, 1], corners[face, 2]
    points = a + r1[:, None] * (b - a) + r2[:, None] * (c - a)
    normals = cross[face] / np.maximum(area[face], 1e-300)[:, None]
    return points, normals


def compare_points(
    points, normals, true_points, true_normals, *, tau: float = F_SCORE_TAU
) -> dict[str, float]:
    """Chamfer, normal consistency and F-score of sampled surfaces (see the module docstring).

    Args:
      points, normals: ``[N, 3]`` the predicted surface's samples and unit normals.
      true_points, true_normals: ``[M, 3]`` the true surface's.
      tau: the F-score distance (world units).
    """
    from scipy.spatial import cKDTree

    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    to_true, nearest_true = cKDTree(true_points).query(points)
    to_pred, nearest_pred = cKDTree(points).query(true_points)
    cos_pred = np.abs(np.sum(normals * true_normals[nearest_true], axis=-1))
    cos_true = np.abs(np.sum(true_normals * normals[nearest_pred], axis=-1))
    precision = float(np.mean(to_true < tau))
    recall = float(np.mean(to_pred < tau))
    f_score = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "chamfer": float(0.5 * (to_true.mean() + to_pred.mean())),
        "normal_consistency": float(0.5 * (cos_pred.mean() + cos_true.mean())),
        "f_score": float(f_score),
        "precision": precision,
        "recall": recall,
        "f_score_tau": float(tau),
    }


def compare_meshes(
    mesh: trimesh.Trimesh, truth: trimesh.Trimesh, *, tau: float = F_SCORE_TAU, seed: int = 0
) -> dict[str, float] | None:
    """`compare_points` of `SAMPLES` points on each mesh; None if ``mesh`` is empty."""
    if len(mesh.faces) == 0:
        return None
    return compare_points(
        *sample_surface(mesh, seed=seed), *sample_surface(truth, seed=seed + 1), tau=tau
    )


__all__ = ["F_SCORE_TAU", "SAMPLES", "compare_meshes", "compare_points", "sample_surface"]
