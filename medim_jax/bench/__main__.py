"""``python -m medim_jax.bench``: see bench/__init__.py and ``--help``."""

from medim_jax.bench.cli import main

main()
