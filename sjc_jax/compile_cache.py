"""JAX's persistent compilation cache, on by default for command-line runs.

A run's programs (the step, the previews, the evaluation renders) depend only on shapes and
static settings, so the second run of the same shapes on a machine can load them instead of
compiling them again. This is JAX's own cache (``jax_compilation_cache_dir``: XLA executables
keyed by the program, the backend and the JAX version), pointed at a directory of ours:

* ``$SJC_JAX_COMPILE_CACHE`` when set (``0`` / ``off`` turns the cache off),
* else JAX's own ``$JAX_COMPILATION_CACHE_DIR`` when set (left as JAX reads it),
* else ``$XDG_CACHE_HOME/sjc-jax/jax-compile`` (``~/.cache/sjc-jax/jax-compile``).

`enable` must run before the first compilation of the process (JAX fixes its cache then); the
command line calls it before building anything, a research script may call it first thing.
Programs that compile in under ``min_compile_seconds`` are not written (JAX's threshold).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ENV = "SJC_JAX_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no")


def default_directory() -> Path:
    """``$XDG_CACHE_HOME/sjc-jax/jax-compile`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sjc-jax" / "jax-compile"


def _jax_own_setting() -> str | None:
    """JAX's ``$JAX_COMPILATION_CACHE_DIR`` when it is what applies (ours is unset), else None."""
    if os.environ.get(ENV, "").strip():
        return None
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None


def resolve(directory: str | os.PathLike | None = None) -> Path | None:
    """The cache directory `enable` would use (None: off); reads the environment, writes nothing."""
    if directory is not None:
        return Path(directory).expanduser()
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    return Path(setting or _jax_own_setting() or default_directory()).expanduser()


def enable(
    directory: str | os.PathLike | None = None, *, min_compile_seconds: float = 1.0
) -> Path | None:
    """Turn JAX's persistent compilation cache on; returns its directory, or None when off.

    Args:
      directory: where to keep compiled programs (default: `resolve`, see the module docstring).
      min_compile_seconds: programs compiled faster than this are not cached.
    """
    path = resolve(directory)
    if path is None:
        return None
    if directory is None and _jax_own_setting():
        return path  # JAX's own setting, with JAX's own thresholds: JAX reads it itself
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        warnings.warn(
            f"compilation cache off: cannot create {str(path)!r} ({err.strerror or err}); "
            f"set {ENV} to a writable directory or to 0",
            stacklevel=2,
        )
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
    return path


__all__ = ["ENV", "default_directory", "enable", "resolve"]
