"""``condnoise`` command line: one module of :mod:`condnoise.app` per command group.

Each module exposes ``register(subparsers)``, which adds its parsers and sets ``func``
(called with the parsed namespace, returns an exit code) as a default. Heavy imports
(torch, diffusers) stay inside the command functions so ``--help`` is fast. A new command
group is one new module plus one entry in :data:`COMMAND_GROUPS`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from condnoise import __version__
from condnoise.app import (
    autoencoder,
    data,
    distill,
    evaluate,
    finetune,
    latents,
    sample,
    study,
    theory,
    train,
)
from condnoise.app.common import ArgumentParser, HelpFormatter
from condnoise.errors import CondnoiseWarning, UserError
from condnoise.io import oserror_text

# In the order of the data flow: corrupt, data; autoencoder (first stage), latents; train;
# distill, finetune; sample, walk; features, evaluate; theory; study, demo.
COMMAND_GROUPS = (data, autoencoder, latents, train, distill, finetune, sample, evaluate, theory, study)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
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
    """Run one command; the exit code: 0 done, 2 bad input or environment (one line on
    stderr, no traceback, also for usage errors and for no command at all), 130 interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version (0) and usage errors (2), already printed
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    with _one_line_warnings():
        try:
            return int(args.func(args) or 0)
        except UserError as e:
            print(f"condnoise: error: {e}", file=sys.stderr)
            return e.exit_code
        except OSError as e:  # the environment: a file in the way, no permission, disk full
            where = f"{e.filename}: " if e.filename else ""
            print(f"condnoise: error: {where}{oserror_text(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("condnoise: interrupted", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _one_line_warnings():
    """Print :class:`CondnoiseWarning` s as ``condnoise: warning: ...`` (one line each)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, CondnoiseWarning):
                print(f"condnoise: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", CondnoiseWarning)
        yield


if __name__ == "__main__":
    raise SystemExit(main())
