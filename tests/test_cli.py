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


TINY_TESTBED = [
    "--steps", "3", "--grid-resolution", "8", "--image-size", "8", "--testbed-views", "8",
    "--testbed-eval-views", "2", "--video-frames", "2", "--num-previews", "1",
    "--views-per-step", "2", "--no-progress",
]  # fmt: skip


def test_estimator_flags_run_from_the_command_line(tmp_path):
    import json

    out = tmp_path / "run"
    flags = ["--estimator", "sds", "--sds-weighting", "sds", "--sigma-schedule", "dreamtime"]
    assert cli.main(["run", "--out", str(out), *TINY_TESTBED, *flags]) == 0
    saved = json.loads((out / "config.json").read_text())["score"]
    assert (saved["estimator"], saved["sds_weighting"]) == ("sds", "sds")
    assert saved["sigma_schedule"] == "dreamtime"
    assert (out / "final" / "eval.json").exists()
    args = cli.build_parser().parse_args(["run", "--estimator", "nfsd", "--guidance-scale", "7.5"])
    assert cli.config_from_args(args).score.guidance_scale == 7.5


def test_config_file_round_trips_and_flags_override(tmp_path, capsys):
    import json

    from sjc_jax.config import SJCConfig

    first = tmp_path / "first"
    assert cli.main(["run", "--out", str(first), *TINY_TESTBED, "--lr", "0.3"]) == 0
    saved = json.loads((first / "config.json").read_text())
    args = cli.build_parser().parse_args(
        ["run", "--config", str(first / "config.json"), "--seed", "5"]
    )
    config = cli.config_from_args(args)
    assert config == SJCConfig.from_dict(saved).replace(seed=5)
    assert config.optimizer.lr == 0.3 and config.run.steps == 3


def test_resume_refuses_other_flags_and_extends_steps(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "--out", str(out), *TINY_TESTBED]) == 0
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(out), "--lr", "0.5", "--seed", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lr" in err and "--seed" in err and "--steps" in err
    assert cli.main(["run", "--resume", str(out), "--steps", "5", "--no-progress"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5]


def test_help_says_what_each_flag_is(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--estimator", "--sds-weighting", "--sigma-schedule", "--lr", "--config"):
        assert flag in text
    assert "score estimator: sjc, sds, nfsd or csd" in " ".join(text.split())
