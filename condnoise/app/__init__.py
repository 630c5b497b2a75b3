"""The command-line application: one module per command group, each with ``register(subparsers)``."""
