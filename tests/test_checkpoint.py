"""Tests of sjc_jax.checkpoint: bit-exact round trips, pruning, leftovers, SIGKILL safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sjc_jax.checkpoint import (
    all_steps,
    latest_step,
    restore_checkpoint,
    save_checkpoint,
    step_directory,
)
from sjc_jax.grid import VoxelGrid, init_grid

# Subprocesses (ffmpeg, the killed child) are fork+exec; JAX's at-fork warning does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
REPO = Path(__file__).resolve().parents[1]


def _optimizer(grid: VoxelGrid) -> optax.GradientTransformation:
    labels = VoxelGrid(
        density="grid", features="grid", background="background", density_scale="grid"
    )
    del grid
    return optax.multi_transform(
        {"grid": optax.adamax(1e-2), "background": optax.adamax(1e-4)}, labels
    )


def _train_state(seed: int) -> dict:
    """A state shaped like the SJC TrainState, with non-trivial optimiser moments."""
    key_grid, key_grads, key_run = jax.random.split(jax.random.key(seed), 3)
    grid = init_grid(key_grid, resolution=(4, 5, 6), channels=4, background_resolution=3)
    tx = _optimizer(grid)
    opt_state = tx.init(grid)
    leaves, treedef = jax.tree.flatten(grid)
    keys = jax.random.split(key_grads, len(leaves))
    grads = jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    updates, opt_state = tx.update(grads, opt_state, grid)
    grid = optax.apply_updates(grid, updates)
    return {
        "step": jnp.int32(seed),
        "grid": grid,
        "opt_state": opt_state,
        "key": jax.random.key_data(key_run),
        "odd": {
            "bf16": jnp.arange(5, dtype=jnp.bfloat16) / 3,
            "specials": jnp.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], jnp.float32),
            "host": np.arange(6, dtype=np.int16).reshape(2, 3),
            "host_scalar": np.float64(seed) / 3,
        },
    }


def _assert_bitwise_equal(expected, actual) -> None:
    assert jax.tree.structure(expected) == jax.tree.structure(actual)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(actual), strict=True):
        assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array))
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_round_trip_is_bitwise(tmp_path):
    state = _train_state(7)
    path = save_checkpoint(tmp_path / "ckpt", 7, state)
    assert path == step_directory(tmp_path / "ckpt", 7) and path.name == "step_00000007"
    target = _train_state(1)  # same structure, different values
    restored = restore_checkpoint(tmp_path / "ckpt", target)
    _assert_bitwise_equal(state, restored)
    assert isinstance(restored["grid"], VoxelGrid)
    assert isinstance(restored["odd"]["host"], np.ndarray)
    assert isinstance(restored["odd"]["host_scalar"], np.float64)
    # The restored optimiser state keeps working with the optimiser.
    tx = _optimizer(restored["grid"])
    grads = jax.tree.map(jnp.ones_like, restored["grid"])
    expected, _ = tx.update(grads, state["opt_state"], state["grid"])
    actual, _ = tx.update(grads, restored["opt_state"], restored["grid"])
    _assert_bitwise_equal(expected, actual)


def test_typed_key_round_trip(tmp_path):
    key = jax.random.key(3, impl="threefry2x32")
    save_checkpoint(tmp_path, 0, {"key": key, "x": jnp.zeros(2)})
    restored = restore_checkpoint(tmp_path, {"key": jax.random.key(0), "x": jnp.ones(2)})
    assert jax.dtypes.issubdtype(restored["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(key))
    np.testing.assert_array_equal(
        jax.random.normal(restored["key"], (4,)), jax.random.normal(key, (4,))
    )


def test_latest_step_and_explicit_step(tmp_path):
    assert latest_step(tmp_path / "missing") is None
    assert all_steps(tmp_path / "missing") == []
    for step in (0, 5, 12):
        save_checkpoint(tmp_path, step, {"x": jnp.full((3,), step, jnp.float32)}, keep=None)
    assert latest_step(tmp_path) == 12
    assert all_steps(tmp_path) == [0, 5, 12]
    target = {"x": jnp.zeros((3,), jnp.float32)}
    np.testing.assert_array_equal(restore_checkpoint(tmp_path, target)["x"], 12.0)
    np.testing.assert_array_equal(restore_checkpoint(tmp_path, target, step=5)["x"], 5.0)
    with pytest.raises(ValueError, match="step 6"):
        restore_checkpoint(tmp_path, target, step=6)


def test_latest_step_ignores_leftover_temporary_directories(tmp_path):
    save_checkpoint(tmp_path, 3, {"x": jnp.arange(3.0)})
    # An interrupted orbax save (its temporary name), a half-deleted checkpoint, and a bare
    # directory with a step name but no orbax metadata.
    leftover = tmp_path / "step_00000009.orbax-checkpoint-tmp-1712345678"
    (leftover / "d").mkdir(parents=True)
    (leftover / "_CHECKPOINT_METADATA").write_text("{}")
    deleting = tmp_path / "step_00000001.deleting-123"
    deleting.mkdir()
    (tmp_path / "step_00000011").mkdir()
    assert latest_step(tmp_path) == 3
    restored = restore_checkpoint(tmp_path, {"x": jnp.zeros(3)})
    np.testing.assert_array_equal(restored["x"], np.arange(3.0))
    # The next save clears the leftovers of interrupted saves and deletions.
    save_checkpoint(tmp_path, 4, {"x": jnp.arange(3.0) + 1})
    assert not leftover.exists() and not deleting.exists()
    assert latest_step(tmp_path) == 4


def test_keep_prunes_oldest(tmp_path):
    for step in range(5):
        save_checkpoint(tmp_path, step, {"x": jnp.full((2,), step)}, keep=2)
    assert all_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_errors_name_the_bad_argument(tmp_path):
    state = {"x": jnp.zeros((2, 3), jnp.float32), "n": jnp.int32(0)}
    with pytest.raises(ValueError, match="directory"):
        restore_checkpoint(tmp_path, state)
    save_checkpoint(tmp_path, 1, state)
    with pytest.raises(ValueError, match="step 1 already"):
        save_checkpoint(tmp_path, 1, state)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, state)
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 2, state, keep=0)
    with pytest.raises(ValueError, match="state"):
        save_checkpoint(tmp_path, 2, {"x": "not an array"})
    with pytest.raises(ValueError, match="shape"):
        restore_checkpoint(tmp_path, {"x": jnp.zeros((3, 2)), "n": jnp.int32(0)})
    with pytest.raises(ValueError, match="dtype"):
        restore_checkpoint(tmp_path, {"x": jnp.zeros((2, 3), jnp.bfloat16), "n": jnp.int32(0)})
    with pytest.raises(ValueError, match="target_state"):
        restore_checkpoint(tmp_path, {"x": jnp.zeros((2, 3))})
    with pytest.raises(ValueError, match="target_state"):
        restore_checkpoint(tmp_path, {"y": jnp.zeros((2, 3)), "n": jnp.int32(0)})


_CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from sjc_jax.checkpoint import latest_step, save_checkpoint

    directory = sys.argv[1]
    start = (latest_step(directory) or 0) + 1
    for step in range(start, start + 100000):
        # 8 MiB per checkpoint, so that a kill often lands inside a save.
        state = {"x": np.full((1 << 21,), step, np.float32), "step": np.int32(step)}
        save_checkpoint(directory, step, state, keep=2)
        print(step, flush=True)
    """
)


def test_sigkill_during_saves_leaves_a_restorable_checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    target = {"x": np.zeros((1 << 21,), np.float32), "step": np.int32(0)}
    last_reported = 0
    interrupted = 0
    for delay in (0.0, 0.011, 0.023):
        child = subprocess.Popen(
            [sys.executable, str(script), str(directory)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            # Wait for two completed saves of this child, then kill it at an arbitrary moment.
            for _ in range(2):
                line = child.stdout.readline()
                assert line, "the child exited before saving"
                last_reported = int(line)
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=60)
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        step = latest_step(directory)
        assert step is not None and step >= last_reported
        restored = restore_checkpoint(directory, target)
        assert int(restored["step"]) == step
        np.testing.assert_array_equal(restored["x"], np.float32(step))
        assert len(all_steps(directory)) <= 3
        names = [p.name for p in directory.iterdir()]
        interrupted += any(".orbax-checkpoint-tmp" in n or ".deleting-" in n for n in names)
    # Saves take nearly all of the child's time: a kill must have caught one half-written.
    assert interrupted >= 1
