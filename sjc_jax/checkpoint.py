"""Atomic, validated, resumable checkpoints of an arbitrary pytree train state.

Layout: ``directory/step_XXXXXXXX/`` (the step zero-padded to 8 digits) holds one checkpoint
written by orbax-checkpoint's `StandardCheckpointHandler` (tensorstore/OCDBT arrays plus a JSON
tree description); ``directory/unusable/`` holds the checkpoints that failed validation, moved
aside (never deleted: they are evidence, and the user decides).

Orbax's own mechanisms do the hard parts:

* Atomicity: orbax writes every checkpoint into ``step_XXXXXXXX.orbax-checkpoint-tmp/`` and
  finalises it by recording a commit time in ``_CHECKPOINT_METADATA`` and one atomic rename.
  A checkpoint is *complete* when its directory has the final name and that commit record
  (`is_complete`); only complete checkpoints are listed, restored or counted by ``keep``.
* Waiting: `CheckpointWriter` holds one `ocp.AsyncCheckpointer` and waits for each save with its
  ``wait_until_finished`` (which also surfaces an error of orbax's background threads) before it
  returns, and before any next save: two saves never write at once, and old checkpoints are
  pruned only after the new one is complete, so a failed save (a full disk) leaves them alone.
  The save is not left running behind the loop: the state is donated to the next step, and
  orbax's host copy of a CPU array is a view of the same buffer (a copy of our own would double
  the state's memory).
* Validation: restoring reads every array (a truncated or missing data file fails there) after
  the saved tree's shapes and dtypes were checked against the target; `restore_latest_usable`
  walks back from the newest checkpoint to the newest one that restores (and passes the caller's
  own check), moving the unusable ones aside.

Ours are the listing, pruning (an old checkpoint is first renamed to a temporary name, atomic,
and only then deleted) and the clean-up of leftovers of interrupted saves (orbax's temporary
directories, never usable). orbax's `CheckpointManager` is not used: it counts a half-deleted or
hand-made ``step_*`` directory as a checkpoint and silently casts a checkpoint into the dtypes of
the restore target. orbax's own log lines are filtered out (`_OrbaxLogFilter`), and so are
the echoes of a failed save or restore that Python can only print (`_drop_orbax_leftovers`):
every failure reaches the caller as an exception, once.

SIGKILL at any moment leaves the latest complete checkpoint intact and restorable. (Durability
against a power loss additionally needs the file system to keep the rename ordered after the
data, which orbax does not fsync.) One writer per directory is assumed (the run directory's lock,
`sjc_jax.rundir`, enforces it).

Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key data and rewrapped
with the target's key implementation on restore; raw ``uint32`` key data is stored as is.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_STEP_PREFIX = "step_"
_STEP_DIGITS = 8
_STEP_RE = re.compile(r"^step_(\d{8,})$")
# orbax's marker of a temporary (unfinalised) directory, and the one we use before deleting.
_TMP_MARKER = ".orbax-checkpoint-tmp"
_DELETING_MARKER = ".deleting-"
# orbax's step metadata; its commit timestamp is written when the checkpoint is finalised.
_METADATA_FILE = "_CHECKPOINT_METADATA"
UNUSABLE_DIR = "unusable"


class UnusableCheckpoint(ValueError):
    """A checkpoint that cannot be restored: incomplete, unreadable or failing a check."""


class _OrbaxLogFilter(logging.Filter):
    """Drops orbax's log records (its errors are re-raised to our caller; the rest is noise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}orbax{os.sep}" not in record.pathname


logging.getLogger("absl").addFilter(_OrbaxLogFilter())


class _LeftoverFutureFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports of tensorstore's reads that a
    failed orbax restore abandoned (the first error already reached our caller)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        # tensorstore's errors name it, or its OCDBT store ("Error reading ... in OCDBT database
        # at local file ...", the message of a truncated checkpoint's abandoned read)
        leftover = "never retrieved" in text and (
            "TensorStore" in text or "OCDBT database" in text or f"{os.sep}orbax{os.sep}" in text
        )
        return not leftover


logging.getLogger("asyncio").addFilter(_LeftoverFutureFilter())


