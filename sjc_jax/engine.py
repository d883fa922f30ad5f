"""The run engine: what ``run``, ``sweep`` and ``train-model`` share around their steps.

Every command that owns a directory and steps a state goes through these, in this order:

1. `prepare`: validation and model building (nothing written yet) with Ctrl-C served at once
   ("nothing was written"), memory checked by `check_memory` before anything large is
   allocated;
2. `owned`: the directory's lock (`rundir.RunLock`, for the command's lifetime) and the full
   disk: an `OSError` ``ENOSPC`` (or tensorstore's echo of one) anywhere inside becomes one
   `DiskFullError` line naming the last good checkpoint;
3. `Checkpoints`: the atomic writer (`checkpoint.CheckpointWriter`, one save at a time, only
   finite states) and the validated restore: the newest checkpoint that reads whole, holds its
   own step and is finite, falling back past (and moving aside) the others, one warning line per
   skipped checkpoint;
4. `run_loop`: the steps, metrics fetched every ``log_every`` steps, checkpoints every
   ``checkpoint_every`` steps, hooks, a progress bar (`progress_bar`), and stop requests
   (SIGINT / SIGTERM, `sjc_jax.interrupts`) served between steps: the step in flight ends, its
   checkpoint is written and `Interrupted` names the ``--resume`` command (exit 130).

The command line maps `Interrupted` to exit 130, `NonFiniteError` and `DiskFullError` to exit 1
and every other `RunError` (a `ValueError`) to exit 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from sjc_jax import checkpoint, files, interrupts, resources, rundir
from sjc_jax.progress import progress_bar
from sjc_jax.rundir import RunError

PROG = "python -m sjc_jax"


class NonFiniteError(RunError):
    """The state became non-finite; the last good checkpoint is kept."""


class Interrupted(RunError):
    """Interrupted (Ctrl-C / SIGTERM); a checkpoint of the last step was written."""


class DiskFullError(RunError):
    """A write failed for lack of space; the last good checkpoint is kept."""


# --- messages ----------------------------------------------------------------------------------


def resume_hint(out: str | Path, command: str = "run") -> str:
    """``continue with: python -m sjc_jax COMMAND --resume 'OUT'``."""
    return f"continue with: {PROG} {command} --resume {str(out)!r}"


def last_good(ckpt_dir: str | Path) -> str:
    """Where the last good checkpoint of ``ckpt_dir`` is, or that there is none."""
    step = checkpoint.latest_step(ckpt_dir)
    if step is None:
        return "no checkpoint was written before it"
    return f"the last good checkpoint (step {step}) is kept in {str(ckpt_dir)!r}"


def interrupted_before(out: str | Path, resume: bool, command: str = "run") -> str:
    """The message of a stop served before the first step."""
    if resume:
        return f"interrupted before continuing; {resume_hint(out, command)}"
    return "interrupted before the first step; nothing was written"


# --- 1. before anything is written ----------------------------------------------------------


def prepare(
    fn: Callable[[], Any],
    stop: interrupts.StopRequest,
    out: str | Path,
    *,
    resume: bool,
    command: str = "run",
) -> Any:
    """``fn()`` (validation, building the model: nothing written) with Ctrl-C served at once.

    Raises:
      Interrupted: a stop request came during ``fn`` (nothing was written).
    """
    try:
        with stop.immediately():
            result = fn()
    except KeyboardInterrupt:
        raise Interrupted(interrupted_before(out, resume, command)) from None
    if stop.requested:  # raised inside the block and swallowed by a library
        raise Interrupted(interrupted_before(out, resume, command))
    return result


def check_memory(
    needed: resources.MemoryEstimate,
    *,
    resolution: int | None = None,
    refusal: Callable[[str, str], str] | None = None,
) -> None:
    """Refuse in one line what cannot fit in the first device's free memory (unknown: pass).

    Args:
      needed: the bytes the command holds at once (`resources.estimate` for a lift).
      resolution: the grid resolution named by the default message (`resources.check_fits`).
      refusal: ``(needed bytes, available bytes) -> message`` for commands without a grid.

    Raises:
      RunError: one line naming what to lower.
    """
    device = jax.devices()[0]
    available = resources.available_bytes(device)
    try:
        if refusal is None:
            resources.check_fits(
                needed,
                available=available,
                resolution=resolution or 0,
                where=resources.where(device),
            )
        elif available is not None and needed.total > available:
            raise ValueError(refusal(needed.total, available))
    except ValueError as err:
        raise RunError(str(err)) from None


# --- 2. the owned directory -------------------------------------------------------------------


@contextlib.contextmanager
def owned(
    out: str | Path,
    *,
    ckpt_dir: str | Path,
    marker: str,
    command: str = "run",
    lock: bool = True,
) -> Iterator[None]:
    """Lock ``out`` for the block (``lock``); a full disk inside becomes `DiskFullError`.

    Args:
      out: the directory (created by the lock if missing).
      ckpt_dir: its checkpoints, named by the full-disk message.
      marker: the file whose presence makes ``out`` resumable (the message then says how).
      command: the command whose ``--resume`` the messages name.
      lock: take the lock (False: another process of the same job holds it).
    """
    out = Path(out)
    try:
        with rundir.RunLock(out) if lock else contextlib.nullcontext():
            yield
    except Exception as err:
        if isinstance(err, RunError) or not files.is_disk_full(err):
            raise
        then = resume_hint(out, command) if (out / marker).is_file() else "run it again"
        raise DiskFullError(
            f"no space left on the device of {str(out)!r}; {last_good(ckpt_dir)}; free some "
            f"space and {then}"
        ) from None


# --- 3. checkpoints ---------------------------------------------------------------------------


def is_finite(tree: Any) -> bool:
    """Whether every floating leaf of ``tree`` is finite."""
    return all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(getattr(x, "dtype", jnp.float32), jnp.inexact)
    )


class Checkpoints:
    """A command's checkpoints: atomic saves of finite states and the validated restore.

    Args:
      directory: the checkpoint directory (`sjc_jax.checkpoint`'s layout).
      keep: complete checkpoints kept.
      step_of: the step a state holds (a batch spread over processes reads a local shard).
      finite_part: the part of a state that must be finite to be saved or restored.
      to_disk, from_disk: the stored form of a state and back (``from_disk(like, stored)``),
        for trees orbax cannot describe; identity by default.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int | None,
        step_of: Callable[[Any], int],
        finite_part: Callable[[Any], Any] = lambda state: state,
        to_disk: Callable[[Any], Any] = lambda state: state,
        from_disk: Callable[[Any, Any], Any] = lambda like, stored: stored,
    ):
        self.directory = Path(directory)
        self.keep = keep
        self.step_of = step_of
        self.finite_part = finite_part
        self.to_disk = to_disk
        self.from_disk = from_disk
        self._writer: checkpoint.CheckpointWriter | None = None

    def __enter__(self) -> Checkpoints:
        self._writer = checkpoint.CheckpointWriter(self.directory, keep=self.keep)
        return self

    def __exit__(self, *exc) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def save(self, state: Any) -> bool:
        """Write ``state``'s checkpoint unless it exists or ``state`` is not finite; whether
        it was written. Returns once the checkpoint is complete (the state may be donated)."""
        if self._writer is None:
            raise RuntimeError("Checkpoints.save outside its `with` block")
        if not is_finite(self.finite_part(state)):
            return False
        step = self.step_of(state)
        if checkpoint.is_complete(checkpoint.step_directory(self.directory, step)):
            return False
        self._writer.save(step, self.to_disk(state))
        return True

    def restore(self, state: Any, *, warn: Callable[[str], None] | None = None) -> Any:
        """The newest usable checkpoint restored into ``state``'s structure, or ``state``.

        Each unusable checkpoint (unreadable, holding another step, not finite) is moved to
        ``unusable/`` and reported as one warning line (``warn``; default `warnings.warn`).
        """
        warn = warn or (lambda line: warnings.warn(line, stacklevel=4))
        skipped: list[tuple[int, str, Path]] = []

        def check(step: int, restored: Any) -> None:
            held = self.step_of(self.from_disk(state, restored))
            if held != step:
                raise checkpoint.UnusableCheckpoint(
                    f"the checkpoint of step {step} holds step {held}"
                )
            if not is_finite(self.finite_part(self.from_disk(state, restored))):
                raise checkpoint.UnusableCheckpoint(f"the checkpoint of step {step} is not finite")

        def on_unusable(step: int, reason: str, moved: Path) -> None:
            skipped.append((step, reason if len(reason) <= 160 else reason[:157] + "...", moved))

        step, restored = checkpoint.restore_latest_usable(
            self.directory, self.to_disk(state), check=check, on_unusable=on_unusable
        )
        start = f"from step {step}" if step is not None else "from step 0 (no usable checkpoint)"
        for _, reason, moved in skipped:
            warn(f"resuming {start}: {reason}, moved to {str(moved)!r}")
        return state if restored is None else self.from_disk(state, restored)

    def last_good(self) -> str:
        """`last_good` of this directory."""
        return last_good(self.directory)


