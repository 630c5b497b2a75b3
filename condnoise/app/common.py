"""Helpers shared by the command modules: the parser and help formatter, option types
that check ranges at parse time, list parsers and the one progress-bar switch."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable

from condnoise.errors import UserError

_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_NO_DEFAULT_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction,
                       argparse._StoreConstAction, argparse._HelpAction,
                       argparse._VersionAction, argparse._CountAction,
                       argparse._AppendConstAction)  # fmt: skip


def plain_text(text: str) -> str:
    """Help text without reStructuredText markup (``code``, :func:`name`)."""
    return _RST_LITERAL.sub(r"\1", _RST_ROLE.sub(r"\1", text))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default once in ``--help``: not for required options, flags,
    ``None`` defaults, or help text that already states its default; no RST markup."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain_text(action.help or "")
        if _shows_default(action, text):
            text += " (default: %(default)s)"
        return text

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))


def _shows_default(action: argparse.Action, text: str) -> bool:
    default = action.default
    if default is None or default is argparse.SUPPRESS or action.required:
        return False
    if isinstance(action, _NO_DEFAULT_ACTIONS) or default in ([], ()):
        return False
    if not action.option_strings and action.nargs not in ("?", "*"):
        return False  # a required positional
    return "default" not in text.lower()


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors on one line, like every other error (``condnoise: error: argument
    --num: ... (see condnoise sample --help)``), exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"condnoise: error: {message} (see {self.prog} --help)\n")


class IntermixedParser(ArgumentParser):
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


def add_group_parser(subparsers: argparse._SubParsersAction, name: str, action: str,
                     **kwargs) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:  # fmt: skip
    """A command group (``condnoise features ACTION``): without an action it prints its
    help and exits 2, like ``condnoise`` without a command."""
    group = add_parser(subparsers, name, **kwargs)
    sub = group.add_subparsers(dest=f"{name}_command", metavar=action)
    group.set_defaults(func=lambda args: (group.print_help(), 2)[1])
    return group, sub


# --------------------------------------------------------------------------- option types


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=``: an integer in ``[lo, hi]`` (checked when the options are parsed)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, got {text}")
        return value

    parse.__name__ = "integer"  # what argparse names in its own messages
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False) -> Callable[[str], float]:  # fmt: skip
    """An argparse ``type=``: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        if not math.isfinite(value) or low_bad or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {_bounds(lo, hi, lo_open)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _bounds(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"<= {hi:g}"


positive_int = int_range(1)
nonneg_int = int_range(0)
seed_int = int_range(0)


def device_type(text: str) -> str:
    """An argparse ``type=`` for ``--device``: a torch device this machine has."""
    from condnoise.training.runtime import check_device

    try:
        return str(check_device(text))
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_device_option(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--device", type=device_type, default=None, help=help_text)


def split_list(value: str, what: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``; UserError naming ``what`` when empty."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise UserError(f"{what}: empty list")
    return items


def typed_list(kind: type, name: str, check: Callable[[str], object] | None = None
               ) -> Callable[[str], list]:  # fmt: skip
    """An argparse ``type=`` for comma-separated values of ``kind`` (``--d 8,32``);
    ``check`` (e.g. :func:`int_range`) validates each value."""

    def parse(text: str) -> list:
        try:
            vals = [(check or kind)(v.strip()) for v in text.split(",") if v.strip()]
        except (ValueError, argparse.ArgumentTypeError) as e:
            why = str(e) if isinstance(e, argparse.ArgumentTypeError) else \
                f"expected comma-separated {kind.__name__}s"  # fmt: skip
            raise argparse.ArgumentTypeError(f"--{name} {text!r}: {why}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"--{name}: empty list")
        return vals

    return parse


# --------------------------------------------------------------------------- progress bars

PROGRESS_ENV = "CONDNOISE_PROGRESS"


def add_progress_option(p: argparse.ArgumentParser) -> None:
    """``--no-progress`` (the one switch of every long command; see :func:`show_progress`)."""
    p.add_argument("--no-progress", action="store_true",
                   help=f"hide progress bars (same as {PROGRESS_ENV}=0); without either, bars "
                        f"show only when stderr is a terminal ({PROGRESS_ENV}=1 forces them)")


def show_progress(args: argparse.Namespace | None = None) -> bool:
    """Whether to draw progress bars: never with ``--no-progress``; else ``CONDNOISE_PROGRESS``
    (0 / false / no / off: no, anything else: yes) when set; else when stderr is a terminal."""
    if args is not None and getattr(args, "no_progress", False):
        return False
    env = os.environ.get(PROGRESS_ENV)
    if env is not None and env.strip():
        return env.strip().lower() not in ("0", "false", "no", "off")
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def status_printer(command: str) -> Callable[[str], None]:
    """A ``status(message)`` callback printing ``condnoise COMMAND: message`` on stderr without
    breaking a progress bar (tqdm.write)."""

    def status(message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"condnoise {command}: {message}", file=sys.stderr)

    return status


#: the step-budget flags of train and distill -> their config keys
TRAIN_FLAGS = (("max_steps", "train.steps"), ("ckpt_every", "train.ckpt_every"), ("seed", "train.seed"))


def flag_overrides(args: argparse.Namespace, pairs: tuple[tuple[str, str], ...]) -> list[str]:
    """``section.key=value`` overrides of the flags in ``pairs`` ((attribute, config key))
    that were given (not None)."""
    return [f"{key}={getattr(args, flag)}" for flag, key in pairs if getattr(args, flag) is not None]


def check_key_values(overrides: list[str]) -> None:
    """Every trailing override is ``section.key=value`` (one-line error otherwise)."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"bad override {bad[0]!r}: expected section.key=value, e.g. train.lr=5e-5")


def resumed_parent_step(explicit: int | None, resume: bool, run_dir: str, section: str,
                        field: str) -> int | None:
    """``explicit``, else on ``resume`` the parent-run step a derived run (distill /
    finetune) started from, read back from its config.yaml ``section.field``."""
    from pathlib import Path

    if explicit is not None or not resume or not (Path(run_dir) / "config.yaml").is_file():
        return explicit
    from condnoise.training.rundir import read_run_config

    saved = getattr(read_run_config(Path(run_dir)), section)
    return getattr(saved, field) if saved is not None else None
