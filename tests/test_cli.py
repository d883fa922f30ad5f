"""Command-line error paths: one line on stderr, exit code 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sjc_jax import cli, estimators

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


def run_in_process(capfd, *args):
    """`cli.main` in this process, with everything written to file descriptor 2 while it runs
    (Python's stderr, logging, native libraries). The fresh process's side of these error paths
    (import-time output, ``python -m sjc_jax``'s exit code) is `run_cli`'s, in
    test_missing_model_offline (a diffusion model) and test_resume_nothing (a run directory);
    in process each case costs no JAX and diffusers import of its own."""
    capfd.readouterr()
    code = cli.main(list(args))
    return subprocess.CompletedProcess(args, code, *capfd.readouterr())


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


def test_missing_local_model_dir(tmp_path, capfd):
    result = run_in_process(
        capfd,
        "run",
        "--prompt",
        "a cat",
        "--model",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "r"),
    )
    assert_one_line_error(result)


def test_empty_prompt(tiny_sd_eps, tmp_path, capfd):
    result = run_in_process(
        capfd, "run", "--prompt", "  ", "--model", str(tiny_sd_eps), "--out", str(tmp_path / "r")
    )
    assert_one_line_error(result, match="prompt")


def test_unwritable_output_dir(tiny_sd_eps, tmp_path, capfd):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_in_process(
        capfd,
        "run",
        "--prompt",
        "a cat",
        "--model",
        str(tiny_sd_eps),
        "--out",
        str(blocker / "run"),
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
    names = "; ".join(f"{n} ({r.summary})" for n, r in estimators.ESTIMATORS.items())
    assert f"score estimator: {names}" in " ".join(text.split())


@pytest.mark.parametrize(
    "flag, value, match",
    [
        ("--seed", str(2**70), "seed must lie in [0, 2**32)"),
        ("--seed", str(2**32), "seed must lie in [0, 2**32)"),
        ("--seed", "-1", "seed must lie in [0, 2**32)"),
        ("--lr", "inf", "invalid finite float value"),
        ("--guidance-scale", "inf", "invalid finite float value"),
        ("--guidance-scale", "nan", "invalid finite float value"),
        ("--emptiness-weight", "inf", "invalid finite float value"),
        ("--b1", "1.5", "b1 must lie in [0, 1)"),
        ("--b2", "1", "b2 must lie in [0, 1)"),
        ("--mesh-threshold", "nan", "invalid finite float value"),
    ],
)
def test_bad_values_are_one_line_and_write_nothing(flag, value, match, tmp_path, capsys):
    out = tmp_path / "deep" / "run"
    assert cli.main(["run", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and match in err, err
    assert not (tmp_path / "deep").exists()


def test_a_failed_validation_leaves_no_out_and_touches_no_model(tiny_sd_eps, tmp_path, capsys):
    out = tmp_path / "deep" / "run"
    assert cli.main(["run", "--out", str(out), "--scene", "nosuch", *TINY_TESTBED]) == 2
    assert "scene must be one of" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()
    unet = tiny_sd_eps / "unet"
    before = {p: p.read_bytes() for p in unet.rglob("*") if p.is_file()}
    assert cli.main(["run", "--out", str(unet), *TINY_TESTBED]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a sjc_jax run directory" in err
    assert {p: p.read_bytes() for p in unet.rglob("*") if p.is_file()} == before


def test_resume_on_a_mistyped_path_creates_nothing(tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path / "typo" / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_help_shows_the_testbed_defaults_beside_the_originals(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 0.2 with --model testbed, 0.05 with a diffusion model)" in text
    assert "(default 600 with --model testbed, 10000 with a diffusion model)" in text
    assert "(default 0.5)" in text  # --emptiness-step: the same for both


def test_a_non_finite_run_without_checkpoint_names_none(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--out", str(out), *TINY_TESTBED, "--lr", "1e30", "--checkpoint-every", "100"]
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, err
    assert "non-finite" in err and "no checkpoint was written before it" in err
