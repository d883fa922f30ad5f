"""Model kinds: what ``--model`` names, chosen by a small registry.

A kind says which ``--model`` values it serves, how to build its `Model` from a config, and
optionally its preset (the config a run starts from when the user gives only flags). Built in:
``testbed`` (the ground-truth testbed, ``--model testbed``), ``learned`` (the learned
known-answer model: ``--model learned`` for the committed one, or a directory holding its
marker file, `sjc_jax.learned.model`) and ``stable-diffusion`` (any other value: a hub id or a
local diffusers directory). `register` adds a kind in front of them, e.g.
a learned model recognised by a marker file in its directory. The types `Model` and `ModelKind`
live in `sjc_jax.model_kind` (re-exported here), below the kinds that build them.
"""

from __future__ import annotations

from sjc_jax.config import SJCConfig
from sjc_jax.grid_io import grid_feature_space
from sjc_jax.model_kind import Model, ModelKind


def _build_testbed(config: SJCConfig) -> Model:
    import jax

    from sjc_jax import testbed

    ground_truth, aabb, _ = testbed.load_scene(config.testbed.scene)
    bed = testbed.build_testbed(
        config, ground_truth, key=jax.random.key(config.run.seed), aabb=aabb
    )
    truth = testbed.truth_mesh(ground_truth, aabb, config)
    return Model(
        denoiser=bed.denoiser,
        background=bed.background,
        evaluate=lambda grid: {
            **testbed.evaluate(grid, bed, config),
            **testbed.evaluate_mesh(grid, truth, config),
        },
    )


def _check_testbed(config: SJCConfig) -> float:
    from sjc_jax import testbed

    testbed.check_scene(config.testbed.scene)
    return testbed.build_bytes(config)


def _testbed_preset(**overrides) -> SJCConfig:
    from sjc_jax.testbed import testbed_config

    return testbed_config(**overrides)


def _build_stable_diffusion(config: SJCConfig) -> Model:
    from sjc_jax.diffusion.stable_diffusion import load_stable_diffusion

    m = config.model
    denoiser = load_stable_diffusion(
        m.model,
        prompt=m.prompt,
        revision=m.revision,
        dtype=m.dtype,
        view_augmentation=config.camera.view_augmentation,
        negative_prompt=m.negative_prompt,
        attention=m.attention,
        gelu=m.gelu,
    )
    return Model(denoiser=denoiser)


def _is_learned(model: str) -> bool:
    from sjc_jax.learned import model as learned_model

    return model == "learned" or learned_model.is_model_dir(model)


def _build_learned(config: SJCConfig) -> Model:
    from sjc_jax import learned

    return learned.build_model(config)


def _learned_preset(**overrides) -> SJCConfig:
    from sjc_jax import learned

    return learned.learned_config(**overrides)


_KINDS: list[ModelKind] = [
    ModelKind(
        "testbed",
        lambda model: model == "testbed",
        _build_testbed,
        _testbed_preset,
        _check_testbed,
    ),
    ModelKind("learned", _is_learned, _build_learned, _learned_preset),
    ModelKind("stable-diffusion", lambda model: True, _build_stable_diffusion),
]


def register(kind: ModelKind) -> None:
    """Add ``kind`` in front of the registered kinds (it is asked first)."""
    if any(k.name == kind.name for k in _KINDS):
        raise ValueError(f"a model kind named {kind.name!r} is registered already")
    _KINDS.insert(0, kind)


def kind_of(model: str) -> ModelKind:
    """The first registered kind that serves ``model``."""
    return next(kind for kind in _KINDS if kind.matches(model))


def check(config: SJCConfig) -> float:
    """``config``'s kind's `ModelKind.check`: refuse what needs no build; bytes the build needs."""
    kind = kind_of(config.model.model)
    return 0 if kind.check is None else kind.check(config)


def build_model(config: SJCConfig) -> Model:
    """The `Model` of ``config.model.model`` through its kind."""
    kind = kind_of(config.model.model)
    if config.model.exact_denoiser and kind.name != "learned":
        raise ValueError(
            f"--exact-denoiser applies to learned models; --model {config.model.model!r} is "
            f"{kind.name}"
        )
    model = kind.build(config)
    grid_feature_space(model.denoiser.feature_space, config.render.feature_activation)
    return model


__all__ = ["Model", "ModelKind", "build_model", "check", "kind_of", "register"]
