"""The learned known-answer model: a small diffusion UNet trained on renders of known scenes.

* `sjc_jax.learned.model`: the model (a diffusers Flax UNet in RGB pixel space with a scene and
  a view token), its directory format, loading and the `Denoiser`;
* `sjc_jax.learned.train`: the training (``python -m sjc_jax train-model``);
* `sjc_jax.learned.sampling`: its own sampler (DDIM), for pictures and the 2D experiments;
* `sjc_jax.learned.data`: the plain background and scene-file checksum both of these use;
* here: the model kind's preset (`learned_config`) and `build_model` (denoiser, the plain
  background, the evaluation against the scene's ground truth).

``--model learned`` names the committed model (`DEFAULT_MODEL_DIR`, trained by the command in
its ``sjc_model.json``); any directory written by `sjc_jax.learned.model.save_model` works too.
"""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

from sjc_jax.config import FIELD_SECTIONS, SJCConfig

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"

# The preset of a lift with a learned model: the testbed's (same cameras, grid, renderer and
# optimiser, `sjc_jax.testbed.testbed_config`) with the appearance activation, noise levels,
# guidance and emptiness weight chosen for the committed model by measurement (duck, seed 0, 600
# steps, held-out PSNR / IoU; the whole table is in docs/learned.md, "The lift preset"):
# unbounded RGB features let a half-transparent volume with extreme colours match the views over
# the plain background (t 50..600, guidance 10: 18.9 / 0.75; guidance 3: 21.1 / 0.33; annealed,
# DreamTime and t 10..600 schedules no better); a sigmoid on the features makes the object solid
# (guidance 10: 19.7 / 0.86, 5: 21.9 / 0.90, 3: 22.0 / 0.90), and t 20..400 at guidance 3 is the
# best measured (22.6 / 0.91; t 10..300: 22.4 / 0.91; guidance 2: 21.6 / 0.89).
_PRESET = dict(
    model="learned",
    feature_activation="sigmoid",
    t_min=20,
    t_max=400,
    guidance_scale=3.0,
    emptiness_weight=100.0,
)


def resolve(model: str) -> Path:
    """The directory of ``--model``: ``learned`` is `DEFAULT_MODEL_DIR`, else the path given."""
    return DEFAULT_MODEL_DIR if model == "learned" else Path(model).expanduser()


def learned_config(**overrides) -> SJCConfig:
    """The preset `SJCConfig` of a lift with a learned model; ``overrides`` replace fields."""
    from sjc_jax.testbed import testbed_config

    unknown = sorted(set(overrides) - set(FIELD_SECTIONS))
    if unknown:
        raise ValueError(f"overrides has unknown SJCConfig fields {unknown}")
    return testbed_config(**{**_PRESET, **overrides})


def ground_truth_of(model, prompt: str):
    """``(grid over the model's plain background, aabb)`` of the scene ``prompt``, or None.

    Built-in scenes always have one; a grid file only while it is where training found it
    (same checksum).
    """
    import jax.numpy as jnp

    from sjc_jax.learned.data import file_sha256, plain_background
    from sjc_jax.testbed import load_scene
    from sjc_jax.testbed.scenes import list_scenes

    record = model.meta["scenes"][model.scene_index(prompt)]
    source = record["source"]
    if source not in list_scenes():
        if not Path(source).is_file():
            return None
        if record.get("sha256") and file_sha256(source) != record["sha256"]:
            return None
    grid, aabb, _ = load_scene(source)
    return grid.replace(background=jnp.asarray(plain_background(model.background))), aabb


@functools.lru_cache(maxsize=1)
def _training_renders(train_config: str):
    """The training renders of a training config (JSON): cached, as lifts of several scenes of
    one model (an experiment's rows) share them."""
    from sjc_jax.learned.data import render_scenes

    c = json.loads(train_config)
    return render_scenes(
        c["scenes"],
        views_per_scene=c["views_per_scene"],
        image_size=c["architecture"]["image_size"],
        background=c["background"],
        seed=c["seed"],
    )


def exact_denoiser(model, prompt: str, config: SJCConfig, training_set=None):
    """The exact posterior-mean denoiser of ``model``'s own training renders, conditioned as the
    model is: the ideal a UNet trained on them can reach (`sjc_jax.testbed.empirical`).

    The condition of view label v is the renders of the scene ``prompt`` with label v (all its
    renders without view augmentation); the unconditional one (and the negative one, which the
    model does not have either) is the whole training set, every scene, as the model's null
    tokens. ``training_set`` is `sjc_jax.learned.train.render_training_set`'s output if the
    caller has it (rendered here otherwise, as the training did: same cameras, same keys).
    """
    import numpy as np

    from sjc_jax.testbed.core import make_denoiser as empirical_denoiser

    scene = model.scene_index(prompt)
    if training_set is None:
        training_set = _training_renders(json.dumps(model.meta["training"]["config"]))
    images, scene_ids, views = training_set
    own = np.asarray(scene_ids) == scene
    # The other scenes' renders get a label no view asks for: only the unconditional (whole
    # set) prediction sees them. Without view augmentation the scene's labels merge into one.
    labels = np.where(own, views, 4)
    return empirical_denoiser(
        images, labels, config, sigmas=model.sigmas, num_labels=5, name=f"exact:{model.root}"
    )


def build_model(config: SJCConfig):
    """The `sjc_jax.model_kind.Model` of a learned model directory for ``config``."""
    from sjc_jax.learned.data import plain_background
    from sjc_jax.learned.model import load_model, make_denoiser
    from sjc_jax.model_kind import Model
    from sjc_jax.testbed.core import evaluate, evaluate_mesh, heldout_targets, truth_mesh

    m = config.model
    model = load_model(resolve(m.model), dtype=m.dtype)
    if not m.prompt:
        raise ValueError(f"a learned model needs --prompt SCENE, one of: {', '.join(model.scenes)}")
    if m.exact_denoiser:
        denoiser = exact_denoiser(model, m.prompt, config)
    else:
        denoiser = make_denoiser(
            model,
            m.prompt,
            view_augmentation=config.camera.view_augmentation,
            dtype=m.dtype,
            attention=m.attention,
            gelu=m.gelu,
        )
    size = config.render.image_size or denoiser.resolution
    if size != denoiser.resolution:
        raise ValueError(
            f"the model denoises {denoiser.resolution} x {denoiser.resolution} images; "
            f"--image-size {size} differs"
        )
    truth = ground_truth_of(model, m.prompt)
    evaluate_fn = None
    if truth is None:
        warnings.warn(
            f"the ground truth of {m.prompt!r} is not where the model was trained from; "
            "final/eval.json is not written",
            stacklevel=2,
        )
    else:
        targets = heldout_targets(config, truth[0], truth[1])
        surface = truth_mesh(truth[0], truth[1], config)
        evaluate_fn = lambda grid: {  # noqa: E731
            **evaluate(grid, targets, config),
            **evaluate_mesh(grid, surface, config),
        }
    return Model(
        denoiser=denoiser,
        background=plain_background(model.background),
        evaluate=evaluate_fn,
    )


__all__ = [
    "DEFAULT_MODEL_DIR",
    "build_model",
    "exact_denoiser",
    "ground_truth_of",
    "learned_config",
    "resolve",
]
