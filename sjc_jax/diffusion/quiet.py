"""Silence the Flax deprecation notices of diffusers 0.39 and transformers 4.x.

Both libraries log a deprecation line from every Flax module's ``setup`` (so at every trace),
hundreds per run. We pin versions that still ship Flax on purpose, so those lines are noise;
`silence_flax_deprecations` drops exactly them (other messages of both libraries still show).
"""

from __future__ import annotations

import logging
import warnings

_MESSAGES = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(m in message for m in _MESSAGES)


_FILTER = _DropFlaxDeprecation()


def silence_flax_deprecations() -> None:
    """Filter the notices out at both libraries' own log handlers (idempotent).

    Every diffusers/transformers logger propagates to its library's root logger, whose handler
    prints; a filter on that handler sees all their records, whenever their modules load.
    """
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        root = library._get_library_root_logger()
        for target in (root, *root.handlers):
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)


def import_flax_models():
    """``(FlaxUNet2DConditionModel, FlaxAutoencoderKL, FlaxCLIPTextModel)``, quietly."""
    silence_flax_deprecations()
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import FlaxCLIPTextModel

    return FlaxUNet2DConditionModel, FlaxAutoencoderKL, FlaxCLIPTextModel
