"""A sweep on disk: N lifts as one batched run, each lift with a normal run directory.

Layout of a sweep directory ``OUT``::

    OUT/plan.json        the lifts: name, settings (what differs), full config (resume reads it)
    OUT/checkpoints/     the whole batched state (`checkpoint.CheckpointWriter`, orbax)
    OUT/<lift>/          each lift's run directory: config.json, metrics.jsonl, previews/,
                         tensorboard/, final/ (grid, view, videos, mesh, metrics.png,
                         eval.json, index.html), as `python -m sjc_jax run` writes them
    OUT/sweep.json       one row a lift: settings, last metrics, eval (written at the end)
    OUT/report.html      the comparison report (`sjc_jax.report`)

`expand` makes the lifts of a grid product (seeds x scenes or prompts x ``--set`` values);
`run_sweep` runs them with `sjc_jax.sweep.make_batched_step` on the run engine of a single run
(`sjc_jax.engine`): same lock, memory check, checkpoints and validated restore, interruption
and full-disk handling, exact ``resume``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from sjc_jax import engine, files, interrupts, report, resources, rundir, sweep
from sjc_jax.artifacts import Artifacts, write_final
from sjc_jax.config import SJCConfig
from sjc_jax.engine import Hook, NonFiniteError, run_loop
from sjc_jax.models import Model, build_model
from sjc_jax.rundir import RunError
from sjc_jax.runner import config_to_dict, write_board_summary
from sjc_jax.sjc import init_state
from sjc_jax.tensorboard import TensorBoardWriter

PLAN = "plan.json"
SUMMARY = "sweep.json"
REPORT = "report.html"
# The metrics whose last values go into sweep.json (when the step reports them).
SUMMARY_METRICS = ("opacity", "emptiness", "score_norm", "sigma")


def _lift_name(index: int, settings: Mapping[str, Any]) -> str:
    """``007-seed3-mug-lr0.1``: the index, then each setting (a scene or prompt by its text)."""
    parts = [f"{index:03d}"]
    for key, value in settings.items():
        if key == "scene":
            parts.append(Path(str(value)).stem)
        elif key == "prompt":
            parts.append(str(value)[:24])
        else:
            parts.append(f"{key}{value}")
    name = "-".join(parts)
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]


def expand(
    base: SJCConfig,
    *,
    seeds: Sequence[int] | None = None,
    scenes: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    sets: Mapping[str, Sequence[Any]] | None = None,
) -> list[tuple[str, dict[str, Any], SJCConfig]]:
    """The lifts of a grid product: ``(name, settings, config)`` each, in product order.

    ``settings`` holds only what differs (the axes given), e.g. ``{"seed": 3, "lr": 0.1}``.

    Raises:
      ValueError: an unknown field or a bad value (the config's own one-line checks).
    """
    axes: list[tuple[str, list[Any]]] = []
    if seeds is not None:
        axes.append(("seed", list(seeds)))
    if scenes is not None:
        axes.append(("scene", list(scenes)))
    if prompts is not None:
        axes.append(("prompt", list(prompts)))
    for name, values in (sets or {}).items():
        axes.append((name, list(values)))
    for name, values in axes:
        if not values:
            raise ValueError(f"the sweep axis {name!r} has no values")
    names = [n for n, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"a sweep axis is given twice: {names}")
    lifts = []
    for index, combo in enumerate(itertools.product(*(v for _, v in axes))):
        settings = dict(zip(names, combo, strict=True))
        lifts.append((_lift_name(index, settings), settings, base.replace(**settings)))
    return lifts


def _check_new(out: Path) -> None:
    """``out`` is missing or empty (but for its lock)."""
    if out.exists() and (not out.is_dir() or any(p.name != rundir.LOCK for p in out.iterdir())):
        raise RunError(f"--out {str(out)!r} exists and is not an empty directory")


def _read_plan(out: Path) -> list[tuple[str, dict[str, Any], SJCConfig]]:
    path = out / PLAN
    try:
        plan = json.loads(path.read_text())
        return [
            (lift["name"], lift["settings"], SJCConfig.from_dict(lift["config"]))
            for lift in plan["lifts"]
        ]
    except FileNotFoundError:
        raise RunError(f"nothing to resume: {str(out)!r} holds no {PLAN}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunError(f"cannot read {str(path)!r}: {err}") from None


def _global(x, sharding):
    """A global array of the host value ``x`` (every process holds all of it) on ``sharding``."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _place(mesh, state, params, axes):
    """State split over the mesh's lifts axis; stacked params too, shared params replicated.

    Works across processes: each one holds the whole host value and hands over its shards."""
    if mesh is None:
        return state, params
    lifts = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("lifts"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.tree_util.tree_map(lambda x: _global(x, lifts), state)
    params = jax.tree_util.tree_map(
        lambda x, a: _global(x, lifts if a == 0 else replicated), params, axes
    )
    return state, params


def _local_lifts(tree, num_lifts: int) -> dict[int, Any]:
    """``{lift index: that lift's pytree of host arrays}`` for the lifts this process holds."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return {}
    found: dict[int, list[np.ndarray]] = {}
    for k, leaf in enumerate(leaves):
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:  # a host array: every lift is here
            parts = [(slice(0, num_lifts), np.asarray(leaf))]
        else:
            parts = [(shard.index[0], np.asarray(shard.data)) for shard in shards]
        for index, data in parts:
            lifts = range(num_lifts)[index]
            for j, lift in enumerate(lifts):
                column = found.setdefault(lift, [None] * len(leaves))
                column[k] = data[j]
    return {
        lift: jax.tree_util.tree_unflatten(treedef, column)
        for lift, column in sorted(found.items())
        if all(c is not None for c in column)
    }


def _local_step(state) -> int:
    """The lifts' step count (every lift is at the same step), read from a local shard."""
    step = state.step
    shards = getattr(step, "addressable_shards", None)
    return int(np.asarray(shards[0].data if shards else step).reshape(-1)[0])


def _gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every process's rows, on every process (one JSON blob a process, padded to one size)."""
    if jax.process_count() == 1:
        return rows
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(rows).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: blob.size] = blob
    blobs = multihost_utils.process_allgather(padded)
    gathered = []
    for size, data in zip(np.ravel(sizes), blobs.reshape(len(np.ravel(sizes)), -1), strict=True):
        gathered.extend(json.loads(bytes(data[: int(size)]).decode()))
    return sorted(gathered, key=lambda row: row["lift"])


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _check_memory(configs: Sequence[SJCConfig], built: Sequence[Model], mesh, choices) -> None:
    """Refuse (one line) a batch whose states and steps cannot fit on one device."""
    base = sweep.base_config(configs)
    denoiser = built[0].denoiser
    shapes = jax.eval_shape(
        lambda: init_state(
            base,
            denoiser.channels,
            background=built[0].background,
            estimator=choices.get("estimator"),
            optimizer=choices.get("optimizer"),
            denoiser=denoiser,
        )
    )
    lift_devices = 1 if mesh is None else mesh.shape["lifts"]
    view_devices = 1 if mesh is None else mesh.shape["views"]
    one = resources.estimate(
        base,
        shapes,
        channels=denoiser.channels,
        image_size=base.render.image_size or denoiser.resolution,
        devices=view_devices,
    )
    per_device = -(-len(configs) // lift_devices)
    needed = resources.MemoryEstimate(state=per_device * one.state, step=per_device * one.step)
    engine.check_memory(needed, resolution=base.render.grid_resolution)


def _plan(lifts, out: Path, *, resume: bool, choices: dict) -> tuple:
    """The lifts, their models and the mesh, every check made; nothing written."""
    if jax.process_index() == 0:
        rundir.check_free(out)  # a sweep running here: refused before anything is built
    if resume:
        lifts = _read_plan(out)
    else:
        if not lifts:
            raise ValueError("a sweep needs at least one lift")
        if jax.process_index() == 0:
            _check_new(out)
    configs = [c for _, _, c in lifts]
    base = sweep.base_config(configs)
    sweep.varying_fields(configs)  # refuse a batch that cannot share one step, before writing
    if not resume:  # bad scenes and sizes that cannot fit, before the models are built
        resources.check_before_build(configs)
    built = [build_model(c) for c in configs]
    denoiser = built[0].denoiser
    for m in built[1:]:
        d = m.denoiser
        if (d.channels, d.resolution, d.feature_space) != (
            denoiser.channels,
            denoiser.resolution,
            denoiser.feature_space,
        ):
            raise ValueError("the lifts of a sweep need one model (same channels and resolution)")
    mesh = sweep.sweep_mesh(len(configs), base.run.views_per_step)
    _check_memory(configs, built, mesh, choices)
    return lifts, built, mesh


def run_sweep(
    lifts: Sequence[tuple[str, dict[str, Any], SJCConfig]] | None,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop: interrupts.StopRequest | None = None,
    log: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    **choices: Any,
) -> dict[str, Any]:
    """Run the lifts as one batched run in ``out`` (or continue it with ``resume``).

    ``choices`` are research choices as values (``estimator``, ``camera_sampler``,
    ``sigma_sampler``, ``regularizers``, ``optimizer``), shared by every lift, as `runner.run`
    takes them (`sjc_jax.sweep.make_batched_step`); left out, each lift's are built from its
    config. A resumed sweep must be given the same values.

    On several processes (`jax.distributed.initialize` called first) every process runs this
    with the same arguments: each writes the run directories of the lifts on its devices, the
    first process writes ``plan.json``, ``sweep.json`` and ``report.html``, and all of them
    write the checkpoints together (orbax). ``out`` must then be one shared directory.

    Everything around the steps is `sjc_jax.engine`'s, as for a run: validation, the models and
    the memory check before anything is written, the directory's lock (held by the first
    process), checkpoints and their validated restore, stop requests and the full disk.

    Returns the summary ``{"lifts": N, "steps", "seconds", "out", "sweep": path}``.

    Raises:
      RunError / ValueError: one line (bad directory, a batch that cannot share a step, a batch
        that cannot fit).
      Interrupted: a stop request was served (state checkpointed; ``--resume`` continues).
      NonFiniteError: a lift's grid became non-finite.
      DiskFullError: a write failed for lack of space (the last good checkpoint kept).
    """
    out = Path(out)
    primary = jax.process_index() == 0
    with interrupts.handling(stop) as stop:
        lifts, built, mesh = engine.prepare(
            lambda: _plan(lifts, out, resume=resume, choices=choices),
            stop,
            out,
            resume=resume,
            command="sweep",
        )
        _sync("sweep-checked")
        # The first process holds the directory's lock for the sweep, and alone shows progress.
        with engine.owned(
            out, ckpt_dir=out / rundir.CHECKPOINTS, marker=PLAN, command="sweep", lock=primary
        ):
            if primary and not resume:
                _check_new(out)  # again under the lock: another sweep may have started here
            return _run_locked(lifts, out, built=built, mesh=mesh, resume=resume,
                               progress=progress and primary, stop=stop,
                               log=log if primary else None, stop_after=stop_after,
                               choices=choices)  # fmt: skip


def _run_locked(
    lifts, out: Path, *, built, mesh, resume, progress, stop, log, stop_after, choices
) -> dict[str, Any]:
    names = [n for n, _, _ in lifts]
    configs = [c for _, _, c in lifts]
    base = sweep.base_config(configs)
    primary = jax.process_index() == 0
    if primary and not resume:
        files.write_json(
            out / PLAN,
            {
                "lifts": [
                    {"name": n, "settings": s, "config": config_to_dict(c)} for n, s, c in lifts
                ]
            },
        )
    _sync("sweep-planned")

    denoiser = built[0].denoiser
    params, axes = sweep.stack([m.denoiser.params for m in built])
    state = sweep.init_batched_state(
        configs,
        denoiser.channels,
        backgrounds=[m.background for m in built],
        estimator=choices.get("estimator"),
        optimizer=choices.get("optimizer"),
        denoiser=denoiser,
    )
    step_fn = sweep.make_batched_step(configs, denoiser, axes, mesh=mesh, **choices)
    state, params = _place(mesh, state, params, axes)
    mine = sorted(_local_lifts(state.step, len(configs)))  # the lifts on this process
    dirs = {i: out / names[i] for i in mine}
    for i, d in dirs.items():
        (d / rundir.PREVIEWS).mkdir(parents=True, exist_ok=True)
        if not (d / rundir.CONFIG).exists():
            files.write_json(d / rundir.CONFIG, config_to_dict(configs[i]))
    ckpt_dir = out / rundir.CHECKPOINTS
    checkpoints = engine.Checkpoints(
        ckpt_dir,
        keep=base.run.keep_checkpoints,
        step_of=_local_step,
        finite_part=lambda state: _local_lifts(state.grid, len(configs)),
    )
    if resume:
        state = checkpoints.restore(state)
        for d in dirs.values():
            rundir.truncate_metrics(d / rundir.METRICS, _local_step(state))
        if log is not None:
            log(engine.resumed_line(_local_step(state)))

    total = base.run.steps
    start = _local_step(state)
    end = total if stop_after is None else min(total, start + stop_after)
    if log is not None:
        shape = "one device" if mesh is None else f"mesh {dict(mesh.shape)}"
        procs = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
        log(f"sweep of {len(configs)} lifts on {shape}{procs}")
    size = base.render.image_size or denoiser.resolution
    artifacts = Artifacts(base, denoiser, size)
    boards = {i: TensorBoardWriter(d / rundir.TENSORBOARD, purge_step=start if resume else None)
              for i, d in dirs.items()}  # fmt: skip
    metric_files = {i: open(d / rundir.METRICS, "a") for i, d in dirs.items()}
    bar = engine.progress(
        total=total, initial=start, enabled=progress, desc=f"sweep x{len(configs)}"
    )

    def on_metrics(records: list[dict[str, Any]]) -> None:
        for record in records:
            for i, f in metric_files.items():
                own = {k: (v if k == "step" else v[i]) for k, v in record.items()}
                f.write(json.dumps(own) + "\n")
                boards[i].scalars(own["step"], own)
            for i in range(len(configs)):
                if not record["finite"][i]:
                    for f in metric_files.values():
                        f.flush()
                    raise NonFiniteError(
                        f"lift {names[i]!r}: the grid became non-finite at step "
                        f"{record['step']}; {checkpoints.last_good()} (try a lower --lr for it)"
                    )
        for f in metric_files.values():
            f.flush()

    def preview(state) -> None:
        step = _local_step(state)
        for i, grid in _local_lifts(state.grid, len(configs)).items():
            path = dirs[i] / rundir.PREVIEWS / f"step_{step:08d}.png"
            boards[i].image(step, "preview", artifacts.preview(grid, path))

    t_start = time.perf_counter()
    try:
        with engine.stopping(stop, out, "sweep"), checkpoints:
            state = run_loop(
                step_fn,
                state,
                params,
                end=end,
                log_every=base.run.log_every,
                checkpoint_every=base.run.checkpoint_every,
                save=checkpoints.save,
                on_metrics=on_metrics,
                hooks=(Hook(max(1, total // base.run.num_previews), preview),),
                bar=bar,
                should_stop=lambda: stop.requested,
                start=start,
            )
    finally:
        bar.close()
        for f in metric_files.values():
            f.close()
        for board in boards.values():
            board.close()
    elapsed = time.perf_counter() - t_start
    summary = {"lifts": len(configs), "steps": _local_step(state), "seconds": elapsed,
               "out": str(out)}  # fmt: skip
    if summary["steps"] < total:
        return summary

    rows = []
    before_part = engine.stop_between_parts(stop, out, "sweep", total)
    for i, grid in _local_lifts(state.grid, len(configs)).items():
        before_part()
        evaluation = write_final(dirs[i], grid, artifacts, evaluate=built[i].evaluate)
        write_board_summary(dirs[i], total, configs[i], evaluation)
        records = rundir.read_metrics(dirs[i] / rundir.METRICS)
        last = records[-1] if records else {}
        rows.append(
            {
                "lift": names[i],
                "dir": str(dirs[i]),
                "settings": lifts[i][1],
                "metrics": {k: last[k] for k in SUMMARY_METRICS if k in last},
                "eval": evaluation,
            }
        )
    rows = _gather_rows(rows)
    if jax.process_index() == 0:
        files.write_json(out / SUMMARY, {"steps": total, "lifts": rows})
        report.write_sweep_report(rows, out / REPORT, title=f"Sweep of {len(rows)} lifts")
    _sync("sweep-written")
    summary["sweep"] = str(out / SUMMARY)
    return summary