# --- 4. the loop ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(state)`` after every ``every``-th step of the loop (``fn`` must not keep ``state``:
    the next step donates its buffers)."""

    every: int
    fn: Callable[[Any], None]


def run_loop(
    step_fn: Callable[[Any, Any], tuple[Any, dict[str, jax.Array]]],
    state: Any,
    params: Any,
    *,
    end: int,
    log_every: int,
    checkpoint_every: int,
    save: Callable[[Any], None],
    on_metrics: Callable[[list[dict[str, Any]]], None],
    hooks: Sequence[Hook] = (),
    bar: Any = None,
    should_stop: Callable[[], bool] | None = None,
    start: int | None = None,
) -> Any:
    """Step ``state`` up to step ``end``; returns the last state.

    Args:
      step_fn: ``(state, params) -> (state, metrics)`` (donates the state).
      state: where to start (its ``step``).
      params: the step's second argument (a model's params, a training set).
      end: the step count to stop at.
      log_every: metrics are fetched from the device every this many steps and at the end.
      checkpoint_every: ``save(state)`` every this many steps and at the end.
      save: writes a checkpoint of a state (called with metrics fetched up to it, before the
        next step donates the state).
      on_metrics: receives the fetched records ``{"step": i, name: float, ...}`` in order (a
        batch of lifts' metrics are lists, one value a lift); raise in it to stop the loop
        (e.g. `NonFiniteError`).
      hooks: called after their steps, in order.
      bar: a progress bar to advance (`progress_bar`), or None.
      should_stop: asked after every step (and once before the first); when it answers True the
        loop flushes the metrics, saves the state (unless just saved) and raises `Interrupted`.
      start: the state's step, when read from the state is not possible here (a batch of lifts
        spread over processes, a dict state); None reads ``state.step``.

    Raises:
      Interrupted: when ``should_stop()``, after the metrics and the save of the last step.
    """
    pending: list[tuple[int, dict]] = []
    stop = should_stop or (lambda: False)

    def flush() -> None:
        fetched = jax.device_get(pending)
        pending.clear()
        if fetched:
            on_metrics([{"step": i, **{k: v.tolist() for k, v in m.items()}} for i, m in fetched])

    start = int(state.step) if start is None else start
    if start < end and stop():
        raise Interrupted(f"interrupted at step {start}")
    for i in range(start, end):
        state, metrics = step_fn(state, params)
        done = i + 1
        pending.append((done, metrics))
        if bar is not None:
            bar.update()
        if done % log_every == 0 or done == end:
            flush()
        for hook in hooks:
            if done % hook.every == 0:
                hook.fn(state)
        saved = done % checkpoint_every == 0 or done == end
        if saved:
            flush()
            save(state)
        if done < end and stop():
            flush()
            if not saved:
                save(state)
            raise Interrupted(f"interrupted at step {done}")
    return state


@contextlib.contextmanager
def stopping(stop: interrupts.StopRequest, out: str | Path, command: str) -> Iterator[None]:
    """`Interrupted` inside the block gets the signal's name and the ``--resume`` command."""
    try:
        yield
    except Interrupted as err:
        raise Interrupted(f"{err} ({stop.name}); {resume_hint(out, command)}") from None


