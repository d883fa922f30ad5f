"""The command line: ``python -m sjc_jax run ...`` (every run-config field is a flag, by its bare
name: ``--lr``, ``--estimator``) and ``python -m sjc_jax bench``.

Every bad input ends as one line on stderr and exit code 2 (never a traceback); a non-finite grid
exits 1 keeping the last good checkpoint; an interruption (Ctrl-C, SIGTERM) checkpoints and exits
130 with the ``--resume`` command to continue.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
    """(argparse type, is_bool) of a config field's annotation."""
    args = typing.get_args(tp)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else tp
    if base is bool:
        return None, True
    if base is float:
        base = _finite_float
    if optional:

        def parse(text: str, base=base):
            return None if text.lower() == "none" else base(text)

        parse.__name__ = base.__name__
        return parse, False
    return base, False


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_finite_float.__name__ = "finite float"


def _config_fields():
    """(section class, field, resolved type) of every run-config field, in section order."""
    from sjc_jax.config import SECTIONS

    for cls in SECTIONS.values():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            yield cls, field, hints[field.name]


# Flags that may accompany --resume (everything else is refused in one line).
RESUME_FLAGS = ("steps",)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Score Jacobian Chaining in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="lift a 2D diffusion model (or the testbed) to 3D",
        description="Every field of the run config is a flag. Defaults are the original SJC's "
        "for diffusion models; --model testbed (the default) starts from the testbed preset.",
    )
    run.add_argument("--out", help="run directory (created; must not hold another run)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    run.add_argument(
        "--config", metavar="FILE", help="start from a config file (e.g. a run's config.json)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    for cls, field, tp in _config_fields():
        flag = "--" + field.name.replace("_", "-")
        kind, is_bool = _field_parser(tp)
        help_text = f"{field.metadata['help']} (default {field.default!r})"
        group = f"{cls.__doc__.splitlines()[0]}"
        if is_bool:
            run.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} [{group}]",
            )
        else:
            run.add_argument(
                flag, dest=field.name, type=kind, default=None, help=f"{help_text} [{group}]"
            )
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


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line (flat names)."""
    return {
        field.name: getattr(args, field.name)
        for _, field, _ in _config_fields()
        if getattr(args, field.name) is not None
    }


def config_from_args(args: argparse.Namespace):
    """The run's config: ``--config FILE`` or the model kind's preset, with the given flags."""
    from sjc_jax.config import SJCConfig
    from sjc_jax.models import kind_of

    given = given_fields(args)
    if args.config:
        try:
            values = json.loads(open(args.config).read())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read --config {args.config}: {err}") from None
        return SJCConfig.from_dict(values).replace(**given)
    model = given.get("model", "testbed")
    kind = kind_of(model)
    if kind.preset is not None and "prompt" not in given:
        return kind.preset(**given)
    if model == "testbed":
        raise ValueError("--prompt needs --model (a hub id or a local diffusers directory)")
    return SJCConfig.flat(**given)


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
        steps = None
        if args.resume:
            out, resume = args.resume, True
            config = None
            refused = sorted(set(given_fields(args)) - set(RESUME_FLAGS))
            if args.config or args.out or refused:
                names = ["--" + n.replace("_", "-") for n in refused]
                names += [f for f, v in (("--config", args.config), ("--out", args.out)) if v]
                return _fail(
                    f"--resume continues a run with its own config; {', '.join(names)} cannot "
                    "change (only --steps can, to extend the run)"
                )
            steps = given_fields(args).get("steps")
        else:
            if not args.out:
                return _fail("run needs --out DIR (or --resume DIR)")
            out, resume = args.out, False
            config = config_from_args(args)
        _install_sigterm()
        summary = runner.run(config, out, resume=resume, steps=steps, progress=not args.no_progress)
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
