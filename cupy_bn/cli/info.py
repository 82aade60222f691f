"""`cupy-bn info`: versions, GPUs, the kernel toolchain and the usable backends."""

from __future__ import annotations

from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from cupy_bn.cli.common import emit_json, stdout_console


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON on stdout.")
def info(as_json: bool) -> None:
    """Show versions, GPUs, the kernel toolchain (NVRTC, simulator) and the usable backends."""
    from cupy_bn.environment import describe

    facts = describe()
    if as_json:
        emit_json(facts.to_json())
        return
    table = Table(title="cupy-bn", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in _info_rows(facts):
        table.add_row(escape(key), escape(value))  # values may hold brackets: not markup
    stdout_console().print(table)


def _text(value: Any) -> str:
    if value is None:
        return "not found"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _gpu_row(gpu: Any) -> str:
    details = [
        "sm " + (gpu.compute_capability or "unknown"),
        "memory unknown" if gpu.memory_bytes is None else f"{gpu.memory_bytes / 2**30:.0f} GiB",
        "peak bandwidth unknown"
        if gpu.peak_bandwidth is None
        else f"peak {gpu.peak_bandwidth / 1e9:.0f} GB/s",
    ]
    return f"{gpu.name} ({', '.join(details)})"


def _info_rows(facts: Any) -> list[tuple[str, str]]:
    rows = [
        ("cupy-bn", facts.cupy_bn),
        ("python", facts.python),
        ("numpy", facts.numpy),
        ("cupy", facts.cupy.state),
    ]
    rows += [(f"gpu {gpu.id}", _gpu_row(gpu)) for gpu in facts.gpus]
    nvrtc = facts.nvrtc
    rows.append(("nvrtc", nvrtc.version if nvrtc.found else f"not found ({nvrtc.detail})"))
    rows.append(("simulator", facts.simulator.detail))
    rows += [(f"  {tool}", _text(where)) for tool, where in facts.simulator.toolchain.items()]
    rows.append(("torch", facts.torch or "not installed"))
    rows.append(("numba", facts.numba or "not installed (pip install cupy-bn[cpu])"))
    rows.append(("backends", ", ".join(facts.backends)))
    rows.append(("auto on NumPy", facts.cpu_backend))
    return rows
