"""What every verb shares: the typer app, the common options, one-line errors (exit 2) and format checks.

User errors (a config that does not validate, an unknown name, a missing or unreadable file, a file that cannot be
written) print one line naming the file and the field and exit 2; no traceback. Usage errors (an unknown option, a
bad value for a typed option, a missing argument) print one line naming the option and exit 2, instead of typer's
boxed help; a reader's `RunWarning` (a damaged last line skipped) prints as one line too.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from tokenfleet.config import ConfigError
from tokenfleet.output import FORMATS
from tokenfleet.results import RunWarning
from typer.core import TyperGroup

# click's ClickException, found through typer's public BadParameter: typer 0.2x vendors click as typer._click, older
# typer uses the click package, and the GPU machines may carry either.
_CLICK_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except _CLICK_ERRORS as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `tokenfleet` alone: the help, as typer shows it
            raise
        typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        raise typer.Exit(e.exit_code) from None


class _OneLineErrors(TyperGroup):
    """The app's group: a usage error while parsing the verb's options or invoking it is one line, not a box."""

    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


_format_warning = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, RunWarning):
        return f"warning: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


warnings.formatwarning = _one_line_warning

# rich_markup_mode=None: click's plain help, where a flag shows no type and an option its metavar (typer's rich
# help prints <bool> and <list[str]> instead). Every option with a value names its metavar.
app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Measure LLM tokens/s on this device and turn it into fleet capacity against demand.")

FormatOpt = Annotated[str, typer.Option("--format", "-f", metavar="table|json|csv|md", help="output format")]
# `env` prints several small tables: CSV has no place for more than one, so env takes table, json or md.
EnvFormatOpt = Annotated[str, typer.Option("--format", "-f", metavar="table|json|md", help="output format")]
DeviceOpt = Annotated[str | None, typer.Option("--device", metavar="cpu|cuda", help="default: CUDA when present")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="print only the headline (capacity) and the run folder")]


def user_errors(fn):
    """Turn ConfigError into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OverflowError as e:  # finite flags whose product is not (--peak-factor 1e308, --utilization 1e-308)
            given = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in kwargs.items() if isinstance(v, float))
            typer.echo(f"error: {given or 'the numbers given'}: out of range, the arithmetic overflowed ({e})",
                       err=True)
            raise typer.Exit(2) from None

    return wrapper


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    if fmt not in allowed:
        raise ConfigError("--format", None, f"unknown format {fmt!r}; known: {', '.join(allowed)}")
    return fmt


def check_finite(values: dict[str, float | None], no_limit: tuple[str, ...] = ()) -> None:
    """Every float flag given is a finite number (NaN never; inf only for the flags in `no_limit`, where it means no
    limit); else one line naming the flag."""
    for flag, v in values.items():
        if v is not None and (math.isnan(v) or (math.isinf(v) and flag not in no_limit)):
            raise ConfigError(flag, None, f"{v} is not a finite number"
                              + (" (give inf for no limit)" if flag in no_limit else ""))
