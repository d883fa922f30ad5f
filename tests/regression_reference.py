"""The reference grids of `test_regression.py`, one set per CPU type.

XLA's CPU code depends on the processor (which kernels, vector widths and fused multiply-adds
it picks), so a float32 lift is bitwise reproducible on one CPU type, not across types: the same
commit on two machines of this project differed by up to 3e-5 after 30 steps. The file
``tests/data/testbed_regression.npz`` therefore holds one set of grids per CPU type, keyed by
`cpu_type()`, each made by the step as it was before the research choices became values
(commit 582412f). The test is bitwise where the file has this CPU's set and within a float32
bound of every set elsewhere.

To add this machine's set (the old code has a flat config, hence a checkout of it)::

    git worktree add /tmp/old 582412f
    cd /tmp/old && PYTHONPATH=. python /path/to/repo/tests/regression_reference.py \\
        /path/to/repo/tests/data/testbed_regression.npz
"""

import hashlib
import platform
import re
import sys
from pathlib import Path

import numpy as np

SMALL = dict(
    steps=30, grid_resolution=16, image_size=16, testbed_views=64, views_per_step=2, seed=3
)
VARIANTS = {
    "default": {},
    "annealed": dict(sigma_schedule="annealed"),
    "eq15_n2_sigma2": dict(var_red=False, noise_samples=2, score_scale="sigma2"),
    "center": dict(center_depth_weight=10.0, emptiness_multiplier=3.0, emptiness_step=0.5),
    "noaug": dict(view_augmentation=False),
}
FIELDS = ("density", "features", "density_scale")
_ISA = re.compile(r"^(avx|amx|fma|sse|ssse|f16c|bmi|popcnt|lzcnt|neon|asimd|sve)")


def cpu_type() -> str:
    """A short name for what XLA's CPU code depends on: architecture, vector extensions, jaxlib."""
    import jaxlib

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(f for f in line.split(":", 1)[1].split() if _ISA.match(f))
    except OSError:
        pass
    text = " ".join([platform.machine(), jaxlib.__version__, *sorted(flags)])
    return "cpu-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def load(path) -> dict[str, dict[str, np.ndarray]]:
    """``{cpu_type: {"variant/field": grid}}`` from the reference file."""
    sets: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            cpu, rest = key.split("/", 1)
            sets.setdefault(cpu, {})[rest] = data[key]
    return sets


def _lift_with_old_code(name):
    """The grid of one variant made by a checkout of 582412f (flat config)."""
    import jax

    from sjc_jax import testbed

    config = testbed.testbed_config(**SMALL, **VARIANTS[name])
    ground_truth, aabb, _ = testbed.load_scene("duck")
    bed = testbed.build_testbed(config, ground_truth, key=jax.random.key(config.seed), aabb=aabb)
    return jax.device_get(testbed.lift(config, bed).grid)


def main(path):
    path = Path(path)
    sets = load(path) if path.exists() else {}
    cpu = cpu_type()
    grids = {}
    for name in VARIANTS:
        grid = _lift_with_old_code(name)
        grids.update({f"{name}/{f}": np.asarray(getattr(grid, f)) for f in FIELDS})
        print(f"{cpu} {name}", flush=True)
    sets[cpu] = grids
    flat = {f"{c}/{k}": v for c, grids in sets.items() for k, v in grids.items()}
    np.savez_compressed(path, **flat)
    print(f"{path}: sets {sorted(sets)}")


if __name__ == "__main__":
    main(sys.argv[1])