def _from_orbax(obj: Any) -> bool:
    """Whether an unraisable's object is one of orbax's coroutines or functions."""
    code = getattr(obj, "cr_code", None) or getattr(obj, "__code__", None)
    filename = getattr(code, "co_filename", "") or getattr(obj, "__module__", "") or ""
    return f"{os.sep}orbax{os.sep}" in filename or filename.startswith("orbax.")


def _drop_orbax_leftovers(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook that drops the echoes of a failed orbax save or restore.

    When a save fails (a full disk) orbax closes its asyncio loop while tensorstore still
    completes the other writes, whose callbacks raise ``RuntimeError('Event loop is closed')``;
    when a restore fails (a truncated file) the coroutines of the other arrays are dropped with
    their own errors. Python can only print those ("Exception ignored in ..."), after the first
    error has already reached our caller. Everything else goes to the previous hook.
    """

    def hook(unraisable) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if _from_orbax(unraisable.object):
            return
        previous(unraisable)

    return hook


sys.unraisablehook = _drop_orbax_leftovers(sys.unraisablehook)


def step_directory(directory: str | os.PathLike, step: int) -> Path:
    """The path ``directory/step_XXXXXXXX`` of the checkpoint of ``step``."""
    return Path(directory) / f"{_STEP_PREFIX}{step:0{_STEP_DIGITS}d}"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finalised orbax checkpoint (final name, commit time recorded)."""
    path = Path(path)
    if not (_STEP_RE.match(path.name) and path.is_dir()):
        return False
    try:
        metadata = json.loads((path / _METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("commit_timestamp_nsecs") is not None


def step_dirs(directory: str | os.PathLike) -> list[int]:
    """Ascending steps of every ``step_XXXXXXXX`` directory, complete or not ([] if none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir():
            steps.append(int(match.group(1)))
    return sorted(steps)


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Ascending steps of the complete checkpoints in ``directory`` ([] if it does not exist).

    Temporary directories of interrupted saves, checkpoints being deleted, moved-aside ones and
    step directories without orbax's commit record are not checkpoints.
    """
    return [s for s in step_dirs(directory) if is_complete(step_directory(directory, s))]


def latest_step(directory: str | os.PathLike) -> int | None:
    """The highest step with a complete checkpoint in ``directory``, or None if there is none."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def move_aside(directory: str | os.PathLike, step: int) -> Path:
    """Move ``step_XXXXXXXX`` to ``directory/unusable/step_XXXXXXXX-<time>`` (atomic); its path."""
    path = step_directory(directory, step)
    aside = Path(directory) / UNUSABLE_DIR
    aside.mkdir(exist_ok=True)
    target = aside / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}"
    path.rename(target)
    return target


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _to_storable(leaf: Any) -> Any:
    """Typed keys as raw key data, numpy scalars as 0-d arrays (orbax restores no np.generic)."""
    if _is_key(leaf):
        return jax.random.key_data(leaf)
    if isinstance(leaf, np.generic):
        return np.asarray(leaf)
    return leaf


def _from_storable(target: Any, value: Any) -> Any:
    """Undo `_to_storable` for a restored ``value`` given its ``target`` leaf."""
    if _is_key(target):
        return jax.random.wrap_key_data(value, impl=jax.random.key_impl(target))
    if isinstance(target, np.generic):
        return np.asarray(value)[()]
    return value


def _check_leaves(tree: PyTree, name: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise ValueError(
                f"{name} leaves must be arrays; {jax.tree_util.keystr(path)} is "
                f"{type(leaf).__name__}"
            )


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")


def _remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _is_primary() -> bool:
    return jax.process_index() == 0


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause (tensorstore's own words), without the file path."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return re.sub(r' in OCDBT database at local file "[^"]*"', "", text)


class CheckpointWriter:
    """Saves into one directory, one at a time, and prunes to ``keep`` complete checkpoints.

    `save` returns once orbax has finalised the checkpoint (the caller may then donate the
    state) and raises the error of a failed save. Use as a context manager (or call `close`).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3):
        if keep is not None and (
            isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1
        ):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self._checkpointer = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        self._pending: int | None = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, step: int, state: PyTree) -> Path:
        """Write ``state`` as the checkpoint of ``step`` and wait for it; then prune.

        A complete checkpoint of ``step`` must not exist; an incomplete directory of that name
        (no commit record) is moved aside first. Returns the checkpoint's final path.
        """
        _check_step(step)
        _check_leaves(state, "state")
        self.wait()
        target = step_directory(self.directory, int(step))
        if is_complete(target):
            raise ValueError(f"step {step} already has a checkpoint at {target}")
        if _is_primary():
            self.directory.mkdir(parents=True, exist_ok=True)
            if target.exists():
                move_aside(self.directory, int(step))
            # Leftovers of saves or deletions interrupted by a kill (never usable checkpoints).
            for entry in self.directory.iterdir():
                if entry.name.startswith(_STEP_PREFIX) and (
                    _TMP_MARKER in entry.name or _DELETING_MARKER in entry.name
                ):
                    _remove_quietly(entry)
        storable = jax.tree.map(_to_storable, state)
        self._pending = int(step)
        try:
            self._checkpointer.save(target, args=ocp.args.StandardSave(storable))
        except BaseException:
            self._abandon()
            raise
        self.wait()
        return target

    def wait(self) -> None:
        """Wait for the save in flight, if any (raising its error); then prune to ``keep``."""
        if self._pending is None:
            return
        try:
            self._checkpointer.wait_until_finished()
        except BaseException:
            self._abandon()
            raise
        step, self._pending = self._pending, None
        if not is_complete(step_directory(self.directory, step)):
            raise UnusableCheckpoint(f"the checkpoint of step {step} was not finalised")
        if self.keep is not None and _is_primary():
            for old in all_steps(self.directory)[: -self.keep]:
                path = step_directory(self.directory, old)
                doomed = path.with_name(f"{path.name}{_DELETING_MARKER}{time.time_ns()}")
                try:
                    path.rename(doomed)
                except OSError:
                    continue
                _remove_quietly(doomed)

    def _abandon(self) -> None:
        """After a failed save: let orbax's threads end, drop its temporary directory."""
        step, self._pending = self._pending, None
        try:
            self._checkpointer.wait_until_finished()
        except Exception:  # noqa: BLE001  (the first error is the one raised)
            pass
        if step is not None and _is_primary():
            target = step_directory(self.directory, step)
            _remove_quietly(target.with_name(target.name + _TMP_MARKER))

    def close(self) -> None:
        """Wait for the last save (raising its error) and release orbax's resources."""
        try:
            self.wait()
        finally:
            self._checkpointer.close()


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: PyTree, *, keep: int | None = 3
) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then prune old checkpoints.

    Args:
      directory: checkpoint root (created if missing).
      step: non-negative training step; a complete checkpoint of this step must not exist yet.
      state: pytree whose leaves are arrays (jax or numpy, typed PRNG keys allowed); pytree
        nodes (flax dataclasses, NamedTuples, dicts, tuples) are recorded by the restore target.
      keep: number of most recent complete checkpoints (by step) to keep, this one included;
        None keeps all.

    Returns:
      The finalised checkpoint directory.
    """
    with CheckpointWriter(directory, keep=keep) as writer:
        return writer.save(step, state)


def restore_checkpoint(
    directory: str | os.PathLike, target_state: PyTree, *, step: int | None = None
) -> PyTree:
    """Restore a checkpoint into the structure, shapes and dtypes of ``target_state``.

    Args:
      directory: checkpoint root written by `save_checkpoint` / `CheckpointWriter`.
      target_state: a pytree like the saved one (e.g. a freshly initialised train state); its
        leaf values are ignored, its shardings are used for jax arrays.
      step: the step to restore; None restores `latest_step`.

    Returns:
      The saved state, bit-exact, with the pytree structure of ``target_state`` (jax leaves come
      back as jax arrays, numpy leaves as numpy arrays, typed keys as typed keys).

    Raises:
      UnusableCheckpoint: the checkpoint is incomplete, or its metadata or data cannot be read.
      ValueError: no complete checkpoint, or ``target_state`` differs from the saved tree in
        leaf count, shape or dtype (the checkpoint itself is fine).
    """
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise ValueError(f"directory {str(directory)!r} holds no complete checkpoint")
    _check_step(step)
    path = step_directory(Path(directory).absolute(), step)
    if not is_complete(path):
        what = "is incomplete (no commit record)" if path.is_dir() else "does not exist"
        raise UnusableCheckpoint(f"the checkpoint of step {step} {what}: {path}")
    _check_leaves(target_state, "target_state")

    raw_target = jax.tree.map(_to_storable, target_state)
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        try:
            saved = checkpointer.metadata(path).item_metadata.tree
        except Exception as err:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
            raise UnusableCheckpoint(
                f"the checkpoint of step {step} has unreadable metadata ({_first_line(err)})"
            ) from err
        _check_matches(saved, raw_target)
        try:
            restored = checkpointer.restore(path, args=ocp.args.StandardRestore(raw_target))
        except Exception as err:  # noqa: BLE001
            raise UnusableCheckpoint(
                f"the checkpoint of step {step} cannot be read ({_first_line(err)})"
            ) from err
    finally:
        checkpointer.close()
    return jax.tree.map(_from_storable, target_state, restored)


def restore_latest_usable(
    directory: str | os.PathLike,
    target_state: PyTree,
    *,
    check: Callable[[int, PyTree], None] | None = None,
    on_unusable: Callable[[int, str, Path], None] | None = None,
) -> tuple[int | None, PyTree | None]:
    """The newest checkpoint that restores and passes ``check``: ``(step, state)``.

    Walks back from the newest ``step_*`` directory (complete or not). Each one that fails
    (`UnusableCheckpoint`, or ``check(step, state)`` raising it) is moved aside (`move_aside`)
    and reported as ``on_unusable(step, reason, new_path)``. Returns ``(None, None)`` when no
    checkpoint is usable. A ``target_state`` that does not match a checkpoint's tree raises
    ValueError and moves nothing (the checkpoint is fine; the target is wrong).
    """
    for step in reversed(step_dirs(directory)):
        try:
            state = restore_checkpoint(directory, target_state, step=step)
            if check is not None:
                check(step, state)
        except UnusableCheckpoint as err:
            moved = move_aside(directory, step)
            if on_unusable is not None:
                on_unusable(step, str(err), moved)
            continue
        return step, state
    return None, None


def _check_matches(saved: PyTree, target: PyTree) -> None:
    """Raise ValueError if the saved leaves differ from the target's in number, shape or dtype.

    Both trees are compared in orbax's serialised form (nested dicts and lists, keys sorted),
    where ``saved`` holds `ArrayMetadata` leaves carrying the dotted leaf name.
    """
    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    saved_items = jax.tree_util.tree_flatten_with_path(saved, is_leaf=is_meta)[0]
    target_items = jax.tree_util.tree_flatten_with_path(
        ocp.tree.serialize_tree(target, keep_empty_nodes=False)
    )[0]
    if len(saved_items) != len(target_items):
        raise ValueError(
            f"target_state has {len(target_items)} array leaves, the checkpoint {len(saved_items)}"
        )
    for (saved_path, _), (target_path, _) in zip(saved_items, target_items, strict=True):
        mine, theirs = jax.tree_util.keystr(target_path), jax.tree_util.keystr(saved_path)
        if mine != theirs:
            raise ValueError(f"target_state has leaf {mine} where the checkpoint has {theirs}")
    saved_leaves = [leaf for _, leaf in saved_items]
    target_leaves = [leaf for _, leaf in target_items]
    for meta, leaf in zip(saved_leaves, target_leaves, strict=True):
        name = getattr(meta, "name", "?")
        if tuple(meta.shape) != tuple(np.shape(leaf)):
            raise ValueError(
                f"target_state leaf {name} has shape {tuple(np.shape(leaf))}, the checkpoint "
                f"{tuple(meta.shape)}"
            )
        if np.dtype(meta.dtype) != np.dtype(leaf.dtype):
            raise ValueError(
                f"target_state leaf {name} has dtype {np.dtype(leaf.dtype)}, the checkpoint "
                f"{np.dtype(meta.dtype)}"
            )


__all__ = [
    "UNUSABLE_DIR",
    "CheckpointWriter",
    "UnusableCheckpoint",
    "all_steps",
    "is_complete",
    "latest_step",
    "move_aside",
    "restore_checkpoint",
    "restore_latest_usable",
    "save_checkpoint",
    "step_directory",
    "step_dirs",
]
