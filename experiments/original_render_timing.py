"""Render + backward of one SJC view: the original's PyTorch algorithm vs ours, on this machine.

    PYTHONPATH=. .venv/bin/python experiments/original_render_timing.py [--threads 2] [--repeats 10]

The issue's figure for the original renderer (535 ms, 2 threads) was measured on another machine;
CPU timings only compare within one machine and one session, so this script times both here, in
one process, one after the other. The torch side is our transcription of the original release's
algorithm as `docs/original.md` section 1 describes it, with the same kinds of torch kernels:
`grid_sample` (trilinear, zero padding, ``align_corners=False``) for density and for appearance,
boolean-mask selects of the valid samples, a ``cumprod`` transmittance, the 1e-4 weight mask, a
4 x 4 background texture, all H x W rays in one bundle, ``[k, n]`` working layout with k the
view's own sample count. Density starts at 0 and appearance at N(0, 1), as the original's
`V_SD`; the view is `sjc_jax.bench`'s (100^3 x 4 channels, 64 x 64, fov 60, radius 1.5). The
backward pass gets ones for the features, depth and weights, as the bench's VJP. The script
checks that both renders agree (features and the density gradient) before it times anything.

Needs torch (``requirements-dev.txt`` installs the CPU build).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def torch_render(torch, density, color, bg, d_scale, ro, rd, t_min, t_max, delta):
    """The original algorithm on one bundle of rays (torch tensors); returns rgb, depth, weights."""
    functional = torch.nn.functional
    chord = t_max - t_min
    k = int((chord.max() / delta).item()) + 1
    ticks = (delta * torch.arange(k, dtype=torch.float32)).view(k, 1, 1)
    dists = t_min.view(-1, 1) + ticks  # [k, n, 1]
    pts = ro + rd * dists  # [k, n, 3]
    mask = (ticks < chord.view(-1, 1)).squeeze(-1)  # [k, n]

    def lookup(volume, points):
        n = points.shape[0]  # the box is [-1, 1]^3: world points are grid_sample coordinates
        return functional.grid_sample(volume, points.view(1, n, 1, 1, 3), align_corners=False).view(
            volume.shape[1], n
        )

    sigma = torch.zeros(mask.shape)
    raw = lookup(density, pts[mask])[0] * torch.exp(d_scale)
    sigma[mask] = functional.softplus(raw - 1.0)
    alpha = 1 - torch.exp(-sigma * delta)
    transmittance = torch.ones_like(alpha)
    transmittance[1:] = (1 - alpha).cumprod(dim=0)[:-1]
    weights = alpha * transmittance
    keep = weights > 1e-4
    colors = torch.zeros(*mask.shape, color.shape[1])
    colors[keep] = lookup(color, pts[keep]).T
    weights = weights.view(*mask.shape, 1)
    bg_weight = 1.0 - weights.sum(dim=0)
    x, y, z = rd.t()
    u = torch.atan2((x**2 + y**2) ** 0.5, z) / torch.pi
    v = torch.atan2(y, x) / (torch.pi * 2) + 0.5
    uv = torch.stack([u, v], -1) * 2 - 1
    bg_feats = (
        functional.grid_sample(bg, uv.view(1, -1, 1, 2), align_corners=False)
        .view(bg.shape[1], -1)
        .T
    )
    rgb = (weights * colors).sum(dim=0) + bg_weight * bg_feats
    depth = (weights * dists).sum(dim=0) + bg_weight * 10.0
    return rgb, depth, weights.squeeze(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import torch

    from sjc_jax.bench import bench_render, bench_view
    from sjc_jax.camera import generate_rays
    from sjc_jax.render import intersect_rays, render_view, step_size

    torch.set_num_threads(args.threads)
    config, grid, camera = bench_view()
    origins, directions = generate_rays(camera)
    t_min, t_max = intersect_rays(origins, directions, config.aabb)
    delta = step_size(config, grid.density.shape)

    def param(array, *, zyx: bool):
        array = np.asarray(array, np.float32)
        if zyx:  # ours [X, Y, Z, C] -> torch [1, C, Z, Y, X]
            array = array.reshape(*array.shape[:3], -1).transpose(3, 2, 1, 0)[None]
        else:  # background [Hb, Wb, C] -> [1, C, Hb, Wb]
            array = array.transpose(2, 0, 1)[None]
        return torch.tensor(np.ascontiguousarray(array), requires_grad=True)

    density = param(grid.density, zyx=True)
    color = param(grid.features, zyx=True)
    bg = param(grid.background, zyx=False)
    d_scale = torch.tensor(float(grid.density_scale), requires_grad=True)
    rays = [torch.tensor(np.asarray(a, np.float32)) for a in (origins, directions, t_min, t_max)]

    def torch_step():
        for p in (density, color, bg, d_scale):
            p.grad = None
        rgb, depth, weights = torch_render(torch, density, color, bg, d_scale, *rays, delta)
        (rgb.sum() + depth.sum() + weights.sum()).backward()
        return rgb

    rgb = torch_step().detach().numpy()
    ours = render_view(grid, camera, config)

    def loss(grid):  # the torch side's: features, depth and weights summed
        view = render_view(grid, camera, config)
        return jnp.sum(view.image) + jnp.sum(view.depth) + jnp.sum(view.weights)

    grad_ours = jax.grad(loss)(grid)
    feature_error = float(np.max(np.abs(rgb - np.asarray(ours.image).reshape(-1, 4))))
    grad_torch = density.grad.numpy()[0, 0].transpose(2, 1, 0)
    grad_error = float(np.max(np.abs(grad_torch - np.asarray(grad_ours.density))))
    scale = float(np.max(np.abs(grad_torch)))
    if feature_error > 1e-4 or grad_error > 1e-4 * max(scale, 1.0):
        raise SystemExit(
            f"the two renderers disagree (features {feature_error:.2e}, density gradient "
            f"{grad_error:.2e} of {scale:.2e}): not timing"
        )

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        torch_step()
        times.append(time.perf_counter() - start)
    torch_ms = 1e3 * statistics.median(times)
    ours = bench_render(args.repeats)
    print(
        json.dumps(
            {
                "original_torch_render_backward_ms": torch_ms,
                "original_spread_ms": [1e3 * min(times), 1e3 * max(times)],
                "torch": torch.__version__,
                "threads": args.threads,
                "render_vjp_ms": ours["render_vjp_ms"],
                "speedup": torch_ms / ours["render_vjp_ms"],
                "max_feature_difference": feature_error,
                "max_density_gradient_difference": grad_error,
            }
        )
    )


if __name__ == "__main__":
    main()
