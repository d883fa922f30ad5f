"""The paper's claims, measured with the learned known-answer model: markdown tables.

Every lift is the learned model's preset (`sjc_jax.learned.learned_config`: the testbed's
cameras, grid, renderer and optimiser, the plain background of the training renders, frozen)
with one change per row, through the same `sjc.make_step`. Each (row, scene, seed) lifts from a
fresh grid and is evaluated on the 16 held-out cameras against the scene's ground truth: PSNR,
silhouette IoU (opacity > 0.5) and the Janus score (`sjc_jax.testbed.core.janus_score`: 0 = the
back views look like the true back, 1 = like the true front seen through the back, 0.5 =
either). Tables give mean ± std over scenes x seeds.

Claims (``--claims``):

* ``paas``: PAAS (SJC Eq. 16) vs naive scoring (``estimator="naive"``: the render itself
  denoised, no perturbation), the out-of-distribution failure PAAS was made for;
* ``eq``: Eq. 16 vs Eq. 15, 1 / 2 / 4 noise samples; with the variance of g per pixel over 64
  noise draws at the renders of a half-optimised grid (one per scene);
* ``estimators``: SJC vs SDS (three weightings) vs NFSD vs CSD;
* ``views``: view-augmented prompts on / off (the Janus score is the point);
* ``sigma``: random vs annealed vs fixed sigma;
* ``guidance``: guidance scale 1 / 10 / 100;
* ``paas_sigma`` (no lifts): what PAAS estimates. For images y, the PAAS mean ``m = E_n[D(y +
  sigma n, sigma)] - y`` (256 draws) with the learned and with the exact denoiser, against the
  exact score directions ``D*(y, s) - y`` at ``s = sigma`` and ``s = sqrt(2) sigma`` (D* the
  exact posterior mean of the model's own training renders): cosine and the relative residual
  after the best scale. y: held-out renders of the true scene (on the data manifold) and renders
  of a half-optimised lift (off it).

    PYTHONPATH=. .venv/bin/python experiments/claims.py --claims paas views --out runs/claims

writes ``OUT/CLAIM.md`` and ``OUT/CLAIM.json`` per claim. Claims can run in separate processes
(one CPU core each at these sizes).
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

from sjc_jax import learned, sjc  # noqa: E402
from sjc_jax.learned import model as learned_model  # noqa: E402

CLAIMS: dict[str, dict[str, dict]] = {
    "paas": {
        "PAAS (SJC Eq. 16, preset)": {},
        "naive: D(render) - render": {"estimator": "naive"},
    },
    "eq": {
        "Eq. 16, 1 noise sample (preset)": {},
        "Eq. 15, 1 noise sample": {"var_red": False},
        "Eq. 16, 2 noise samples": {"noise_samples": 2},
        "Eq. 16, 4 noise samples": {"noise_samples": 4},
        "Eq. 15, 4 noise samples": {"var_red": False, "noise_samples": 4},
    },
    "estimators": {
        "sjc Eq. 16 (preset)": {},
        "sds, w = 1": {"estimator": "sds", "sds_weighting": "uniform"},
        "sds, w = 1 - abar": {"estimator": "sds", "sds_weighting": "sds"},
        "sds, w = sqrt(abar) (1 - abar)": {"estimator": "sds", "sds_weighting": "fantasia3d"},
        "nfsd (s = 7.5)": {"estimator": "nfsd", "guidance_scale": 7.5},
        "csd": {"estimator": "csd"},
    },
    "views": {
        "view-augmented prompts (preset)": {},
        "no view augmentation": {"view_augmentation": False},
    },
    "sigma": {
        "random sigma (preset)": {},
        "annealed sigma": {"sigma_schedule": "annealed"},
        "fixed sigma (t = 200)": {"sigma_schedule": "fixed", "t_max": 200},
    },
    "guidance": {
        "guidance 1": {"guidance_scale": 1.0},
        "guidance 10 (preset)": {},
        "guidance 100": {"guidance_scale": 100.0},
    },
}


def configure(row: dict, model: str, scene: str, seed: int, steps: int | None):
    extra = {} if steps is None else {"steps": steps}
    return learned.learned_config(model=model, prompt=scene, seed=seed, **row, **extra)


class Models:
    """`learned.build_model` once per (scene, view augmentation): the denoiser and targets."""

    def __init__(self):
        self._cache = {}

    def get(self, config):
        key = (config.model.model, config.model.prompt, config.camera.view_augmentation)
        if key not in self._cache:
            self._cache[key] = learned.build_model(config)
        return self._cache[key]


def lift(config, model, step=None):
    """``(final state, compiled step, seconds)`` of one lift (``step`` reused if given)."""
    state = sjc.init_state(config, 3, background=model.background)
    step = sjc.make_step(config, model.denoiser) if step is None else step
    start = time.perf_counter()
    for _ in range(config.run.steps):
        state, _ = step(state, model.denoiser.params)
    jax.block_until_ready(state)
    return state, step, time.perf_counter() - start


def run_row(name, row, args, models) -> list[dict]:
    results, step = [], None
    for scene in args.scenes:
        for seed in args.seeds:
            config = configure(row, args.model, scene, seed, args.steps)
            model = models.get(config)
            state, step, seconds = lift(config, model, step)
            finite = bool(jnp.all(jnp.isfinite(state.grid.density)))
            result = model.evaluate(state.grid) if finite else {"psnr": float("nan")}
            record = {
                "scene": scene,
                "seed": seed,
                "steps": config.run.steps,
                "seconds": seconds,
                **{k: result.get(k, float("nan")) for k in ("psnr", "iou", "janus")},
            }
            results.append(record)
            print(
                f"{name:34s} {scene:6s} seed {seed}: PSNR {record['psnr']:.2f} IoU "
                f"{record['iou']:.3f} Janus {record['janus']:.3f} ({seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return results


def _mean_std(values, digits: int = 2) -> str:
    values = np.asarray(values, np.float64)
    return f"{np.nanmean(values):.{digits}f} ± {np.nanstd(values):.{digits}f}"


def lift_table(results: dict[str, list[dict]], scenes, extra: dict | None = None) -> str:
    """One row per variant: PSNR, IoU, Janus (mean ± std), per-scene PSNR / IoU, s / lift."""
    extra = extra or {}
    extra_heads = sorted({k for v in extra.values() for k in v})
    head = "| variant | PSNR (dB) | IoU | Janus | s / lift | "
    head += " | ".join(f"{s} PSNR / IoU" for s in scenes)
    head += "".join(f" | {h}" for h in extra_heads) + " |"
    lines = [head, "|" + " --- |" * (5 + len(scenes) + len(extra_heads))]
    for name, runs in results.items():
        per_scene = []
        for s in scenes:
            mine = [r for r in runs if r["scene"] == s]
            per_scene.append(
                f"{np.mean([r['psnr'] for r in mine]):.1f} / "
                f"{np.mean([r['iou'] for r in mine]):.3f}"
            )
        cells = [
            _mean_std([r["psnr"] for r in runs]),
            _mean_std([r["iou"] for r in runs], 3),
            _mean_std([r["janus"] for r in runs], 3),
            f"{np.median([r['seconds'] for r in runs]):.0f}",
            *per_scene,
            *(extra.get(name, {}).get(h, "") for h in extra_heads),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- variance of g (claim "eq") ----------------------------------------------------------------


def half_optimised_grid(args, scene, models, steps: int = 150):
    """The preset's lift of ``scene`` (seed 0) after ``steps`` steps: the OOD renders' source."""
    config = configure({}, args.model, scene, 0, steps)
    model = models.get(config)
    state, _, _ = lift(config, model)
    return config, model, state


def estimator_variance(args, models, rows: dict[str, dict], draws: int = 64) -> dict:
    """Per row: mean per-pixel variance of the cotangent over noise draws, and its mean's RMS.

    At 4 views rendered from the half-optimised grid of each scene, sigma at timesteps
    (50, 100, 200, 300) of the model's table (one per view), view labels of the cameras.
    """
    from sjc_jax.render import render_cameras
    from sjc_jax.testbed.scenes import heldout_cameras

    out = {name: {"variance": [], "signal": []} for name in rows}
    for scene in args.scenes:
        config, model, state = half_optimised_grid(args, scene, models)
        cameras, labels = heldout_cameras(image_size=32, radius=config.camera.radius)
        pick = np.array([0, 2, 4, 9])
        cams = jax.tree_util.tree_map(lambda a, pick=pick: a[pick], cameras)
        images = render_cameras(state.grid, cams, config.render_config()).images
        sigma = jnp.asarray(model.denoiser.sigmas[np.array([50, 100, 200, 300])])
        for name, row in rows.items():
            est = sjc.estimator_from_config(configure(row, args.model, scene, 0, None))
            view_labels = jnp.asarray(labels)[pick]

            def draw(k, est=est, model=model, images=images, sigma=sigma, view_labels=view_labels):
                return est(k, model.denoiser, model.denoiser.params, images, sigma, view_labels)[0]

            run = jax.jit(jax.vmap(draw))
            g = np.asarray(run(jax.random.split(jax.random.key(7), draws)), np.float64)
            out[name]["variance"].append(float(np.mean(np.var(g, axis=0))))
            out[name]["signal"].append(float(np.sqrt(np.mean(np.square(g.mean(axis=0))))))
    return {
        name: {
            "var(g) per pixel": f"{np.mean(v['variance']):.3g}",
            "RMS of E[g]": f"{np.mean(v['signal']):.3g}",
        }
        for name, v in out.items()
    }


# --- what PAAS estimates (claim "paas_sigma") ----------------------------------------------------


def _best_scale_residual(m: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """``(cosine, |m - c s| / |m|)`` with the least-squares c, over each image's pixels."""
    m, s = m.reshape(m.shape[0], -1), s.reshape(s.shape[0], -1)
    dot = np.sum(m * s, axis=1)
    cos = dot / np.maximum(np.linalg.norm(m, axis=1) * np.linalg.norm(s, axis=1), 1e-30)
    c = dot / np.maximum(np.sum(s * s, axis=1), 1e-30)
    res = np.linalg.norm(m - c[:, None] * s, axis=1) / np.maximum(np.linalg.norm(m, axis=1), 1e-30)
    return float(np.mean(cos)), float(np.mean(res))


