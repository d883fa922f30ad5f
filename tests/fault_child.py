"""``python tests/fault_child.py ARGS...``: the command line with a simulated full disk.

``SJC_FAULT`` picks the write that fails, as a full disk makes it fail:

* ``checkpoint:K``: the K-th checkpoint save writes part of orbax's temporary directory, then
  raises tensorstore's error (a ValueError whose text carries ``os_error_code='28'``);
* ``file:NAME:K``: the K-th atomic write of a file named NAME (``grid.npz``, ``view.png``,
  ``eval.json``, ...) raises ``OSError(ENOSPC)`` after creating its temporary file;
* ``metrics:K``: the K-th write to ``metrics.jsonl`` raises ``OSError(ENOSPC)``;
* ``stop:K``: a stop request (as SIGINT's) right after the K-th checkpoint save completes (a
  deterministic interruption: the command checkpoints nothing more and exits 130).

Signals are installed first, as ``python -m sjc_jax`` does. Used by ``tests/test_faults.py``
where no tiny file system can be mounted.
"""

import builtins
import contextlib
import errno
import os
import signal
import sys
from pathlib import Path

from sjc_jax import interrupts

_stop = interrupts.StopRequest()
_restore = interrupts.install(_stop)

import orbax.checkpoint as ocp  # noqa: E402

from sjc_jax import checkpoint, files  # noqa: E402
from sjc_jax.cli import main  # noqa: E402


def _full(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def _install(spec: str) -> None:
    kind, _, rest = spec.partition(":")
    if kind == "checkpoint":
        target, count = int(rest), [0]
        save = ocp.AsyncCheckpointer.save

        def failing_save(self, directory, *args, **kwargs):
            count[0] += 1
            if count[0] != target:
                return save(self, directory, *args, **kwargs)
            tmp = Path(f"{directory}.orbax-checkpoint-tmp") / "ocdbt.process_0" / "d"
            tmp.mkdir(parents=True)
            (tmp / "partial").write_bytes(b"\0" * 4096)
            raise ValueError(
                'RESOURCE_EXHAUSTED: Error writing "grid.density/0.0.0" in OCDBT database at '
                f'local file "{tmp}": Failed to write 4096 bytes to file 18: No space left on '
                "device [os_error_code='28']"
            )

        ocp.AsyncCheckpointer.save = failing_save
    elif kind == "file":
        name, _, k = rest.rpartition(":")
        target, count = int(k), [0]
        atomic_path = files.atomic_path

        @contextlib.contextmanager
        def failing_atomic_path(path):
            with atomic_path(path) as tmp:
                if Path(path).name == name:
                    count[0] += 1
                    if count[0] == target:
                        tmp.write_bytes(b"\0" * 16)
                        raise _full(str(tmp))
                yield tmp

        files.atomic_path = failing_atomic_path
        # Modules that imported the helper by name.
        for module in ("sjc_jax.export", "sjc_jax.grid_io"):
            __import__(module)
            sys.modules[module].atomic_path = failing_atomic_path
    elif kind == "metrics":
        target, count = int(rest), [0]
        real_open = builtins.open

        class FailingFile:
            def __init__(self, f):
                self._f = f

            def write(self, text):
                count[0] += 1
                if count[0] == target:
                    self._f.write(text[: len(text) // 2])
                    self._f.flush()
                    raise _full("metrics.jsonl")
                return self._f.write(text)

            def __getattr__(self, name):
                return getattr(self._f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

        def failing_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if str(file).endswith("metrics.jsonl") and "a" in mode:
                return FailingFile(f)
            return f

        builtins.open = failing_open
    elif kind == "stop":
        target, count = int(rest), [0]
        writer_save = checkpoint.CheckpointWriter.save

        def stopping_save(self, step, state):
            path = writer_save(self, step, state)
            count[0] += 1
            if count[0] == target:
                _stop.request(signal.SIGINT)
            return path

        checkpoint.CheckpointWriter.save = stopping_save
    elif spec:
        raise SystemExit(f"unknown SJC_FAULT {spec!r}")


if __name__ == "__main__":
    _install(os.environ.get("SJC_FAULT", ""))
    sys.exit(main(sys.argv[1:], stop=_stop, restore=_restore))
