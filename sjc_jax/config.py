"""The run configuration: frozen sections composed into one `SJCConfig`; defaults = the original.

Sections (each a frozen dataclass, validated on construction, every field with a help line):
`ModelConfig`, `RenderSettings`, `CameraConfig`, `ScoreConfig` (estimator and noise levels),
`OptimizerConfig`, `RegularizerConfig`, `RunSettings` (length, seed, artifacts) and
`TestbedConfig`. Field names are unique across sections, so the command line and `flat` use the
bare names (``--lr``, ``--steps``) while code reads ``config.optimizer.lr``.

The defaults reproduce the original SJC release (docs/original.md). A config round-trips
through `to_dict` / `from_dict` (the run directory's ``config.json``, nested by section; flat
dicts of the same fields are read too).

Numerics never receive a config: the builders in `sjc_jax.sjc` (`estimator_from_config` and
friends) pass each factory the scalars it needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any

from sjc_jax.diffusion.attention import ATTENTION_KINDS
from sjc_jax.diffusion.numerics import GELU_KINDS
from sjc_jax.estimators import ESTIMATORS, SCALES, WEIGHTINGS
from sjc_jax.render import FEATURE_ACTIVATIONS, RenderConfig

DTYPES = ("float32", "bfloat16")
# Noise-free score distillation's negative prompt (Katzir et al., ICLR 2024).
NFSD_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, "
    "low-resolution, gloomy"
)
SIGMA_SCHEDULES = ("random", "annealed", "fixed", "dreamtime")


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


def _check_positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_finite(obj: Any, names: tuple[str, ...], *, low: float | None = None) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if low is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What is lifted, and how the 2D model runs."""

    model: str = _field("testbed", "hub id or local diffusers directory, or 'testbed'")
    prompt: str = _field("", "text prompt (SD models); view prefixes are added per camera")
    negative_prompt: str = _field(
        NFSD_NEGATIVE_PROMPT, "text of the negative condition (nfsd, csd)"
    )
    revision: str | None = _field(None, "hub revision of the model")
    dtype: str = _field("float32", "UNet compute dtype: float32 or bfloat16")
    attention: str = _field("auto", "UNet attention kernel: auto, diffusers, xla or cudnn")
    gelu: str = _field(
        "exact", "UNet GEGLU activation: exact (the original's) or tanh (diffusers')"
    )
    exact_denoiser: bool = _field(
        False,
        "learned models: lift with the exact posterior mean of the model's own training "
        "renders in place of its UNet (the ideal the UNet approximates)",
    )

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.gelu not in GELU_KINDS:
            raise ValueError(f"gelu must be one of {GELU_KINDS}, got {self.gelu!r}")


@dataclasses.dataclass(frozen=True)
class RenderSettings:
    """The voxel grid and the renderer."""

    grid_resolution: int = _field(100, "voxels per axis of the grid")
    background_resolution: int = _field(4, "side of the learned background texture")
    image_size: int | None = _field(None, "render H = W in pixels; None = the model's resolution")
    step_ratio: float = _field(0.5, "ray-march step as a fraction of a voxel")
    density_shift: float = _field(-1.0, "s in softplus(raw * exp(d_scale) + s)")
    weight_threshold: float = _field(1e-4, "features count only where a sample's weight exceeds it")
    background_depth: float = _field(10.0, "depth given to the background")
    background_wrap: bool = _field(
        True, "background wraps in azimuth (no seam); False zero-pads it as the original"
    )
    feature_activation: str = _field(
        "none", "features as appearance: none (as stored, the original) or sigmoid (RGB in (0, 1))"
    )

    def __post_init__(self):
        _check_positive_ints(self, ("grid_resolution", "background_resolution"))
        if self.image_size is not None and (
            isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
            or self.image_size < 8
        ):  # fmt: skip
            raise ValueError(f"image_size must be an integer >= 8, got {self.image_size!r}")
        _check_finite(self, ("step_ratio", "density_shift", "background_depth"))
        _check_finite(self, ("weight_threshold",), low=0.0)
        if self.feature_activation not in FEATURE_ACTIVATIONS:
            raise ValueError(
                f"feature_activation must be one of {FEATURE_ACTIVATIONS}, "
                f"got {self.feature_activation!r}"
            )
        if not isinstance(self.background_wrap, bool):
            raise ValueError(f"background_wrap must be true or false, got {self.background_wrap!r}")
        if not self.step_ratio > 0:
            raise ValueError(f"step_ratio must be positive, got {self.step_ratio}")

    def render_config(self) -> RenderConfig:
        """The renderer's static `RenderConfig` (box ``[-1, 1]^3``)."""
        return RenderConfig(
            step_ratio=self.step_ratio,
            density_shift=self.density_shift,
            weight_threshold=self.weight_threshold,
            background_depth=self.background_depth,
            background_wrap=self.background_wrap,
            feature_activation=self.feature_activation,
        )