def paas_sigma(args, models, draws: int = 256) -> tuple[str, dict]:
    from sjc_jax.learned.train import TrainConfig, render_training_set
    from sjc_jax.render import render_cameras
    from sjc_jax.testbed.empirical import make_empirical_denoiser
    from sjc_jax.testbed.scenes import heldout_cameras, render_views

    meta = learned_model.load_model(learned.resolve(args.model)).meta
    train_config = TrainConfig.from_dict(meta["training"]["config"])
    images, scene_ids, views = render_training_set(train_config)
    timesteps = (25, 50, 100, 200, 400)
    rows = []
    for scene in args.scenes:
        config = configure({}, args.model, scene, 0, None)
        model = models.get(config)
        index = list(train_config.scenes).index(scene) if scene in train_config.scenes else None
        if index is None:
            continue
        mine = scene_ids == index
        exact = make_empirical_denoiser(images[mine], views[mine], sigmas=model.denoiser.sigmas)
        cameras, labels = heldout_cameras(image_size=32, radius=config.camera.radius)
        pick = np.array([0, 2, 4, 9])
        cams = jax.tree_util.tree_map(lambda a, pick=pick: a[pick], cameras)
        labels = jnp.asarray(labels)[pick]
        truth = learned.ground_truth_of(
            learned_model.load_model(learned.resolve(args.model)), scene
        )
        on_manifold = jnp.clip(render_views(truth[0], cams, config.render_config())[0], 0, 1)
        _, _, half = half_optimised_grid(args, scene, models)
        off_manifold = render_cameras(half.grid, cams, config.render_config()).images
        for where, y in (
            ("true-scene renders", on_manifold),
            ("half-optimised lift", off_manifold),
        ):
            for t in timesteps:
                sigma = float(model.denoiser.sigmas[t])
                sig = jnp.full((y.shape[0],), sigma, jnp.float32)
                ref = {}
                for label, s in (("sigma", sigma), ("sqrt2 sigma", np.sqrt(2.0) * sigma)):
                    d = exact.apply(exact.params, y, jnp.full_like(sig, s), labels)
                    ref[label] = np.asarray(d - y, np.float64)
                for name, den in (("exact", exact), ("learned", model.denoiser)):

                    def paas_mean(key, den=den, sig=sig, y=y, sigma=sigma, labels=labels):
                        noise = jax.random.normal(key, (draws,) + y.shape)
                        z = y[None] + sigma * noise
                        flat = z.reshape((-1,) + y.shape[1:])
                        d = den.apply(
                            den.params, flat, jnp.tile(sig, draws), jnp.tile(labels, draws)
                        )
                        return jnp.mean(d.reshape(z.shape), axis=0) - y

                    m = np.asarray(jax.jit(paas_mean)(jax.random.key(t)), np.float64)
                    row = {
                        "scene": scene,
                        "images": where,
                        "t": t,
                        "sigma": sigma,
                        "denoiser": name,
                    }
                    for label, s in ref.items():
                        cos, res = _best_scale_residual(m, s)
                        row[f"cos {label}"], row[f"residual {label}"] = cos, res
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    lines = [
        "| images | denoiser | t | sigma | cos, score at sigma | cos, at sqrt(2) sigma | "
        "residual at sigma | residual at sqrt(2) sigma |",
        "|" + " --- |" * 8,
    ]
    for where in ("true-scene renders", "half-optimised lift"):
        for name in ("exact", "learned"):
            for t in timesteps:
                mine = [
                    r
                    for r in rows
                    if r["images"] == where and r["denoiser"] == name and r["t"] == t
                ]
                if not mine:
                    continue
                mean = {
                    k: np.mean([r[k] for r in mine])
                    for k in mine[0]
                    if k.startswith(("cos", "res"))
                }
                lines.append(
                    f"| {where} | {name} | {t} | {mine[0]['sigma']:.3f} | "
                    f"{mean['cos sigma']:.3f} | {mean['cos sqrt2 sigma']:.3f} | "
                    f"{mean['residual sigma']:.3f} | {mean['residual sqrt2 sigma']:.3f} |"
                )
    return "\n".join(lines), {"rows": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for CLAIM.md and CLAIM.json")
    parser.add_argument(
        "--claims", nargs="+", default=[*CLAIMS, "paas_sigma"], choices=[*CLAIMS, "paas_sigma"]
    )
    parser.add_argument("--model", default="learned", help="a learned model directory")
    parser.add_argument("--scenes", nargs="+", default=["duck", "house", "robot", "mug"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows of a claim")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    models = Models()
    for claim in args.claims:
        start = time.perf_counter()
        if claim == "paas_sigma":
            text, raw = paas_sigma(args, models)
        else:
            rows = {k: v for k, v in CLAIMS[claim].items() if args.rows is None or k in args.rows}
            results = {name: run_row(name, row, args, models) for name, row in rows.items()}
            extra = estimator_variance(args, models, rows) if claim == "eq" else None
            text = lift_table(results, args.scenes, extra)
            raw = {"results": results, "extra": extra}
        config = configure({}, args.model, args.scenes[0], 0, args.steps)
        header = (
            f"<!-- experiments/claims.py --claims {claim} --scenes {' '.join(args.scenes)} "
            f"--seeds {' '.join(map(str, args.seeds))} --steps {config.run.steps}; "
            f"{time.perf_counter() - start:.0f} s; jax {jax.__version__}, "
            f"{jax.devices()[0].platform} -->\n"
        )
        with open(os.path.join(args.out, f"{claim}.md"), "w") as f:
            f.write(header + text + "\n")
        with open(os.path.join(args.out, f"{claim}.json"), "w") as f:
            json.dump({"args": vars(args), **raw}, f, indent=1, default=str)
        print(header + text, flush=True)


if __name__ == "__main__":
    main()
