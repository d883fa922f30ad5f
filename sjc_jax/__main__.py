"""``python -m sjc_jax``: see `sjc_jax.cli`."""

import sys

from sjc_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
