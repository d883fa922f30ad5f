"""The Makefile's environments: `make run` installs the runtime with the JAX build of ACCEL,
`make test` the dev tools (dry runs, `make -n`, into a venv path that does not exist)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sjc_jax import devices

ROOT = Path(__file__).resolve().parents[1]
JAX = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(tmp_path, *args, env=None):
    return subprocess.run(
        ["make", "-n", "-C", str(ROOT), *args, f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        env=env,
    )


@pytest.mark.parametrize(
    ("accel", "jax"),
    [("cpu", f"'jax=={JAX}'"), ("cuda", f"'jax[cuda13]=={JAX}'"), ("tpu", f"'jax[tpu]=={JAX}'")],
)
def test_run_installs_the_runtime_and_the_jax_build_of_accel(tmp_path, accel, jax):
    out = _dry_run(tmp_path, "run", f"ACCEL={accel}", "PROMPT=a hamburger")
    assert out.returncode == 0, out.stderr
    install = [line for line in out.stdout.splitlines() if "pip install -q -r" in line]
    assert install == [
        f"{tmp_path / 'venv'}/bin/python -m pip install -q -r requirements.txt {jax}"
    ]
    assert "requirements-dev.txt" not in out.stdout
    assert "--model 'stable-diffusion-v1-5/stable-diffusion-v1-5' --prompt 'a hamburger'" in (
        out.stdout
    )


def test_test_installs_the_dev_requirements_only(tmp_path):
    out = _dry_run(tmp_path, "test", "ACCEL=cuda")
    assert out.returncode == 0, out.stderr
    assert "-r requirements-dev.txt" in out.stdout and "cuda13" not in out.stdout
    assert "-m pytest" in out.stdout


def test_accel_is_detected_and_checked(tmp_path):
    if devices.detect_accelerator() != "cpu":
        pytest.skip("this machine has an accelerator: the fake one would not be the only one")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-1)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    path = f"{fake}:{os.environ['PATH']}"
    out = _dry_run(tmp_path, "run", env={**os.environ, "PATH": path})
    assert f"'jax[cuda13]=={JAX}'" in out.stdout
    assert f"'jax=={JAX}'" in _dry_run(tmp_path, "run").stdout
    bad = _dry_run(tmp_path, "run", "ACCEL=rocm")
    assert bad.returncode != 0 and "ACCEL must be cpu, cuda or tpu, got 'rocm'" in bad.stderr
