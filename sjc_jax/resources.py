"""Memory of a run, estimated before anything is allocated or compiled, against the device's.

A run holds its train state (the grid and the optimiser's moments: `jax.eval_shape` of
`sjc.init_state` gives it exactly, without allocating) and, inside one step, the grid's gradient
and update plus the renderer's residuals for the VJP. The step's part was fitted to XLA's
``compiled.memory_analysis()`` of testbed steps on the CPU (grids 16^3-96^3, 8-32 px, 1-4 views):
temporaries ~ 2 x grid + ~100 bytes x (1 + C) per ray sample, samples = views x pixels x the
static per-ray budget (`render.sample_budget`). The model's own parameters are already resident
when this is asked (they count in the available memory), its activations are not counted: the
estimate is a floor, so it refuses only what cannot fit.

Available memory: an accelerator's ``memory_stats()`` (limit - in use); on the CPU, Linux's
``MemAvailable`` bounded by the cgroup's limit. Unknown (another OS, a backend without stats):
no check.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sjc_jax.config import SJCConfig
from sjc_jax.estimators import ESTIMATORS
from sjc_jax.render import sample_budget

# Bytes of step temporaries per ray sample and per (1 + C) field values (fitted, see above).
_BYTES_PER_SAMPLE_VALUE = 100
# Gradient and update of the grid inside the step.
_GRID_COPIES_IN_STEP = 2
# Image-sized arrays per noise draw inside the estimator: z, the noise and the denoised image,
# for both halves of classifier-free guidance.
_NOISE_COPIES = 6


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of ``tree`` (arrays or `jax.ShapeDtypeStruct`; keys as data)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            continue
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            total += 8 * int(np.prod(leaf.shape))  # threefry key data: 2 x uint32
        else:
            total += int(np.prod(leaf.shape)) * np.dtype(dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs on one device."""

    state: int  # the train state: grid, optimiser moments, key, estimator state
    step: int | float  # one step's temporaries: grid gradient and update, render residuals,
    # the estimator's noisy copies (inf: a sample count past any integer, e.g. a tiny step_ratio)
    build: int | float = 0  # what the model kind allocates to build the model (the testbed's
    # image set), when asked before it is built

    @property
    def total(self) -> int | float:
        return self.state + self.step + self.build


def estimate(
    config: SJCConfig, state_shapes: Any, *, channels: int, image_size: int, devices: int = 1
) -> MemoryEstimate:
    """The memory of ``config``'s run on one of ``devices`` (the views are split over them).

    Args:
      config: grid resolution, views per step and the renderer's sample budget are read.
      state_shapes: the train state or its `jax.eval_shape` (`jax.ShapeDtypeStruct` leaves).
      channels: C of the grid's features.
      image_size: the rendered H = W.
      devices: devices sharing the views of a step (each holds the whole state).
    """
    if devices < 1:
        raise ValueError(f"devices must be positive, got {devices}")
    resolution = config.render.grid_resolution
    grid = resolution**3 * (1 + channels) * 4
    views = -(-config.run.views_per_step // devices)
    try:
        budget = sample_budget(config.render_config(), resolution)
    except (OverflowError, ZeroDivisionError):  # a step_ratio so small the count is not finite
        budget = math.inf
    samples = views * image_size**2 * budget
    step = _GRID_COPIES_IN_STEP * grid + _BYTES_PER_SAMPLE_VALUE * (1 + channels) * samples
    score = config.score
    if "noise_samples" in ESTIMATORS[score.estimator].fields.values():
        step += _NOISE_COPIES * score.noise_samples * views * image_size**2 * channels * 4
    return MemoryEstimate(state=tree_bytes(state_shapes), step=step)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _host_available() -> int | None:
    """Linux: MemAvailable, bounded by the cgroup (v2 or v1) limit minus its usage."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    cgroups = (
        (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
        (
            Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            Path("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ),
    )
    for limit_path, usage_path in cgroups:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 1 << 60:
            left = max(limit - usage, 0)
            available = left if available is None else min(available, left)
            break
    return available


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Free memory of ``device`` (default: the first one) in bytes, or None if unknown."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return _host_available()
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (backends without stats raise various errors)
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _gib(n: int | float) -> str:
    if not math.isfinite(n):
        return "more than any memory"
    if n >= 2**50:
        return f"{n / 2**40:.3g} TiB"
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def check_fits(
    needed: MemoryEstimate, *, available: int | None, resolution: int, where: str
) -> None:
    """Raise ValueError (one line, naming the flags to lower) if ``needed`` exceeds ``available``.

    ``available=None`` (unknown) passes.
    """
    if available is None or needed.total <= available:
        return
    build = f", {_gib(needed.build)} to build the model" if needed.build else ""
    raise ValueError(
        f"the run needs at least {_gib(needed.total)} on the {where} ({_gib(needed.state)} of "
        f"grid and optimiser state at --grid-resolution {resolution}, {_gib(needed.step)} for "
        f"one step{build}) but {_gib(available)} is available; lower --grid-resolution, "
        "--image-size, --views-per-step, --noise-samples, or raise --step-ratio"
        + (" or lower --testbed-views" if needed.build else "")
    )


def where(device: jax.Device) -> str:
    """How `check_fits` names ``device``'s memory."""
    return f"{device.platform} device" if device.platform != "cpu" else "host"


def check_before_build(configs: Sequence[SJCConfig]) -> None:
    """Refuse in one line, before any model is built or anything written, what cannot fit.

    The lifts of ``configs`` (one for a run; a sweep's, all held at once) at the floors known
    before the model exists: 3 feature channels, the config's image size (8 if the model's),
    and each model kind's own `ModelKind.check` (which also refuses a bad scene). `check_fits`
    repeats the check with the model's sizes once it is built.

    Raises:
      ValueError: one line naming the flags to lower, or the kind's refusal.
    """
    from sjc_jax import models
    from sjc_jax.sjc import init_state

    build = sum(models.check(config) for config in configs)
    first = configs[0]
    shapes = jax.eval_shape(lambda: init_state(first, 3))
    one = estimate(first, shapes, channels=3, image_size=first.render.image_size or 8)
    needed = MemoryEstimate(
        state=len(configs) * one.state, step=len(configs) * one.step, build=build
    )
    device = jax.devices()[0]
    check_fits(
        needed,
        available=available_bytes(device),
        resolution=first.render.grid_resolution,
        where=where(device),
    )


__all__ = [
    "MemoryEstimate",
    "available_bytes",
    "check_before_build",
    "check_fits",
    "estimate",
    "tree_bytes",
    "where",
]
