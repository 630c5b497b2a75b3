"""Helpers shared by the command modules: the help formatter and list parsers."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from condnoise.errors import UserError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default in ``--help``."""


class IntermixedParser(argparse.ArgumentParser):
    """Lets ``key=value`` items follow options (``PRESET --perturb cep-u train.lr=1e-3``):
    plain argparse stops collecting positionals at the first option."""

    _busy = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._busy:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._busy = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False


def add_parser(subparsers: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """``subparsers.add_parser`` with :class:`HelpFormatter` (defaults shown in ``--help``)."""
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def split_list(value: str, what: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``; UserError naming ``what`` when empty."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise UserError(f"{what}: empty list")
    return items


def typed_list(kind: type, name: str) -> Callable[[str], list]:
    """An argparse ``type=`` for comma-separated values of ``kind`` (``--d 8,32``)."""

    def parse(text: str) -> list:
        try:
            vals = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--{name}: expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"--{name}: empty list")
        return vals

    return parse
