"""`cupy-bn bench`: timings against peer implementations, GB/s against `cupy_bn.traffic`."""

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
    parse_sizes,
    progress_bar,
    stdout_console,
)


@click.command()
@click.option(
    "--suite",
    type=click.Choice(["default", "gpu"]),
    default="default",
    show_default=True,
    help="Case set: 'default' (every implementation that runs here on ResNet-50-like and dense "
    "inputs) or 'gpu' (ResNet-50's batch-norm inputs at batch 256, NCHW and NHWC, float16, "
    "bfloat16 and float32, L2 flushed: our CUDA kernels against naive CuPy, PyTorch CUDA and "
    "cuDNN; needs a GPU).",
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="N,C,...",
    help="Input shape; repeatable [default: the suite's shapes].",
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
    "dtypes",
    multiple=True,
    type=click.Choice(["float16", "bfloat16", "float32", "float64"]),
    help="Storage dtype; repeatable [default: the suite's: float32; gpu: float16, bfloat16 "
    "and float32].",
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
    help="Implementation to time; repeatable [default: the suite's]. Names: cupy_bn.numpy, "
    "cupy_bn.sim, cupy_bn.cuda, cupy_bn.cuda.kernels, numpy.textbook, numpy.einsum, torch.cpu, "
    "torch.cuda, torch.cuda.cudnn, cupy.naive.",
)
@click.option(
    "--flush-l2/--no-flush-l2",
    default=None,
    help="Evict the GPU's L2 cache before every timed GPU call [default: on for the gpu suite].",
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
    type=click.Path(allow_dash=True, path_type=str),
    metavar="PATH",
    help="Write pytest-benchmark-style JSON to PATH ('-': stdout, no table).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Write a PNG bar chart of GB/s (needs matplotlib: pip install 'cupy-bn[plot]').",
)
def bench(
    suite: str,
    shapes: tuple[str, ...],
    channel_axis: int,
    dtypes: tuple[str, ...],
    repeat: int,
    warmup: int,
    phases: tuple[str, ...],
    impls: tuple[str, ...],
    flush_l2: bool | None,
    copy_mb: int,
    seed: int,
    json_path: str | None,
    plot_path: Path | None,
) -> None:
    """Time forward-train, backward and eval against peer implementations.

    Reports median/min time; GB/s of the minimal traffic (forward-train and eval R1 W1,
    backward R2 W1) for every implementation, and for cupy-bn's own also of the traffic its
    kernels move (R2 W1, R4 W1, R1 W1); each as % of the machine's memory bandwidth; and the
    ratio to the fastest peer. Exit status 2 when an output path cannot be written, a
    requested implementation of cupy-bn's own (or the gpu suite) cannot run here, or none of
    those requested can; 1 when one of cupy-bn's own implementations fails.
    """
    from cupy_bn import bench as b
    from cupy_bn.modelfile import ModelFileError, atomic_output, check_output_path

    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError(
                "--plot needs matplotlib, which is not installed (pip install 'cupy-bn[plot]')"
            ) from None
    to_stdout = json_path == "-"
    for option, path in (("--json", None if to_stdout else json_path), ("--plot", plot_path)):
        if path is not None:
            try:
                check_output_path(path, overwrite=True)
            except ModelFileError as e:
                raise UserError(f"{option}: {e}") from None
    try:
        names = b.select_implementations(impls, suite)
    except (ValueError, b.UnavailableError) as e:
        raise UserError(str(e)) from None
    chosen = b.SUITES[suite]
    cases = []
    for dtype in dict.fromkeys(dtypes) or chosen.dtypes:
        if not shapes:
            cases += chosen.cases(dtype)
        for text in shapes:
            shape = parse_sizes(text, "--shape")
            name = "x".join(str(d) for d in shape) + ("" if channel_axis == 1 else "-last")
            try:
                cases.append(b.BenchCase(name, shape, channel_axis, dtype))
            except (TypeError, ValueError) as e:
                raise UserError(str(e)) from None
    phase_list = list(dict.fromkeys(phases)) or list(b.PHASES)

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
            flush_l2=chosen.flush_l2 if flush_l2 is None else flush_l2,
        )
    if json_path is not None:
        payload = report.to_json()
        if to_stdout:
            emit_json(payload)
        else:
            try:
                with atomic_output(json_path, overwrite=True) as f:
                    f.write(json.dumps(payload, indent=2, allow_nan=False).encode())
            except (ModelFileError, OSError) as e:
                raise UserError(f"--json: {e}") from None
    if not to_stdout:
        _print_bench(report)
    if plot_path is not None:
        try:
            b.plot_report(report, plot_path)
        except (OSError, ValueError) as e:
            raise UserError(f"--plot: {plot_path}: {e}") from None
    if report.errors:
        raise CheckFailed(
            f"{len(report.errors)} cupy-bn implementation(s) failed: {report.errors[0]}"
        )


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
        for column in ("median", "min", "GB/s", "% bw", "moved GB/s", "moved % bw", "vs peer"):
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
            table.add_row(
                _PHASE_LABELS[row.phase] if first else "",
                f"[bold]{row.impl}[/]" if row.ours else row.impl,
                f"{row.median * 1e3:.3f}",
                f"{row.stats['min'] * 1e3:.3f}",
                _figure(row.gbps, "{:.1f}"),
                _figure(row.percent_of_bandwidth, "{:.0f}%"),
                _figure(row.moved_gbps, "{:.1f}"),
                _figure(row.moved_percent_of_bandwidth, "{:.0f}%"),
                _figure(row.ratio_to_fastest_peer, "{:.2f}x"),
            )
        console.print(table)
    if report.rows:
        console.print(_model_legend(), markup=False)
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


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)


def _model_legend() -> str:
    """Which traffic each GB/s column divides, from `cupy_bn.traffic`."""
    from cupy_bn import traffic

    def per_phase(passes) -> str:
        return ", ".join(f"{_PHASE_LABELS[p]} {passes(p)}" for p in traffic.PHASES)

    return (
        f"GB/s, % bw: minimal traffic / median, every implementation alike "
        f"({per_phase(traffic.minimal_passes)})\n"
        f"moved GB/s, moved % bw: traffic cupy-bn's backends make / median "
        f"({per_phase(traffic.moved_passes)})"
    )
