"""`cupy-bn gradcheck`: finite differences against the analytic backward and double backward."""

from __future__ import annotations

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
    "--shape",
    "shapes",
    multiple=True,
    metavar="N,C,...",
    help="Input shape, rank 2-5; repeatable [default: one small shape per rank].",
)
@click.option(
    "--channel-axis",
    "channel_axes",
    multiple=True,
    type=int,
    help="1 (channels-first) or -1 (channels-last); repeatable [default: both].",
)
@click.option(
    "--mode",
    type=click.Choice(["train", "eval", "both"]),
    default="both",
    show_default=True,
    help="Batch statistics (train) or fixed running statistics (eval).",
)
@click.option(
    "--affine",
    type=click.Choice(["on", "off", "both"]),
    default="both",
    show_default=True,
    help="With weight and bias, without, or both.",
)
@click.option(
    "--backend",
    "backends",
    multiple=True,
    type=click.Choice(["numpy", "sim", "cuda", "all"]),
    default=("numpy",),
    show_default=True,
    help="Backend to check; repeatable. 'all': every backend that can run here.",
)
@click.option(
    "--fast",
    is_flag=True,
    help="Check dx along random directions instead of entry by entry (for slow backends).",
)
@click.option(
    "--order",
    type=click.Choice(["1", "2", "both"]),
    default="1",
    show_default=True,
    help="1: the backward against differences of the forward; 2: the double backward against "
    "differences of the backward; both.",
)
@click.option(
    "--virtual-batch",
    "virtual_batches",
    multiple=True,
    type=int,
    metavar="G",
    help="Ghost batches of G samples (first order); repeatable [default: off].",
)
@click.option(
    "--renorm",
    type=click.Choice(["off", "on", "both"]),
    default="off",
    show_default=True,
    help="Batch renormalization (train mode, r and d clipped and unclipped): off, on, or both "
    "batch norm and renorm.",
)
@click.option("--step", type=float, default=1e-6, show_default=True, help="Difference step h.")
@click.option("--atol", type=float, default=1e-5, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@click.option("--eps", type=float, default=1e-5, show_default=True, help="Batch norm's eps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def gradcheck(
    shapes: tuple[str, ...],
    channel_axes: tuple[int, ...],
    mode: str,
    affine: str,
    backends: tuple[str, ...],
    fast: bool,
    order: str,
    virtual_batches: tuple[int, ...],
    renorm: str,
    step: float,
    atol: float,
    rtol: float,
    eps: float,
    seed: int,
    as_json: bool,
) -> None:
    """Check batch norm's gradients (x, weight, bias) against central differences in float64;
    with --order 2, the double backward's (x, weight, dy) against differences of the backward;
    with --renorm, batch renormalization's against differences of its formula (r, d constant).

    Exit status 0 when every case passes, 1 when one fails, 2 for options the library refuses
    or a backend that cannot run here.
    """
    from cupy_bn.backends import available_backends
    from cupy_bn.gradient_check import CHANNEL_AXES, MODES, RENORMS, build_cases, run_cases

    try:
        cases = build_cases(
            [parse_sizes(s, "--shape") for s in shapes] or None,
            channel_axes=channel_axes or CHANNEL_AXES,
            modes=MODES if mode == "both" else (mode,),
            affine={"both": (True, False), "on": (True,), "off": (False,)}[affine],
            backends=available_backends() if "all" in backends else tuple(dict.fromkeys(backends)),
            order=(1, 2) if order == "both" else (int(order),),
            virtual_batch=tuple(dict.fromkeys(virtual_batches)) or None,
            renorm={"off": (None,), "on": RENORMS[1:], "both": RENORMS}[renorm],
        )
        progress, task = progress_bar(not as_json, len(cases), "gradcheck")
        with progress:
            result = run_cases(
                cases,
                step=step,
                atol=atol,
                rtol=rtol,
                eps=eps,
                seed=seed,
                fast=fast,
                progress=lambda _: progress.advance(task),
            )
    except ValueError as e:
        raise UserError(str(e)) from None

    if as_json:
        emit_json(result.to_json())
    else:
        _print_gradcheck(result)
    if not result.passed:
        raise CheckFailed(f"{len(result.failures)} of {len(result.cases)} gradient checks failed")


def _print_gradcheck(result: Any) -> None:
    table = Table(title="Gradient check (central differences, float64)")
    for column in ("backend", "order", "mode", "shape", "axis", "affine", "ghost", "renorm"):
        table.add_column(column, no_wrap=True)
    table.add_column("abs err", justify="right", no_wrap=True)
    table.add_column("rel err", justify="right", no_wrap=True)
    table.add_column("result")
    for outcome in result.cases:
        case = outcome.case
        if outcome.error is not None:
            verdict = "[red]ERROR[/]"
            errors = ("-", "-")
        else:
            failed = [n for n, c in outcome.comparisons.items() if not c.passed]
            verdict = "[green]ok[/]" if not failed else f"[red]FAIL[/] ({', '.join(failed)})"
            errors = (f"{outcome.max_abs_error:.1e}", f"{outcome.max_rel_error:.1e}")
        table.add_row(
            case.backend,
            str(case.order),
            case.mode,
            "x".join(str(d) for d in case.shape),
            str(case.channel_axis),
            "yes" if case.affine else "no",
            "-" if case.virtual_batch is None else str(case.virtual_batch),
            case.renorm or "-",
            *errors,
            verdict,
        )
    console = stdout_console()
    console.print(table)
    for outcome in result.cases:
        if outcome.error is not None:
            console.print(f"[red]{outcome.case.name}[/]: {outcome.error}", markup=True)
    console.print(
        "rel err: |numeric - analytic| / (|numeric| + atol/rtol); a value passes when it is "
        f"<= rtol ({result.rtol:g})",
        markup=False,
    )
    console.print(("[green]" if result.passed else "[red]") + result.summary() + "[/]")
