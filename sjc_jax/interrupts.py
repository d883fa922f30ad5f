"""Ctrl-C and SIGTERM as requests: a handler sets a flag that the run loop serves between steps.

Python's default SIGINT handler raises `KeyboardInterrupt` wherever the main thread happens to
be: inside a jitted step that has already consumed (donated) its input state, or in the middle of
a checkpoint write whose orbax threads go on writing. A `StopRequest` instead records the first
signal; the loop finishes the step it is in, flushes its metrics, writes one checkpoint and stops
(`sjc_jax.runner`). Later signals change nothing: a second Ctrl-C while the checkpoint is being
written waits for it. (To abandon a run at once, SIGKILL it; the last checkpoint stays intact.)

Before anything is in flight (parsing, imports, building the model) waiting would only make
Ctrl-C feel dead, so a request in *immediate* mode raises `KeyboardInterrupt` once, right away;
the runner switches to deferred mode (`StopRequest.defer`) before it writes anything.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

# The signals served as stop requests.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The first SIGINT / SIGTERM received (``signum``), and whether it raises at once."""

    def __init__(self, *, immediate: bool = True):
        self.signum: int | None = None
        self.immediate = immediate

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """``"SIGINT"`` / ``"SIGTERM"`` of the request ("" if none)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def request(self, signum: int = signal.SIGINT) -> None:
        """Record a stop request (what the signal handler does; also for scripts and tests)."""
        first = self.signum is None
        if first:
            self.signum = int(signum)
        if first and self.immediate:
            self.immediate = False
            raise KeyboardInterrupt

    def handler(self, signum, frame) -> None:
        self.request(signum)

    def defer(self) -> None:
        """From now on a request only sets the flag (it never raises); there is no way back."""
        self.immediate = False


def install(stop: StopRequest) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to ``stop``; returns a function restoring the previous handlers.

    A SIGINT that is ignored (a background job started by a non-interactive shell, ``nohup``)
    stays ignored, as Python itself does. Outside the main thread nothing is installed (Python
    delivers signals to the main thread only) and the returned function does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if signum == signal.SIGINT and current == signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, stop.handler)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


@contextlib.contextmanager
def handling(stop: StopRequest | None = None) -> Iterator[StopRequest]:
    """``stop`` as given (its handlers are the caller's), or a new one installed for the block."""
    if stop is not None:
        yield stop
        return
    stop = StopRequest()
    restore = install(stop)
    try:
        yield stop
    finally:
        restore()


__all__ = ["SIGNALS", "StopRequest", "handling", "install"]
