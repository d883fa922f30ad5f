"""TensorBoard event files of a run, written with tensorboardX (no TensorFlow needed).

``tensorboard --logdir RUN_DIR/tensorboard`` shows them. `TensorBoardWriter` takes what the run
loop already has on the host: the fetched metrics of a step (`TensorBoardWriter.scalars`) and
preview images ``[H, W, 3]`` in [0, 1] or uint8 (`TensorBoardWriter.image`), and at the end the
evaluation and the config (`TensorBoardWriter.summary`: ``eval/...`` scalars and the HParams
table, the latter in the subdirectory ``hparams/``). A resumed run
passes ``purge_step`` (the step it resumes from), so TensorBoard hides the events the
interrupted run wrote past that step.

Event files are a view of the run, never a reason to lose it: tensorboardX writes them from a
thread of its own, and when that thread fails (a full disk) its traceback is not printed; the
writer stops sending events (a dead thread would otherwise block the run once the queue is
full) and says so in one warning line.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

# Errors of tensorboardX's writer threads, in order (see the module docstring).
_THREAD_ERRORS: list[BaseException] = []


def _from_tensorboardx(tb) -> bool:
    while tb is not None:
        if f"{os.sep}tensorboardX{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _quiet_writer_threads(previous):
    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and _from_tensorboardx(args.exc_traceback):
            _THREAD_ERRORS.append(args.exc_value)
            return
        previous(args)

    return hook


threading.excepthook = _quiet_writer_threads(threading.excepthook)


class TensorBoardWriter:
    """Scalars and images of a run as TensorBoard events in ``logdir`` (created).

    Args:
      logdir: the event files' directory.
      purge_step: when resuming at this step, events at or after it in earlier files are hidden.
      flush_secs: how often pending events are written to disk (and on `flush` / `close`).

    Use as a context manager, or call `close`.
    """

    def __init__(
        self, logdir: str | os.PathLike, *, purge_step: int | None = None, flush_secs: int = 30
    ) -> None:
        from tensorboardX import SummaryWriter

        self.logdir = os.fspath(logdir)
        self._errors_before = len(_THREAD_ERRORS)
        self._stopped = False
        # tensorboardX names a file by the second it opens it: a writer opened in the same
        # second (a quick resume) would overwrite the last one's file without a unique suffix,
        # and TensorBoard reads files in name order, so the suffix sorts by time.
        self._writer = SummaryWriter(
            logdir=self.logdir,
            purge_step=purge_step,
            flush_secs=flush_secs,
            max_queue=1000,
            filename_suffix=f".{time.time_ns()}.{os.getpid()}",
        )

    def _stop(self, error: BaseException) -> None:
        if not self._stopped:
            self._stopped = True
            # tensorboardX closes its file writers again at exit (an atexit hook that would
            # fail the same way): mark ours closed, its own flag for "nothing left to write".
            file_writer = getattr(self._writer, "file_writer", None)
            if file_writer is not None and hasattr(file_writer, "event_writer"):
                file_writer.event_writer._closed = True
            reason = getattr(error, "strerror", None) or error
            warnings.warn(f"TensorBoard events stopped: {reason}", stacklevel=3)

    def _writing(self) -> bool:
        """Whether events still go out (False once a writer thread of ours has failed)."""
        if not self._stopped and len(_THREAD_ERRORS) > self._errors_before:
            self._stop(_THREAD_ERRORS[-1])
        return not self._stopped

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One scalar per entry of ``values`` (numbers, bools, 0-d arrays) at ``step``.

        Entries that are not numbers (strings, arrays with more than one element) are skipped,
        and so are non-finite values (TensorBoard cannot plot them).
        """
        if not self._writing():
            return
        for name, value in values.items():
            array = np.asarray(value)
            if array.size != 1 or array.dtype.kind not in "biuf":
                continue
            number = float(array.reshape(()))
            if math.isfinite(number):
                self._writer.add_scalar(name, number, global_step=int(step))

    def summary(self, step: int, config: Mapping[str, Any], evaluation: Mapping[str, Any]) -> None:
        """A finished run: its evaluation as scalars, its config as hyper-parameters.

        ``evaluation`` (``eval.json``, or ``{"mesh": ...}`` alone) goes in as ``eval/<key>``
        scalars at ``step``, one level of nested dicts as ``eval/<key>/<inner>``; lists and
        strings are left out. ``config`` (`SJCConfig.to_flat`) becomes TensorBoard's HParams
        table (values that are not numbers or bools as text), with the scalars as its metrics.
        """
        flat: dict[str, Any] = {}
        for key, value in evaluation.items():
            if isinstance(value, Mapping):
                flat.update({f"eval/{key}/{inner}": v for inner, v in value.items()})
            else:
                flat[f"eval/{key}"] = value
        self.scalars(step, flat)
        if not self._writing():
            return
        metrics = {}
        for name, value in flat.items():
            array = np.asarray(value)
            if array.size == 1 and array.dtype.kind in "biuf":
                number = float(array.reshape(()))
                if math.isfinite(number):
                    metrics[name] = number
        hparams = {
            name: value if isinstance(value, (bool, int, float, str)) else str(value)
            for name, value in config.items()
        }
        self._writer.add_hparams(hparams, metrics, name="hparams", global_step=int(step))

    def image(self, step: int, name: str, array: Any) -> None:
        """An image ``[H, W, 3]`` (or ``[H, W, 4]``, ``[H, W]``) in [0, 1] or uint8 at ``step``."""
        from sjc_jax.export import to_uint8

        image = to_uint8(array)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image must be [H, W], [H, W, 1|3|4], got shape {image.shape}")
        if self._writing():
            self._writer.add_image(name, image, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._writing():
            try:
                self._writer.flush()
            except OSError as err:
                self._stop(err)

    def close(self) -> None:
        """Write what is pending and close (after a failure: drop it, never block)."""
        if not self._writing():
            return
        try:
            self._writer.close()
        except OSError as err:
            self._stop(err)

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
