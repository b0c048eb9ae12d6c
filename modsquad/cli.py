"""The `modsquad` command line. It only parses arguments, calls library functions and prints.

Every command is also one Python call in the library; errors that users can cause (`UserError`) are printed
as one red line and exit with code 2.
"""

from __future__ import annotations

import functools
from pathlib import Path

import typer
from rich.console import Console

from . import __version__
from .errors import UserError

console = Console()
err_console = Console(stderr=True)


class _App(typer.Typer):
    """Typer app whose direct call also turns stray `UserError`s into one line and exit code 2."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except UserError as e:  # pragma: no cover - commands already catch these
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise SystemExit(2) from None


app = _App(name="modsquad", help="Multi-task vision with mixture-of-experts ViTs (Mod-Squad and friends).",
           no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Make and check datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def user_errors(fn):
    """Print `UserError`s as one red line and exit 2 instead of showing a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool):
    if value:
        console.print(f"modsquad {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    """Train, inspect, prune and benchmark multi-task mixture-of-experts ViTs."""


def _csv(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None
