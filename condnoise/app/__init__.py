"""The ``condnoise`` command-line application.

One module per command group (``data``, ``autoencoder``, ``train``, ``sample``,
``evaluate``, ``theory``, ``study``), each with ``register(subparsers)``;
:mod:`condnoise.app.cli` imports them statically. Only this package parses arguments or
prints: the stage packages are libraries and never import ``condnoise.app``.
"""
