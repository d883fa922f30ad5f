"""The command line: ``python -m sjc_jax run ...`` (every `SJCConfig` field is a flag) and
``python -m sjc_jax bench``.

Every bad input ends as one line on stderr and exit code 2 (never a traceback); a non-finite grid
exits 1 keeping the last good checkpoint; an interruption (Ctrl-C, SIGTERM) checkpoints and exits
130 with the ``--resume`` command to continue.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import types
import typing
import warnings
from typing import Any

PROG = "sjc_jax"


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (and exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        raise SystemExit(_fail(f"{message} (see --help)"))


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _field_parser(tp: Any):
    """(argparse type, is_bool) of an `SJCConfig` field annotation."""
    tp = typing.get_type_hints(_config_cls())[tp] if isinstance(tp, str) else tp
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else tp
    if base is bool:
        return None, True
    if optional:

        def parse(text: str, base=base):
            return None if text.lower() == "none" else base(text)

        parse.__name__ = base.__name__
        return parse, False
    return base, False


def _config_cls():
    from sjc_jax.sjc import SJCConfig

    return SJCConfig


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Score Jacobian Chaining in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="lift a 2D diffusion model (or the testbed) to 3D")
    run.add_argument("--out", help="run directory (created; must not hold another run)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    hints = typing.get_type_hints(_config_cls())
    for field in dataclasses.fields(_config_cls()):
        flag = "--" + field.name.replace("_", "-")
        kind, is_bool = _field_parser(hints[field.name])
        help_text = f"default: {field.default!r} (testbed: its preset)"
        if is_bool:
            run.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            run.add_argument(flag, dest=field.name, type=kind, default=None, help=help_text)
    bench = sub.add_parser("bench", help="time the renderer and the SJC step; prints JSON")
    bench.add_argument("--repeats", type=int, default=5, help="timed repetitions (median)")
    bench.add_argument(
        "--parts", default="render,step", help="comma list of render, step (step needs ~4 GB)"
    )
    bench.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma list of UNet dtypes of the step"
    )
    bench.add_argument(
        "--attention",
        default="auto",
        help="comma list of UNet attention kernels of the step (auto, diffusers, xla, cudnn)",
    )
    return parser


def config_from_args(args: argparse.Namespace):
    """The run's `SJCConfig`: the preset of the model (testbed or SJC) with the given flags."""
    from sjc_jax.sjc import SJCConfig

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SJCConfig)
        if getattr(args, f.name) is not None
    }
    if given.get("model", "testbed") == "testbed" and "prompt" not in given:
        from sjc_jax.testbed import testbed_config

        return testbed_config(**given)
    if "model" not in given:
        raise ValueError("--prompt needs --model (a hub id or a local diffusers directory)")
    return SJCConfig(**given)


def _install_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.showwarning = _show_warning
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command == "bench":
        from sjc_jax.bench import run_bench

        try:
            result = run_bench(
                repeats=args.repeats,
                parts=tuple(args.parts.split(",")),
                dtypes=tuple(args.dtypes.split(",")),
                attention=tuple(args.attention.split(",")),
                report=lambda part: print(
                    f"{PROG}: bench: {json.dumps(part)}", file=sys.stderr, flush=True
                ),
            )
            print(json.dumps(result))
        except ValueError as err:
            return _fail(str(err))
        return 0
    from sjc_jax import runner

    try:
        if args.resume:
            out, resume = args.resume, True
            config = None
        else:
            if not args.out:
                return _fail("run needs --out DIR (or --resume DIR)")
            out, resume = args.out, False
            config = config_from_args(args)
        _install_sigterm()
        summary = runner.run(config, out, resume=resume, progress=not args.no_progress)
    except runner.NonFiniteError as err:
        return _fail(str(err), 1)
    except runner.Interrupted as err:
        return _fail(str(err), 130)
    except KeyboardInterrupt:
        return _fail("interrupted before the first step; nothing to resume", 130)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    print(json.dumps(summary))
    return 0
