"""The run directory: what belongs in it, the checks made before writing, its lock, its metrics.

A run directory holds only these entries (`ENTRIES`): ``config.json``, ``metrics.jsonl``,
``previews/``, ``checkpoints/``, ``tensorboard/``, ``final/`` and the lock file ``.lock``, plus
the leftovers of a killed writer (`files.atomic_path` temporaries, an unpublished
``final.tmp-*`` / ``final.old-*``).
Anything else makes it someone else's directory, which a run refuses to write into (a model's
``unet/`` holds a ``config.json`` too).

Ownership, in the order `sjc_jax.runner.run` applies it:

1. `check_new` / `check_resume` validate the directory without writing anything (a mistyped
   ``--resume`` path is not created);
2. `RunLock` creates the directory (and any missing parents) only once everything else has been
   validated, and holds an exclusive ``flock`` on ``.lock`` (which records the pid) for the run's
   lifetime. The kernel drops the lock when its process dies, even by SIGKILL, so a lock file
   nobody holds is stale by definition and is taken over; releasing it removes the file, and the
   directories the lock created if they are still empty (a run that fails under the lock before
   writing leaves no half-made ``--out``).

Files are created with the process umask's normal mode (``0o666 & ~umask``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
import warnings
from pathlib import Path

from sjc_jax import files
from sjc_jax.config import SJCConfig

CONFIG = "config.json"
METRICS = "metrics.jsonl"
PREVIEWS = "previews"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
FINAL = "final"
LOCK = ".lock"
MESH_INFO = "mesh.json"  # in final/: how its mesh was made (`sjc_jax.mesh.MeshInfo`)
ENTRIES = (CONFIG, METRICS, PREVIEWS, CHECKPOINTS, TENSORBOARD, FINAL, LOCK)
# Leftovers of a killed writer: `files.atomic_path`'s temporaries, unpublished final/ folders.
_LEFTOVER_RE = re.compile(r"^(\..+\.[0-9a-f]{12}\.tmp.*|final\.(tmp|old)-\d+)$")


class RunError(ValueError):
    """A run cannot start or go on (bad output directory, nothing to resume, ...)."""


def _show(path: Path) -> str:
    return repr(str(path))


def foreign_entries(out: str | os.PathLike) -> list[str]:
    """The sorted names in ``out`` that are not part of a run directory."""
    return sorted(
        name for name in os.listdir(out) if name not in ENTRIES and not _LEFTOVER_RE.match(name)
    )


def is_run_config(path: str | os.PathLike) -> bool:
    """Whether ``path`` reads as a run's ``config.json`` (a model's config.json does not)."""
    try:
        SJCConfig.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return False
    return True


def _check_writable(path: Path, what: str) -> None:
    """``path`` (existing or to be created) can be written, judged without creating anything."""
    for part in path.parts:  # a name the file system cannot hold is bad input, not a fault
        if len(os.fsencode(part)) > 255:
            raise RunError(
                f"cannot write to {what} {_show(path)}: a name in it is longer than 255 bytes"
            )
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link
            raise RunError(f"cannot write to {what} {_show(path)}: {_show(probe)} is a broken link")
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"cannot write to {what} {_show(path)}: {_show(probe)} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"cannot write to {what} {_show(path)}: permission denied")


def check_new(out: str | os.PathLike, *, locked: bool = False) -> None:
    """``out`` can receive a new run: it is missing, empty or holds only a stale lock.

    ``locked``: this process holds ``out``'s `RunLock` (the check is repeated under it).

    Raises:
      RunError: ``out`` holds a run (continue it with ``--resume``), holds anything else, is
        not a directory, or cannot be written.
    """
    out = Path(out)
    _check_writable(out, "output directory")
    if not out.exists():
        return
    foreign = foreign_entries(out)
    if foreign:
        raise RunError(_foreign_message(out, foreign))
    if (out / CONFIG).exists():
        if not is_run_config(out / CONFIG):
            raise RunError(_foreign_message(out, [f"a {CONFIG} that is not a run's"]))
        raise RunError(
            f"{_show(out)} already holds a run; continue it with --resume {_show(out)} or "
            "choose another --out"
        )
    holder = None if locked else lock_holder(out)
    if holder is not None:
        raise RunError(_locked_message(out, holder))
    ours = [name for name in os.listdir(out) if name != LOCK and not _LEFTOVER_RE.match(name)]
    if ours:
        raise RunError(
            f"{_show(out)} holds parts of a run but no {CONFIG} ({', '.join(sorted(ours))}); "
            "choose another --out"
        )


def check_resume(out: str | os.PathLike, *, locked: bool = False) -> None:
    """``out`` holds a run of ours that can be continued (nothing is created or written).

    ``locked``: this process holds ``out``'s `RunLock` (the check is repeated under it).

    Raises:
      RunError: ``out`` does not exist, holds no ``config.json``, holds other files, is in use
        by a live run, or cannot be written.
    """
    out = Path(out)
    if not out.is_dir():
        what = "does not exist" if not out.exists() else "is not a directory"
        raise RunError(f"nothing to resume: {_show(out)} {what}")
    if not (out / CONFIG).is_file():
        raise RunError(f"nothing to resume in {_show(out)}: no {CONFIG}")
    foreign = foreign_entries(out)
    if foreign:
        raise RunError(_foreign_message(out, foreign))
    holder = None if locked else lock_holder(out)
    if holder is not None:
        raise RunError(_locked_message(out, holder))
    _check_writable(out, "run directory")


def _foreign_message(out: Path, foreign: list[str]) -> str:
    shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
    return (
        f"{_show(out)} is not a sjc_jax run directory (it holds {shown}); choose an empty or "
        "new --out"
    )


def _locked_message(out: Path, pid: int | str) -> str:
    return f"{_show(out)} is in use by another run (pid {pid}); wait for it or stop it first"


def _read_pid(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return text or "unknown"


def lock_holder(out: str | os.PathLike) -> str | None:
    """The pid recorded by a live lock on ``out`` (None if nobody holds it); writes nothing."""
    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_free(out: str | os.PathLike) -> None:
    """Raise `RunError` naming the pid if a live process holds ``out``'s lock (writes nothing)."""
    holder = lock_holder(out) if Path(out).is_dir() else None
    if holder is not None:
        raise RunError(_locked_message(Path(out), holder))


