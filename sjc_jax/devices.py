"""Which accelerator this machine has, and what JAX runs on.

`detect_accelerator` needs only the standard library: the Makefile runs this file with the
system Python, before any virtual environment exists, to pick the JAX build to install
(``python3 sjc_jax/devices.py`` prints ``cpu``, ``cuda`` or ``tpu``). `describe_backend` and
`accelerator_warning` ask JAX (imported when called) for the start of a run.

What counts as an accelerator:

* ``tpu``: a Google TPU on the PCI bus (vendor ``0x1ae0`` with a TPU device id under
  ``/sys/bus/pci/devices``, as JAX itself checks), TPU device files ``/dev/accel<N>`` (TPU v2-v4
  VMs), or a TPU VM's environment (``TPU_ACCELERATOR_TYPE``, set on GKE and queued resources).
* ``cuda``: ``nvidia-smi -L`` on ``PATH`` lists at least one GPU (a driver that answers).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

ACCELERATORS = ("cpu", "cuda", "tpu")
_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips v3 .. 7x (JAX's hardware_utils has the same list).
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_NAMES = {"cuda": "an NVIDIA GPU", "tpu": "a TPU"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _has_tpu(root: str, environ: Mapping[str, str]) -> bool:
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        device = os.path.join(os.path.dirname(vendor), "device")
        if _read(vendor) == _GOOGLE_PCI_VENDOR and _read(device) in _TPU_PCI_DEVICES:
            return True
    if glob.glob(os.path.join(root, "dev/accel[0-9]*")):
        return True
    return bool(environ.get("TPU_ACCELERATOR_TYPE"))


def _has_nvidia_gpu(environ: Mapping[str, str], timeout: float) -> bool:
    smi = shutil.which("nvidia-smi", path=environ.get("PATH", os.defpath))
    if smi is None:
        return False
    try:
        listed = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=timeout, env=dict(environ)
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and any(
        line.startswith("GPU ") for line in listed.stdout.splitlines()
    )


def detect_accelerator(
    *, root: str = "/", environ: Mapping[str, str] | None = None, timeout: float = 10.0
) -> str:
    """``"tpu"``, ``"cuda"`` or ``"cpu"``: the JAX build this machine wants (module docstring).

    ``root`` prefixes ``/sys`` and ``/dev``, ``environ`` replaces ``os.environ`` (PATH finds
    ``nvidia-smi``); ``timeout`` bounds the ``nvidia-smi`` call, in seconds.
    """
    environ = os.environ if environ is None else environ
    if _has_tpu(root, environ):
        return "tpu"
    if _has_nvidia_gpu(environ, timeout):
        return "cuda"
    return "cpu"


def describe_backend() -> str:
    """One line: JAX's version, backend and devices, e.g. ``JAX 0.10.2 on gpu: 1 device (NVIDIA
    H100 80GB HBM3)``; with several processes (multi-host), this process's index too."""
    import jax

    devices = jax.devices()
    kinds = ", ".join(
        f"{count} x {kind}" if count > 1 else kind
        for kind, count in Counter(d.device_kind for d in devices).items()
    )
    plural = "s" if len(devices) != 1 else ""
    line = (
        f"JAX {jax.__version__} on {jax.default_backend()}: {len(devices)} device{plural} ({kinds})"
    )
    if jax.process_count() > 1:
        line += f", process {jax.process_index()} of {jax.process_count()}"
    return line


def accelerator_warning(accelerator: str | None = None) -> str | None:
    """A one-line warning when this machine has an accelerator but JAX runs on the CPU, else None.

    ``accelerator`` is what the machine has (default `detect_accelerator`). The warning names
    the install that fixes it.
    """
    import jax

    if jax.default_backend() != "cpu":
        return None
    accelerator = detect_accelerator() if accelerator is None else accelerator
    if accelerator == "cpu":
        return None
    return (
        f"this machine has {_NAMES[accelerator]} but JAX runs on the CPU (its {accelerator} "
        f"build is not installed or cannot start): make run ACCEL={accelerator}, or "
        f"pip install -e '.[{accelerator}]'"
    )


def main(argv: list[str] | None = None) -> int:
    """``devices.py [--root DIR]``: print the detected accelerator (``cpu``, ``cuda``, ``tpu``)."""
    args = sys.argv[1:] if argv is None else argv
    root = "/"
    if args[:1] == ["--root"] and len(args) == 2:
        root = args[1]
    elif args:
        print("usage: devices.py [--root DIR]", file=sys.stderr)
        return 2
    print(detect_accelerator(root=root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
