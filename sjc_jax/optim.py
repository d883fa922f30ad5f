"""The optimiser of a lift, as an optax value, with parameter groups read off the field's structure.

The original optimises every field of the voxel grid with Adamax at one learning rate and the
background texture at another. `field_labels` derives those groups from the pytree paths of
whatever state is optimised (a field named ``background`` is the background group, every other
leaf the field group), so another representation with a ``background`` leaf needs no edit here.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

FIELD = "field"
BACKGROUND = "background"


def field_labels(params: Any) -> Any:
    """The group of each leaf of ``params``: `BACKGROUND` under a ``background`` attribute or key,
    `FIELD` everywhere else (a pytree of strings with the structure of ``params``)."""

    def label(path, _leaf) -> str:
        names = {getattr(entry, "name", getattr(entry, "key", None)) for entry in path}
        return BACKGROUND if BACKGROUND in names else FIELD

    return jax.tree_util.tree_map_with_path(label, params)


def sjc_adamax(
    *,
    lr: float = 0.05,
    background_lr: float = 1e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """The original's optimiser: Adamax at ``lr`` for the field, ``background_lr`` for the
    background texture (0 freezes it); torch's Adamax update (tests/test_sjc.py checks it)."""

    def adamax(rate: float) -> optax.GradientTransformation:
        return optax.adamax(rate, b1=b1, b2=b2, eps=eps)

    return optax.multi_transform(
        {FIELD: adamax(lr), BACKGROUND: adamax(background_lr)}, field_labels
    )
