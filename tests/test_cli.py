"""Command-line error paths: one line on stderr, exit code 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sjc_jax import cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "sjc_jax", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_line_error(result, code=2, match=None):
    assert result.returncode == code, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sjc_jax: error:"), lines[0]
    assert "Traceback" not in result.stderr
    if match:
        assert match in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, match",
    [
        (["run", "--out", "x", "--bogus"], "unrecognized arguments"),
        (["run", "--out", "x", "--steps", "many"], "invalid int value"),
        (["run", "--out", "x", "--steps", "0"], "steps must be a positive integer"),
        (["run", "--out", "x", "--dtype", "float16"], "dtype must be one of"),
        (["run", "--out", "x", "--lr", "-1"], "lr must be"),
        (["run", "--steps", "5"], "needs --out"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_in_process(args, match, capsys):
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and match in lines[0], err


def test_missing_model_offline(tmp_path):
    result = run_cli(
        "run",
        "--prompt",
        "a cat",
        "--model",
        "no-such-org/no-such-model",
        "--out",
        str(tmp_path / "r"),
    )
    assert_one_line_error(result, match="no-such-org/no-such-model")


def test_missing_local_model_dir(tmp_path):
    result = run_cli(
        "run",
        "--prompt",
        "a cat",
        "--model",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "r"),
    )
    assert_one_line_error(result)


def test_empty_prompt(tiny_sd_eps, tmp_path):
    result = run_cli(
        "run", "--prompt", "  ", "--model", str(tiny_sd_eps), "--out", str(tmp_path / "r")
    )
    assert_one_line_error(result, match="prompt")


def test_unwritable_output_dir(tiny_sd_eps, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli(
        "run", "--prompt", "a cat", "--model", str(tiny_sd_eps), "--out", str(blocker / "run")
    )
    assert_one_line_error(result, match="cannot write to output directory")


def test_resume_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("run", "--resume", str(tmp_path / "empty"))
    assert_one_line_error(result, match="nothing to resume")
