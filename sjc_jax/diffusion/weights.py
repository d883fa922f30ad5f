"""PyTorch checkpoints -> Flax params with numpy, and a disk cache of the converted params.

A diffusers-format model that ships only PyTorch weights is converted here without torch:
`read_state_dict` reads ``.safetensors`` with ``safetensors.numpy`` (torch is needed only to
unpickle a ``.bin``), `convert_state_dict` renames and transposes each tensor into the Flax
layout (diffusers' and transformers' own numpy rename rules: linear kernels transposed, conv
kernels OIHW -> HWIO, norm weights -> ``scale``) and checks every param against the Flax model's
shapes. `load_converted` wraps that in a cache, so only the first load of a checkpoint converts.

Conventions of this module:

* Params are nested dicts of numpy arrays (host memory), float checkpoints cast to float32.
* The cache holds one ``.safetensors`` file of flattened params (keys joined by ``/``) per
  converted checkpoint, in `cache_dir` (``$SJC_JAX_CACHE``, default ``sjc-jax/flax-params``
  beside the Hugging Face hub cache). A file's key hashes the checkpoint's resolved path, size
  and modification time, and its ``config.json``: a hub file resolves to its content-addressed
  blob (``models--ORG--NAME/blobs/HASH``: repository and file hash), a local file to its path,
  so a changed file is converted again, never served stale.
* Errors are `ModelLoadError` (a `ValueError`), one line each.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sjc_jax import files

# Bump when the conversion changes, so caches of an older conversion are not read.
CACHE_FORMAT = 1
CACHE_ENV = "SJC_JAX_CACHE"

# (torch key, tensor, flat Flax shapes) -> (Flax key tuple, tensor)
RenameFn = Callable[[str, np.ndarray, Mapping[tuple[str, ...], Any]], tuple[tuple, np.ndarray]]


class ModelLoadError(ValueError):
    """A model could not be found or loaded; the message is one line naming the model."""


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def read_state_dict(path: Path, *, name: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch checkpoint as numpy arrays, floats cast to float32.

    ``.safetensors`` needs no torch; a pickled ``.bin`` needs torch (`ModelLoadError` naming
    model ``name`` and the file when it is missing).
    """
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        state = load_file(path)
    elif path.suffix == ".bin":
        if not has_torch():
            raise ModelLoadError(
                f"model {name!r} has only pickled PyTorch weights in {path.parent.name}/ "
                f"({path.name}); reading them needs torch: pip install torch"
            )
        import torch

        loaded = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in loaded.items()}
    else:
        raise ModelLoadError(f"model {name!r}: {path.name} is not a PyTorch checkpoint")
    return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in state.items()}


def diffusers_rename(key: str, tensor: np.ndarray, flat_shapes) -> tuple[tuple, np.ndarray]:
    """diffusers' rule for its Flax models (``down_blocks.0`` -> ``down_blocks_0``, ...)."""
    from diffusers.models.modeling_flax_pytorch_utils import (
        rename_key,
        rename_key_and_reshape_tensor,
    )

    return rename_key_and_reshape_tensor(tuple(rename_key(key).split(".")), tensor, flat_shapes)


def transformers_rename(prefix: str) -> RenameFn:
    """transformers' rule for its Flax models with base-model prefix ``prefix``."""
    from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

    return lambda key, tensor, flat: rename_key_and_reshape_tensor(
        tuple(key.split(".")), tensor, flat, prefix
    )


def convert_state_dict(
    state: Mapping[str, np.ndarray], shapes: Any, rename: RenameFn, *, name: str
) -> dict:
    """Flax params (nested dict) of a PyTorch ``state`` for a model with param ``shapes``.

    ``shapes`` is the model's param tree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of its
    init). Checkpoint entries the model has no param for (buffers such as ``position_ids``) are
    dropped; a param the checkpoint lacks, or one of another shape, is a `ModelLoadError`.
    """
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat_shapes = flatten_dict(shapes)
    params = {}
    for key, tensor in state.items():
        flax_key, value = rename(key, tensor, flat_shapes)
        if flax_key not in flat_shapes:
            continue
        expected = tuple(flat_shapes[flax_key].shape)
        if value.shape != expected:
            raise ModelLoadError(
                f"model {name!r}: checkpoint tensor {key} has shape {value.shape}, "
                f"the model expects {expected}"
            )
        params[flax_key] = np.ascontiguousarray(value)
    missing = [k for k in flat_shapes if k not in params]
    if missing:
        raise ModelLoadError(
            f"model {name!r}: the checkpoint lacks {len(missing)} of the model's params "
            f"(first: {'/'.join(missing[0])}); is it the config's model?"
        )
    return unflatten_dict(params)


def cache_dir() -> Path:
    """``$SJC_JAX_CACHE``, else ``sjc-jax/flax-params`` beside the hub cache (``HF_HUB_CACHE``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().parent / "sjc-jax" / "flax-params"


def cache_key(weights: Path, config: Path, kind: str) -> str:
    """Hex key of a checkpoint's conversion (see the module docstring for what it hashes)."""
    real = weights.resolve()
    info = real.stat()
    record = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "weights": str(real),
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "config": hashlib.sha256(config.read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def _flatten(params: Any) -> dict[str, np.ndarray]:
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(params)
    if any("/" in part for key in flat for part in key):
        raise ValueError("param names must not contain '/'")
    return {"/".join(key): np.asarray(value) for key, value in flat.items()}


def save_cached(path: Path, params: Any, source: Mapping[str, Any]) -> None:
    """Write ``params`` to ``path`` atomically (a temporary sibling, then a rename)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(path) as tmp:
        save_file(_flatten(params), tmp, metadata={k: str(v) for k, v in source.items()})


def load_cached(path: Path) -> dict:
    """The params of a cache file, as nested dicts of numpy arrays."""
    from flax.traverse_util import unflatten_dict
    from safetensors.numpy import load_file

    return unflatten_dict({tuple(k.split("/")): v for k, v in load_file(path).items()})


def load_converted(
    weights: Path,
    config: Path,
    *,
    kind: str,
    shapes: Callable[[], Any],
    rename: RenameFn,
    name: str,
) -> dict:
    """Flax params of the PyTorch checkpoint ``weights``, converted once and then cached.

    Args:
      weights: the ``.safetensors`` or ``.bin`` file.
      config: the model's ``config.json`` (part of the cache key).
      kind: the model class (part of the cache key), e.g. ``"FlaxUNet2DConditionModel"``.
      shapes: returns the model's param shapes; called only when converting.
      rename: `diffusers_rename` or `transformers_rename(prefix)`.
      name: the model id or path, for messages.

    A cache that cannot be written (read-only, full) is one warning; the params still load.
    """
    path = cache_dir() / f"{kind}-{cache_key(weights, config, kind)}.safetensors"
    if path.is_file():
        try:
            return load_cached(path)
        except Exception as err:  # a corrupt or foreign file: convert again and replace it
            warnings.warn(f"ignoring unreadable cache file {path}: {err}", stacklevel=2)
    params = convert_state_dict(read_state_dict(weights, name=name), shapes(), rename, name=name)
    try:
        save_cached(path, params, {"source": weights, "kind": kind, "format": CACHE_FORMAT})
    except OSError as err:
        warnings.warn(
            f"cannot cache converted weights in {path.parent} ({err.strerror or err}); "
            f"set {CACHE_ENV} to a writable directory to load faster next time",
            stacklevel=2,
        )
    return params
