"""sjc-jax: Score Jacobian Chaining in pure JAX."""

__version__ = "0.1.0"
