"""Score-distillation estimators on the ground-truth testbed: one markdown table.

Every row is the testbed preset (`sjc_jax.testbed.testbed_config`: exact empirical denoiser,
known textured background, 600 steps, 4 views per step, sigma from timesteps 10..100) with the
estimator changed through the config, so each goes through the same `make_step`:

* sjc Eq. 16: PAAS with var_red (the preset, the original's default);
* sjc Eq. 15: ``var_red=False``;
* sds w = 1 / w = 1 - abar (DreamFusion) / w = sqrt(abar)(1 - abar) (Fantasia3D);
* nfsd: noise-free score distillation, guidance 7.5 (the paper's);
* csd: classifier score distillation, the guidance term eps_c - eps_u alone.

The testbed's conditions: a view label's subset of the image set is the conditional model, the
whole set the unconditional (and negative) one. Each (estimator, scene, seed) lifts from a fresh
grid and is evaluated on the 16 held-out cameras. Every default scene x 3 seeds by default.

    PYTHONPATH=. .venv/bin/python experiments/estimators.py --out runs/estimators.md

The rows can be run in separate processes (XLA keeps one CPU core busy per process at these
sizes) and joined: ``--estimators NAME ... --json part.json`` in each, then ``--merge part1.json
part2.json --out table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from testbed_ablations import build_bases, run_variant, table, write_report  # noqa: E402

from sjc_jax import testbed  # noqa: E402

ESTIMATORS: dict[str, dict] = {
    "sjc Eq. 16 (preset)": {},
    "sjc Eq. 15": {"var_red": False},
    "sds, w = 1": {"estimator": "sds", "sds_weighting": "uniform"},
    "sds, w = 1 - abar": {"estimator": "sds", "sds_weighting": "sds"},
    "sds, w = sqrt(abar) (1 - abar)": {"estimator": "sds", "sds_weighting": "fantasia3d"},
    "nfsd (s = 7.5)": {"estimator": "nfsd", "guidance_scale": 7.5},
    "csd": {"estimator": "csd"},
}


def configure(name: str, scene: str, seed: int, steps: int | None):
    extra = {} if steps is None else {"steps": steps}
    return testbed.testbed_config(scene=scene, seed=seed, **ESTIMATORS[name], **extra)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="markdown file for the table")
    parser.add_argument("--json", default=None, help="also write every result here")
    parser.add_argument("--scenes", nargs="+", default=list(testbed.DEFAULT_SCENES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--merge", nargs="+", default=None, help="join the --json files of parts")
    args = parser.parse_args(argv)

    if args.merge:
        parts: dict[str, list] = {}
        for path in args.merge:
            with open(path) as f:
                parts.update(json.load(f))
        results = {name: parts[name] for name in ESTIMATORS if name in parts}
        scenes = list(dict.fromkeys(r["scene"] for runs in results.values() for r in runs))
        seeds = sorted({r["seed"] for runs in results.values() for r in runs})
        steps = {r["steps"] for runs in results.values() for r in runs}
        text = (
            f"Estimators on the testbed: {len(scenes)} scenes x {len(seeds)} seeds (seeds "
            f"{seeds}), {'/'.join(map(str, sorted(steps)))} steps each; mean ± std over all "
            "lifts. s / lift and steps / s: medians over the lifts of the steps alone.\n\n"
            + table(results, scenes, seeds, label="estimator")
            + "\n"
        )
        write_report(text, args.out)
        return

    bases, build_seconds = build_bases(args.scenes, args.seeds, args.steps)
    results = {}
    for name in args.estimators:
        results[name] = run_variant(name, bases["world"], args.steps, configure)
        if args.json:  # keep what is done if a long run is stopped
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    steps = configure(args.estimators[0], args.scenes[0], 0, args.steps).run.steps
    text = (
        f"Estimators on the testbed: {len(args.scenes)} scenes x {len(args.seeds)} seeds "
        f"(seeds {args.seeds}), {steps} steps each; mean ± std over all lifts. s / lift and "
        f"steps / s: medians over the lifts of the steps alone; building an image set took "
        f"{np.mean(build_seconds):.0f} s.\n\n"
        + table(results, args.scenes, args.seeds, label="estimator")
        + "\n"
    )
    write_report(text, args.out)


if __name__ == "__main__":
    main()