def stop_between_parts(
    stop: interrupts.StopRequest, out: str | Path, command: str, step: int
) -> Callable[[], None]:
    """A check to call between two final artifacts: raises `Interrupted` once stop is asked."""

    def before_part() -> None:
        if stop.requested:
            raise Interrupted(
                f"interrupted while writing the final artifacts at step {step} ({stop.name}); "
                f"{resume_hint(out, command)}"
            )

    return before_part


def progress(*, total: int, initial: int, desc: str, enabled: bool) -> Any:
    """The loop's progress: a tqdm bar on a terminal, plain lines elsewhere (`progress_bar`)."""
    return progress_bar(total=total, initial=initial, desc=desc, enabled=enabled)


def resumed_line(step: int | None) -> str:
    """The line a resumed command prints once it knows its step."""
    return f"resuming at step {step or 0}" + ("" if step else " (no usable checkpoint)")


__all__ = [
    "Checkpoints",
    "DiskFullError",
    "Hook",
    "Interrupted",
    "NonFiniteError",
    "RunError",
    "check_memory",
    "interrupted_before",
    "is_finite",
    "last_good",
    "owned",
    "prepare",
    "progress",
    "resume_hint",
    "resumed_line",
    "run_loop",
    "stop_between_parts",
    "stopping",
]
