"""How good a learned known-answer model is, against the ideal of its own training data.

For each model directory given:

* **Denoising error per noise level** on held-out true-scene renders (the 16 held-out cameras
  of every scene the model knows, ``--draws`` noise draws each): ``RMSE(D, y)`` of the model's
  conditional D (the camera's view label, no guidance) against the clean render y, beside
  ``RMSE(D*, y)`` of the exact posterior mean D* of the model's own training renders (the ideal
  a model trained on them can reach) and ``RMSE(D, D*)``; the target column says whether
  ``RMSE(D, y) <= RMSE(D*, y) + 0.02``.
* **Samples** from its own sampler (ancestral DDIM, 50 steps, guidance 3, D clipped to [0, 1];
  every scene x the 4 view labels x ``--per-view``): the 2 x 2 checkerboard energy
  (`sjc_jax.learned.sampling.checkerboard_energy`) of the samples against that of the training
  renders of the same labels, the RMSE of each sample to its nearest training render of the same
  scene, and a figure (rows: scenes; column groups: front, side, back, overhead).

    PYTHONPATH=. .venv/bin/python experiments/learned_quality.py --models learned \\
        --out runs/quality

writes ``OUT/quality.md``, ``OUT/quality.json`` and ``OUT/samples-NAME.png`` per model.
"""

from __future__ import annotations

import argparse
import functools
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
from sjc_jax.learned.sampling import checkerboard_energy, ddim_sample  # noqa: E402

TIMESTEPS = (10, 25, 50, 100, 200, 400, 600, 800)
DATA_FIELDS = ("scenes", "views_per_scene", "background", "seed")
MARGIN = 0.02  # the target: RMSE(D, y) <= RMSE(D*, y) + MARGIN


@functools.lru_cache(maxsize=2)
def training_set(config_json: str, cache: str | None = None):
    """``(images, scene ids, view labels)`` of a training config: D* of equal configs is the
    same, so the renders are kept (in memory, and in ``cache/HASH.npz`` if given)."""
    import hashlib

    from sjc_jax.learned.train import Architecture, TrainConfig, render_training_set

    path = None
    if cache:
        digest = hashlib.sha256(config_json.encode()).hexdigest()[:16]
        path = os.path.join(cache, f"training-renders-{digest}.npz")
        if os.path.exists(path):
            with np.load(path) as f:
                return f["images"], f["scene_ids"], f["views"]
    data = json.loads(config_json)
    size = data.pop("image_size")
    config = TrainConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()},
        architecture=Architecture(image_size=size),
    )
    images, scene_ids, views = render_training_set(config)
    if path:
        os.makedirs(cache, exist_ok=True)
        np.savez(path, images=images, scene_ids=scene_ids, views=views)
    return images, scene_ids, views


def heldout_renders(model, scene: str, image_size: int):
    """``(images [16, H, W, 3], labels [16])``: the true scene at the 16 held-out cameras."""
    from sjc_jax.testbed.scenes import heldout_cameras, render_views

    config = learned.learned_config(model=str(model.root), prompt=scene)
    cameras, labels = heldout_cameras(image_size=image_size, radius=config.camera.radius)
    truth, _ = learned.ground_truth_of(model, scene)
    images = render_views(truth, cameras, config.render_config())[0]
    return jnp.clip(images, 0.0, 1.0), jnp.asarray(labels, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _apply(den, params, z, sigma, labels):
    return den.apply(params, z, sigma, labels)


def rms(a, b) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(a) - jnp.asarray(b)))))


