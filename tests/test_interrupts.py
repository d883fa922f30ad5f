"""Stop requests: deferred by default, immediate only inside `StopRequest.immediately`."""

import signal
import subprocess
import sys
import textwrap

import pytest

from sjc_jax import interrupts


def test_a_request_only_sets_the_flag_and_later_ones_change_nothing():
    stop = interrupts.StopRequest()
    assert not stop.requested and stop.name == ""
    stop.request(signal.SIGTERM)
    stop.request(signal.SIGINT)
    assert stop.requested and stop.signum == signal.SIGTERM and stop.name == "SIGTERM"


def test_immediately_raises_once_and_a_pending_request_at_entry():
    stop = interrupts.StopRequest()
    with pytest.raises(KeyboardInterrupt):
        with stop.immediately():
            stop.request(signal.SIGINT)
    stop.request(signal.SIGINT)  # after the block: a flag again, no raise
    with pytest.raises(KeyboardInterrupt):
        with stop.immediately():
            pass


def test_handlers_are_installed_and_restored():
    stop = interrupts.StopRequest()
    before = signal.getsignal(signal.SIGTERM)
    restore = interrupts.install(stop)
    try:
        assert signal.getsignal(signal.SIGTERM) == stop.handler
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        restore = interrupts.install(interrupts.StopRequest())
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        restore()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_request_raised_where_python_cannot_raise_is_not_printed():
    """Inside a __del__ (as inside a gc callback) the KeyboardInterrupt is unraisable."""
    script = textwrap.dedent(
        """
        import gc, signal
        from sjc_jax import interrupts

        # A shell that starts us in the background ignores SIGINT; this test needs it delivered.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        stop = interrupts.StopRequest()
        interrupts.install(stop)

        class Finalised:
            def __del__(self):
                signal.raise_signal(signal.SIGINT)

        with stop.immediately():
            Finalised()
            gc.collect()
        print("requested", stop.requested)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "requested True"
    assert result.stderr == ""


def test_handling_installs_only_without_a_given_request():
    given = interrupts.StopRequest()
    before = signal.getsignal(signal.SIGTERM)
    with interrupts.handling(given) as stop:
        assert stop is given and signal.getsignal(signal.SIGTERM) == before
    with interrupts.handling() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop.handler
    assert signal.getsignal(signal.SIGTERM) == before
