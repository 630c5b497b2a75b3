"""``condnoise`` command line: one module of :mod:`condnoise.app` per command group.

Each module exposes ``register(subparsers)``, which adds its parsers and sets ``func``
(called with the parsed namespace, returns an exit code) as a default. Heavy imports
(torch, diffusers) stay inside the command functions so ``--help`` is fast. A new command
group is one new module plus one entry in :data:`COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import sys

from condnoise import __version__
from condnoise.app import autoencoder, data, evaluate, latents, sample, study, theory, train
from condnoise.app.common import HelpFormatter
from condnoise.errors import UserError

# In the order of the data flow: corrupt, data; autoencoder (first stage), latents; train;
# sample, walk; features, evaluate; theory; study, demo.
COMMAND_GROUPS = (data, autoencoder, latents, train, sample, evaluate, theory, study)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="condnoise",
        description="condnoise: condition corruption and condition-embedding perturbation "
                    "(CEP) for conditional diffusion models (Chen et al., NeurIPS 2024).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"condnoise {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
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
