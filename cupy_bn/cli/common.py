"""What every `cupy-bn` command shares: errors with exit codes, JSON and table output, option
parsing.

Exit status 0 on success, 1 when a check ran and failed (`CheckFailed`), 2 on usage or input
errors (`UserError`), which print a one-line reason on stderr without a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console

from cupy_bn.jsonable import finite_or_none, jsonable

__all__ = [
    "CheckFailed",
    "UserError",
    "emit_json",
    "finite_or_none",
    "parse_sizes",
    "progress_bar",
    "stdout_console",
]


class UserError(click.ClickException):
    """Bad input or usage: one line on stderr, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class CheckFailed(UserError):
    """A check ran and failed: one line on stderr, exit status 1."""

    exit_code = 1


def emit_json(payload: Any) -> None:
    """Print `payload` on stdout as JSON, through `cupy_bn.jsonable.jsonable` (the one place
    where tuples, NumPy values and non-finite floats become plain JSON)."""
    click.echo(json.dumps(jsonable(payload), indent=2, allow_nan=False))


def stdout_console() -> Console:
    """Rich output on stdout; when piped, wide enough that tables keep one row per line."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """`4,3,5,5` or `4x3x5x5` as a tuple of ints; the library checks what sizes it accepts."""
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise UserError(f"{option}: expected sizes like 4,3,5,5, got {text!r}") from None


def progress_bar(enabled: bool, total: int, description: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not enabled or not console.is_terminal,
    )
    task = progress.add_task(description, total=total)
    return progress, task
