"""The run engine's parts in-process (`sjc_jax.engine`); the commands on it: test_engine_faults."""

from __future__ import annotations

import errno
import os
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax import checkpoint, engine, interrupts, resources, rundir


def _state(step: int, value: float = 1.0) -> dict:
    return {"step": jnp.asarray(step, jnp.int32), "x": jnp.full((64,), value, jnp.float32)}


def _checkpoints(directory, **kwargs) -> engine.Checkpoints:
    return engine.Checkpoints(
        directory, keep=None, step_of=lambda s: int(s["step"]), finite_part=lambda s: s["x"],
        **kwargs,
    )  # fmt: skip


def test_only_finite_states_are_saved_and_each_step_once(tmp_path):
    with _checkpoints(tmp_path) as ckpts:
        assert ckpts.save(_state(1))
        assert not ckpts.save(_state(1))  # already complete
        assert not ckpts.save(_state(2, np.nan))
    assert checkpoint.all_steps(tmp_path) == [1]
    assert "last good checkpoint (step 1)" in ckpts.last_good()


def test_restore_falls_back_with_one_warning_line_per_skipped_checkpoint(tmp_path):
    with _checkpoints(tmp_path) as ckpts:
        for step in (1, 2, 3):
            ckpts.save(_state(step, float(step)))
    for step in (2, 3):  # truncated data files (OCDBT's own, and merged under d/)
        for data in checkpoint.step_directory(tmp_path, step).glob("**/d/*"):
            data.write_bytes(data.read_bytes()[:3])
    lines: list[str] = []
    restored = _checkpoints(tmp_path).restore(_state(0, 0.0), warn=lines.append)
    assert int(restored["step"]) == 1 and float(restored["x"][0]) == 1.0
    assert len(lines) == 2, lines
    assert all(line.startswith("resuming from step 1: the checkpoint of step ") for line in lines)
    assert len(list((tmp_path / checkpoint.UNUSABLE_DIR).iterdir())) == 2


def test_restore_refuses_a_checkpoint_holding_another_step(tmp_path):
    with _checkpoints(tmp_path) as ckpts:
        ckpts.save(_state(1))
    checkpoint.step_directory(tmp_path, 1).rename(checkpoint.step_directory(tmp_path, 5))
    lines: list[str] = []
    restored = _checkpoints(tmp_path).restore(_state(0, 0.0), warn=lines.append)
    assert int(restored["step"]) == 0  # none usable: the fresh state
    assert lines == [lines[0]] and "holds step 1" in lines[0], lines


def test_owned_locks_and_turns_a_full_disk_into_one_line(tmp_path):
    out = tmp_path / "out"
    with _checkpoints(out / "checkpoints") as ckpts:
        ckpts.save(_state(4))
    (out / "config.json").write_text("{}")
    with pytest.raises(engine.DiskFullError) as err:
        with engine.owned(out, ckpt_dir=out / "checkpoints", marker="config.json", command="sweep"):
            assert rundir.lock_holder(out) == str(os.getpid())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "x"))
    message = str(err.value)
    assert "no space left" in message and "last good checkpoint (step 4)" in message
    assert f"python -m sjc_jax sweep --resume {str(out)!r}" in message
    assert rundir.lock_holder(out) is None and not (out / rundir.LOCK).exists()


def test_prepare_serves_a_stop_at_once_and_says_nothing_was_written(tmp_path):
    stop = interrupts.StopRequest()

    def build():
        stop.request(signal.SIGINT)
        raise AssertionError("not reached")

    with pytest.raises(engine.Interrupted, match="nothing was written"):
        engine.prepare(build, stop, tmp_path / "out", resume=False)
    with pytest.raises(engine.Interrupted, match="train-model --resume"):
        engine.prepare(lambda: None, stop, tmp_path / "out", resume=True, command="train-model")


def test_check_memory_refuses_in_one_line():
    huge = resources.MemoryEstimate(state=2**62, step=0)
    with pytest.raises(engine.RunError, match="--grid-resolution 2000"):
        engine.check_memory(huge, resolution=2000)
    with pytest.raises(engine.RunError, match="^too big: "):
        engine.check_memory(huge, refusal=lambda needed, available: f"too big: {needed}")
