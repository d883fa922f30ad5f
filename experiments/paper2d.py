"""The SJC paper's 2D experiments, with the learned model and with the exact denoiser.

The original authors never released these (their README lists them as a TODO). Both models
see the same conditions (a scene and a view label) and the same images (32 x 32 RGB):

* ``learned``: the learned known-answer model (``--model``, `sjc_jax.learned`);
* ``exact``: the exact posterior-mean denoiser of the model's own training renders
  (`sjc_jax.testbed.empirical`), with the same view labels.

(a) Out of distribution (the paper's Sec. 3.3 demo): a flat image of the training background
    with one coloured blob (the scene's mean object colour), far from every training image.
    Denoised directly (``D(x, sigma)`` at small sigma, what naive scoring relies on) vs by PAAS
    ascent (``x <- x + lr mean_n (D(x + sigma n, sigma) - x)``, 4 noise draws, sigma annealed
    from t = 300 to t = 20 over 100 steps, lr 0.5).
(b) Generation from noise by PAAS ascent (the paper's Fig. 4): from ``x_0 = 0.5 + 0.3 n``,
    200 ascent steps with one fixed sigma (t = 100) vs sigma annealed (t = 500 -> 10), against
    the model's own sampler (ancestral DDIM, eta 1, 50 steps, each step's D clipped to [0, 1]).

Numbers: the distance (RMSE) of each result to its nearest training image of the condition,
and the diversity of 8 results per condition (mean pairwise RMSE); figures are PNGs (rows:
condition, columns: samples). Writes ``OUT/paper2d.md``, ``OUT/paper2d.json`` and the figures.

    PYTHONPATH=. .venv/bin/python experiments/paper2d.py --out runs/paper2d
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sjc_jax import learned  # noqa: E402
from sjc_jax.learned import model as learned_model  # noqa: E402
from sjc_jax.learned.sampling import ddim_sample, guided_denoise  # noqa: E402

GUIDANCE = 3.0


def paas_ascent(denoiser, key, x, labels, timesteps, *, lr=0.5, noise_samples=4):
    """``x <- x + lr mean_n (D_cfg(x + sigma_k n, sigma_k) - x)`` for each level in turn."""
    sigmas = jnp.asarray(denoiser.sigmas[np.asarray(timesteps)])
    b = x.shape[0]

    @jax.jit
    def run(params, x, key):
        import dataclasses

        den = dataclasses.replace(denoiser, params=params)

        def body(x, inputs):
            sigma, k = inputs
            noise = jax.random.normal(k, (noise_samples,) + x.shape)
            z = (x[None] + sigma * noise).reshape((-1,) + x.shape[1:])
            d = guided_denoise(
                den,
                z,
                jnp.full((noise_samples * b,), sigma),
                jnp.tile(labels, noise_samples),
                GUIDANCE,
            )
            d = d.reshape((noise_samples,) + x.shape).mean(axis=0)
            return x + lr * (d - x), None

        keys = jax.random.split(key, len(timesteps))
        x, _ = jax.lax.scan(body, x, (sigmas, keys))
        return x

    return run(denoiser.params, x, key)


def nearest_rmse(images: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """RMSE of each image to its nearest image of ``bank``."""
    a = images.reshape(images.shape[0], -1).astype(np.float64)
    b = bank.reshape(bank.shape[0], -1).astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0) / a.shape[1])


def diversity(images: np.ndarray) -> float:
    """Mean pairwise RMSE of a set of images."""
    a = images.reshape(images.shape[0], -1).astype(np.float64)
    d = np.sqrt(np.maximum(((a[:, None] - a[None]) ** 2).mean(-1), 0.0))
    n = a.shape[0]
    return float(d.sum() / (n * (n - 1)))


def save_strip(rows: list[np.ndarray], path: str, scale: int = 3) -> None:
    import imageio

    picture = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    picture = np.kron(np.clip(picture, 0, 1), np.ones((scale, scale, 1)))
    imageio.imwrite(path, (picture * 255 + 0.5).astype(np.uint8))


def main(argv=None) -> None:
    from sjc_jax.learned.train import TrainConfig, render_training_set
    from sjc_jax.testbed.empirical import make_empirical_denoiser

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="learned")
    parser.add_argument("--scenes", nargs="+", default=["duck", "mug"])
    parser.add_argument("--views", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    model = learned_model.load_model(learned.resolve(args.model))
    train_config = TrainConfig.from_dict(model.meta["training"]["config"])
    images, scene_ids, views = render_training_set(train_config)
    background = np.asarray(model.background, np.float32)
    rows, figures = [], {"ood": [], "fixed": [], "annealed": [], "ddim": []}
    n = args.samples
    for scene in args.scenes:
        index = list(train_config.scenes).index(scene)
        mine = scene_ids == index
        denoisers = {
            "learned": learned_model.make_denoiser(model, scene),
            "exact": make_empirical_denoiser(images[mine], views[mine], sigmas=model.sigmas),
        }
        # The object's mean colour: pixels that differ from the background.
        obj = images[mine].reshape(-1, 3)
        obj = obj[np.abs(obj - background).sum(-1) > 0.3]
        colour = obj.mean(axis=0)
        for view in args.views:
            bank = images[mine & (views == view)]
            labels = jnp.full((n,), view, jnp.int32)
            yy, xx = np.mgrid[:32, :32]
            blob = ((yy - 16) ** 2 + (xx - 16) ** 2 < 8**2)[..., None]
            flat = np.where(blob, colour, background).astype(np.float32)
            flat = jnp.asarray(np.broadcast_to(flat, (n, 32, 32, 3)).copy())
            noise0 = jax.random.normal(jax.random.key(view), (n, 32, 32, 3))
            for name, den in denoisers.items():
                key = jax.random.key(1000 * index + view)
                results = {}
                small = jnp.full((n,), float(den.sigmas[20]))
                results["OOD: D(x, sigma_20)"] = guided_denoise(den, flat, small, labels, GUIDANCE)
                results["OOD: PAAS ascent"] = paas_ascent(
                    den, key, flat, labels, np.linspace(300, 20, 100).round().astype(int)
                )
                x0 = jnp.clip(0.5 + 0.3 * noise0, -1, 2)
                results["noise: PAAS, fixed t = 100"] = paas_ascent(
                    den, key, x0, labels, np.full(200, 100)
                )
                results["noise: PAAS, annealed t = 500 -> 10"] = paas_ascent(
                    den, key, x0, labels, np.linspace(500, 10, 200).round().astype(int)
                )
                results["DDIM, 50 steps"] = ddim_sample(
                    den, key, labels, steps=50, guidance=GUIDANCE, clip=(0.0, 1.0), eta=1.0
                )
                for what, out in results.items():
                    out = np.clip(np.asarray(out), 0, 1)
                    row = {
                        "scene": scene,
                        "view": view,
                        "denoiser": name,
                        "result": what,
                        "nearest RMSE": float(np.mean(nearest_rmse(out, bank))),
                        "diversity": diversity(out),
                    }
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                figures["ood"].append(
                    np.concatenate(
                        [
                            np.asarray(flat[:1]),
                            np.clip(np.asarray(results["OOD: D(x, sigma_20)"][:1]), 0, 1),
                            np.clip(np.asarray(results["OOD: PAAS ascent"][:4]), 0, 1),
                        ]
                    )
                )
                figures["fixed"].append(
                    np.clip(np.asarray(results["noise: PAAS, fixed t = 100"]), 0, 1)
                )
                figures["annealed"].append(
                    np.clip(np.asarray(results["noise: PAAS, annealed t = 500 -> 10"]), 0, 1)
                )
                figures["ddim"].append(np.clip(np.asarray(results["DDIM, 50 steps"]), 0, 1))
    for name, strip in figures.items():
        save_strip(strip, os.path.join(args.out, f"paper2d_{name}.png"))
    lines = [
        "| result | denoiser | nearest training image (RMSE) | diversity (pairwise RMSE) |",
        "| --- | --- | --- | --- |",
    ]
    for what in dict.fromkeys(r["result"] for r in rows):
        for name in ("learned", "exact"):
            mine = [r for r in rows if r["result"] == what and r["denoiser"] == name]
            lines.append(
                f"| {what} | {name} | {np.mean([r['nearest RMSE'] for r in mine]):.3f} | "
                f"{np.mean([r['diversity'] for r in mine]):.3f} |"
            )
    header = (
        f"<!-- experiments/paper2d.py --scenes {' '.join(args.scenes)} --views "
        f"{' '.join(map(str, args.views))} --samples {n}; "
        f"{time.perf_counter() - start:.0f} s -->\n"
    )
    text = header + "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "paper2d.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "paper2d.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
