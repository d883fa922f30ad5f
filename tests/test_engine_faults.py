"""The fault cases against each command on the run engine: ``run``, ``sweep``, ``train-model``.

`sjc_jax.engine` gives the three commands one lock, one checkpoint writer, one validated
restore, one stop handling and one full-disk message; these cases check that each command keeps
them, through the real command line (``python -m sjc_jax``, or ``tests/fault_child.py`` for a
simulated fault) at tiny sizes, against an uninterrupted run of the same command:

* a concurrent run on the same directory: refused in one line by the lock, exit 2 (the fast
  case, in ``make test``; each of the others starts two or more processes and runs under
  ``make test-slow``);
* a full disk at the second checkpoint (``OSError ENOSPC`` as tensorstore reports it): one
  line, exit 1, the first checkpoint kept; the resume ends as the uninterrupted run;
* a stop request right after a checkpoint: exit 130 with the ``--resume`` command;
* a corrupt newest checkpoint (truncated data files) and a half-written one (a directory of
  the final name without orbax's commit record, beside a temporary one): the resume falls back
  to the last good checkpoint with one warning line per skipped checkpoint, says where it
  resumed, and ends as the uninterrupted run;
* SIGINT or SIGTERM at a random instant (slow): a chain of resumes ends as the uninterrupted
  run.

"Ends as the uninterrupted run": the final grids (run, each sweep lift) or the model's weights
(train-model) bitwise equal, each metrics file with every step (train-model: every logged step)
once and the same values. The cases use the helpers of ``tests/test_faults.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from test_faults import (
    PYTHON,
    Fault,
    Result,
    check_output,
    error_lines,
    fault_child,
    validate_checkpoints,
)
from test_faults import launch as _launch

from sjc_jax import checkpoint, rundir

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")

STEPS = 12
RUN_FLAGS = [
    "--model", "testbed", "--steps", str(STEPS), "--grid-resolution", "8", "--image-size", "8",
    "--testbed-views", "4", "--testbed-eval-views", "2", "--video-frames", "2",
    "--num-previews", "2", "--views-per-step", "2", "--checkpoint-every", "4",
    "--log-every", "3", "--keep-checkpoints", "2", "--no-progress",
]  # fmt: skip
TRAIN_FLAGS = [
    "--scenes", "duck", "--steps", str(STEPS), "--batch-size", "2", "--views-per-scene", "2",
    "--channels", "32,32", "--checkpoint-every", "4", "--no-progress",
]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Command:
    """How to start, resume and judge one command."""

    name: str
    flags: tuple[str, ...]
    metrics: tuple[str, ...]  # metrics files, relative to the directory
    results: tuple[str, ...]  # glob patterns of the result files compared bitwise
    logged: tuple[int, ...]  # the steps each metrics file must hold once

    def new(self, out: Path) -> list[str]:
        return [self.name, "--out", str(out), *self.flags]

    def resume(self, out: Path) -> list[str]:
        return [self.name, "--resume", str(out), "--no-progress"]

    def marker(self) -> str:
        return {"run": rundir.CONFIG, "sweep": "plan.json", "train-model": "train_config.json"}[
            self.name
        ]


EVERY_STEP = tuple(range(1, STEPS + 1))
COMMANDS = {
    "run": Command("run", tuple(RUN_FLAGS), ("metrics.jsonl",), ("final/grid.npz",), EVERY_STEP),
    "sweep": Command(
        "sweep",
        ("--seeds", "0-1", *RUN_FLAGS),
        ("000-seed0/metrics.jsonl", "001-seed1/metrics.jsonl"),
        ("000-seed0/final/grid.npz", "001-seed1/final/grid.npz"),
        EVERY_STEP,
    ),
    "train-model": Command(
        "train-model",
        tuple(TRAIN_FLAGS),
        ("train.jsonl",),
        ("model/unet/*.safetensors", "model/tokens/*.safetensors"),
        (STEPS,),  # one record a log_every (50) steps window, and one at the end
    ),
}


# train-model compiles a UNet's training step: minutes on a loaded 2-core machine.
TIMEOUT = 1200


def launch(cmd, out: Path, fault: Fault | None, cache_dir, **env) -> Result:
    return _launch(cmd, out, fault, cache_dir, timeout=TIMEOUT, **env)


def cli(*args: str) -> list[str]:
    return [*PYTHON, "-m", "sjc_jax", *args]


def _records(path: Path) -> list[dict]:
    """A metrics file's records without the wall-clock fields (and train-model's lines of an
    open window, its bookkeeping for a resume)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records if "window" not in r]


