"""What every `cupy-bn` command shares: errors with exit codes, JSON and table output, option
parsing.

Exit status 0 on success, 1 when a check ran and failed (`CheckFailed`), 2 on usage or input
errors (`UserError`), which print a one-line reason on stderr without a traceback.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click
from rich.console import Console


class UserError(click.ClickException):
    """Bad input or usage: one line on stderr, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class CheckFailed(UserError):
    """A check ran and failed: one line on stderr, exit status 1."""

    exit_code = 1


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, allow_nan=False, default=json_default))


def json_default(value: Any) -> Any:
    try:
        return value.item()  # numpy scalars
    except AttributeError:
        raise TypeError(f"cannot serialize {type(value).__name__}") from None


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def stdout_console() -> Console:
    """Rich output on stdout; when piped, wide enough that tables keep one row per line."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def parse_shape(text: str, option: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise UserError(f"{option}: expected sizes like 4,3,5,5, got {text!r}") from None
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise UserError(f"{option}: expected rank 2 to 5 with positive sizes, got {text!r}")
    return shape


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
