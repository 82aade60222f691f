"""The `cupy-bn` command."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from cupy_bn import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cupy-bn")
def main() -> None:
    """Batch normalization for array code: checks, inference folding, benchmarks."""


@main.command()
def info() -> None:
    """Show versions, whether CuPy can use a GPU here, and which backends can run."""
    import numpy

    from cupy_bn.backends import describe_environment

    env = describe_environment()
    table = Table(title="cupy-bn", show_header=False)
    table.add_row("cupy-bn", __version__)
    table.add_row("numpy", numpy.__version__)
    table.add_row("cupy", env["cupy"])
    table.add_row("backends", ", ".join(env["backends"]))
    Console().print(table)