def _results(out: Path, command: Command) -> dict[str, bytes]:
    found = {}
    for pattern in command.results:
        for path in sorted(out.glob(pattern)):
            if path.suffix == ".npz":
                with np.load(path) as data:
                    found[str(path.relative_to(out))] = b"".join(
                        np.asarray(data[k]).tobytes() for k in sorted(data.files)
                    )
            else:
                found[str(path.relative_to(out))] = path.read_bytes()
    return found


@dataclasses.dataclass
class Reference:
    results: dict[str, bytes]
    metrics: dict[str, list[dict]]


def compare(out: Path, command: Command, reference: Reference) -> list[str]:
    """Problems of a finished directory against the uninterrupted run (empty when equal)."""
    problems = []
    results = _results(out, command)
    if not results:
        return [f"no results {command.results}"]
    if results.keys() != reference.results.keys():
        problems.append(f"result files {sorted(results)} vs {sorted(reference.results)}")
    elif results != reference.results:
        differ = [k for k in results if results[k] != reference.results[k]]
        problems.append(f"results differ from the uninterrupted run: {differ}")
    for name in command.metrics:
        records = _records(out / name)
        steps = [r["step"] for r in records]
        if tuple(steps) != command.logged:
            problems.append(f"{name} steps {steps}, expected {list(command.logged)}")
        elif records != reference.metrics[name]:
            problems.append(f"{name} values differ from the uninterrupted run")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(("final.", ".lock"))]
    if leftovers:
        problems.append(f"leftovers {leftovers}")
    return problems


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-compile-cache")


@pytest.fixture(scope="module", params=list(COMMANDS))
def command(request) -> Command:
    return COMMANDS[request.param]


@pytest.fixture(scope="module")
def reference(command, tmp_path_factory, engine_cache) -> Reference:
    """The command run without a fault."""
    out = tmp_path_factory.mktemp(f"reference-{command.name}") / "out"
    result = launch(cli(*command.new(out)), out, None, engine_cache)
    assert result.rc == 0, result.stderr
    return Reference(
        _results(out, command), {name: _records(out / name) for name in command.metrics}
    )


@pytest.fixture(scope="module")
def stopped(command, tmp_path_factory, engine_cache, reference) -> Path:
    """The command stopped (a request, as SIGINT's) right after its second checkpoint: steps
    4 and 8 checkpointed, exit 130 with the resume command."""
    out = tmp_path_factory.mktemp(f"stopped-{command.name}") / "out"
    result = launch(fault_child(*command.new(out)), out, None, engine_cache, SJC_FAULT="stop:2")
    problems = check_output(result, out, {130}) + validate_checkpoints(out)
    assert not problems, (problems, result.stderr)
    assert f"{command.name} --resume {str(out)!r}" in error_lines(result.stderr)[-1]
    assert checkpoint.all_steps(out / "checkpoints") == [4, 8]
    return out


def _resume_and_compare(out: Path, command: Command, reference: Reference, cache) -> Result:
    done = launch(cli(*command.resume(out)), out, None, cache)
    problems = check_output(done, out, {0}) + compare(out, command, reference)
    assert not problems, (problems, done.stderr)
    return done


