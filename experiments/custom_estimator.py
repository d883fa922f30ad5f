"""A new estimator in ten lines, run on the testbed through the library's own run loop.

SDS with a weighting of our own, ``w(sigma) = sqrt(1 - abar) = sigma / sqrt(1 + sigma^2)``
(between DreamFusion's ``1 - abar`` and SJC's ``1``), written against `sjc_jax.estimators`'
building blocks and passed as a value: no library edit. The run directory has the usual
artifacts (``final/eval.json`` with PSNR and IoU on held-out cameras).

    PYTHONPATH=. .venv/bin/python experiments/custom_estimator.py --out runs/custom [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sjc_jax import estimators, runner, testbed  # noqa: E402


def sds_sqrt_weight(key, denoiser, params, images, sigma, labels):
    """SDS with w = sqrt(1 - abar): the descended image-space gradient and one metric."""
    z, noise = estimators.perturb(key, images, sigma)  # z = y + sigma n, [1, B, H, W, C]
    d = estimators.guided(denoiser, params, z, sigma, labels, guidance_scale=1.0)
    eps_hat = estimators.noise_estimate(z, d, sigma)
    w = sigma / jnp.sqrt(1.0 + sigma**2)
    grad = estimators.per_image(w) * jnp.mean(eps_hat - noise, axis=0)
    return grad, {"weight": jnp.mean(w)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--scene", default=None, help="built-in scene or grid file (.npz)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    args = parser.parse_args(argv)
    overrides = {"scene": args.scene} | ({} if args.steps is None else {"steps": args.steps})
    config = testbed.testbed_config(**overrides)
    summary = runner.run(config, args.out, estimator=sds_sqrt_weight)
    print(json.dumps({k: summary["eval"][k] for k in ("psnr", "iou")}))


if __name__ == "__main__":
    main()