@dataclasses.dataclass(frozen=True)
class CameraConfig:
    """SJC's training-camera distribution and view-augmented prompting."""

    radius: float = _field(1.5, "camera distance from the origin")
    fov_min_deg: float = _field(40.0, "training fov_x ~ U[fov_min_deg, fov_max_deg) degrees")
    fov_max_deg: float = _field(70.0, "upper end of the training fov_x in degrees")
    max_v_deg: float = _field(100.0, "polar draw v ~ U[0, max_v_deg) degrees")
    overhead_deg: float = _field(30.0, "v below this is an 'overhead view'")
    view_augmentation: bool = _field(True, "view-dependent prompts / labels per camera")

    def __post_init__(self):
        _check_finite(self, ("radius", "fov_min_deg", "fov_max_deg", "max_v_deg", "overhead_deg"))
        if not self.radius > 0 or not self.max_v_deg > 0:
            raise ValueError(
                f"radius and max_v_deg must be positive, got {self.radius}, {self.max_v_deg}"
            )
        if not 0 < self.fov_min_deg <= self.fov_max_deg < 180:
            raise ValueError(
                f"need 0 < fov_min_deg <= fov_max_deg < 180, got {self.fov_min_deg}, "
                f"{self.fov_max_deg}"
            )


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """The score-distillation estimator and the noise levels it is asked at."""

    estimator: str = _field(
        "sjc",
        "score estimator: " + "; ".join(f"{name} ({r.summary})" for name, r in ESTIMATORS.items()),
    )
    guidance_scale: float = _field(
        100.0, "classifier-free guidance scale of sjc, sds, nfsd, naive (1 = conditional only)"
    )
    var_red: bool = _field(True, "sjc: Eq. 16, D - y (True, the original) or Eq. 15, D - z")
    noise_samples: int = _field(1, "sjc, sds: noise draws averaged per view (1 = the original)")
    score_scale: str = _field("sigma", "sjc: divide by sigma (the original) or sigma2 (the score)")
    sds_weighting: str = _field("sds", "sds, nfsd, csd weighting w(t): uniform, sds, fantasia3d")
    nfsd_switch_timestep: int = _field(200, "nfsd: timestep from which the negative term is used")
    csd_negative_weight: float = _field(0.0, "csd: weight of the negative-prompt term (0 = off)")
    sigma_schedule: str = _field("random", "noise levels: random, annealed, fixed or dreamtime")
    t_min: int = _field(10, "smallest timestep of the model's table drawn")
    t_max: int = _field(969, "largest timestep drawn (fixed: the one used)")

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {tuple(ESTIMATORS)}, got {self.estimator!r}"
            )
        if self.score_scale not in SCALES:
            raise ValueError(f"score_scale must be one of {SCALES}, got {self.score_scale!r}")
        if self.sds_weighting not in WEIGHTINGS:
            raise ValueError(
                f"sds_weighting must be one of {tuple(WEIGHTINGS)}, got {self.sds_weighting!r}"
            )
        if self.sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(
                f"sigma_schedule must be one of {SIGMA_SCHEDULES}, got {self.sigma_schedule!r}"
            )
        _check_positive_ints(self, ("noise_samples",))
        _check_finite(self, ("guidance_scale", "csd_negative_weight"), low=0.0)
        for name in ("t_min", "t_max", "nfsd_switch_timestep"):
            value = getattr(self, name)  # an index into the model's noise table (int32)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
                raise ValueError(f"{name} must be an integer in [0, 2**31), got {value!r}")
        if not self.t_min <= self.t_max:
            raise ValueError(f"need t_min <= t_max, got t_min={self.t_min}, t_max={self.t_max}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adamax, as the original."""

    lr: float = _field(0.05, "learning rate of density, features and d_scale")
    background_lr: float = _field(1e-4, "learning rate of the background texture (0 freezes it)")
    b1: float = _field(0.9, "Adamax beta1, in [0, 1)")
    b2: float = _field(0.999, "Adamax beta2, in [0, 1)")
    eps: float = _field(1e-8, "Adamax epsilon")

    def __post_init__(self):
        _check_finite(self, ("lr", "background_lr", "b1", "b2", "eps"), low=0.0)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RegularizerConfig:
    """The emptiness and center-depth losses."""

    emptiness_weight: float = _field(1e4, "weight of the emptiness loss log(1 + B w)")
    emptiness_scale: float = _field(10.0, "B in log(1 + B w)")
    emptiness_multiplier: float = _field(20.0, "emptiness weight factor from emptiness_step on")
    emptiness_step: float = _field(0.5, "fraction of the run after which the multiplier applies")
    center_depth_weight: float = _field(0.0, "weight of the center-depth loss (0 = off)")

    def __post_init__(self):
        _check_finite(
            self,
            ("emptiness_weight", "emptiness_scale", "emptiness_multiplier", "center_depth_weight"),
            low=0.0,
        )
        _check_finite(self, ("emptiness_step",))
        if not 0 <= self.emptiness_step <= 1:
            raise ValueError(f"emptiness_step must lie in [0, 1], got {self.emptiness_step}")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Length, seed, batch and the artifacts of a run."""

    steps: int = _field(10000, "optimisation steps")
    seed: int = _field(0, "the whole run is reproducible from it; in [0, 2**32)")
    views_per_step: int = _field(1, "views rendered and scored per step (1 = the original)")
    num_previews: int = _field(100, "preview images over the run")
    checkpoint_every: int = _field(1000, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = _field(2, "most recent checkpoints kept")
    log_every: int = _field(10, "steps between metric fetches (the loop's only host syncs)")
    video_frames: int = _field(100, "frames of the final videos")
    mesh_threshold: float | None = _field(
        None, "density level of the mesh; None = the level whose silhouettes match the lift's"
    )

    def __post_init__(self):
        _check_positive_ints(
            self,
            (
                "steps",
                "views_per_step",
                "num_previews",
                "checkpoint_every",
                "keep_checkpoints",
                "log_every",
                "video_frames",
            ),
        )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        # jax.random.key keeps only a seed's low 32 bits (without x64): 2**32 would be seed 0
        # again, -1 seed 2**32 - 1, and above 2**63 it raises.
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}")
        if self.mesh_threshold is not None:
            _check_finite(self, ("mesh_threshold",), low=0.0)


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """The ground-truth testbed (``--model testbed``)."""

    __test__ = False  # not a pytest class

    scene: str | None = _field(None, "testbed scene: a built-in name or a grid file (.npz)")
    testbed_views: int = _field(100, "labelled renders of the ground-truth scene")
    testbed_eval_views: int = _field(8, "held-out cameras per elevation ring in eval.json")

    def __post_init__(self):
        _check_positive_ints(self, ("testbed_views", "testbed_eval_views"))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "render": RenderSettings,
    "camera": CameraConfig,
    "score": ScoreConfig,
    "optimizer": OptimizerConfig,
    "regularizers": RegularizerConfig,
    "run": RunSettings,
    "testbed": TestbedConfig,
}
# Each field's section: the flat namespace of the command line.
FIELD_SECTIONS: dict[str, str] = {
    f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
}


def _field_types() -> dict[str, Any]:
    return {
        name: hint
        for cls in SECTIONS.values()
        for name, hint in typing.get_type_hints(cls).items()
        if name in FIELD_SECTIONS
    }


def _check_type(name: str, value: Any) -> None:
    """Refuse a value of the wrong JSON type for field ``name`` (a config file is hand-edited)."""
    hint = _field_types()[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint
    if value is None and optional:
        return
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, base)
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        expected = kind.get(base, base.__name__) + (" or null" if optional else "")
        raise ValueError(
            f"config field {name!r} ({FIELD_SECTIONS[name]}) must be {expected}, got "
            f"{json.dumps(value) if _jsonable(value) else repr(value)}"
        )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class SJCConfig:
    """Every setting of a run, by section; the defaults reproduce the original SJC."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    render: RenderSettings = dataclasses.field(default_factory=RenderSettings)
    camera: CameraConfig = dataclasses.field(default_factory=CameraConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    regularizers: RegularizerConfig = dataclasses.field(default_factory=RegularizerConfig)
    run: RunSettings = dataclasses.field(default_factory=RunSettings)
    testbed: TestbedConfig = dataclasses.field(default_factory=TestbedConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")

    @classmethod
    def flat(cls, **fields: Any) -> SJCConfig:
        """A config from field names alone: ``SJCConfig.flat(steps=600, lr=0.2)``."""
        return cls().replace(**fields)

    def replace(self, **fields: Any) -> SJCConfig:
        """A copy with the given fields (bare names, any section) replaced."""
        unknown = sorted(set(fields) - set(FIELD_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in fields.items():
            by_section.setdefault(FIELD_SECTIONS[name], {})[name] = value
        return dataclasses.replace(
            self,
            **{
                section: dataclasses.replace(getattr(self, section), **values)
                for section, values in by_section.items()
            },
        )

    def to_flat(self) -> dict[str, Any]:
        """``{field: value}`` over every section."""
        return {
            name: getattr(getattr(self, section), name) for name, section in FIELD_SECTIONS.items()
        }

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {field: value}}`` (JSON-serialisable; the run's ``config.json``)."""
        return {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SJCConfig:
        """The inverse of `to_dict`; a flat ``{field: value}`` dict is accepted too.

        Raises:
          ValueError: naming unknown sections or fields, or a field's bad value.
        """
        if not isinstance(values, dict):
            raise ValueError(f"a config must be a JSON object, got {type(values).__name__}")
        if values and all(isinstance(v, dict) for v in values.values()):
            unknown = sorted(set(values) - set(SECTIONS))
            if unknown:
                raise ValueError(f"unknown config sections {unknown}")
            flat: dict[str, Any] = {}
            for section, fields in values.items():
                names = {f.name for f in dataclasses.fields(SECTIONS[section])}
                bad = sorted(set(fields) - names)
                if bad:
                    raise ValueError(f"unknown fields {bad} in config section {section!r}")
                flat.update(fields)
            values = flat
        unknown = sorted(set(values) - set(FIELD_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        for name, value in values.items():
            _check_type(name, value)
        return cls().replace(**values)

    def render_config(self) -> RenderConfig:
        """The renderer's static `RenderConfig` of this config."""
        return self.render.render_config()
