"""Progress in a log file: plain lines every few per cent, never carriage-return frames."""

from __future__ import annotations

import io

from sjc_jax.progress import PlainProgress, progress_bar


def test_plain_lines_every_five_per_cent():
    stream = io.StringIO()
    bar = progress_bar(total=200, desc="duck", file=stream)
    assert isinstance(bar, PlainProgress)  # a StringIO is no terminal
    for step in range(200):
        bar.set_postfix(sigma=f"{0.1 * step:.1f}", refresh=False)
        bar.update()
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 20
    assert lines[0].startswith("duck: 5% 10/200 [") and lines[0].endswith("sigma=0.9")
    assert lines[-1].startswith("duck: 100% 200/200 [")


def test_resumed_and_stopped_loops_say_where_they_are():
    stream = io.StringIO()
    bar = PlainProgress(total=100, initial=42, desc="x", file=stream)
    for _ in range(5):
        bar.update()
    bar.close()
    bar.close()  # once
    assert [line.split(" [")[0] for line in stream.getvalue().splitlines()] == [
        "x: 45% 45/100",
        "x: 47% 47/100",
    ]


def test_a_terminal_gets_tqdm_and_disabled_prints_nothing():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    bar = progress_bar(total=10, desc="t", file=terminal)
    assert not isinstance(bar, PlainProgress)
    bar.update(10)
    bar.close()
    assert "\r" in terminal.getvalue()
    quiet = io.StringIO()
    bar = progress_bar(total=10, enabled=False, file=quiet)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""
