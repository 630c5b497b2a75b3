"""``condnoise`` command line. Each stage registers its own sub-commands.

A stage module exposes ``register(subparsers)`` which adds its parsers and sets
``func`` (called with the parsed namespace, returns an exit code) as a default.
Heavy imports (torch, diffusers) stay inside the command functions so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from condnoise import __version__
from condnoise.errors import UserError

# Stage modules providing sub-commands, in the order of the data flow.
COMMAND_MODULES = (
    "condnoise.data.commands",  # corrupt
    "condnoise.training.commands",  # train
    "condnoise.diffusion.commands",  # sample, walk
    "condnoise.evaluation.commands",  # features, evaluate
    "condnoise.theory.commands",  # theory
    "condnoise.study.commands",  # study, demo
    "condnoise.app.autoencoder",  # autoencoder train, autoencoder eval
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default in ``--help``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="condnoise",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"condnoise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"condnoise: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("condnoise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
