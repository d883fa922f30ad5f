"""The run directory: checks that write nothing, the lock, metrics truncation, file modes."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from sjc_jax import files, rundir
from sjc_jax.config import SJCConfig


def _run_dir(path):
    path.mkdir(parents=True)
    files.write_json(path / "config.json", SJCConfig().to_dict())
    return path


def test_check_new_accepts_missing_empty_and_stale_lock_only(tmp_path):
    rundir.check_new(tmp_path / "a" / "b")  # missing parents: nothing is created
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    rundir.check_new(tmp_path / "empty")
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".lock").write_text("12345\n")  # no process holds it
    (stale / ".config.json.0123456789ab.tmp.json").write_text("{")  # a killed atomic write
    rundir.check_new(stale)


@pytest.mark.parametrize(
    "entries, match",
    [
        ({"unet/config.json": '{"_class_name": "UNet2DConditionModel"}'}, "not a sjc_jax run"),
        ({"config.json": '{"_class_name": "UNet2DConditionModel"}'}, "not a run's"),
        ({"notes.txt": "mine"}, "notes.txt"),
        ({"metrics.jsonl": ""}, "parts of a run but no config.json"),
    ],
)
def test_check_new_refuses_what_is_not_ours(tmp_path, entries, match):
    out = tmp_path / "out"
    for name, text in entries.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    snapshot = {p: p.read_text() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(rundir.RunError, match=match):
        rundir.check_new(out)
    assert {p: p.read_text() for p in out.rglob("*") if p.is_file()} == snapshot


def test_check_new_refuses_a_run_and_points_to_resume(tmp_path):
    out = _run_dir(tmp_path / "run")
    with pytest.raises(rundir.RunError, match="already holds a run; continue it with --resume"):
        rundir.check_new(out)


def test_check_new_refuses_unwritable_places(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(rundir.RunError, match="cannot write to output directory.*not a dir"):
        rundir.check_new(blocker / "run")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(rundir.RunError, match="permission denied"):
            rundir.check_new(locked / "run")


def test_check_resume_never_creates_and_needs_a_run(tmp_path):
    with pytest.raises(rundir.RunError, match="nothing to resume: .* does not exist"):
        rundir.check_resume(tmp_path / "typo" / "run")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(rundir.RunError, match="no config.json"):
        rundir.check_resume(tmp_path / "empty")
    out = _run_dir(tmp_path / "run")
    rundir.check_resume(out)
    (out / "mine.txt").write_text("x")
    with pytest.raises(rundir.RunError, match="mine.txt"):
        rundir.check_resume(out)


def test_lock_excludes_a_second_holder_and_is_released(tmp_path):
    out = tmp_path / "deep" / "run"
    with rundir.RunLock(out):
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        assert rundir.lock_holder(out) == str(os.getpid())
        with pytest.raises(rundir.RunError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            rundir.RunLock(out).acquire()
        with pytest.raises(rundir.RunError, match="in use by another run"):
            rundir.check_new(out)
        rundir.check_new(out, locked=True)
    # Released: the file is gone, and so are the folders it created (still empty).
    assert not (tmp_path / "deep").exists()


def test_lock_keeps_folders_that_received_files(tmp_path):
    out = tmp_path / "run"
    with rundir.RunLock(out):
        (out / "config.json").write_text("{}")
    assert sorted(os.listdir(out)) == ["config.json"]


def test_a_killed_holders_lock_is_stale(tmp_path):
    """The kernel drops the flock of a dead process: its lock file is taken over."""
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import os
        from sjc_jax import rundir
        rundir.RunLock({str(out)!r}).acquire()
        os._exit(0)  # dies holding it, as SIGKILL would leave it
        """
    )
    env = {**os.environ, "PYTHONPATH": str(os.path.dirname(os.path.dirname(__file__)))}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
    dead = (out / ".lock").read_text().strip()
    assert rundir.lock_holder(out) is None
    with pytest.warns(UserWarning, match=f"left by pid {dead}, which is no longer running"):
        with rundir.RunLock(out):
            assert (out / ".lock").read_text() == f"{os.getpid()}\n"


def test_truncate_metrics_keeps_each_step_once_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "x": s / 3}) for s in (1, 2, 3, 2, 3, 4, 5)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "x"')  # torn by a kill
    assert [r["step"] for r in rundir.read_metrics(path)] == [1, 2, 3, 2, 3, 4, 5]
    rundir.truncate_metrics(path, 4)
    records = rundir.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["x"] == 1.0  # the first record of a step is kept, bit for bit
    rundir.truncate_metrics(path, 0)
    assert path.read_text() == ""


def test_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        out = tmp_path / "run"
        with rundir.RunLock(out):
            files.write_json(out / "config.json", {})
            lock_mode = stat.S_IMODE(os.stat(out / ".lock").st_mode)
        mode = stat.S_IMODE(os.stat(out / "config.json").st_mode)
    finally:
        os.umask(old)
    assert mode == 0o640 and lock_mode == 0o640
