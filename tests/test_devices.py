"""Accelerator detection with fake nvidia-smi and TPU markers; the backend line and warning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sjc_jax import devices

SCRIPT = Path(devices.__file__)
GPU_LIST = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b5f3c1e-1111-2222-3333-444455556666)"
NO_DRIVER = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


def _fake_smi(directory: Path, stdout: str, code: int = 0, sleep: float = 0) -> dict:
    """An environment whose PATH has only a fake ``nvidia-smi`` (and the shell it needs)."""
    directory.mkdir(parents=True, exist_ok=True)
    smi = directory / "nvidia-smi"
    hang = f"exec sleep {sleep}\n" if sleep else ""  # exec: the kill on timeout ends it
    smi.write_text(f"#!/bin/sh\n{hang}echo '{stdout}'\nexit {code}\n")
    smi.chmod(0o755)
    return {"PATH": f"{directory}:/usr/bin:/bin"}


def _pci(root: Path, slot: str, vendor: str, device: str) -> None:
    folder = root / "sys" / "bus" / "pci" / "devices" / slot
    folder.mkdir(parents=True)
    (folder / "vendor").write_text(vendor + "\n")
    (folder / "device").write_text(device + "\n")


def test_nothing_is_cpu(tmp_path):
    _pci(tmp_path, "0000:00:04.0", "0x1ae0", "0x0042")  # a Google NIC, not a TPU
    _pci(tmp_path, "0000:00:05.0", "0x8086", "0x1237")
    (tmp_path / "dev" / "accel").mkdir(parents=True)  # the Linux accel class (e.g. an Intel NPU)
    environ = {"PATH": str(tmp_path / "empty")}
    assert devices.detect_accelerator(root=str(tmp_path), environ=environ) == "cpu"


@pytest.mark.parametrize("marker", ["pci", "dev", "env"])
def test_tpu_markers(tmp_path, marker):
    environ = {"PATH": str(tmp_path / "empty")}
    if marker == "pci":
        _pci(tmp_path, "0000:00:05.0", "0x1ae0", "0x0063")  # TPU v5e
    elif marker == "dev":
        (tmp_path / "dev").mkdir()
        (tmp_path / "dev" / "accel0").write_text("")
    else:
        environ["TPU_ACCELERATOR_TYPE"] = "v4-8"
    assert devices.detect_accelerator(root=str(tmp_path), environ=environ) == "tpu"


def test_nvidia_smi_that_lists_a_gpu_is_cuda(tmp_path):
    environ = _fake_smi(tmp_path / "bin", GPU_LIST)
    assert devices.detect_accelerator(root=str(tmp_path), environ=environ) == "cuda"


@pytest.mark.parametrize(
    ("stdout", "code", "sleep"),
    [(NO_DRIVER, 9, 0), ("No devices were found", 6, 0), (GPU_LIST, 0, 5)],
)
def test_nvidia_smi_without_a_gpu_is_cpu(tmp_path, stdout, code, sleep):
    environ = _fake_smi(tmp_path / "bin", stdout, code, sleep)
    found = devices.detect_accelerator(root=str(tmp_path), environ=environ, timeout=0.5)
    assert found == "cpu"  # a driver that fails, no device, or one that hangs


def test_the_script_needs_no_site_packages(tmp_path):
    """The Makefile runs it with the system Python: no JAX, no numpy (-S: no site-packages)."""
    run = lambda env, *args: subprocess.run(
        [sys.executable, "-S", str(SCRIPT), *args], capture_output=True, text=True, env=env
    )
    environ = _fake_smi(tmp_path / "bin", GPU_LIST)
    assert run(environ, "--root", str(tmp_path)).stdout == "cuda\n"
    _pci(tmp_path, "0000:00:05.0", "0x1ae0", "0x005e")
    assert run(environ, "--root", str(tmp_path)).stdout == "tpu\n"
    bad = run(environ, "--bogus")
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_describe_backend_names_backend_and_devices():
    import jax

    line = devices.describe_backend()
    assert "\n" not in line and line.startswith(f"JAX {jax.__version__} on {jax.default_backend()}")
    assert f"{len(jax.devices())} device" in line


def test_accelerator_warning():
    import jax

    if jax.default_backend() != "cpu":
        assert devices.accelerator_warning("cuda") is None
        return
    assert devices.accelerator_warning("cpu") is None
    for accel, name in (("cuda", "an NVIDIA GPU"), ("tpu", "a TPU")):
        message = devices.accelerator_warning(accel)
        assert "\n" not in message and name in message and f"make run ACCEL={accel}" in message
