"""Atomic, resumable checkpoints of an arbitrary pytree train state.

Layout: ``directory/step_XXXXXXXX/`` (the step zero-padded to 8 digits) holds one complete
checkpoint written by orbax-checkpoint's `StandardCheckpointHandler` (tensorstore/OCDBT arrays
plus a JSON tree description).

Why this shape (orbax for the pytree I/O, a few lines of our own around it):

* orbax writes every checkpoint into ``step_XXXXXXXX.orbax-checkpoint-tmp-<time>/`` and
  finalises it with one atomic directory rename, so a directory named exactly ``step_XXXXXXXX``
  is complete; it stores every dtype bit-exactly (bfloat16 and uint32 key data included) and is
  multi-host aware (every process calls `save_checkpoint`; orbax synchronises them).
* Listing, pruning and the clean-up of leftovers are ours, with orbax's synchronous
  `Checkpointer` rather than its `CheckpointManager`: the manager counts a half-deleted or
  hand-made ``step_*`` directory as a checkpoint, silently casts a checkpoint into the dtypes of
  the restore target, and its ``max_to_keep`` deletes in place. Here an old checkpoint is first
  renamed to a temporary name (atomic) and only then deleted, and restore refuses a shape or
  dtype that differs from the target.

SIGKILL at any moment leaves the latest finalised checkpoint intact and restorable: before the
rename the new checkpoint is invisible; after it, it is complete; pruning touches only older
ones. (Durability against a power loss additionally needs the file system to keep the rename
ordered after the data, which orbax does not fsync; a killed process loses nothing since the
page cache survives it.) One writer per directory is assumed.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key data and rewrapped
with the target's key implementation on restore; raw ``uint32`` key data is stored as is.
"""

from __future__ import annotations

import os
import re
import shutil
import time
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
# Written by orbax inside the temporary directory before the finalising rename.
_METADATA_FILE = "_CHECKPOINT_METADATA"


def step_directory(directory: str | os.PathLike, step: int) -> Path:
    """The path ``directory/step_XXXXXXXX`` of the checkpoint of ``step``."""
    return Path(directory) / f"{_STEP_PREFIX}{step:0{_STEP_DIGITS}d}"


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Ascending steps of the complete checkpoints in ``directory`` ([] if it does not exist).

    Temporary directories of interrupted saves and checkpoints being deleted are ignored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir() and (entry / _METADATA_FILE).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The highest step with a complete checkpoint in ``directory``, or None if there is none."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


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


def _remove_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _is_primary() -> bool:
    return jax.process_index() == 0


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: PyTree, *, keep: int | None = 3
) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically, then prune old checkpoints.

    Args:
      directory: checkpoint root (created if missing).
      step: non-negative training step; a checkpoint of this step must not exist yet.
      state: pytree whose leaves are arrays (jax or numpy, typed PRNG keys allowed); pytree
        nodes (flax dataclasses, NamedTuples, dicts, tuples) are recorded by the restore target.
      keep: number of most recent checkpoints (by step) to keep, this one included; None keeps
        all.

    Returns:
      The finalised checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep is not None and (not isinstance(keep, (int, np.integer)) or keep < 1):
        raise ValueError(f"keep must be a positive int or None, got {keep!r}")
    _check_leaves(state, "state")
    root = Path(directory).absolute()
    target = step_directory(root, int(step))
    if target.exists():
        raise ValueError(f"step {step} already has a checkpoint at {target}")
    if _is_primary():
        root.mkdir(parents=True, exist_ok=True)
        # Leftovers of saves or deletions interrupted by a kill.
        for entry in root.iterdir():
            if entry.name.startswith(_STEP_PREFIX) and (
                _TMP_MARKER in entry.name or _DELETING_MARKER in entry.name
            ):
                _remove_quietly(entry)

    state = jax.tree.map(_to_storable, state)
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        checkpointer.save(target, args=ocp.args.StandardSave(state))
    finally:
        checkpointer.close()

    if keep is not None and _is_primary():
        for old in all_steps(root)[:-keep]:
            path = step_directory(root, old)
            doomed = path.with_name(f"{path.name}{_DELETING_MARKER}{time.time_ns()}")
            try:
                path.rename(doomed)
            except OSError:
                continue
            _remove_quietly(doomed)
    return target


def restore_checkpoint(
    directory: str | os.PathLike, target_state: PyTree, *, step: int | None = None
) -> PyTree:
    """Restore a checkpoint into the structure, shapes and dtypes of ``target_state``.

    Args:
      directory: checkpoint root written by `save_checkpoint`.
      target_state: a pytree like the saved one (e.g. a freshly initialised train state); its
        leaf values are ignored, its shardings are used for jax arrays.
      step: the step to restore; None restores `latest_step`.

    Returns:
      The saved state, bit-exact, with the pytree structure of ``target_state`` (jax leaves come
      back as jax arrays, numpy leaves as numpy arrays, typed keys as typed keys).
    """
    if step is None:
        step = latest_step(directory)
        if step is None:
            raise ValueError(f"directory {str(directory)!r} holds no complete checkpoint")
    elif step not in all_steps(directory):
        raise ValueError(f"step {step} has no complete checkpoint in {str(directory)!r}")
    _check_leaves(target_state, "target_state")
    path = step_directory(Path(directory).absolute(), step)

    raw_target = jax.tree.map(_to_storable, target_state)
    checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    try:
        saved = checkpointer.metadata(path).item_metadata.tree
        _check_matches(saved, raw_target)
        try:
            restored = checkpointer.restore(path, args=ocp.args.StandardRestore(raw_target))
        except ValueError as err:
            raise ValueError(f"target_state does not match checkpoint {path}: {err}") from err
    finally:
        checkpointer.close()
    return jax.tree.map(_from_storable, target_state, restored)


def _check_matches(saved: PyTree, target: PyTree) -> None:
    """Raise ValueError if the saved leaves differ from the target's in number, shape or dtype.

    Both trees are compared in orbax's serialised form (nested dicts and lists, keys sorted),
    where ``saved`` holds `ArrayMetadata` leaves carrying the dotted leaf name.
    """
    is_meta = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    saved_leaves = jax.tree.leaves(saved, is_leaf=is_meta)
    target_leaves = jax.tree.leaves(ocp.tree.serialize_tree(target, keep_empty_nodes=False))
    if len(saved_leaves) != len(target_leaves):
        raise ValueError(
            f"target_state has {len(target_leaves)} array leaves, the checkpoint "
            f"{len(saved_leaves)}"
        )
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
