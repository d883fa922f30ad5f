"""``python -m sjc_jax``: see `sjc_jax.cli`."""

import sys

# Before anything else is imported: Ctrl-C / SIGTERM become requests (`sjc_jax.interrupts`).
from sjc_jax import interrupts

_stop = interrupts.StopRequest()
_restore = interrupts.install(_stop)

from sjc_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stop=_stop, restore=_restore))
