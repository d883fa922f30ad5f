"""Batched lifts (`sjc_jax.sweep`) and sweeps on disk (`sjc_jax.sweep_run`, ``sjc_jax sweep``).

Equal to separate runs to float32 round-off, not bitwise: vmap batches the renderer's
contractions, whose sums XLA's CPU kernels then order differently (one render differs by ~6e-8),
and the lift amplifies that to ~1e-5 in 10-20 steps. A wrong pairing of lift and run, or any
real change of a setting, moves the grid by 1e-2 or more, so the bound below still tells them
apart. Runs of one program on one machine (a sweep and its resume) are bitwise.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sjc_jax import models, sjc, sweep, sweep_run, testbed

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(grid_resolution=16, image_size=16, testbed_views=64, views_per_step=2)
# measured max |batch - separate| over these lifts: 1.2e-4 after 20 steps (a mug lift whose
# guidance and emptiness weight are traced), 1e-5 for seeds alone
ROUND_OFF = 3e-4
FIELDS = ("density", "features", "density_scale")
CLI_TINY = [
    "--steps", "12", "--grid-resolution", "16", "--image-size", "16", "--testbed-views", "64",
    "--views-per-step", "2", "--video-frames", "4", "--num-previews", "2",
    "--checkpoint-every", "4", "--no-progress",
]  # fmt: skip


def _max_diff(a, b) -> float:
    return max(
        float(np.abs(np.asarray(getattr(a, f)) - np.asarray(getattr(b, f))).max()) for f in FIELDS
    )


def _separate(config, model):
    state = sjc.init_state(config, model.denoiser.channels, background=model.background)
    step = sjc.make_step(config, model.denoiser)
    for _ in range(config.run.steps):
        state, _ = step(state, model.denoiser.params)
    return jax.device_get(state.grid)


def test_a_batch_of_lifts_equals_separate_runs():
    settings = [
        dict(seed=0),
        dict(seed=1, lr=0.1),
        dict(seed=2, scene="mug", emptiness_weight=100.0, guidance_scale=50.0, t_max=60),
    ]
    configs = [testbed.testbed_config(steps=10, **TINY, **s) for s in settings]
    built = [models.build_model(c) for c in configs]
    assert sweep.varying_fields(configs) == ("lr", "guidance_scale", "emptiness_weight", "t_max")
    params, axes = sweep.stack([m.denoiser.params for m in built])
    assert axes["valid"] is None and axes["images"] == 0  # shared leaves stay unstacked
    state = sweep.init_batched_state(configs, 3, backgrounds=[m.background for m in built])
    step = sweep.make_batched_step(configs, built[0].denoiser, axes)
    for _ in range(10):
        state, metrics = step(state, params)
    assert metrics["sigma"].shape == (3,)
    separate = [_separate(c, m) for c, m in zip(configs, built, strict=True)]
    for i in range(3):
        mine = sweep.unstack(state.grid, i)
        assert _max_diff(mine, separate[i]) < ROUND_OFF, settings[i]
        others = [_max_diff(mine, separate[j]) for j in range(3) if j != i]
        assert min(others) > 30 * ROUND_OFF  # the bound tells lifts apart


def test_a_batch_refuses_static_differences_in_one_line():
    a, b = testbed.testbed_config(**TINY), testbed.testbed_config(**{**TINY, "views_per_step": 4})
    with pytest.raises(ValueError, match=r"must share \['views_per_step'\]"):
        sweep.varying_fields([a, b])
    fixed = dict(sigma_schedule="fixed")
    with pytest.raises(ValueError, match="t_max"):
        sweep.varying_fields(
            [testbed.testbed_config(**fixed), testbed.testbed_config(**fixed, t_max=50)]
        )


def test_stack_shares_equal_leaves_and_refuses_other_shapes():
    same = np.ones(3)
    stacked, axes = sweep.stack([{"a": same, "b": np.zeros(2)}, {"a": same, "b": np.ones(2)}])
    assert axes == {"a": None, "b": 0} and stacked["b"].shape == (2, 2)
    with pytest.raises(ValueError, match="shape"):
        sweep.stack([{"b": np.zeros(2)}, {"b": np.zeros(3)}])


def test_expand_is_a_grid_product_with_readable_names():
    lifts = sweep_run.expand(
        testbed.testbed_config(), seeds=[0, 1], scenes=["duck", "mug"], sets={"lr": [0.1, 0.2]}
    )
    assert len(lifts) == 8
    name, settings, config = lifts[-1]
    assert name == "007-seed1-mug-lr0.2"
    assert settings == {"seed": 1, "scene": "mug", "lr": 0.2}
    assert (config.run.seed, config.testbed.scene, config.optimizer.lr) == (1, "mug", 0.2)


def test_sweep_mesh_splits_lifts_then_views():
    devices = [jax.devices()[0]] * 8
    assert sweep.sweep_mesh(4, 2, devices).shape == {"lifts": 4, "views": 2}
    assert sweep.sweep_mesh(3, 8, devices).shape == {"lifts": 1, "views": 8}
    assert sweep.sweep_mesh(3, 4, devices).shape == {"lifts": 1, "views": 4}
    assert sweep.sweep_mesh(16, 2, devices).shape == {"lifts": 8, "views": 1}
    assert sweep.sweep_mesh(4, 2, devices[:1]) is None


def _cli(*args, env=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SJC_JAX_COMPILE_CACHE": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sjc_jax", *args], env=env, capture_output=True, text=True,
        **kwargs,
    )  # fmt: skip


def _grids(out: Path) -> dict[str, dict[str, np.ndarray]]:
    rows = json.loads((out / "sweep.json").read_text())["lifts"]
    grids = {}
    for row in rows:
        with np.load(Path(row["dir"]) / "final" / "grid.npz") as data:
            grids[row["lift"]] = {f: data[f] for f in FIELDS}
    return grids


@pytest.fixture(scope="module")
def one_device_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "one"
    done = _cli("sweep", "--out", str(out), "--seeds", "0-1", "--set", "lr=0.1,0.2", *CLI_TINY)
    assert done.returncode == 0, done.stderr
    return out


def test_sweep_writes_run_directories_summary_and_report(one_device_sweep):
    out = one_device_sweep
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["lift"] for r in summary["lifts"]] == [
        "000-seed0-lr0.1", "001-seed0-lr0.2", "002-seed1-lr0.1", "003-seed1-lr0.2",
    ]  # fmt: skip
    for row in summary["lifts"]:
        lift = Path(row["dir"])
        assert lift.parent == out
        config = json.loads((lift / "config.json").read_text())
        assert config["run"]["seed"] == row["settings"]["seed"]
        assert config["optimizer"]["lr"] == row["settings"]["lr"]
        steps = [json.loads(line)["step"] for line in (lift / "metrics.jsonl").open()]
        assert steps == list(range(1, 13))
        for name in ("grid.npz", "view.png", "turntable.mp4", "eval.json", "index.html"):
            assert (lift / "final" / name).is_file(), name
        assert set(row["eval"]) >= {"psnr", "iou"} and "opacity" in row["metrics"]
        assert len(list((lift / "previews").glob("*.png"))) == 2
    assert "000-seed0-lr0.1/final/index.html" in (out / "report.html").read_text()


def test_sweep_on_eight_devices_gives_the_grids_of_one(one_device_sweep, tmp_path):
    out = tmp_path / "eight"
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    args = ("sweep", "--out", str(out), "--seeds", "0-1", "--set", "lr=0.1,0.2", *CLI_TINY)
    done = _cli(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert "mesh {'lifts': 4, 'views': 2}" in done.stderr
    one, eight = _grids(one_device_sweep), _grids(out)
    assert one.keys() == eight.keys()
    for name in one:
        for field in FIELDS:
            np.testing.assert_allclose(eight[name][field], one[name][field], atol=ROUND_OFF)


@pytest.mark.slow  # about 35-45 s: make test-slow
def test_a_sweep_over_two_processes_gives_the_grids_of_one(one_device_sweep, tmp_path):
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SJC_JAX_COMPILE_CACHE": "0"}
    args = ["sweep", "--out", str(out), "--seeds", "0-1", "--set", "lr=0.1,0.2", *CLI_TINY]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sjc_jax",
                *args,
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = [child.communicate(timeout=600) for child in children]
    for child, (_, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
    assert "in 2 processes" in results[0][1]
    one, two = _grids(one_device_sweep), _grids(out)
    assert one.keys() == two.keys()
    for name in one:
        for field in FIELDS:
            np.testing.assert_allclose(two[name][field], one[name][field], atol=ROUND_OFF)
    rows = json.loads((out / "sweep.json").read_text())["lifts"]
    first = json.loads((one_device_sweep / "sweep.json").read_text())["lifts"]
    assert [r["settings"] for r in rows] == [r["settings"] for r in first]
    assert all(r["eval"] is not None and Path(r["dir"]).parent == out for r in rows)
    # each process wrote its own lifts' directories, all complete
    for row in rows:
        steps = [json.loads(line)["step"] for line in (Path(row["dir"]) / "metrics.jsonl").open()]
        assert steps == list(range(1, 13))


def test_a_sweep_killed_by_sigkill_resumes_to_the_same_grids(one_device_sweep, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SJC_JAX_COMPILE_CACHE": "0"}
    args = ["sweep", "--out", str(out), "--seeds", "0-1", "--set", "lr=0.1,0.2", *CLI_TINY]
    args[args.index("--steps") + 1] = "12"
    child = subprocess.Popen(
        [sys.executable, "-m", "sjc_jax", *args], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step_00000004").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out / "sweep.json").exists()  # killed before the end
    done = _cli("sweep", "--resume", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    resumed, whole = _grids(out), _grids(one_device_sweep)
    for name in whole:
        for field in FIELDS:
            np.testing.assert_array_equal(resumed[name][field], whole[name][field])
        steps = [json.loads(line)["step"] for line in (out / name / "metrics.jsonl").open()]
        assert steps == list(range(1, 13))


def test_sweep_errors_are_one_line(tmp_path):
    done = _cli("sweep", "--out", str(tmp_path / "a"), "--set", "views_per_step=2,4")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "must share ['views_per_step']" in done.stderr
    done = _cli("sweep", "--resume", str(tmp_path / "none"))
    assert done.returncode == 2 and "nothing to resume" in done.stderr
    done = _cli("sweep", "--out", str(tmp_path / "b"), "--seeds", "3-1")
    assert done.returncode == 2 and "--seeds" in done.stderr
    done = _cli("sweep", "--out", str(tmp_path / "c"), "--set", "lr")
    assert done.returncode == 2 and "FIELD=V1,V2" in done.stderr


@pytest.mark.slow  # about 35-45 s: make test-slow
def test_a_sweep_of_prompts_with_a_diffusers_model_equals_separate_runs(tiny_sd_eps, tmp_path):
    from sjc_jax import runner
    from sjc_jax.config import SJCConfig
    from sjc_jax.grid_io import load_grid_file

    base = SJCConfig.flat(
        model=str(tiny_sd_eps), prompt="a cat", steps=4, grid_resolution=8,
        background_resolution=2, num_previews=2, checkpoint_every=4, video_frames=2,
        emptiness_weight=10.0,
    )  # fmt: skip
    lifts = sweep_run.expand(base, prompts=["a cat", "a red hamburger"])
    assert [n for n, _, _ in lifts] == ["000-a_cat", "001-a_red_hamburger"]
    sweep_run.run_sweep(lifts, tmp_path / "sweep", progress=False)
    for name, _, config in lifts:
        runner.run(config, tmp_path / name, progress=False)
        mine, _, _ = load_grid_file(tmp_path / "sweep" / name / "final" / "grid.npz")
        alone, _, _ = load_grid_file(tmp_path / name / "final" / "grid.npz")
        assert _max_diff(mine, alone) < ROUND_OFF, name
    first, _, _ = load_grid_file(tmp_path / "sweep" / lifts[0][0] / "final" / "grid.npz")
    second, _, _ = load_grid_file(tmp_path / "sweep" / lifts[1][0] / "final" / "grid.npz")
    assert _max_diff(first, second) > 30 * ROUND_OFF  # the prompts differ, so do the lifts


def test_a_sweep_takes_research_choices_as_values(tmp_path):
    """``run_sweep(..., estimator=...)`` as ``runner.run`` takes it: every lift steps with it."""
    from sjc_jax import estimators

    sds = estimators.sds(guidance_scale=1.0, weighting_name="uniform")

    def tagged(key, denoiser, params, images, sigma, labels):
        cotangent, metrics = sds(key, denoiser, params, images, sigma, labels)
        return cotangent, {**metrics, "tagged": jax.numpy.float32(7.0)}

    base = testbed.testbed_config(
        **{**TINY, "testbed_views": 8}, steps=2, video_frames=2, num_previews=1,
        testbed_eval_views=1, checkpoint_every=2,
    )  # fmt: skip
    lifts = sweep_run.expand(base, seeds=[0, 1])
    sweep_run.run_sweep(lifts, tmp_path / "s", progress=False, estimator=tagged)
    for name, _, _ in lifts:
        rows = [json.loads(line) for line in (tmp_path / "s" / name / "metrics.jsonl").open()]
        assert [r["tagged"] for r in rows] == [7.0, 7.0], name
