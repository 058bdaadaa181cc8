"""The ``rdkd`` command line: a thin typer layer over the stage entry functions.

Each command parses options and calls one function in ``rdkd.stages``; the stages do the
work and raise :class:`rdkd.errors.UserError` for bad input, which ``main`` turns into one
line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from rdkd.errors import UserError

app = typer.Typer(
    help="Distil open_clip teachers into small students from an offline teacher-embedding cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
cache_app = typer.Typer(help="Inspect and check a teacher-embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


# --- extract-teacher (stage one) ---------------------------------------------------------


# --- cache info / verify -------------------------------------------------------------------


# --- train-student (stage two) ---------------------------------------------------------------


# --- evaluate / report -----------------------------------------------------------------------


# --- demo-data -------------------------------------------------------------------------------


def main() -> None:
    """Console-script entry: run the app, turning user errors into one line and exit code 2."""
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
