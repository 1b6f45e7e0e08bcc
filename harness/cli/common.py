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

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Measure LLM tokens/s on this device and turn it into fleet capacity against demand.")

FormatOpt = Annotated[str, typer.Option("--format", "-f", help="table | json | csv | md")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu | cuda (default: CUDA when present)")]


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
