"""Progress of a long loop: tqdm's bar on a terminal, plain lines everywhere else.

A tqdm bar redraws itself with carriage returns; written into a file (``make run > log``, a
batch system's log) its frames pile up on one line of many kilobytes. `progress_bar` returns the
bar only when its stream is a terminal, else a `PlainProgress`, which prints one ordinary line
every `PLAIN_EVERY_PERCENT` per cent of the run (and where it stops), e.g. ``testbed: 25%
150/600 [263 s, 0.57 it/s] sigma=0.260 empty=0.0218 opacity=0.185``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLAIN_EVERY_PERCENT = 5


class PlainProgress:
    """The part of tqdm's interface the loops use, printing plain lines (see the module)."""

    def __init__(
        self,
        *,
        total: int,
        initial: int = 0,
        desc: str = "",
        file: TextIO | None = None,
        every_percent: float = PLAIN_EVERY_PERCENT,
    ):
        self.total, self.n, self.desc = int(total), int(initial), desc
        self._file = file
        self._start_n, self._start = self.n, time.perf_counter()
        self._every = max(1, round(self.total * every_percent / 100))
        self._next = (self.n // self._every + 1) * self._every
        self._postfix = ""
        self._closed = False

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = False) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self.n >= min(self._next, self.total):
            self._print()
            self._next = (self.n // self._every + 1) * self._every

    def _print(self) -> None:
        elapsed = time.perf_counter() - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        percent = 100 * self.n / self.total if self.total else 100
        head = f"{self.desc}: " if self.desc else ""
        tail = f" {self._postfix}" if self._postfix else ""
        line = f"{head}{percent:.0f}% {self.n}/{self.total} [{elapsed:.0f} s, {rate:.2f} it/s]"
        print(line + tail, file=self._file or sys.stderr, flush=True)

    def close(self) -> None:
        if not self._closed and self.n > self._start_n and self.n % self._every:
            self._print()  # the last line says where the loop ended
        self._closed = True


def progress_bar(
    *, total: int, initial: int = 0, desc: str = "", enabled: bool = True, file=None
) -> Any:
    """A tqdm bar on a terminal, a `PlainProgress` elsewhere; a disabled tqdm if not enabled."""
    from tqdm.auto import tqdm

    stream = file or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if enabled and not (isatty is not None and isatty()):
        return PlainProgress(total=total, initial=initial, desc=desc, file=file)
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        file=file,
    )


__all__ = ["PLAIN_EVERY_PERCENT", "PlainProgress", "progress_bar"]