def evaluate_model(path: str, args) -> dict:
    from sjc_jax.testbed.empirical import make_empirical_denoiser

    model = learned_model.load_model(learned.resolve(path))
    # The renders depend on the data settings only, not on the UNet or the loss.
    data = {k: model.meta["training"]["config"][k] for k in DATA_FIELDS}
    data["image_size"] = model.architecture.image_size
    images, scene_ids, views = training_set(json.dumps(data, sort_keys=True), args.cache)
    size = model.architecture.image_size
    rows, sample_rows, strips = [], [], []
    for s, scene in enumerate(model.scenes):
        denoiser = learned_model.make_denoiser(model, scene)
        mine = scene_ids == s
        exact = make_empirical_denoiser(images[mine], views[mine], sigmas=denoiser.sigmas)
        y, labels = heldout_renders(model, scene, size)
        y = jnp.tile(y, (args.draws, 1, 1, 1))
        labels = jnp.tile(labels, args.draws)
        for t in TIMESTEPS:
            sigma = jnp.full((y.shape[0],), float(denoiser.sigmas[t]))
            z = y + sigma[:, None, None, None] * jax.random.normal(jax.random.key(t), y.shape)
            d = _apply(denoiser, denoiser.params, z, sigma, labels)
            d_star = _apply(exact, exact.params, z, sigma, labels)
            rows.append(
                {
                    "scene": scene,
                    "t": t,
                    "sigma": float(sigma[0]),
                    "D vs y": rms(d, y),
                    "D* vs y": rms(d_star, y),
                    "D vs D*": rms(d, d_star),
                }
            )
        sample_labels = jnp.repeat(jnp.arange(4), args.per_view)
        x = ddim_sample(
            denoiser,
            jax.random.key(args.seed),
            sample_labels,
            steps=50,
            guidance=3.0,
            clip=(0.0, 1.0),
            eta=1.0,
        )
        x = np.clip(np.asarray(x), 0.0, 1.0)
        train_mine = images[mine]
        nearest = np.sqrt(
            np.min(
                np.mean(np.square(x[:, None] - train_mine[None]), axis=(2, 3, 4)),
                axis=1,
            )
        )
        same_labels = np.concatenate([train_mine[views[mine] == v] for v in range(4)])
        sample_rows.append(
            {
                "scene": scene,
                "checkerboard samples": float(checkerboard_energy(x)),
                "checkerboard training renders": float(checkerboard_energy(same_labels)),
                "nearest training RMSE": float(np.mean(nearest)),
                "nearest training RMSE max": float(np.max(nearest)),
            }
        )
        strips.append(np.concatenate(list(x), axis=1))
        print(f"{path}: {scene} done", file=sys.stderr, flush=True)
    name = os.path.basename(os.path.normpath(str(model.root)))
    figure = os.path.join(args.out, f"samples-{name}.png")
    import imageio

    picture = np.kron(np.concatenate(strips), np.ones((3, 3, 1)))
    imageio.imwrite(figure, (picture * 255 + 0.5).astype(np.uint8))
    return {"model": path, "rows": rows, "samples": sample_rows, "figure": figure}


def table(result: dict) -> str:
    lines = [
        f"Model `{result['model']}`:",
        "",
        "| t | sigma | RMSE(D, y) | RMSE(D*, y) | RMSE(D, D*) | D <= D* + 0.02 |",
        "|" + " --- |" * 6,
    ]
    for t in TIMESTEPS:
        mine = [r for r in result["rows"] if r["t"] == t]
        mean = {k: np.mean([r[k] for r in mine]) for k in ("D vs y", "D* vs y", "D vs D*")}
        ok = mean["D vs y"] <= mean["D* vs y"] + MARGIN
        lines.append(
            f"| {t} | {mine[0]['sigma']:.3f} | {mean['D vs y']:.4f} | {mean['D* vs y']:.4f} | "
            f"{mean['D vs D*']:.4f} | {'yes' if ok else 'no'} |"
        )
    samples = result["samples"]
    cb = np.mean([r["checkerboard samples"] for r in samples])
    cb_train = np.mean([r["checkerboard training renders"] for r in samples])
    nearest = np.mean([r["nearest training RMSE"] for r in samples])
    lines += [
        "",
        f"Samples: checkerboard energy {cb:.2e} (training renders {cb_train:.2e}, ratio "
        f"{cb / cb_train:.2f}); RMSE to the nearest training render {nearest:.4f} (mean), "
        f"{max(r['nearest training RMSE max'] for r in samples):.4f} (max). "
        f"Figure: `{result['figure']}`.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["learned"], help="model directories")
    parser.add_argument("--out", required=True, help="directory for quality.md / .json")
    parser.add_argument("--draws", type=int, default=4, help="noise draws per held-out camera")
    parser.add_argument("--per-view", type=int, default=3, help="samples per scene and label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="directory to keep training renders in")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    results = [evaluate_model(path, args) for path in args.models]
    header = (
        f"<!-- experiments/learned_quality.py --models {' '.join(args.models)} --draws "
        f"{args.draws} --per-view {args.per_view}; {time.perf_counter() - start:.0f} s; jax "
        f"{jax.__version__}, {jax.devices()[0].platform} -->\n"
    )
    text = header + "\n\n".join(table(r) for r in results) + "\n"
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(text, flush=True)


if __name__ == "__main__":
    main()
