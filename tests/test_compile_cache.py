"""The persistent compilation cache: where it lives, and a second run that compiles nothing."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sjc_jax import compile_cache
from sjc_jax.grid_io import load_grid_file

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve() == tmp_path / "xdg" / "sjc-jax" / "jax-compile"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.resolve() == tmp_path / "jax"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "ours"))
    assert compile_cache.resolve() == tmp_path / "ours"
    assert compile_cache.resolve(tmp_path / "given") == tmp_path / "given"
    for off in ("0", "off", "OFF", "false"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.resolve() is None
        assert compile_cache.enable() is None


def test_unwritable_directory_is_one_warning(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(compile_cache.ENV, str(blocker / "cache"))
    with pytest.warns(UserWarning, match="compilation cache off: cannot create"):
        assert compile_cache.enable() is None


def _run(tiny_sd_eps, out, cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **{compile_cache.ENV: cache})
    flags = dict(
        model=str(tiny_sd_eps), prompt="a hamburger", grid_resolution=8, background_resolution=2,
        steps=3, video_frames=2, num_previews=1, emptiness_weight=10.0,
    )  # fmt: skip
    cmd = [sys.executable, "-m", "sjc_jax", "run", "--out", str(out), "--no-progress"]
    for k, v in flags.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return load_grid_file(out / "final" / "grid.npz")[0]


@pytest.mark.slow
def test_second_run_loads_every_program_and_ends_the_same(tiny_sd_eps, tmp_path):
    """The first run compiles (and fills the cache), the second loads everything: same grid."""
    cache = tmp_path / "cache"
    first = _run(tiny_sd_eps, tmp_path / "first", str(cache))
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run cached nothing"
    second = _run(tiny_sd_eps, tmp_path / "second", str(cache))
    assert sorted(p.name for p in cache.iterdir()) == entries, "the second run compiled again"
    for field in ("density", "features", "background"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
