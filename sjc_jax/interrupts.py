"""Ctrl-C and SIGTERM as requests: a handler sets a flag that the run loop serves between steps.

Python's default SIGINT handler raises `KeyboardInterrupt` wherever the main thread happens to
be: inside a jitted step that has already consumed (donated) its input state, or in the middle of
a checkpoint write whose orbax threads go on writing. A `StopRequest` instead records the first
signal; the loop finishes the step it is in, flushes its metrics, writes one checkpoint and stops
(`sjc_jax.runner`). Later signals change nothing: a second Ctrl-C while the checkpoint is being
written waits for it. (To abandon a run at once, SIGKILL it; the last checkpoint stays intact.)

While nothing is in flight and nothing has been written (building the model: loading weights,
rendering the testbed's image set), waiting would only make Ctrl-C feel dead, so within
`StopRequest.immediately` the first request raises `KeyboardInterrupt` at once. (One raised
where Python can only print it, in a garbage-collection callback say, is not printed; it stays
recorded and is served right after the block.) Everywhere else, imports included (a library
that swallows a `KeyboardInterrupt` raised mid-import leaves the process in a state nobody
tested), a request only sets the flag.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

# The signals served as stop requests.
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Requested(KeyboardInterrupt):
    """The `KeyboardInterrupt` of an immediate request (recognised where Python cannot raise it)."""


def _quiet_requests(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook that drops our own immediate requests.

    A signal handler runs wherever the main thread is, also inside a garbage-collection callback
    or a ``__del__``, where Python can only print the exception ("Exception ignored in ...").
    The request stays recorded (``StopRequest.requested``) and is served right after the block.
    """

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, _Requested):
            previous(unraisable)

    hook.quiet_requests = True
    return hook


class StopRequest:
    """The first SIGINT / SIGTERM received (``signum``); it raises only within `immediately`."""

    def __init__(self):
        self.signum: int | None = None
        self._immediate = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        """``"SIGINT"`` / ``"SIGTERM"`` of the request ("" if none)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def request(self, signum: int = signal.SIGINT) -> None:
        """Record a stop request (what the signal handler does; also for scripts and tests)."""
        if self.signum is not None:
            return
        self.signum = int(signum)
        if self._immediate:
            self._immediate = False
            raise _Requested

    def handler(self, signum, frame) -> None:
        self.request(signum)

    @contextlib.contextmanager
    def immediately(self) -> Iterator[StopRequest]:
        """Within the block a request raises `KeyboardInterrupt` (also one already pending)."""
        if self.requested:
            raise KeyboardInterrupt
        self._immediate = True
        try:
            yield self
        finally:
            self._immediate = False


def install(stop: StopRequest) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to ``stop``; returns a function restoring the previous handlers.

    A SIGINT that is ignored (a background job started by a non-interactive shell, ``nohup``)
    stays ignored, as Python itself does. Outside the main thread nothing is installed (Python
    delivers signals to the main thread only) and the returned function does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if not getattr(sys.unraisablehook, "quiet_requests", False):
        sys.unraisablehook = _quiet_requests(sys.unraisablehook)
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
