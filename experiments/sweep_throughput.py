"""Throughput of N batched testbed lifts against N separate runs, and how step time and memory grow.

    PYTHONPATH=. python experiments/sweep_throughput.py [--lifts 1,4,16] [--steps 30]
        [--out experiments/results/sweep]

Each N runs in its own process (so its peak memory is its own): N testbed lifts of the preset
(duck, seeds 0..N-1, `sjc_jax.testbed.testbed_config`) as one `sweep.make_batched_step`, timed
over ``--steps`` steps after the first (compilation), against one lift's `sjc.make_step` timed
the same way (N separate runs cost N times that, plus a compilation each). Peak memory: the
device's ``peak_bytes_in_use`` where it reports one (GPU), else the process's peak RSS. Writes
``throughput.json`` and ``throughput.md`` (the table in docs/sweeps.md) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _measure(lifts: int, steps: int) -> dict:
    import jax

    from sjc_jax import models, sjc, sweep, testbed

    configs = [testbed.testbed_config(seed=s) for s in range(lifts)]
    start = time.perf_counter()
    built = [models.build_model(c) for c in configs]
    image_sets = time.perf_counter() - start
    params, axes = sweep.stack([m.denoiser.params for m in built])
    state = sweep.init_batched_state(configs, 3, backgrounds=[m.background for m in built])
    mesh = sweep.sweep_mesh(lifts, configs[0].run.views_per_step)
    step = sweep.make_batched_step(configs, built[0].denoiser, axes, mesh=mesh)
    start = time.perf_counter()
    state, _ = step(state, params)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = step(state, params)
    jax.block_until_ready(state)
    batched_ms = 1e3 * (time.perf_counter() - start) / steps

    one = sjc.make_step(configs[0], built[0].denoiser)
    single = sjc.init_state(configs[0], 3, background=built[0].background)
    single, _ = one(single, built[0].denoiser.params)
    jax.block_until_ready(single)
    start = time.perf_counter()
    for _ in range(steps):
        single, _ = one(single, built[0].denoiser.params)
    jax.block_until_ready(single)
    single_ms = 1e3 * (time.perf_counter() - start) / steps

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    memory = (
        {"peak_device_mib": peak / 2**20}
        if peak
        else {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    )
    return {
        "lifts": lifts,
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "image_sets_s": image_sets,
        "compile_s": compile_s,
        "batched_step_ms": batched_ms,
        "single_step_ms": single_ms,
        "batched_lift_steps_per_s": 1e3 * lifts / batched_ms,
        "sequential_lift_steps_per_s": 1e3 / single_ms,
        "speedup": lifts * single_ms / batched_ms,
        **memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lifts", default="1,4,16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="experiments/results/sweep")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child's N
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(_measure(args.one, args.steps)))
        return
    rows = []
    for lifts in (int(n) for n in args.lifts.split(",")):
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(lifts), "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(rows, indent=1) + "\n")
    mem = "peak_device_mib" if "peak_device_mib" in rows[0] else "peak_rss_mib"
    lines = [
        f"| N | batched step (ms) | one lift's step (ms) | lift-steps/s batched | "
        f"sequential | speed-up | compile (s) | {mem.replace('_', ' ')} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lifts']} | {r['batched_step_ms']:.1f} | {r['single_step_ms']:.1f} | "
            f"{r['batched_lift_steps_per_s']:.1f} | {r['sequential_lift_steps_per_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['compile_s']:.1f} | {r[mem]:.0f} |"
        )
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
