"""Time one testbed lift (image set, compilation, steps) and print its held-out PSNR / IoU.

    PYTHONPATH=. python experiments/testbed_timing.py [--scene duck] [--steps N]

The same preset and step as ``make run`` (`sjc_jax.testbed.testbed_config`), without the run's
artifacts, so the figure is the loop's own time on this device.
"""

from __future__ import annotations

import argparse
import time

import jax

from sjc_jax import testbed
from sjc_jax.sjc import init_state, make_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scene", default=None, help="built-in scene or grid file (default: duck)")
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    args = parser.parse_args()
    overrides = {"scene": args.scene} if args.scene else {}
    if args.steps:
        overrides["steps"] = args.steps
    config = testbed.testbed_config(**overrides)

    start = time.perf_counter()
    scene, aabb, _ = testbed.load_scene(config.testbed.scene)
    name = config.testbed.scene or "duck"
    tb = testbed.build_testbed(config, scene, key=jax.random.key(config.run.seed), aabb=aabb)
    jax.block_until_ready(tb.denoiser.params)
    built = time.perf_counter() - start

    step = make_step(config, tb.denoiser)
    state = init_state(config, tb.denoiser.channels, background=tb.background)
    start = time.perf_counter()
    state, _ = step(state, tb.denoiser.params)
    jax.block_until_ready(state)
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(config.run.steps - 1):
        state, _ = step(state, tb.denoiser.params)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    result = testbed.evaluate(state.grid, tb, config)
    per_step = 1e3 * seconds / max(config.run.steps - 1, 1)
    print(
        f"testbed {name} on {jax.devices()[0].device_kind}: image set {built:.1f} s, "
        f"compile {compiled:.1f} s, {config.run.steps - 1} steps {seconds:.2f} s "
        f"({per_step:.2f} ms/step), "
        f"PSNR {result['psnr']:.2f} dB, IoU {result['iou']:.3f}"
    )


if __name__ == "__main__":
    main()
