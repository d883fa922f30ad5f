"""What a model kind builds for a run (`Model`) and what a kind is (`ModelKind`).

The registry of kinds (`sjc_jax.models`) imports the kinds (`sjc_jax.testbed`,
`sjc_jax.learned`); the kinds build a `Model`. Both types sit here, below all of them, so no
kind imports the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from sjc_jax.config import SJCConfig
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.grid import VoxelGrid


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """What a run needs from its model kind."""

    denoiser: Denoiser
    # [Hb, Wb, C] a known background the lift starts from (a host array: the run's state is
    # donated to the step, so a device array shared with it would be deleted); None = random.
    background: np.ndarray | None = None
    # grid -> a JSON-serialisable evaluation (final/eval.json); None = no evaluation.
    evaluate: Callable[[VoxelGrid], dict[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """A kind of model: which ``--model`` values it serves and how to build it."""

    name: str
    matches: Callable[[str], bool]
    build: Callable[[SJCConfig], Model]
    # flat overrides -> the kind's preset config (None: the original's defaults)
    preset: Callable[..., SJCConfig] | None = None
    # config -> a floor of the bytes `build` allocates, after refusing (ValueError) what can be
    # refused without building; asked before anything is built or written (None: 0 bytes)
    check: Callable[[SJCConfig], float] | None = None
