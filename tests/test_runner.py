"""The run loop end to end: artifacts, resume equivalence (also after SIGKILL), NaN handling."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as imageio
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from sjc_jax import runner
from sjc_jax.grid_io import load_grid_file
from sjc_jax.sjc import SJCConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(model, **kw):
    base = dict(
        model=str(model),
        prompt="a hamburger",
        steps=6,
        grid_resolution=8,
        background_resolution=2,
        num_previews=3,
        checkpoint_every=2,
        video_frames=4,
        log_every=2,
        emptiness_weight=10.0,
    )
    return SJCConfig.flat(**{**base, **kw})


def test_end_to_end_artifacts(tiny_sd_eps, tmp_path):
    out = tmp_path / "run"
    summary = runner.run(tiny_config(tiny_sd_eps), out, progress=False)
    assert summary["steps"] == 6
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["prompt"] == "a hamburger" and saved["run"]["steps"] == 6
    assert runner.config_from_dict(saved) == tiny_config(tiny_sd_eps)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))
    assert all(np.isfinite(x["score_norm"]) and x["finite"] for x in lines)
    assert len(list((out / "previews").glob("*.png"))) == 3
    final = out / "final"
    grid, aabb, space = load_grid_file(final / "grid.npz")
    assert space == "sd-latent" and grid.features.shape == (8, 8, 8, 4)
    np.testing.assert_array_equal(aabb, [[-1, -1, -1], [1, 1, 1]])
    frames = imageio.imread(final / "turntable.mp4", index=None)
    assert frames.shape[0] == 4 and frames.ndim == 4
    assert imageio.imread(final / "depth.mp4", index=None).shape[0] == 4
    mesh = trimesh.load(final / "mesh.ply")
    assert isinstance(mesh, trimesh.Trimesh | trimesh.PointCloud | trimesh.Scene)
    for name in ("mesh.glb", "mesh.obj", "mesh.mtl", "mesh_texture.png"):
        assert (final / name).is_file(), name
    assert imageio.imread(final / "metrics.png").ndim == 3
    assert (out / "checkpoints" / "step_00000006").is_dir()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in events.Scalars("score_norm")] == list(range(1, 7))
    assert len(events.Images("preview")) == 3
    # An SD run has no eval.json: TensorBoard gets the mesh's record, and the config.
    info = json.loads((final / "mesh.json").read_text())
    assert [e.value for e in events.Scalars("eval/mesh/faces")] == [info["faces"]]
    assert (out / "tensorboard" / "hparams").is_dir()
    for picture in [final / "view.png", *(out / "previews").glob("*.png")]:
        assert imageio.imread(picture).shape[0] >= 256, picture


RESUME_ARGS = dict(steps=40, checkpoint_every=5, video_frames=2, num_previews=2, log_every=1)


@pytest.fixture(scope="module")
def reference_grid(tiny_sd_eps, tmp_path_factory):
    """The final grid of an uninterrupted run (shared by the resume tests)."""
    out = tmp_path_factory.mktemp("reference")
    runner.run(tiny_config(tiny_sd_eps, **RESUME_ARGS), out, progress=False)
    return load_grid_file(out / "final" / "grid.npz")[0]


def assert_same_grid(a, b):
    for f in ("density", "features", "background", "density_scale"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def test_resume_gives_the_same_grid(tiny_sd_eps, reference_grid, tmp_path):
    config = tiny_config(tiny_sd_eps, **RESUME_ARGS)
    partial = tmp_path / "partial"
    summary = runner.run(config, partial, progress=False, stop_after=12)  # checkpoints 5, 10, 12
    assert summary["steps"] == 12
    with pytest.raises(runner.RunError, match="--resume"):
        runner.run(config, partial, progress=False)
    runner.run(None, partial, resume=True, progress=False)
    assert_same_grid(reference_grid, load_grid_file(partial / "final" / "grid.npz")[0])
    steps = [json.loads(x)["step"] for x in (partial / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


@pytest.mark.slow  # make test has SIGKILL + resume in tests/test_faults.py's fast chain
def test_sigkill_then_resume_matches(tiny_sd_eps, reference_grid, tmp_path):
    """Kill the command-line run with SIGKILL after a checkpoint, resume, compare."""
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sjc_jax", "run", "--out", str(killed), "--no-progress"]
    flags = {
        **RESUME_ARGS,
        "model": str(tiny_sd_eps),
        "prompt": "a hamburger",
        "grid_resolution": 8,
        "background_resolution": 2,
        "emptiness_weight": 10.0,
    }
    for k, v in flags.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000010").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    runner.run(None, killed, resume=True, progress=False)
    assert_same_grid(reference_grid, load_grid_file(killed / "final" / "grid.npz")[0])


def test_non_finite_grid_stops_and_keeps_last_checkpoint(tiny_sd_eps, tmp_path):
    from sjc_jax.diffusion.stable_diffusion import load_stable_diffusion
    from sjc_jax.models import Model

    def poisoned(config):
        den = load_stable_diffusion(config.model.model, prompt=config.model.prompt)
        apply = den.apply

        def bad_apply(params, z, sigma, label):
            # NaN from the 4th call of the step on (the step count rides in params).
            return jnp.where(params["poison"] > 0, jnp.nan, apply(params, z, sigma, label))

        params = {**den.params, "poison": jnp.float32(0.0)}
        return Model(den.__class__(**{**den.__dict__, "apply": bad_apply, "params": params}))

    config = tiny_config(tiny_sd_eps, steps=4, checkpoint_every=2)
    out = tmp_path / "nan"
    runner.run(config, out, progress=False, model=poisoned(config), stop_after=2)
    den = poisoned(config).denoiser
    params = {**den.params, "poison": jnp.float32(1.0)}
    poisoned_now = Model(den.__class__(**{**den.__dict__, "params": params}))
    with pytest.raises(runner.NonFiniteError, match="step 3"):
        runner.run(None, out, resume=True, progress=False, model=poisoned_now)
    from sjc_jax.checkpoint import latest_step

    assert latest_step(out / "checkpoints") == 2


def test_unwritable_output_is_refused_before_the_model_is_built(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")

    class Untouched:
        def __getattr__(self, name):
            raise AssertionError("the model was used before the output was checked")

    config = SJCConfig.flat(steps=2)
    with pytest.raises(runner.RunError, match="cannot write to output directory"):
        runner.run(config, blocker / "run", progress=False, model=Untouched())


def test_custom_estimator_script_runs_through_the_run_loop(tmp_path):
    """experiments/custom_estimator.py's estimator, passed as a value to runner.run."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from custom_estimator import sds_sqrt_weight

    from sjc_jax import testbed

    config = testbed.testbed_config(
        steps=4, grid_resolution=8, image_size=8, testbed_views=8, testbed_eval_views=2,
        video_frames=2, num_previews=1, views_per_step=2, checkpoint_every=2, log_every=2,
    )  # fmt: skip
    out = tmp_path / "custom"
    summary = runner.run(config, out, estimator=sds_sqrt_weight, progress=False, stop_after=2)
    assert summary["steps"] == 2
    summary = runner.run(None, out, resume=True, estimator=sds_sqrt_weight, progress=False)
    assert np.isfinite(summary["eval"]["psnr"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(0 < x["weight"] < 1 for x in lines)


def test_run_loop_serves_a_stop_request_between_steps():
    """The request is served after the step in flight: metrics flushed up to it, one save of
    the step's (not yet donated) output, then `Interrupted`; never a second save."""
    from typing import NamedTuple

    import jax

    class State(NamedTuple):
        step: jax.Array

    step_fn = jax.jit(lambda s, p: (State(s.step + 1), {"value": s.step + 1.0}), donate_argnums=0)
    saved, records, requested = [], [], []

    def save(state):
        saved.append(int(np.asarray(state.step)))  # fails on a donated (deleted) state

    def should_stop():
        return bool(requested)  # set by the hook after step 7, as a signal handler would

    with pytest.raises(runner.Interrupted, match="interrupted at step 7"):
        runner.run_loop(
            step_fn,
            State(jnp.int32(0)),
            None,
            end=20,
            log_every=100,
            checkpoint_every=4,
            save=save,
            on_metrics=records.extend,
            hooks=[runner.Hook(7, lambda s: requested.append(int(np.asarray(s.step))))],
            should_stop=should_stop,
        )
    assert saved == [4, 7]  # the regular checkpoint, then the one of the request
    assert [r["step"] for r in records] == list(range(1, 8))
    assert requested == [7]