class RunLock:
    """An exclusive lock on a run directory for as long as the run writes into it.

    ``with RunLock(out):`` creates ``out`` if needed, takes ``out/.lock`` (recording this
    process's pid) or raises `RunError` naming the live holder; leaving the block releases it.
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK
        self._fd: int | None = None
        self._created: list[Path] = []

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        missing = []
        probe = self.out
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunError(
                f"cannot write to output directory {_show(self.out)}: {err.strerror or err}"
            ) from None
        self._created = missing  # deepest first
        try:
            self._take()
        except BaseException:
            self._remove_created()
            raise

    def _take(self) -> None:
        # `lock_holder` probes hold a shared lock for microseconds; a run holds it for its life.
        deadline = time.monotonic() + 0.5
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise RunError(_locked_message(self.out, holder)) from None
            except OSError as err:
                os.close(fd)
                raise RunError(f"cannot lock {_show(self.path)}: {err.strerror}") from None
            # The holder we waited for may have removed the file between our open and flock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = _read_pid(fd)
        if stale != "unknown":
            warnings.warn(
                f"taking over the lock of {_show(self.out)} left by pid {stale}, which is no "
                "longer running",
                stacklevel=4,
            )
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (while still holding it), unlock, drop empty created folders."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for path in self._created:
            try:
                path.rmdir()
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
                break
        self._created = []


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` ([] if missing); a torn last line is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        reason = f"{err.reason} at byte {err.start}"
        raise RunError(f"{_show(path)} is not UTF-8 text ({reason})") from None
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keep one record per step up to ``last_step`` (the checkpoint a resume starts from)."""
    path = Path(path)
    if not path.exists():
        return
    seen: set[int] = set()
    kept = []
    for record in read_metrics(path):
        if record["step"] <= last_step and record["step"] not in seen:
            seen.add(record["step"])
            kept.append(json.dumps(record) + "\n")
    with files.atomic_path(path) as tmp:
        tmp.write_text("".join(kept))


__all__ = [
    "CHECKPOINTS",
    "CONFIG",
    "ENTRIES",
    "FINAL",
    "LOCK",
    "METRICS",
    "PREVIEWS",
    "TENSORBOARD",
    "RunError",
    "RunLock",
    "check_free",
    "check_new",
    "check_resume",
    "foreign_entries",
    "lock_holder",
    "read_metrics",
    "truncate_metrics",
]
