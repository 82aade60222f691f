"""`cupy-bn info`: versions, GPUs, the kernel toolchain and the usable backends."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from cupy_bn.cli.common import (
    emit_json,
    stdout_console,
)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON on stdout.")
def info(as_json: bool) -> None:
    """Show versions, GPUs, the kernel toolchain (NVRTC, simulator) and the usable backends."""
    from cupy_bn.environment import describe

    facts = describe()
    if as_json:
        emit_json(facts)
        return
    table = Table(title="cupy-bn", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in _info_rows(facts):
        table.add_row(key, value)
    stdout_console().print(table)


def _info_rows(facts: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        ("cupy-bn", facts["cupy_bn"]),
        ("python", facts["python"]),
        ("numpy", facts["numpy"]),
        ("cupy", facts["cupy"]["state"]),
    ]
    for gpu in facts["gpus"]:
        peak = gpu["peak_bandwidth"]
        rows.append(
            (
                f"gpu {gpu['id']}",
                f"{gpu['name']} (sm {gpu['compute_capability']}, "
                f"{gpu['memory_bytes'] / 2**30:.0f} GiB, "
                + ("peak bandwidth unknown" if peak is None else f"peak {peak / 1e9:.0f} GB/s")
                + ")",
            )
        )
    nvrtc = facts["nvrtc"]
    rows.append(("nvrtc", nvrtc["version"] if nvrtc["found"] else f"not found ({nvrtc['detail']})"))
    sim = facts["simulator"]
    rows.append(("simulator", sim["detail"]))
    for tool, where in sim.get("toolchain", {}).items():
        rows.append((f"  {tool}", str(where) if where else "not found"))
    rows.append(("torch", facts["torch"] or "not installed"))
    rows.append(("backends", ", ".join(facts["backends"])))
    return rows
