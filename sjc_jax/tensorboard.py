"""TensorBoard event files of a run, written with tensorboardX (no TensorFlow needed).

``tensorboard --logdir RUN_DIR/tensorboard`` shows them. `TensorBoardWriter` takes what the run
loop already has on the host: the fetched metrics of a step (`TensorBoardWriter.scalars`) and
preview images ``[H, W, 3]`` in [0, 1] or uint8 (`TensorBoardWriter.image`). A resumed run
passes ``purge_step`` (the step it resumes from), so TensorBoard hides the events the
interrupted run wrote past that step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


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
        # tensorboardX names a file by the second it opens it: a writer opened in the same
        # second (a quick resume) would overwrite the last one's file without a unique suffix,
        # and TensorBoard reads files in name order, so the suffix sorts by time.
        self._writer = SummaryWriter(
            logdir=self.logdir,
            purge_step=purge_step,
            flush_secs=flush_secs,
            filename_suffix=f".{time.time_ns()}.{os.getpid()}",
        )

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """One scalar per entry of ``values`` (numbers, bools, 0-d arrays) at ``step``.

        Entries that are not numbers (strings, arrays with more than one element) are skipped,
        and so are non-finite values (TensorBoard cannot plot them).
        """
        for name, value in values.items():
            array = np.asarray(value)
            if array.size != 1 or array.dtype.kind not in "biuf":
                continue
            number = float(array.reshape(()))
            if math.isfinite(number):
                self._writer.add_scalar(name, number, global_step=int(step))

    def image(self, step: int, name: str, array: Any) -> None:
        """An image ``[H, W, 3]`` (or ``[H, W, 4]``, ``[H, W]``) in [0, 1] or uint8 at ``step``."""
        from sjc_jax.export import to_uint8

        image = to_uint8(array)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image must be [H, W], [H, W, 1|3|4], got shape {image.shape}")
        self._writer.add_image(name, image, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
