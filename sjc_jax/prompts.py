"""View-augmented prompts (docs/original.md section 2).

SJC conditions each rendered view on its direction: ``f"{prefix} {prompt}"`` with the prefix of
the camera's view label. Labels are ints 0..3 = front, side, back, overhead (the order of
`sjc_jax.camera`'s view labels); `VIEW_PREFIXES` is indexed by them. The four texts (and the
unconditional one) are encoded once per run and selected by label inside jit. `short_prompt`
shortens a prompt for one-line displays (the progress bar, warnings).
"""

from __future__ import annotations

# Indexed by view label: 0 front, 1 side, 2 back, 3 overhead.
VIEW_PREFIXES: tuple[str, str, str, str] = (
    "front view of",
    "side view of",
    "backside view of",
    "overhead view of",
)


def view_prompts(prompt: str, *, view_augmentation: bool = True) -> tuple[str, str, str, str]:
    """The text of each view label 0..3: ``f"{prefix} {prompt}"``, or ``prompt`` 4 times when off.

    The prompt is stripped of surrounding whitespace; an empty prompt raises `ValueError`.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    text = prompt.strip()
    if not text:
        raise ValueError("prompt is empty: give a text description such as 'a hamburger'")
    if not view_augmentation:
        return (text, text, text, text)
    front, side, back, overhead = (f"{prefix} {text}" for prefix in VIEW_PREFIXES)
    return (front, side, back, overhead)


def short_prompt(text: str, width: int = 40) -> str:
    """``text`` on one line in at most ``width`` characters: whitespace runs collapsed, and a
    longer text cut (at a word boundary when one is in its second half) with a trailing "…".
    """
    if width < 4:
        raise ValueError(f"width must be at least 4, got {width}")
    line = " ".join(str(text).split())
    if len(line) <= width:
        return line
    cut = line[: width - 1]
    space = cut.rfind(" ")
    if space >= width // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "…"
