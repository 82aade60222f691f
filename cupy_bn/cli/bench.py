"""`cupy-bn bench`: timings against peer implementations, GB/s against the traffic model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cupy_bn.cli.common import (
    CheckFailed,
    UserError,
    emit_json,
    finite_or_none,
    parse_shape,
    progress_bar,
    stdout_console,
)


@click.command()
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="N,C,...",
    help="Input shape; repeatable [default: ResNet-50-like NCHW and NHWC, dense 4096x1024].",
)
@click.option(
    "--channel-axis",
    type=int,
    default=1,
    show_default=True,
    help="Channel axis of every --shape (1: channels-first, -1: channels-last).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32", "float64"]),
    default="float32",
    show_default=True,
)
@click.option("--repeat", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option(
    "--phase",
    "phases",
    multiple=True,
    type=click.Choice(["forward_train", "backward", "eval"]),
    help="Phase to time; repeatable [default: all three].",
)
@click.option(
    "--impl",
    "impls",
    multiple=True,
    metavar="NAME",
    help="Implementation to time; repeatable [default: all that can run here except "
    "cupy_bn.sim]. Names: cupy_bn.numpy, cupy_bn.sim, cupy_bn.cuda, numpy.textbook, "
    "torch.cpu, torch.cuda, cupy.naive.",
)
@click.option(
    "--copy-mb",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Buffer size of the CPU bandwidth measurement (numpy.copyto), MiB.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True, path_type=str),
    metavar="PATH",
    help="Write pytest-benchmark-style JSON to PATH ('-': stdout, no table).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="Write a PNG bar chart of GB/s (needs matplotlib: pip install 'cupy-bn[plot]').",
)
def bench(
    shapes: tuple[str, ...],
    channel_axis: int,
    dtype: str,
    repeat: int,
    warmup: int,
    phases: tuple[str, ...],
    impls: tuple[str, ...],
    copy_mb: int,
    seed: int,
    json_path: str | None,
    plot_path: Path | None,
) -> None:
    """Time forward-train, backward and eval against peer implementations.

    Reports median/min time, GB/s against the minimal-traffic model (forward-train and eval
    R1W1, backward R2W1), % of the measured memory bandwidth and the ratio to the fastest peer.
    Exit status 1 when one of cupy-bn's own implementations fails.
    """
    from cupy_bn import bench as b

    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError(
                "--plot needs matplotlib, which is not installed (pip install 'cupy-bn[plot]')"
            ) from None
    if shapes:
        cases = []
        for text in shapes:
            shape = parse_shape(text, "--shape")
            if not -len(shape) <= channel_axis < len(shape) or channel_axis % len(shape) == 0:
                raise UserError(f"--channel-axis {channel_axis} is not a channel axis of {shape}")
            name = "x".join(str(d) for d in shape) + ("" if channel_axis == 1 else "-last")
            cases.append(b.BenchCase(name, shape, channel_axis, dtype))
    else:
        cases = b.default_cases(dtype)
    unknown = [name for name in impls if name not in b.IMPLEMENTATIONS]
    if unknown:
        raise UserError(
            f"--impl: unknown implementation {unknown[0]!r} (known: {', '.join(b.IMPLEMENTATIONS)})"
        )
    names = list(dict.fromkeys(impls)) or list(b.DEFAULT_IMPLEMENTATIONS)
    phase_list = list(dict.fromkeys(phases)) or list(b.PHASES)
    to_stdout = json_path == "-"

    progress, task = progress_bar(not to_stdout, len(cases) * len(names) * len(phase_list), "bench")
    with progress:
        report = b.run_bench(
            cases,
            names,
            phase_list,
            repeat=repeat,
            warmup=warmup,
            seed=seed,
            copy_bytes=copy_mb << 20,
            progress=lambda label: progress.update(task, advance=1, description=label),
        )
    if json_path is not None:
        payload = b.to_pytest_benchmark(report)
        if to_stdout:
            emit_json(_json_safe(payload))
        else:
            from cupy_bn.modelfile import ModelFileError, atomic_output

            try:
                with atomic_output(json_path, overwrite=True) as f:
                    f.write(json.dumps(_json_safe(payload), indent=2).encode())
            except (ModelFileError, OSError) as e:
                raise UserError(str(e)) from None
    if not to_stdout:
        _print_bench(report)
    if plot_path is not None:
        try:
            b.plot_report(report, plot_path)
        except (OSError, ValueError) as e:
            raise UserError(f"{plot_path}: {e}") from None
    if report.errors:
        raise CheckFailed(
            f"{len(report.errors)} cupy-bn implementation(s) failed: {report.errors[0]}"
        )


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf (not JSON) by None, recursively."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_PHASE_LABELS = {"forward_train": "fwd train", "backward": "backward", "eval": "eval"}


def _print_bench(report: Any) -> None:
    from rich import box

    console = stdout_console()
    phase_order = list(_PHASE_LABELS)
    for case in dict.fromkeys(row.case for row in report.rows):
        table = Table(
            title=f"{case.name}: {'x'.join(map(str, case.shape))} {case.dtype}, "
            f"channel axis {case.channel_axis} (ms per call)",
            box=box.SIMPLE_HEAD,
        )
        table.add_column("phase", no_wrap=True)
        table.add_column("implementation", no_wrap=True)
        for column in ("median", "min", "GB/s", "% bw", "vs peer"):
            table.add_column(column, justify="right", no_wrap=True)
        rows = sorted(
            (r for r in report.rows if r.case == case), key=lambda r: phase_order.index(r.phase)
        )
        previous = None
        for row in rows:
            first = row.phase != previous
            if first and previous is not None:
                table.add_section()
            previous = row.phase
            pct, ratio = row.percent_of_bandwidth, row.ratio_to_fastest_peer
            table.add_row(
                _PHASE_LABELS[row.phase] if first else "",
                f"[bold]{row.impl}[/]" if row.ours else row.impl,
                f"{row.median * 1e3:.3f}",
                f"{row.stats['min'] * 1e3:.3f}",
                f"{row.gbps:.1f}",
                "-" if pct is None else f"{pct:.0f}%",
                "-" if ratio is None else f"{ratio:.2f}x",
            )
        console.print(table)
    if report.cpu_bandwidth:
        console.print(
            f"CPU memory bandwidth (numpy.copyto, read + write, best of 1 and "
            f"{report.cpu_threads} threads): {report.cpu_bandwidth / 1e9:.1f} GB/s"
        )
    for gpu in report.gpus:
        peak = gpu["peak_bandwidth"]
        console.print(
            f"GPU {gpu['id']} {gpu['name']}: peak "
            + ("unknown" if peak is None else f"{peak / 1e9:.0f} GB/s")
        )
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    for error in report.errors:
        console.print(f"[red]error:[/] {error}")
