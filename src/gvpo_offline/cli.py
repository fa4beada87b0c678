"""The `gvpo-offline` command line: a thin typer layer that parses options and calls the stages.

Every user-facing failure is a GvpoError: printed as one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from gvpo_offline.errors import GvpoError

app = typer.Typer(
    name="gvpo-offline",
    help="Offline GVPO post-training: precompute-ref -> train -> eval on prompts with k>=2 scored responses.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


# ---- commands ------------------------------------------------------------------------------------
# Each command parses options into the stage's config dataclass and calls the stage. Keep them thin.


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except GvpoError as err:
        console.print(f"error: {err}", style="bold red", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted", style="yellow")
        sys.exit(130)
    except typer.Exit as exc:  # raised by commands that end early on purpose
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
