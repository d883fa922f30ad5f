"""The command line: ``python -m sjc_jax run ...`` (every run-config field is a flag, by its bare
name: ``--lr``, ``--estimator``) and ``python -m sjc_jax bench``.

Every bad input ends as one line on stderr and exit code 2 (never a traceback); a non-finite grid
or a full disk exits 1 keeping the last good checkpoint; an interruption (Ctrl-C, SIGTERM)
finishes the step in flight, checkpoints it and exits 130 with the ``--resume`` command to
continue. SIGINT and SIGTERM are routed to a `sjc_jax.interrupts.StopRequest` before anything
heavy is imported, so no path prints a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import types
import typing
import warnings
from typing import Any

from sjc_jax import interrupts

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


def _default_text(field: dataclasses.Field, preset: dict[str, Any] | None, model: str) -> str:
    """``(default X)``, or both defaults where the default model's preset differs."""
    if preset is None or preset[field.name] == field.default:
        return f"(default {field.default!r})"
    return (
        f"(default {preset[field.name]!r} with --model {model}, {field.default!r} with a "
        "diffusion model)"
    )


def _preset_of_default_model() -> tuple[dict[str, Any] | None, str]:
    """The flat preset of the default ``--model`` (the testbed's), and that model's name."""
    from sjc_jax.config import ModelConfig
    from sjc_jax.models import kind_of

    model = ModelConfig().model
    kind = kind_of(model)
    return (kind.preset().to_flat() if kind.preset is not None else None), model


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Score Jacobian Chaining in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="lift a 2D diffusion model (or the testbed) to 3D",
        description="Every field of the run config is a flag. Defaults are the original SJC's "
        "for diffusion models; --model testbed (the default) starts from the testbed preset.",
    )
    run.add_argument(
        "--out", help="run directory (created; must be missing or empty, and is locked while used)"
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its newest usable checkpoint (with --steps N: extend "
        "it to N steps; no other flag)",
    )
    run.add_argument(
        "--config", metavar="FILE", help="start from a config file (e.g. a run's config.json)"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(run)
    _add_sweep_parser(sub)
    _add_train_parser(sub)
    export = sub.add_parser(
        "export",
        help="write a finished run's final/ again from its final/grid.npz",
        description="Meshes, view, videos, curves, eval.json (testbed and learned runs) and "
        "index.html of RUN_DIR, made again from RUN_DIR/final/grid.npz with the run's config.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's directory")
    export.add_argument(
        "--mesh-threshold",
        type=float,
        default=None,
        help="density level of the mesh (default: the run's setting; unset, the level whose "
        "silhouettes match the lift's, docs/outputs.md)",
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


def _add_config_flags(run: argparse.ArgumentParser) -> None:
    """Every run-config field as a flag of ``run``, by its bare name, in one group per section."""
    from sjc_jax.config import SECTIONS

    preset, default_model = _preset_of_default_model()
    groups = {}
    for name, cls in SECTIONS.items():
        summary = cls.__doc__.splitlines()[0].rstrip(".").replace("`", "")  # plain text
        groups[cls] = run.add_argument_group(f"{name} ({summary})")
    for cls, field, tp in _config_fields():
        flag = "--" + field.name.replace("_", "-")
        kind, is_bool = _field_parser(tp)
        help_text = f"{field.metadata['help']} {_default_text(field, preset, default_model)}"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if is_bool:
            groups[cls].add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            groups[cls].add_argument(flag, dest=field.name, type=kind, default=None, help=help_text)


def _add_sweep_parser(sub) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="many lifts at once: seeds x scenes/prompts x settings in one batched, jitted step",
        description="The grid product of --seeds, --scenes or --prompts and every --set runs "
        "as one batch (sjc_jax.sweep); every other flag is the lifts' shared base, as for run. "
        "Each lift gets a run directory under --out, plus sweep.json and report.html.",
    )
    sweep.add_argument("--out", help="sweep directory (created; must be missing or empty)")
    sweep.add_argument("--resume", metavar="DIR", help="continue the sweep in DIR (no other flag)")
    sweep.add_argument("--config", metavar="FILE", help="the shared base from a config file")
    sweep.add_argument("--seeds", help="seeds: a list and ranges, e.g. 0-7 or 0,3,5-6")
    sweep.add_argument("--scenes", help="testbed scenes: comma list of names or grid files")
    sweep.add_argument("--prompts", metavar="FILE", help="prompts, one a line (SD models)")
    sweep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="a traced field's values (lr, guidance_scale, loss weights, t_min / t_max); "
        "repeat for a grid product",
    )
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.add_argument(
        "--distributed",
        action="store_true",
        help="one process of a multi-host job: jax.distributed.initialize() (TPU pod slices, "
        "SLURM and other clusters it detects; or give the three flags below)",
    )
    sweep.add_argument("--coordinator", metavar="HOST:PORT", help="the first process's address")
    sweep.add_argument("--num-processes", type=int, help="how many processes the job has")
    sweep.add_argument("--process-id", type=int, help="this process's index (0 first)")
    _add_config_flags(sweep)


def _comma_list(text: str) -> list[str]:
    """``"duck, mug,"`` -> ``["duck", "mug"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


# The most lifts one sweep takes: they are one batched state, and each gets a run directory.
MAX_LIFTS = 65536


def parse_seeds(text: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]`` (at most `MAX_LIFTS` seeds)."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                if high < low:
                    raise ValueError(part)
                if len(seeds) + high - low + 1 > MAX_LIFTS:
                    raise OverflowError
                seeds.extend(range(low, high + 1))
            elif part:
                seeds.append(int(part))
    except ValueError:
        raise ValueError(f"--seeds must be numbers and ranges like 0-7,9, got {text!r}") from None
    except OverflowError:
        raise ValueError(f"--seeds names more than {MAX_LIFTS} seeds, a sweep's most") from None
    if not seeds:
        raise ValueError(f"--seeds names no seed: {text!r}")
    return seeds


def parse_sets(items: list[str]) -> dict[str, list[Any]]:
    """``["lr=0.05,0.1"]`` -> ``{"lr": [0.05, 0.1]}``, each value parsed as its field's type."""
    types_ = {field.name: tp for _, field, tp in _config_fields()}
    sets: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--set needs FIELD=V1,V2,..., got {item!r}")
        if name not in types_:
            raise ValueError(f"--set: unknown config field {name!r}")
        kind, is_bool = _field_parser(types_[name])
        parse = (lambda v: v.lower() in ("1", "true", "yes")) if is_bool else kind
        try:
            sets[name] = [parse(v.strip()) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--set {name}: cannot read {values!r} as {kind.__name__}") from None
    return sets


def _initialize_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` for ``--distributed`` or the explicit process flags."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in explicit):
        return
    if any(v is None for v in explicit) and any(v is not None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    import jax

    try:
        if args.coordinator is None:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(
                coordinator_address=args.coordinator,
                num_processes=args.num_processes,
                process_id=args.process_id,
            )
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot join the distributed job: {first}") from None


def _sweep(args: argparse.Namespace, stop: interrupts.StopRequest) -> int:
    from sjc_jax import sweep_run

    def action() -> dict[str, Any]:
        log = lambda line: print(f"{PROG}: {line}", file=sys.stderr)  # noqa: E731
        _initialize_distributed(args)
        if args.resume:
            given = sorted(given_fields(args))
            extra = [f for f in ("out", "config", "seeds", "scenes", "prompts") if getattr(args, f)]
            if given or extra or args.set:
                raise ValueError("--resume continues a sweep with its own plan (no other flag)")
            return sweep_run.run_sweep(
                None, args.resume, resume=True, progress=not args.no_progress, stop=stop, log=log
            )
        if not args.out:
            raise ValueError("sweep needs --out DIR (or --resume DIR)")
        prompts = None
        if args.prompts:
            try:
                lines = open(args.prompts).read().splitlines()
            except OSError as err:
                raise ValueError(f"cannot read --prompts {args.prompts}: {err.strerror}") from None
            prompts = [line.strip() for line in lines if line.strip()]
        lifts = sweep_run.expand(
            config_from_args(args),
            seeds=parse_seeds(args.seeds) if args.seeds else None,
            scenes=_comma_list(args.scenes) if args.scenes else None,
            prompts=prompts,
            sets=parse_sets(args.set),
        )
        return sweep_run.run_sweep(
            lifts, args.out, progress=not args.no_progress, stop=stop, log=log
        )

    return _outcome(action)


def _outcome(action: typing.Callable[[], dict[str, Any]]) -> int:
    """Run ``action`` and print its summary as JSON (exit 0), or map what it raises to one line
    (`sjc_jax.engine`'s, the same for every command): `Interrupted` exits 130, a non-finite
    state or a full disk (work kept, run stopped) and other OS errors 1, bad input (ValueError,
    a missing file) 2."""
    from sjc_jax.engine import DiskFullError, Interrupted, NonFiniteError

    try:
        summary = action()
    except Interrupted as err:
        return _fail(str(err), 130)
    except (NonFiniteError, DiskFullError) as err:
        return _fail(str(err), 1)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        return _fail(f"{err.strerror or err}{where}", 1)
    print(json.dumps(summary))
    return 0


def _add_train_parser(sub) -> None:
    from sjc_jax.learned.model import MODEL_PREDICTIONS
    from sjc_jax.learned.train import LOSS_WEIGHTINGS, TrainConfig

    d = TrainConfig()
    train = sub.add_parser(
        "train-model",
        help="train the learned known-answer model on renders of known scenes",
        description="Renders the scenes from the testbed's cameras over a plain background and "
        "trains a small conditional diffusers UNet on them (sjc_jax.learned); the model "
        "directory is written to OUT/model (or --model-out) and loads with --model DIR.",
    )
    train.add_argument("--out", help="training directory (created; must be missing or empty)")
    train.add_argument("--resume", metavar="DIR", help="continue the training in DIR")
    train.add_argument("--model-out", metavar="DIR", help="where the model goes (OUT/model)")
    train.add_argument(
        "--scenes",
        help=f"comma list of built-in scenes and RGB grid files (.npz) (default "
        f"{','.join(d.scenes)})",
    )
    for name, kind in (
        ("steps", int),
        ("batch_size", int),
        ("lr", _finite_float),
        ("seed", int),
        ("views_per_scene", int),
        ("checkpoint_every", int),
    ):
        train.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"(default {getattr(d, name)!r})",
        )
    train.add_argument(
        "--prediction-type",
        choices=MODEL_PREDICTIONS,
        default=None,
        help=f"what the UNet predicts (default {d.prediction_type})",
    )
    train.add_argument(
        "--loss-weighting",
        choices=LOSS_WEIGHTINGS,
        default=None,
        help=f"weights of the timesteps in the loss (default {d.loss_weighting})",
    )
    train.add_argument(
        "--snr-gamma", type=_finite_float, default=None, help=f"min_snr's gamma ({d.snr_gamma})"
    )
    train.add_argument(
        "--channels",
        help="comma list of the UNet's block channels, multiples of 32 (default "
        f"{','.join(map(str, d.architecture.block_out_channels))})",
    )
    train.add_argument("--background", help="R,G,B of the plain background (default 1,1,1)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_model(args: argparse.Namespace, stop: interrupts.StopRequest) -> int:
    from sjc_jax.learned import train as learned_train

    command = "python -m sjc_jax " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
    given = {
        name: getattr(args, name)
        for name in (
            "steps",
            "batch_size",
            "lr",
            "seed",
            "views_per_scene",
            "checkpoint_every",
            "prediction_type",
            "loss_weighting",
            "snr_gamma",
        )
        if getattr(args, name) is not None
    }

    def action() -> dict[str, Any]:
        if args.resume:
            extra = sorted(set(given) - {"steps"})
            if args.out or args.scenes or args.background or args.channels or extra:
                raise ValueError(
                    "--resume continues a training with its own settings (only --steps can change)"
                )
            config, out, resume = None, args.resume, True
        else:
            if not args.out:
                raise ValueError("train-model needs --out DIR (or --resume DIR)")
            if args.scenes is not None:
                given["scenes"] = tuple(_comma_list(args.scenes))
            if args.background is not None:
                try:
                    given["background"] = tuple(float(v) for v in args.background.split(","))
                except ValueError:
                    raise ValueError(
                        f"--background must be R,G,B numbers, got {args.background!r}"
                    ) from None
            if args.channels is not None:
                try:
                    channels = tuple(int(v) for v in args.channels.split(","))
                except ValueError:
                    raise ValueError(
                        f"--channels must be comma-separated integers, got {args.channels!r}"
                    ) from None
                given["architecture"] = dataclasses.replace(
                    learned_train.Architecture(), block_out_channels=channels
                )
            seed = given.get("seed", 0)
            if not 0 <= seed < 2**32:  # jax.random.key keeps a seed's low 32 bits
                raise ValueError(f"--seed must lie in [0, 2**32), got {seed}")
            rgb = given.get("background", (1.0, 1.0, 1.0))
            if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in rgb):
                raise ValueError(f"--background must be numbers in [0, 1], got {args.background!r}")
            config, out, resume = learned_train.TrainConfig(**given), args.out, False
            learned_train.check_before_training(config, args.model_out)
        return learned_train.train(
            config,
            out,
            resume=resume,
            steps=given.get("steps") if resume else None,
            model_out=args.model_out,
            command=command,
            progress=not args.no_progress,
            stop=stop,
            log=lambda line: print(f"{PROG}: {line}", file=sys.stderr),
        )

    return _outcome(action)


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
    if model == "testbed" and "prompt" in given:
        raise ValueError("--prompt needs --model (a hub id or a local diffusers directory)")
    if kind.preset is not None:
        return kind.preset(**given)
    return SJCConfig.flat(**given)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    lines = str(message).strip().splitlines() or [category.__name__]
    print(f"{PROG}: warning: {lines[0]}", file=sys.stderr)  # one line each, as errors


def main(
    argv: list[str] | None = None,
    *,
    stop: interrupts.StopRequest | None = None,
    restore: typing.Callable[[], None] | None = None,
) -> int:
    """The command line; ``stop`` (with its handlers' ``restore``) when already installed.

    Ctrl-C / SIGTERM are requests (`sjc_jax.interrupts`) that `runner.run` serves; nothing
    raises mid-import. ``python -m sjc_jax`` installs them before importing this module.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    warnings.showwarning = _show_warning
    if stop is not None:
        return _main(argv, stop, restore or (lambda: None))
    stop = interrupts.StopRequest()
    restore = interrupts.install(stop)
    try:  # called in-process (tests, scripts): the caller's handlers come back afterwards
        return _main(argv, stop, restore)
    finally:
        restore()


def _main(argv: list[str] | None, stop: interrupts.StopRequest, restore) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command == "bench":
        restore()  # a benchmark writes nothing: Ctrl-C just stops it
        try:
            if stop.requested:
                raise KeyboardInterrupt
            from sjc_jax.bench import run_bench

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
        except KeyboardInterrupt:
            return _fail("bench interrupted", 130)
        return 0
    from sjc_jax import compile_cache, runner

    compile_cache.enable()  # before anything compiles; $SJC_JAX_COMPILE_CACHE=0 turns it off
    if args.command == "train-model":
        return _train_model(args, stop)
    if args.command == "sweep":
        return _sweep(args, stop)
    if args.command == "export":
        from sjc_jax.reexport import export_run

        return _outcome(lambda: export_run(args.run_dir, mesh_threshold=args.mesh_threshold))

    def action() -> dict[str, Any]:
        steps = None
        if args.resume:
            out, resume = args.resume, True
            config = None
            refused = sorted(set(given_fields(args)) - set(RESUME_FLAGS))
            if args.config or args.out or refused:
                names = ["--" + n.replace("_", "-") for n in refused]
                names += [f for f, v in (("--config", args.config), ("--out", args.out)) if v]
                raise ValueError(
                    f"--resume continues a run with its own config; {', '.join(names)} cannot "
                    "change (only --steps can, to extend the run)"
                )
            steps = given_fields(args).get("steps")
        else:
            if not args.out:
                raise ValueError("run needs --out DIR (or --resume DIR)")
            out, resume = args.out, False
            config = config_from_args(args)
        return runner.run(
            config,
            out,
            resume=resume,
            steps=steps,
            progress=not args.no_progress,
            stop=stop,
            log=lambda line: print(f"{PROG}: {line}", file=sys.stderr),
        )

    return _outcome(action)
