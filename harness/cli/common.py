"""What every verb shares: the typer app, the common options, one-line errors (exit 2) and format checks.

User errors (a config that does not validate, an unknown name, a missing or unreadable file) print one line
naming the file and the field and exit 2; no traceback.
"""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from harness.config import ConfigError
from harness.output import FORMATS

# rich_markup_mode=None: click's plain help, where a flag shows no type and an option its metavar (typer's rich
# help prints <bool> and <list[str]> instead). Every option with a value names its metavar.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
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

    return wrapper


def check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    if fmt not in allowed:
        raise ConfigError("--format", None, f"unknown format {fmt!r}; known: {', '.join(allowed)}")
    return fmt
