"""The paper's claims, measured with the learned known-answer model: markdown tables.

Every lift is the learned model's preset (`sjc_jax.learned.learned_config`: the testbed's
cameras, grid, renderer and optimiser, the plain background of the training renders, frozen)
with one change per row, through the same `sjc.make_step`. Each (row, scene, seed) lifts from a
fresh grid and is evaluated on the 16 held-out cameras against the scene's ground truth: PSNR,
silhouette IoU (opacity > 0.5) and the Janus score (`sjc_jax.testbed.core.janus_score`: 0 = the
back views look like the true back, 1 = like the true front seen through the back, 0.5 =
either). Tables give mean ± std over scenes x seeds.

Claims (``--claims``):

* ``lift``: the preset, and the same lifts with the exact posterior mean of the model's own
  training renders in place of its UNet (``exact_denoiser``): the gap is the learning error;
* ``paas``: PAAS (SJC Eq. 16) vs naive scoring (``estimator="naive"``: the render itself
  denoised, no perturbation), the out-of-distribution failure PAAS was made for;
* ``eq``: Eq. 16 vs Eq. 15, 1 / 2 / 4 noise samples; with the variance of g per pixel over 64
  noise draws at the renders of a half-optimised grid (one per scene);
* ``estimators``: SJC vs SDS (three weightings) vs NFSD vs CSD;
* ``views``: view-augmented prompts on / off (the Janus score is the point);
* ``sigma``: random vs annealed vs fixed sigma;
* ``guidance``: guidance scale 1 / 3 (the preset) / 10 / 100;
* ``paas_sigma`` (no lifts): what PAAS estimates. For images y, the PAAS mean ``m = E_n[D(y +
  sigma n, sigma)] - y`` (256 draws) with the learned and with the exact denoiser, against the
  exact score directions ``D*(y, s) - y`` at ``s = sigma`` and ``s = sqrt(2) sigma`` (D* the
  exact posterior mean of the model's own training renders): cosine and the relative residual
  after the best scale. y: held-out renders of the true scene (on the data manifold) and renders
  of a half-optimised lift (off it).

    PYTHONPATH=. .venv/bin/python experiments/claims.py --claims paas views --out runs/claims

writes ``OUT/CLAIM.md`` and ``OUT/CLAIM.json`` per claim, and each lift's grid file to
``OUT/grids/``. Claims can run in separate processes
(one CPU core each at these sizes).
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

from sjc_jax import learned, sjc  # noqa: E402
from sjc_jax.learned import model as learned_model  # noqa: E402


def _candidate(schedule, t_min, t_max, guidance, emptiness, activation) -> dict:
    """A lift preset candidate: every value the preset sets."""
    return dict(
        sigma_schedule=schedule,
        t_min=t_min,
        t_max=t_max,
        guidance_scale=guidance,
        emptiness_weight=emptiness,
        feature_activation=activation,
    )


CLAIMS: dict[str, dict[str, dict]] = {
    "lift": {
        "learned model (preset)": {},
        "exact D* of its training renders": {"exact_denoiser": True},
    },
    # The preset chosen by measurement: candidate settings, each lifted with the learned model
    # (and with its exact twin); every row sets all five values, so the rows do not move with the
    # preset (docs/learned.md, "The lift preset").
    "preset": {
        f"{twin}: {name}": {**_candidate(*values), **extra}
        for name, values in {
            "random 50..600, g 10, empt 100": ("random", 50, 600, 10.0, 100.0, "none"),
            "annealed 600->10, g 10, empt 100": ("annealed", 10, 600, 10.0, 100.0, "none"),
            "annealed 600->10, g 5, empt 100": ("annealed", 10, 600, 5.0, 100.0, "none"),
            "annealed 800->10, g 10, empt 100": ("annealed", 10, 800, 10.0, 100.0, "none"),
            "dreamtime 10..600, g 10, empt 100": ("dreamtime", 10, 600, 10.0, 100.0, "none"),
            "random 10..600, g 10, empt 300": ("random", 10, 600, 10.0, 300.0, "none"),
            "random 50..600, g 3, empt 100": ("random", 50, 600, 3.0, 100.0, "none"),
            "random 50..600, g 1, empt 100": ("random", 50, 600, 1.0, 100.0, "none"),
            "random 20..400, g 3, empt 100": ("random", 20, 400, 3.0, 100.0, "none"),
            "random 50..600, g 3, empt 10": ("random", 50, 600, 3.0, 10.0, "none"),
            "random 50..600, g 5, empt 30": ("random", 50, 600, 5.0, 30.0, "none"),
            "sigmoid, random 50..600, g 10, empt 100": ("random", 50, 600, 10.0, 100.0, "sigmoid"),
            "sigmoid, random 50..600, g 5, empt 100": ("random", 50, 600, 5.0, 100.0, "sigmoid"),
            "sigmoid, random 50..600, g 3, empt 100": ("random", 50, 600, 3.0, 100.0, "sigmoid"),
            "sigmoid, random 20..400, g 3, empt 100": ("random", 20, 400, 3.0, 100.0, "sigmoid"),
            "sigmoid, random 20..400, g 2, empt 100": ("random", 20, 400, 2.0, 100.0, "sigmoid"),
            "sigmoid, random 10..300, g 3, empt 100": ("random", 10, 300, 3.0, 100.0, "sigmoid"),
            "sigmoid, random 20..400, g 3, empt 30": ("random", 20, 400, 3.0, 30.0, "sigmoid"),
        }.items()
        for twin, extra in (("learned", {}), ("exact", {"exact_denoiser": True}))
    },
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
        "guidance 3 (preset)": {},
        "guidance 10": {"guidance_scale": 10.0},
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
        key = (
            config.model.model,
            config.model.prompt,
            config.camera.view_augmentation,
            config.model.exact_denoiser,
        )
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


def save_grid(args, row_name, scene, seed, grid, config) -> None:
    """The lift's grid file (``OUT/grids/ROW-SCENE-SEED.npz``), to mesh or render later."""
    from sjc_jax.grid_io import grid_feature_space, save_grid_file

    slug = "".join(c if c.isalnum() else "-" for c in row_name.lower()).strip("-")
    path = os.path.join(args.out, "grids", f"{slug}-{scene}-{seed}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    space = grid_feature_space("rgb", config.render.feature_activation)
    save_grid_file(path, grid, aabb=config.render_config().aabb, feature_space=space)


def _done(args, claim: str) -> dict:
    """The lifts of ``claim`` finished by earlier calls (``OUT/CLAIM.lifts.jsonl``)."""
    path = os.path.join(args.out, f"{claim}.lifts.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                done[(record["row"], record["scene"], record["seed"], record["steps"])] = record
    return done


def run_row(claim, name, row, args, models) -> list[dict]:
    """The lifts of one row, every scene x seed; each finished lift is appended to
    ``OUT/CLAIM.lifts.jsonl`` at once, and a rerun skips the lifts found there (a long table
    runs in parts)."""
    results, step = [], None
    done = _done(args, claim)
    for scene in args.scenes:
        for seed in args.seeds:
            config = configure(row, args.model, scene, seed, args.steps)
            key = (name, scene, seed, config.run.steps)
            if key in done:
                results.append({k: v for k, v in done[key].items() if k != "row"})
                continue
            model = models.get(config)
            state, step, seconds = lift(config, model, step)
            finite = bool(jnp.all(jnp.isfinite(state.grid.density)))
            save_grid(args, name, scene, seed, state.grid, config)
            result = model.evaluate(state.grid) if finite else {"psnr": float("nan")}
            record = {
                "scene": scene,
                "seed": seed,
                "steps": config.run.steps,
                "seconds": seconds,
                **{k: result.get(k, float("nan")) for k in ("psnr", "iou", "janus")},
            }
            results.append(record)
            with open(os.path.join(args.out, f"{claim}.lifts.jsonl"), "a") as f:
                f.write(json.dumps({"row": name, **record}) + "\n")
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


_HALF = {}


def half_optimised_grid(args, scene, models, steps: int = 150):
    """The preset's lift of ``scene`` (seed 0) after ``steps`` steps: the OOD renders' source."""
    if (args.model, scene) not in _HALF:
        config = configure({}, args.model, scene, 0, steps)
        model = models.get(config)
        state, _, _ = lift(config, model)
        _HALF[args.model, scene] = config, model, state
    return _HALF[args.model, scene]


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


@functools.partial(jax.jit, static_argnums=(0, 6))
def _paas_mean(den, params, y, sigma, labels, key, draws):
    """``E_n[D(y + sigma n, sigma)] - y`` over ``draws`` noise samples (one call)."""
    noise = jax.random.normal(key, (draws,) + y.shape)
    z = (y[None] + sigma[None, :, None, None, None] * noise).reshape((-1,) + y.shape[1:])
    d = den.apply(params, z, jnp.tile(sigma, draws), jnp.tile(labels, draws))
    return jnp.mean(d.reshape((draws,) + y.shape), axis=0) - y


def paas_sigma(args, models, draws: int = 256) -> tuple[str, dict]:
    exact_of = _exact_denoisers(args, models)
    timesteps = (25, 50, 100, 200, 400)
    rows = []
    for scene, exact in exact_of.items():
        model, labels, on_manifold, off_manifold = _probe_images(args, scene, models)
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
                    m = np.asarray(
                        _paas_mean(den, den.params, y, sig, labels, jax.random.key(t), draws),
                        np.float64,
                    )
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


def _probe_images(args, scene, models):
    """``(model, labels [4], on [4, H, W, 3], off [4, H, W, 3])``: 4 held-out cameras (front,
    side, back, overhead), the true scene's renders there (on the data manifold) and the
    half-optimised lift's (off it)."""
    from sjc_jax.render import render_cameras
    from sjc_jax.testbed.scenes import heldout_cameras, render_views

    config = configure({}, args.model, scene, 0, None)
    model = models.get(config)
    cameras, labels = heldout_cameras(image_size=32, radius=config.camera.radius)
    pick = np.array([0, 2, 4, 9])
    cams = jax.tree_util.tree_map(lambda a, pick=pick: a[pick], cameras)
    truth = learned.ground_truth_of(learned_model.load_model(learned.resolve(args.model)), scene)
    on = jnp.clip(render_views(truth[0], cams, config.render_config())[0], 0, 1)
    _, _, half = half_optimised_grid(args, scene, models)
    off = render_cameras(half.grid, cams, config.render_config()).images
    return model, jnp.asarray(labels)[pick], on, off


_EXACT = {}


def _exact_denoisers(args, models):
    """Per scene: the exact posterior-mean denoiser of the model's own training renders."""
    if args.model in _EXACT:
        return _EXACT[args.model]
    from sjc_jax.learned.train import TrainConfig, render_training_set
    from sjc_jax.testbed.empirical import make_empirical_denoiser

    meta = learned_model.load_model(learned.resolve(args.model)).meta
    train_config = TrainConfig.from_dict(meta["training"]["config"])
    images, scene_ids, views = render_training_set(train_config)
    out = {}
    for scene in args.scenes:
        if scene in train_config.scenes:
            mine = scene_ids == list(train_config.scenes).index(scene)
            sigmas = models.get(configure({}, args.model, scene, 0, None)).denoiser.sigmas
            out[scene] = make_empirical_denoiser(images[mine], views[mine], sigmas=sigmas)
    _EXACT[args.model] = out
    return out


def quality(args, models, draws: int = 16) -> tuple[str, dict]:
    """Denoising error of the learned model per sigma, against the exact posterior mean.

    For clean images y (held-out renders of the true scene, and renders of a half-optimised
    lift: SJC's out-of-distribution inputs), ``z = y + sigma n`` (``draws`` per image, 4
    held-out cameras): RMSE of the learned D against the exact D* of the training renders, and
    of each against y.
    """

    exact_of = _exact_denoisers(args, models)
    timesteps = (10, 25, 50, 100, 200, 400, 600, 800)
    rows = []
    for scene, exact in exact_of.items():
        model, labels, on, off = _probe_images(args, scene, models)
        labels = jnp.tile(labels, draws)
        for where, y in (("true-scene renders", on), ("half-optimised lift", off)):
            y = jnp.tile(y, (draws, 1, 1, 1))
            for t in timesteps:
                sigma = jnp.full((y.shape[0],), float(model.denoiser.sigmas[t]))
                z = y + sigma[:, None, None, None] * jax.random.normal(jax.random.key(t), y.shape)
                d_l = _apply(model.denoiser, model.denoiser.params, z, sigma, labels)
                d_e = _apply(exact, exact.params, z, sigma, labels)
                rms = lambda a, b: float(jnp.sqrt(jnp.mean(jnp.square(a - b))))  # noqa: E731
                rows.append(
                    {
                        "scene": scene,
                        "images": where,
                        "t": t,
                        "sigma": float(sigma[0]),
                        "learned vs exact": rms(d_l, d_e),
                        "learned vs y": rms(d_l, y),
                        "exact vs y": rms(d_e, y),
                    }
                )
    lines = [
        "| images | t | sigma | RMSE(D, D*) | RMSE(D, y) | RMSE(D*, y) |",
        "|" + " --- |" * 6,
    ]
    for where in ("true-scene renders", "half-optimised lift"):
        for t in timesteps:
            mine = [r for r in rows if r["images"] == where and r["t"] == t]
            lines.append(
                f"| {where} | {t} | {mine[0]['sigma']:.3f} | "
                + " | ".join(
                    f"{np.mean([r[k] for r in mine]):.4f}"
                    for k in ("learned vs exact", "learned vs y", "exact vs y")
                )
                + " |"
            )
    return "\n".join(lines), {"rows": rows}


@functools.partial(jax.jit, static_argnums=0)
def _apply(den, params, z, sigma, labels):
    return den.apply(params, z, sigma, labels)


def samples(args, models, per_view: int = 3) -> tuple[str, dict]:
    """A figure of the model's own samples (ancestral DDIM, 50 steps, guidance 3, D clipped to
    [0, 1]) per scene (rows) and view label (column groups: front, side, back, overhead)."""
    import imageio

    from sjc_jax.learned.sampling import ddim_sample

    strips = []
    for scene in args.scenes:
        model = models.get(configure({}, args.model, scene, 0, None))
        labels = jnp.repeat(jnp.arange(4), per_view)
        x = ddim_sample(
            model.denoiser,
            jax.random.key(0),
            labels,
            steps=50,
            guidance=3.0,
            clip=(0.0, 1.0),
            eta=1.0,
        )
        strips.append(np.concatenate(list(np.clip(np.asarray(x), 0, 1)), axis=1))
    picture = np.kron(np.concatenate(strips), np.ones((3, 3, 1)))
    path = os.path.join(args.out, "samples.png")
    imageio.imwrite(path, (picture * 255 + 0.5).astype(np.uint8))
    return f"![samples]({path})", {"path": path}


NO_LIFTS = {"paas_sigma": paas_sigma, "quality": quality, "samples": samples}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for CLAIM.md and CLAIM.json")
    parser.add_argument(
        "--claims", nargs="+", default=[*CLAIMS, *NO_LIFTS], choices=[*CLAIMS, *NO_LIFTS]
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
        if claim in NO_LIFTS:
            text, raw = NO_LIFTS[claim](args, models)
        else:
            rows = {k: v for k, v in CLAIMS[claim].items() if args.rows is None or k in args.rows}
            results = {name: run_row(claim, name, row, args, models) for name, row in rows.items()}
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
