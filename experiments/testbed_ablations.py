"""Ablations of SJC on the ground-truth testbed: one markdown table over scenes and seeds.

Every variant is the testbed preset (`sjc_jax.testbed.testbed_config`) with one change:

* full: the preset itself;
* no view labels: ``view_augmentation=False`` (one unlabelled image set, every view asks for it);
* no emptiness: ``emptiness_weight=0``;
* Eq. 15: ``var_red=False`` (``g = (D(z) - z) / sigma`` instead of Eq. 16's ``(D(z) - y) / sigma``);
* annealed sigma: ``sigma_schedule="annealed"`` (from t_max down to t_min) instead of random;
* white background (opt-in, ``--variants``): the scene's own white background instead of the
  testbed world's textured one (`testbed.world_background`), in the image set, the held-out
  targets and the lift.

Each (variant, scene, seed) lifts from a fresh grid and is evaluated on the held-out cameras
(PSNR against the ground truth over the known background, silhouette IoU of opacity > 0.5).
The image set of a (scene, seed) is built once and shared by the variants ("no view labels"
only relabels it); one compiled step serves all lifts of a variant. "s / lift" is the wall time
of one lift's steps. The table is printed to stdout and written to ``--out``; ``--json`` keeps
every single result.

    .venv/bin/python experiments/testbed_ablations.py --out runs/testbed_ablations.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sjc_jax import sjc, testbed  # noqa: E402

VARIANTS: dict[str, dict] = {
    "full (preset)": {},
    "no view labels": {"view_augmentation": False},
    "no emptiness loss": {"emptiness_weight": 0.0},
    "Eq. 15 (var_red=False)": {"var_red": False},
    "annealed sigma": {"sigma_schedule": "annealed"},
    "white background": {},
}
DEFAULT_VARIANTS = [name for name in VARIANTS if name != "white background"]
# Variants that need their own image set: the scene's own background instead of the world's.
SCENE_BACKGROUND = {"white background"}


def variant_config(name: str, scene: str, seed: int, steps: int | None):
    extra = {} if steps is None else {"steps": steps}
    return testbed.testbed_config(scene=scene, seed=seed, **VARIANTS[name], **extra)


def run_variant(name: str, bases: dict, steps: int | None, configure=None, **choices) -> list[dict]:
    """Every (scene, seed) lift of one variant; one compiled step serves them all.

    ``configure(name, scene, seed, steps)`` makes a lift's config (default `variant_config`);
    ``choices`` (e.g. ``estimator=``) go to `sjc.make_step` as values.
    """
    results, step = [], None
    for (scene, seed), base in bases.items():
        config = (configure or variant_config)(name, scene, seed, steps)
        tb = dataclasses.replace(
            base, denoiser=testbed.make_denoiser(base.images, base.labels, config)
        )
        start = time.perf_counter()
        if step is None:
            step = sjc.make_step(config, tb.denoiser, **choices)
        state = testbed.lift(config, tb, step=step)
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        result = testbed.evaluate(state.grid, tb, config)
        results.append(
            {
                "scene": scene,
                "seed": seed,
                "psnr": result["psnr"],
                "iou": result["iou"],
                "seconds": seconds,
                "steps": config.run.steps,
            }
        )
        print(
            f"{name:24s} {scene:6s} seed {seed}: PSNR {result['psnr']:.2f} "
            f"IoU {result['iou']:.3f} ({seconds:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return results


def _mean_std(values, digits: int = 2) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def table(
    results: dict[str, list[dict]], scenes: list[str], seeds: list[int], label: str = "variant"
) -> str:
    """Markdown: one row per variant; mean ± std over scenes x seeds, and per-scene PSNR.

    "s / lift" and "steps / s" are medians over the lifts (the first lift of a variant also
    compiles its step)."""
    head = f"| {label} | PSNR (dB) | IoU | min PSNR | min IoU | s / lift | steps / s | "
    head += " | ".join(f"{s} PSNR / IoU" for s in scenes) + " |"
    rule = "|" + " --- |" * (7 + len(scenes))
    lines = [head, rule]
    for name, runs in results.items():
        psnr = [r["psnr"] for r in runs]
        iou = [r["iou"] for r in runs]
        per_scene = []
        for s in scenes:
            mine = [r for r in runs if r["scene"] == s]
            psnr_s, iou_s = np.mean([r["psnr"] for r in mine]), np.mean([r["iou"] for r in mine])
            per_scene.append(f"{psnr_s:.1f} / {iou_s:.3f}")
        lines.append(
            f"| {name} | {_mean_std(psnr)} | {_mean_std(iou, 3)} | {min(psnr):.2f} "
            f"| {min(iou):.3f} | {np.median([r['seconds'] for r in runs]):.0f} | "
            f"{np.median([r['steps'] / r['seconds'] for r in runs]):.1f} | "
            + " | ".join(per_scene)
            + " |"
        )
    return "\n".join(lines)


def write_report(text: str, path: str) -> None:
    """Print ``text`` and write it to ``path`` (its directory created)."""
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def build_bases(scenes, seeds, steps, kinds=("world",)) -> tuple[dict, list[float]]:
    """One image set per (scene, seed) and background kind ("world" or "scene"), shared by the
    variants; returns ``({kind: {(scene, seed): Testbed}}, build seconds)``."""
    bases: dict[str, dict] = {kind: {} for kind in kinds}
    build_seconds = []
    for scene in scenes:
        ground_truth, aabb, _ = testbed.load_scene(scene)
        for seed in seeds:
            config = variant_config("full (preset)", scene, seed, steps)
            for kind in sorted(kinds):
                start = time.perf_counter()
                bases[kind][scene, seed] = testbed.build_testbed(
                    config,
                    ground_truth,
                    key=jax.random.key(seed),
                    aabb=aabb,
                    background=ground_truth.background if kind == "scene" else None,
                )
                build_seconds.append(time.perf_counter() - start)
    return bases, build_seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file for the table")
    parser.add_argument("--json", default=None, help="also write every result here")
    parser.add_argument("--scenes", nargs="+", default=list(testbed.DEFAULT_SCENES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    args = parser.parse_args(argv)

    kinds = {"scene" if name in SCENE_BACKGROUND else "world" for name in args.variants}
    bases, build_seconds = build_bases(args.scenes, args.seeds, args.steps, kinds)
    results = {
        name: run_variant(name, bases["scene" if name in SCENE_BACKGROUND else "world"], args.steps)
        for name in args.variants
    }
    config = testbed.testbed_config(**({} if args.steps is None else {"steps": args.steps}))
    text = (
        f"Testbed ablations: {len(args.scenes)} scenes x {len(args.seeds)} seeds "
        f"(seeds {args.seeds}), {config.run.steps} steps each; mean ± std over all lifts. "
        f"s / lift: the steps of one lift (plus one compilation per variant); building an "
        f"image set took {np.mean(build_seconds):.0f} s.\n\n"
        + table(results, args.scenes, args.seeds)
        + "\n"
    )
    write_report(text, args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