def _copy(stopped: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(stopped, out)
    return out


@pytest.mark.slow
def test_a_stop_request_exits_130_and_the_resume_ends_as_the_uninterrupted_run(
    command, stopped, reference, engine_cache, tmp_path
):
    out = _copy(stopped, tmp_path)
    done = _resume_and_compare(out, command, reference, engine_cache)
    assert "sjc_jax: resuming at step 8" in done.stderr, done.stderr
    assert not any("resuming from step" in line for line in error_lines(done.stderr))


def test_a_second_process_is_refused_by_the_lock(command, engine_cache, tmp_path):
    """While another process holds the directory (this one, by `rundir.RunLock`), the command
    is refused in one line naming it, before it builds anything, and writes nothing."""
    out = tmp_path / "out"
    with rundir.RunLock(out):
        refused = launch(cli(*command.new(out)), out, None, engine_cache)
        assert [p.name for p in out.iterdir()] == [rundir.LOCK]
    problems = check_output(refused, out, {2})
    assert not problems, (problems, refused.stderr)
    assert f"in use by another run (pid {os.getpid()})" in refused.stderr


@pytest.mark.slow
def test_a_corrupt_checkpoint_falls_back_with_one_line(
    command, stopped, reference, engine_cache, tmp_path
):
    out = _copy(stopped, tmp_path)
    newest = checkpoint.step_directory(out / "checkpoints", 8)
    for data in newest.glob("**/d/*"):  # OCDBT's data files, and merged under d/
        data.write_bytes(data.read_bytes()[:7])
    done = _resume_and_compare(out, command, reference, engine_cache)
    skipped = [x for x in error_lines(done.stderr) if "resuming from step" in x]
    assert len(skipped) == 1 and "from step 4: the checkpoint of step 8" in skipped[0], skipped
    assert "sjc_jax: resuming at step 4" in done.stderr
    assert list((out / "checkpoints" / "unusable").glob("step_00000008-*"))


@pytest.mark.slow
def test_a_half_written_checkpoint_is_skipped_with_one_line(
    command, stopped, reference, engine_cache, tmp_path
):
    """A kill inside a save leaves orbax's temporary directory, or (killed between the rename
    and the commit record) a directory of the final name without that record."""
    out = _copy(stopped, tmp_path)
    ckpt = out / "checkpoints"
    torn = checkpoint.step_directory(ckpt, 12)
    shutil.copytree(checkpoint.step_directory(ckpt, 8), torn)
    (torn / "_CHECKPOINT_METADATA").unlink()
    tmp = torn.with_name(torn.name + ".orbax-checkpoint-tmp")
    (tmp / "ocdbt.process_0").mkdir(parents=True)
    (tmp / "ocdbt.process_0" / "partial").write_bytes(b"\0" * 64)
    done = _resume_and_compare(out, command, reference, engine_cache)
    skipped = [x for x in error_lines(done.stderr) if "resuming from step" in x]
    assert len(skipped) == 1 and "from step 8: the checkpoint of step 12" in skipped[0], skipped
    assert "sjc_jax: resuming at step 8" in done.stderr


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(
    command, reference, engine_cache, tmp_path
):
    out = tmp_path / "out"
    full = launch(fault_child(*command.new(out)), out, None, engine_cache, SJC_FAULT="checkpoint:2")
    problems = check_output(full, out, {1}) + validate_checkpoints(out)
    assert not problems, (problems, full.stderr)
    line = error_lines(full.stderr)[-1]
    assert "no space left" in line and "last good checkpoint (step 4)" in line, line
    assert f"{command.name} --resume {str(out)!r}" in line, line
    assert checkpoint.all_steps(out / "checkpoints") == [4]
    assert not list((out / "checkpoints").glob("*tmp*"))
    _resume_and_compare(out, command, reference, engine_cache)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_a_signal_at_a_random_instant(command, seed, reference, engine_cache, tmp_path):
    """SIGINT or SIGTERM at a random instant of each process of a chain of resumes (up to 3
    signals); the chain ends as the uninterrupted run."""
    rng = random.Random(f"{command.name}-{seed}")
    out = tmp_path / "out"
    history = []
    for attempt in range(6):
        resumable = (out / command.marker()).is_file()
        argv = command.resume(out) if resumable else command.new(out)
        fault = None
        if attempt < 3:
            sig = rng.choice([signal.SIGINT, signal.SIGTERM])
            fault = Fault((sig,), "time", rng.uniform(0.5, 8.0))
        started = time.monotonic()
        result = launch(cli(*argv), out, fault, engine_cache)
        seconds = time.monotonic() - started
        history.append(f"{fault and fault.describe()} -> {result.rc} ({seconds:.0f} s)")
        expect = {0, 130} if fault is not None and result.fired else {0}
        problems = check_output(result, out, expect) + validate_checkpoints(out)
        assert not problems, (history, problems, result.stderr)
        if result.rc == 0:
            break
    else:
        pytest.fail(f"never finished: {history}")
    problems = compare(out, command, reference)
    assert not problems, (history, problems)
