"""Fault injection: signals at any instant, corrupt checkpoints, full disks, concurrent runs.

Every case runs the real command line (``python -m sjc_jax run``, a short testbed run) in a
subprocess and asserts, against an uninterrupted run of the same config:

* the exit code (0, 130 interrupted, 1 full disk, 2 refused, -9 killed) and, for a failure, one
  line on stderr (``sjc_jax: error: ...``, the last line; only warnings besides) and never a
  traceback;
* after the chain of resumes: ``final/grid.npz`` bitwise equal, ``metrics.jsonl`` with every
  step exactly once and bitwise the same values, the same ``eval.json``;
* after every process: each complete checkpoint (`checkpoint.all_steps`) restores with orbax
  alone and holds its own step and finite arrays, and a resume reports (``resumed_from``) the
  newest such checkpoint; a corrupted one is moved aside, never loaded.

The fast cases run in ``make test``; the random chains, every corruption and a real tiny tmpfs
(when a mount namespace is available) run under ``make test-slow``. A JAX compilation cache
shared by the session's subprocesses keeps each one to a few seconds.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from sjc_jax import checkpoint
from sjc_jax.grid_io import load_grid_file

ROOT = Path(__file__).resolve().parents[1]
STEPS = 120
# 4 image-set views, 4 held-out cameras, 4 video frames: one compiled render program for all.
FLAGS = [
    "--model", "testbed", "--steps", str(STEPS), "--grid-resolution", "8", "--image-size", "8",
    "--testbed-views", "4", "--testbed-eval-views", "2", "--video-frames", "4",
    "--num-previews", "3", "--views-per-step", "2", "--checkpoint-every", "20",
    "--log-every", "7", "--keep-checkpoints", "2", "--no-progress",
]  # fmt: skip
# Seconds a process may take; raise it on a loaded machine (SJC_FAULT_TIMEOUT=1200).
TIMEOUT = int(os.environ.get("SJC_FAULT_TIMEOUT", "300"))

pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-compile-cache")


def _env(cache_dir, **extra):
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
        **extra,
    }


# Children start with SIGINT at its default even when this process ignores it (a background
# `make test &`: the run would keep an inherited SIG_IGN, as Python does, and never see SIGINT).
PYTHON = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]


def new_run(out):
    return [*PYTHON, "-m", "sjc_jax", "run", "--out", str(out), *FLAGS]


def resume_run(out):
    return [*PYTHON, "-m", "sjc_jax", "run", "--resume", str(out), "--no-progress"]


def fault_child(*args):
    return [*PYTHON, str(ROOT / "tests" / "fault_child.py"), *args]


# --- faults: when and what ---------------------------------------------------------------


@dataclasses.dataclass
class Fault:
    """Signals sent when ``trigger`` fires (``+0.01`` entries wait; ``None``: no fault)."""

    signals: tuple = ()
    trigger: str = "time"  # time | checkpoint | final | metrics
    after: float = 0.0  # seconds (time), or extra delay once the path appears
    nth: int = 1  # the n-th distinct path that appears (checkpoint)

    def describe(self) -> str:
        names = [s if isinstance(s, str) else signal.Signals(s).name for s in self.signals]
        return f"{'+'.join(names) or 'none'}@{self.trigger}{self.nth}+{self.after:.3f}"


_PATTERNS = {
    # A checkpoint's temporary directory, or (if polling missed it) its final one.
    "checkpoint": "checkpoints/step_*",
    "final": "final.tmp-*",
    "metrics": "metrics.jsonl",
}


def _key(path: str) -> str:
    """What a path trigger counts: a checkpoint's step (tmp or final), else the path."""
    name = os.path.basename(path)
    if name.startswith("step_"):
        return name[5:13]
    return path


def _wait_trigger(proc, out: Path, fault: Fault, before: set[str]) -> bool:
    """Block until the fault's instant; False if the process ended first.

    A path trigger counts only paths (checkpoint steps) that appear after the launch
    (``before``: the keys of those already there, a killed process's leftovers).
    """
    if fault.trigger == "time":
        deadline = time.monotonic() + fault.after
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            time.sleep(0.002)
        return True
    seen: set[str] = set()
    pattern = str(out / _PATTERNS[fault.trigger])
    while proc.poll() is None:
        seen.update({_key(p) for p in glob.glob(pattern)} - before)
        if len(seen) >= fault.nth:
            time.sleep(fault.after)
            return proc.poll() is None
        time.sleep(0.002)
    return False


