"""Tests of sjc_jax.checkpoint: bit-exact round trips, pruning, leftovers, SIGKILL safety,
validation with fallback, failed saves."""

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

from sjc_jax import files
from sjc_jax.checkpoint import (
    UNUSABLE_DIR,
    CheckpointWriter,
    UnusableCheckpoint,
    all_steps,
    is_complete,
    latest_step,
    restore_checkpoint,
    restore_latest_usable,
    save_checkpoint,
    step_directory,
    step_dirs,
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


def _small(step):
    return {"x": jnp.full((64,), step, jnp.float32), "step": jnp.int32(step)}


def _corrupt(path, how):
    # OCDBT keeps the data under ocdbt.process_0/d/ and, merged, under d/ (small values inline).
    data = sorted(path.glob("**/d/*"))
    if how == "truncated":
        for f in data:
            f.write_bytes(f.read_bytes()[:3])
    elif how == "no ocdbt":
        import shutil

        shutil.rmtree(path / "ocdbt.process_0")
        shutil.rmtree(path / "d")
    elif how == "no metadata":
        (path / "_CHECKPOINT_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated", "no ocdbt", "no metadata"])
def test_restore_falls_back_and_moves_the_bad_one_aside(tmp_path, how):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _small(step), keep=None)
    _corrupt(step_directory(tmp_path, 3), how)
    reports = []
    step, state = restore_latest_usable(
        tmp_path, _small(0), on_unusable=lambda *a: reports.append(a)
    )
    assert step == 2 and int(state["step"]) == 2
    np.testing.assert_array_equal(state["x"], 2.0)
    ((bad, reason, moved),) = reports
    assert bad == 3 and "step 3" in reason
    assert moved.parent == tmp_path / UNUSABLE_DIR and moved.is_dir()  # moved, not deleted
    assert all_steps(tmp_path) == [1, 2]


def test_restore_checks_and_gives_up_when_none_is_usable(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _small(step), keep=None)

    def refuse_step_2(step, state):
        if step == 2:
            raise UnusableCheckpoint("step 2 refused by the caller")

    step, state = restore_latest_usable(tmp_path, _small(0), check=refuse_step_2)
    assert step == 1
    _corrupt(step_directory(tmp_path, 1), "truncated")
    assert restore_latest_usable(tmp_path, _small(0)) == (None, None)
    assert len(list((tmp_path / UNUSABLE_DIR).iterdir())) == 2


def test_a_mismatched_target_moves_nothing(tmp_path):
    save_checkpoint(tmp_path, 1, _small(1))
    with pytest.raises(ValueError, match="shape") as err:
        restore_latest_usable(tmp_path, {"x": jnp.zeros((3,)), "step": jnp.int32(0)})
    assert not isinstance(err.value, UnusableCheckpoint)
    assert all_steps(tmp_path) == [1] and not (tmp_path / UNUSABLE_DIR).exists()


def test_keep_counts_only_complete_checkpoints(tmp_path):
    for step in (1, 2):
        save_checkpoint(tmp_path, step, _small(step), keep=2)
    half = step_directory(tmp_path, 3)  # a step directory without orbax's commit record
    (half / "d").mkdir(parents=True)
    assert not is_complete(half) and step_dirs(tmp_path) == [1, 2, 3]
    save_checkpoint(tmp_path, 4, _small(4), keep=2)
    assert all_steps(tmp_path) == [2, 4] and half.is_dir()
    # Saving over an incomplete directory of the same step moves it aside first.
    save_checkpoint(tmp_path, 3, _small(3), keep=None)
    assert is_complete(half) and len(list((tmp_path / UNUSABLE_DIR).iterdir())) == 1


def test_a_failed_save_keeps_the_older_checkpoints(tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    save_checkpoint(tmp_path, 1, _small(1), keep=1)
    real_save = ocp.AsyncCheckpointer.save

    def full_disk(self, directory, *args, **kwargs):
        tmp = directory.parent / f"{directory.name}.orbax-checkpoint-tmp"
        tmp.mkdir()
        raise ValueError("Failed to write: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.AsyncCheckpointer, "save", full_disk)
    with CheckpointWriter(tmp_path, keep=1) as writer:
        with pytest.raises(ValueError, match="No space") as err:
            writer.save(2, _small(2))
        assert files.is_disk_full(err.value)
        assert all_steps(tmp_path) == [1] and sorted(os.listdir(tmp_path)) == ["step_00000001"]
        monkeypatch.setattr(ocp.AsyncCheckpointer, "save", real_save)
        writer.save(2, _small(2))  # space freed: the same writer goes on
    assert all_steps(tmp_path) == [2]
    assert files.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("writing failed") from inner
    except RuntimeError as outer:
        assert files.is_disk_full(outer)
    assert not files.is_disk_full(OSError(errno.EACCES, "Permission denied"))


@pytest.mark.parametrize(
    "message",
    [
        # a truncated checkpoint's abandoned read, as CI's fault chain printed it once
        "Future exception was never retrieved\nfuture: <Future finished exception=ValueError("
        '\'OUT_OF_RANGE: Error reading "opt_state.nu/0.0.0.0" in OCDBT database at local file '
        '"/tmp/x/checkpoints/step_00000040/": Requested byte range [1, 9) is not valid\')>',
        "Task exception was never retrieved\nfuture: <Task ... TensorStore ...>",
    ],
)
def test_asyncio_reports_of_abandoned_tensorstore_reads_are_dropped(message):
    import logging

    record = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)
    assert not all(f.filter(record) for f in logging.getLogger("asyncio").filters)
    other = logging.LogRecord(
        "asyncio", logging.ERROR, __file__, 1, "Future exception was never retrieved", None, None
    )
    assert all(f.filter(other) for f in logging.getLogger("asyncio").filters)
