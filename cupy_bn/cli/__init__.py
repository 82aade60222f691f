"""The `cupy-bn` command: one module per subcommand (the command has the module's name), shared
pieces in `common`.

Conventions shared by every command: `--json` prints machine-readable output on stdout (no
styling); exit status 0 on success, 1 when a check fails, 2 on usage or input errors, which
print a one-line reason on stderr without a traceback.
"""

from __future__ import annotations

import click

from cupy_bn import __version__
from cupy_bn.cli import bench, fold, gradcheck, info


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cupy-bn")
def main() -> None:
    """Batch normalization for array code: checks, inference folding, benchmarks."""


# The modules stay the package's attributes (`cupy_bn.cli.fold` is the module); each holds
# its command under the module's name.
for command in (info.info, gradcheck.gradcheck, fold.fold, bench.bench):
    main.add_command(command)

__all__ = ["main"]