@dataclasses.dataclass
class Result:
    rc: int
    stderr: str
    stdout: str
    fired: bool

    @property
    def summary(self) -> dict | None:
        lines = [x for x in self.stdout.splitlines() if x.startswith("{")]
        return json.loads(lines[-1]) if lines else None


def launch(cmd, out: Path, fault: Fault | None, cache_dir, *, timeout=TIMEOUT, **env) -> Result:
    before = (
        {_key(p) for p in glob.glob(str(out / _PATTERNS[fault.trigger]))}
        if fault and fault.signals and fault.trigger != "time"
        else set()
    )
    proc = subprocess.Popen(
        cmd,
        env=_env(cache_dir, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fired = False
    out_buf: list[str] = []
    err_buf: list[str] = []
    readers = [
        threading.Thread(target=lambda: out_buf.append(proc.stdout.read()), daemon=True),
        threading.Thread(target=lambda: err_buf.append(proc.stderr.read()), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        if fault is not None and fault.signals and _wait_trigger(proc, out, fault, before):
            fired = True
            for sig in fault.signals:
                if isinstance(sig, str):
                    time.sleep(float(sig[1:]))
                elif proc.poll() is None:
                    proc.send_signal(sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for reader in readers:
            reader.join(timeout=10)
    return Result(proc.returncode, "".join(err_buf), "".join(out_buf), fired)


# --- what every case must show -----------------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.strip()]


def check_output(result: Result, out: Path, expect: set[int]) -> list[str]:
    """Problems with a process's exit code and stderr (empty when all is well)."""
    problems = []
    if result.rc not in expect:
        problems.append(f"exit code {result.rc}, expected one of {sorted(expect)}")
    text = result.stderr
    for bad in ("Traceback", "Exception ignored", "ERROR:absl", "RuntimeError"):
        if bad in text:
            problems.append(f"{bad!r} on stderr")
    lines = error_lines(text)
    errors = [x for x in lines if x.startswith("sjc_jax: error:")]
    # Besides errors and warnings a command prints notes: the backend line (describe_backend),
    # where a resume starts, a sweep's shape, train-model's renders.
    notes = (
        "sjc_jax: error:",
        "sjc_jax: warning:",
        "sjc_jax: JAX ",
        "sjc_jax: resuming at step ",
        "sjc_jax: sweep of ",
        "sjc_jax: rendered ",
    )
    others = [x for x in lines if not x.startswith(notes)]
    if result.rc == -signal.SIGKILL:
        return problems + ([f"stray lines {others}"] if others else [])
    if others:
        problems.append(f"stray lines on stderr: {others}")
    if result.rc == 0:
        if errors:
            problems.append(f"error lines in a successful run: {errors}")
        return problems
    if len(errors) != 1 or lines[-1] != errors[0]:
        problems.append(f"not one error line, last: {lines}")
        return problems
    if result.rc == 130 and "nothing was written" not in errors[0]:
        if f" --resume {str(out)!r}" not in errors[0].partition("continue with: ")[2]:
            problems.append(f"no resume command in {errors[0]!r}")
    return problems


def validate_checkpoints(out: Path) -> list[str]:
    """Every complete checkpoint restores with orbax alone and holds its own, finite, step."""
    problems = []
    ckpt_dir = out / "checkpoints"
    for step in checkpoint.all_steps(ckpt_dir):
        path = checkpoint.step_directory(ckpt_dir, step)
        try:
            tree = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(path)
        except Exception as err:  # noqa: BLE001
            problems.append(f"complete checkpoint {path.name} does not restore: {err}")
            continue
        if int(tree["step"]) != step:
            problems.append(f"{path.name} holds step {int(tree['step'])}")
        leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(tree)]
        if not all(np.all(np.isfinite(x)) for x in leaves if x.dtype.kind == "f"):
            problems.append(f"{path.name} is not finite")
    return problems


@dataclasses.dataclass
class Reference:
    grid: object
    metrics: list
    evaluation: dict


def _grid_bytes(grid) -> list[bytes]:
    return [
        np.asarray(getattr(grid, f)).tobytes()
        for f in ("density", "features", "background", "density_scale")
    ]


def compare_with_reference(out: Path, reference: Background) -> list[str]:
    ref: Reference = reference.get()
    problems = []
    if not (out / "final" / "grid.npz").exists():
        return ["no final/grid.npz"]
    if _grid_bytes(load_grid_file(out / "final" / "grid.npz")[0]) != _grid_bytes(ref.grid):
        problems.append("final grid differs from the uninterrupted run")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    steps = [r["step"] for r in records]
    if steps != list(range(1, STEPS + 1)):
        missing = sorted(set(range(1, STEPS + 1)) - set(steps))
        dups = sorted({s for s in steps if steps.count(s) > 1})
        problems.append(f"metrics steps: {len(steps)} lines, missing {missing}, twice {dups}")
    elif records != ref.metrics:
        problems.append("metrics values differ from the uninterrupted run")
    if json.loads((out / "final" / "eval.json").read_text()) != ref.evaluation:
        problems.append("eval.json differs")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(("final.", ".lock"))]
    if leftovers:
        problems.append(f"leftovers {leftovers}")
    return problems


class Background:
    """``fn()`` in a thread, started at once; `get` waits for its value (or raises its error)."""

    def __init__(self, fn):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._value = fn()
        except BaseException as err:  # noqa: BLE001  (re-raised by get)
            self._error = err

    def running(self) -> bool:
        return self._thread.is_alive()

    def get(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir) -> Background:
    """The uninterrupted run, computed in the background (the first fault case runs beside it
    on the second core); `compare_with_reference` waits for it."""
    out = tmp_path_factory.mktemp("faults") / "reference"

    def compute() -> Reference:
        result = launch(new_run(out), out, None, cache_dir)
        assert result.rc == 0, result.stderr
        return Reference(
            grid=load_grid_file(out / "final" / "grid.npz")[0],
            metrics=[json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()],
            evaluation=json.loads((out / "final" / "eval.json").read_text()),
        )

    background = Background(compute)
    background.out = out
    return background


class Cases:
    """Counts fault cases and collects the problems of each (asserted at the end)."""

    def __init__(self):
        self.tried = 0
        self.failed: list[str] = []

    def check(self, name: str, problems: list[str]) -> None:
        self.tried += 1
        if problems:
            self.failed.append(f"{name}: {'; '.join(problems)}")

    def assert_all(self, label: str) -> None:
        print(
            f"\n{label}: {self.tried} fault cases tried, {self.tried - len(self.failed)} survived"
        )
        assert not self.failed, "\n".join(self.failed)


def latest_complete(out: Path) -> int:
    return checkpoint.latest_step(out / "checkpoints") or 0


def run_chain(out: Path, faults: list[Fault], cache_dir, cases: Cases, name: str) -> None:
    """A new run, then resumes until one finishes; ``faults[i]`` hits the i-th process."""
    history = []
    for attempt in range(len(faults) + 3):
        fault = faults[attempt] if attempt < len(faults) else None
        resumable = (out / "config.json").exists()
        before = latest_complete(out) if resumable else None
        cmd = resume_run(out) if resumable else new_run(out)
        result = launch(cmd, out, fault, cache_dir)
        label = f"{name}[{attempt}] {'resume' if resumable else 'new'} {fault and fault.describe()}"
        history.append(f"{label} -> {result.rc}")
        expect = {0}  # also when the process ended before the fault's instant came
        if fault is not None and result.fired:
            expect.add(-signal.SIGKILL if signal.SIGKILL in fault.signals else 130)
        problems = check_output(result, out, expect) + validate_checkpoints(out)
        summary = result.summary
        if result.rc == 0 and resumable and summary is not None:
            if summary.get("resumed_from") != before:
                problems.append(f"resumed from {summary.get('resumed_from')}, newest {before}")
        if (fault is not None and result.fired) or problems:
            cases.check(label, problems)
        if result.rc == 0:
            return
    cases.check(f"{name} never finished", [" | ".join(history)])


# --- fast cases (make test) --------------------------------------------------------------


def test_faults_over_a_chain_of_resumes(tmp_path, cache_dir, reference):
    """Every kind of fault on one run: a second run into the reference's directory while it
    runs (refused); SIGKILL inside a checkpoint write; the newest checkpoint then truncated; a
    resume on a full disk (fails, after falling back past the corrupt checkpoint); SIGTERM then
    SIGINT inside the final artifacts; a clean resume, identical to the uninterrupted run."""
    cases = Cases()
    # While the reference runs (its lock taken), a second process tries to continue it.
    while not (reference.out / ".lock").exists():
        assert reference.running(), "the reference run ended before taking its lock"
        time.sleep(0.01)
    locked = launch(resume_run(reference.out), reference.out, None, cache_dir)
    problems = check_output(locked, reference.out, {2})
    if "in use by another run (pid " not in locked.stderr:
        problems.append(f"not refused as in use: {locked.stderr!r}")
    cases.check("a second run while one runs", problems)

    # Once the reference has written its first checkpoint (every program it needs until then is
    # in the compilation cache), the chain starts.
    first = reference.out / "checkpoints" / "step_00000020"
    while not checkpoint.is_complete(first) and reference.running():
        time.sleep(0.01)
    out = tmp_path / "chain"
    # The 3rd checkpoint: killed while it is written (or just after, if polling missed it).
    killed = launch(new_run(out), out, Fault((signal.SIGKILL,), "checkpoint", 0.0, 3), cache_dir)
    cases.check("SIGKILL in checkpoint write", check_output(killed, out, {-signal.SIGKILL}))
    cases.check("after SIGKILL", validate_checkpoints(out))
    older, newest_step = checkpoint.all_steps(out / "checkpoints")
    newest = checkpoint.step_directory(out / "checkpoints", newest_step)
    for data in (newest / "ocdbt.process_0" / "d").iterdir():
        data.write_bytes(data.read_bytes()[:7])  # truncated data files

    # Resumed from `older`; its first checkpoint is written, the second meets a full disk.
    child = fault_child("run", "--resume", str(out), "--no-progress")
    full = launch(child, out, None, cache_dir, SJC_FAULT="checkpoint:2")
    problems = check_output(full, out, {1})
    lines = error_lines(full.stderr)
    fallback = f"resuming from step {older}: the checkpoint of step {newest_step}"
    if not any(fallback in x for x in lines):
        problems.append(f"no fallback line: {lines}")
    good = older + 20
    if "no space left" not in lines[-1] or f"last good checkpoint (step {good})" not in lines[-1]:
        problems.append(f"message {lines[-1]!r}")
    if not list((out / "checkpoints" / "unusable").glob(f"{newest.name}-*")):
        problems.append("the corrupt checkpoint was not moved aside")
    if checkpoint.all_steps(out / "checkpoints") != [older, good]:
        problems.append(f"checkpoints {checkpoint.all_steps(out / 'checkpoints')}")
    if glob.glob(str(out / "checkpoints" / "*tmp*")):
        problems.append("a temporary checkpoint was left")
    cases.check("corrupt newest, then ENOSPC", problems + validate_checkpoints(out))

    final = launch(
        resume_run(out), out, Fault((signal.SIGTERM, "+0.01", signal.SIGINT), "final"), cache_dir
    )
    problems = check_output(final, out, {130})
    if "while writing the final artifacts" not in final.stderr:
        problems.append(f"not interrupted in the final artifacts: {final.stderr!r}")
    cases.check("SIGTERM + SIGINT in final artifacts", problems + validate_checkpoints(out))

    done = launch(resume_run(out), out, None, cache_dir)
    problems = check_output(done, out, {0})
    if done.summary is None or done.summary.get("resumed_from") != STEPS:
        problems.append(f"summary {done.summary}")
    cases.check("last resume", problems + compare_with_reference(out, reference))
    cases.assert_all("faults over a chain")


# --- slow cases (make test-slow) ---------------------------------------------------------


@pytest.fixture(scope="module")
def warm_lifetime(tmp_path_factory, cache_dir, reference) -> float:
    """Seconds of an uninterrupted run once the compilation cache is warm (random instants
    are drawn over it); the run must match the reference too."""
    out = tmp_path_factory.mktemp("warm") / "run"
    started = time.monotonic()
    result = launch(new_run(out), out, None, cache_dir)
    lifetime = time.monotonic() - started
    assert result.rc == 0 and not compare_with_reference(out, reference), result.stderr
    return lifetime


@pytest.mark.slow
def test_sigint_inside_checkpoint_writes(tmp_path, cache_dir, reference):
    """SIGINT (and a second one) while a checkpoint is being written, twice, then a resume."""
    cases = Cases()
    out = tmp_path / "run"
    for nth, signals in ((2, (signal.SIGINT,)), (1, (signal.SIGINT, "+0.002", signal.SIGINT))):
        cmd = resume_run(out) if (out / "config.json").exists() else new_run(out)
        result = launch(cmd, out, Fault(signals, "checkpoint", 0.0, nth), cache_dir)
        problems = check_output(result, out, {130}) + validate_checkpoints(out)
        cases.check(f"SIGINT in checkpoint write {nth}", problems)
    done = launch(resume_run(out), out, None, cache_dir)
    cases.check("resume", check_output(done, out, {0}) + compare_with_reference(out, reference))
    cases.assert_all("SIGINT in checkpoint writes")


@pytest.mark.slow
def test_two_runs_started_into_one_directory(tmp_path, cache_dir, reference):
    """Started together: one runs, the other is refused in one line (in use, or holds a run)."""
    cases = Cases()
    out = tmp_path / "shared"
    results: list[Result] = []
    threads = [
        threading.Thread(target=lambda: results.append(launch(new_run(out), out, None, cache_dir)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(r.rc for r in results)
    problems = [] if codes == [0, 2] else [f"exit codes {codes}"]
    for result in results:
        problems += check_output(result, out, {0, 2})
        if result.rc == 2:
            line = error_lines(result.stderr)[-1]
            if "in use by another run" not in line and "already holds a run" not in line:
                problems.append(f"refusal {line!r}")
    cases.check("two concurrent runs", problems + compare_with_reference(out, reference))
    cases.assert_all("concurrent runs")


def _random_fault(rng: random.Random, lifetime: float) -> Fault:
    sig = rng.choice(
        [
            (signal.SIGINT,),
            (signal.SIGTERM,),
            (signal.SIGKILL,),
            (signal.SIGINT, "+0.02", signal.SIGINT),
        ]
    )
    trigger = rng.choice(["time", "time", "checkpoint", "checkpoint", "final", "metrics"])
    if trigger == "time":
        return Fault(sig, "time", rng.uniform(0.2, 0.9 * lifetime))
    return Fault(sig, trigger, rng.uniform(0.0, 0.03), nth=rng.randint(1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_random_signals_over_chains(seed, tmp_path, cache_dir, reference, warm_lifetime):
    """Random signals (SIGINT, SIGTERM, SIGKILL, double SIGINT) at random instants and inside
    checkpoint writes, metrics writes and final artifacts, over a chain of up to 4 resumes."""
    seed = int(os.environ.get("SJC_FAULT_SEED", 0)) * 1000 + seed
    rng = random.Random(seed)
    cases = Cases()
    out = tmp_path / "chain"
    faults = [_random_fault(rng, warm_lifetime) for _ in range(4)]
    run_chain(out, faults, cache_dir, cases, f"seed {seed}")
    cases.check(f"seed {seed} final", compare_with_reference(out, reference))
    cases.assert_all(f"random chain seed {seed}")


def _corrupt(out: Path, how: str) -> int:
    """Corrupt the newest complete checkpoint(s); returns the step a resume must start from."""
    ckpt = out / "checkpoints"
    steps = checkpoint.all_steps(ckpt)
    newest = checkpoint.step_directory(ckpt, steps[-1])
    data = sorted((newest / "ocdbt.process_0" / "d").iterdir())
    if how == "truncated data file":  # the largest: it holds the arrays (others are b-tree
        largest = max(data, key=lambda f: f.stat().st_size)  # nodes, some superseded)
        largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    elif how == "empty data files":
        for f in data:
            f.write_bytes(b"")
    elif how == "deleted ocdbt directory":
        shutil.rmtree(newest / "ocdbt.process_0")
    elif how == "deleted manifest":
        (newest / "manifest.ocdbt").unlink()
    elif how == "deleted tree metadata":
        (newest / "_METADATA").unlink()
    elif how == "deleted _CHECKPOINT_METADATA":
        (newest / "_CHECKPOINT_METADATA").unlink()
    elif how == "every checkpoint truncated":
        for step in steps:
            path = checkpoint.step_directory(ckpt, step)
            for f in (path / "ocdbt.process_0" / "d").iterdir():
                f.write_bytes(f.read_bytes()[:5])
        return 0
    return steps[-2]


CORRUPTIONS = [
    "truncated data file",
    "empty data files",
    "deleted ocdbt directory",
    "deleted manifest",
    "deleted tree metadata",
    "deleted _CHECKPOINT_METADATA",
    "every checkpoint truncated",
]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, cache_dir):
    """A run stopped (SIGINT) after its third checkpoint: checkpoints 40 and 60."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    result = launch(new_run(out), out, Fault((signal.SIGINT,), "checkpoint", 0.0, 3), cache_dir)
    assert result.rc == 130, result.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_checkpoints_fall_back(how, interrupted_run, tmp_path, cache_dir, reference):
    cases = Cases()
    out = tmp_path / "run"
    shutil.copytree(interrupted_run, out)
    start = _corrupt(out, how)
    done = launch(resume_run(out), out, None, cache_dir)
    problems = check_output(done, out, {0})
    warnings = [x for x in error_lines(done.stderr) if "resuming from step" in x]
    moved = list((out / "checkpoints").glob("unusable/step_*"))
    # one warning line per checkpoint skipped (moved aside)
    if len(warnings) != len(moved) or any(f"from step {start}" not in w for w in warnings):
        problems.append(f"fallback lines {warnings} for {len(moved)} moved aside")
    if done.summary is None or done.summary.get("resumed_from") != start:
        problems.append(f"summary {done.summary}")
    if not moved:
        problems.append("nothing moved aside")
    cases.check(how, problems + compare_with_reference(out, reference))
    cases.assert_all(f"corruption: {how}")


FULL_DISK = [
    "checkpoint:1",
    "checkpoint:5",
    "file:config.json:1",
    "file:grid.npz:1",
    "file:step_00000080.png:1",
    "file:view.png:1",
    "file:eval.json:1",
    "metrics:9",
]


@pytest.mark.slow
@pytest.mark.parametrize("fault", FULL_DISK)
def test_simulated_full_disk_everywhere(fault, tmp_path, cache_dir, reference):
    cases = Cases()
    out = tmp_path / "run"
    full = launch(
        fault_child("run", "--out", str(out), *FLAGS), out, None, cache_dir, SJC_FAULT=fault
    )
    problems = check_output(full, out, {1})
    if "no space left" not in (error_lines(full.stderr) or [""])[-1]:
        problems.append(f"message {full.stderr!r}")
    if not (out / "config.json").exists():
        if "run it again" not in full.stderr or out.exists():
            problems.append(f"no run written, yet {full.stderr!r} / {out.exists()}")
    cases.check(f"ENOSPC {fault}", problems + validate_checkpoints(out))
    again = resume_run(out) if (out / "config.json").exists() else new_run(out)
    done = launch(again, out, None, cache_dir)
    cases.check(
        f"resume after ENOSPC {fault}",
        check_output(done, out, {0}) + compare_with_reference(out, reference),
    )
    cases.assert_all(f"simulated full disk {fault}")


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("size", ["16k", "300k", "700k", "1100k"])
def test_real_tiny_tmpfs(size, tmp_path, cache_dir, reference):
    """A run on a tmpfs of ``size`` (mounted in a user + mount namespace): a full disk is one
    line and exit 1; moved to a roomy disk, the resume ends identical."""
    if not _can_mount_tmpfs():
        pytest.skip("no user mount namespace to mount a tmpfs in")
    cases = Cases()
    mount = tmp_path / "mnt"
    mount.mkdir()
    out = mount / "run"
    cmd = " ".join(f"'{x}'" for x in new_run(out))
    script = f"mount -t tmpfs -o size={size} tmpfs '{mount}' && {cmd}; rc=$?; "
    script += f"cp -a '{mount}/.' '{tmp_path}/copy' 2>/dev/null; exit $rc"
    (tmp_path / "copy").mkdir()
    result = launch(["unshare", "-rm", "sh", "-c", script], out, None, cache_dir)
    problems = check_output(result, out, {0, 1})
    if result.rc == 1 and "no space left" not in error_lines(result.stderr)[-1]:
        problems.append(f"message {result.stderr!r}")
    copy = tmp_path / "copy" / "run"
    cases.check(f"tmpfs {size}", problems + (validate_checkpoints(copy) if copy.exists() else []))
    if result.rc == 1 and (copy / "config.json").exists():
        done = launch(resume_run(copy), copy, None, cache_dir)
        cases.check(
            f"resume after tmpfs {size}",
            check_output(done, copy, {0}) + compare_with_reference(copy, reference),
        )
    cases.assert_all(f"tmpfs {size}")
