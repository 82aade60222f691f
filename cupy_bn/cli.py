"""The `cupy-bn` command.

Conventions shared by every command: `--json` prints machine-readable output on stdout (no
styling); exit status 0 on success, 1 when a check fails, 2 on usage or input errors, which
print a one-line reason on stderr without a traceback.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cupy_bn import __version__


class UserError(click.ClickException):
    """Bad input or usage: one line on stderr, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class CheckFailed(UserError):
    """A check ran and failed: one line on stderr, exit status 1."""

    exit_code = 1


def _emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, allow_nan=False, default=_json_default))


def _json_default(value: Any) -> Any:
    try:
        return value.item()  # numpy scalars
    except AttributeError:
        raise TypeError(f"cannot serialize {type(value).__name__}") from None


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _console() -> Console:
    return Console(highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cupy-bn")
def main() -> None:
    """Batch normalization for array code: checks, inference folding, benchmarks."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON on stdout.")
def info(as_json: bool) -> None:
    """Show versions, GPUs, the kernel toolchain (NVRTC, simulator) and the usable backends."""
    from cupy_bn.environment import describe

    facts = describe()
    if as_json:
        _emit_json(facts)
        return
    table = Table(title="cupy-bn", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in _info_rows(facts):
        table.add_row(key, value)
    _console().print(table)


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


# ---------------------------------------------------------------------------------------------
# fold


def _parse_assignments(values: tuple[str, ...], option: str, what: str) -> list[tuple[str, str]]:
    result = []
    for value in values:
        left, sep, right = value.partition("=")
        if not sep or not left or not right:
            raise UserError(f"{option}: expected {what}, got {value!r}")
        result.append((left, right))
    return result


def _default_output(model: Path) -> Path:
    stem = model.name[: -len(".npz")] if model.name.endswith(".npz") else model.name
    return model.with_name(stem + ".folded.npz")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Where to write the folded model [default: MODEL.folded.npz].",
)
@click.option(
    "--pair",
    "pairs",
    multiple=True,
    metavar="LAYER=BN",
    help="Fold batch norm BN into LAYER (key prefixes); repeatable. Others pair automatically.",
)
@click.option(
    "--transpose",
    multiple=True,
    metavar="LAYER",
    help="LAYER is a ConvTranspose (weight (in, out/groups, *k)); repeatable.",
)
@click.option(
    "--groups",
    "groups",
    multiple=True,
    metavar="LAYER=G",
    help="Groups of a ConvTranspose LAYER [default: output channels / weight.shape[1]].",
)
@click.option("--eps", type=float, default=1e-5, show_default=True, help="Batch norms' eps.")
@click.option("--keep-unpaired", is_flag=True, help="Keep batch norms without a layer unfolded.")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check every pair against a float64 reference on random input.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the check input.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists (never the input).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def fold(
    model: Path,
    output: Path | None,
    pairs: tuple[str, ...],
    transpose: tuple[str, ...],
    groups: tuple[str, ...],
    eps: float,
    keep_unpaired: bool,
    verify: bool,
    seed: int,
    force: bool,
    as_json: bool,
) -> None:
    """Fold each BatchNorm of MODEL.npz into the conv/linear layer before it (inference).

    MODEL.npz holds arrays under PyTorch state-dict names, e.g. written by
    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()}).
    """
    from cupy_bn.fold import FoldError, fold_state_dict
    from cupy_bn.foldcheck import verify_fold
    from cupy_bn.modelfile import ModelFileError, load_npz, save_npz

    pair_list = _parse_assignments(pairs, "--pair", "LAYER=BN")
    group_map: dict[str, int] = {}
    for name, value in _parse_assignments(groups, "--groups", "LAYER=G"):
        try:
            group_map[name] = int(value)
        except ValueError:
            raise UserError(
                f"--groups: expected LAYER=G with an integer G, got {name}={value}"
            ) from None
    output = output if output is not None else _default_output(model)
    if _same_file(output, model):
        raise UserError(f"{output}: is the input model; refusing to write over it")
    if output.exists() and not force:
        raise UserError(f"{output}: already exists (use --force to overwrite it)")

    try:
        state = load_npz(model)
        folded, report = fold_state_dict(
            state,
            pairs=pair_list,
            transpose=transpose,
            groups=group_map,
            eps=eps,
            keep_unpaired=keep_unpaired,
        )
    except (ModelFileError, FoldError) as e:
        raise UserError(str(e)) from None
    checks = (
        {(c.layer, c.bn): c for c in verify_fold(state, folded, report, seed=seed)}
        if verify
        else {}
    )
    failed = [c for c in checks.values() if not c.ok]
    if not failed:
        try:
            save_npz(output, folded, overwrite=force)
        except (ModelFileError, OSError) as e:
            raise UserError(str(e)) from None

    rows = []
    for pair in report.pairs:
        check = checks.get((pair.layer, pair.bn))
        rows.append(
            {
                "layer": pair.layer,
                "bn": pair.bn,
                "kind": pair.kind,
                "channels": pair.channels,
                "groups": pair.groups,
                "created_bias": pair.created_bias,
                "explicit": pair.explicit,
                "max_abs_error": None if check is None else _finite_or_none(check.max_abs_error),
                "max_abs_output": None if check is None else _finite_or_none(check.max_abs_output),
                "error_to_bound": None if check is None else _finite_or_none(check.error_to_bound),
                "ok": None if check is None else check.ok,
            }
        )
    if as_json:
        _emit_json(
            {
                "input": str(model),
                "output": str(output),
                "written": not failed,
                "eps": eps,
                "verified": verify,
                "ok": not failed,
                "pairs": rows,
                "unpaired": report.unpaired,
                "removed_keys": len(state)
                - len(folded)
                + sum(p.created_bias for p in report.pairs),
            }
        )
    else:
        _print_fold_table(rows, report.unpaired, verify)
        if not failed:
            _console().print(
                f"Folded {len(rows)} batch norm(s): {model} -> {output}"
                + (f"; kept {len(report.unpaired)} unpaired" if report.unpaired else "")
            )
    if failed:
        names = ", ".join(f"{c.layer}+{c.bn}" for c in failed)
        raise CheckFailed(f"fold check failed for {names}; nothing written")


def _print_fold_table(rows: list[dict[str, Any]], unpaired: list[str], verified: bool) -> None:
    from rich import box

    table = Table(title="Folded pairs", box=box.SIMPLE_HEAD)
    table.add_column("layer", overflow="fold")
    table.add_column("batch norm", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("C", justify="right", no_wrap=True)
    table.add_column("groups", justify="right", no_wrap=True)
    table.add_column("bias", no_wrap=True)
    if verified:
        table.add_column("max abs err", justify="right", no_wrap=True)
        table.add_column("check", no_wrap=True)
    for row in rows:
        cells = [
            row["layer"] or "<top level>",
            row["bn"] or "<top level>",
            row["kind"],
            str(row["channels"]),
            str(row["groups"]),
            "new" if row["created_bias"] else "",
        ]
        if verified:
            err = row["max_abs_error"]
            cells += [
                "nan" if err is None else f"{err:.2e}",
                "[green]ok[/]" if row["ok"] else "[red]FAIL[/]",
            ]
        table.add_row(*cells)
    console = _console()
    console.print(table)
    for bn in unpaired:
        console.print(f"kept unpaired batch norm: {bn}")


# ---------------------------------------------------------------------------------------------
# gradcheck and bench: shared option parsing


def _parse_shape(text: str, option: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise UserError(f"{option}: expected sizes like 4,3,5,5, got {text!r}") from None
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise UserError(f"{option}: expected rank 2 to 5 with positive sizes, got {text!r}")
    return shape


def _progress(enabled: bool, total: int, description: str):
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


# ---------------------------------------------------------------------------------------------
# gradcheck


def _resolve_backends(requested: tuple[str, ...]) -> list[str]:
    from cupy_bn.backends import available_backends

    usable = available_backends()
    if "all" in requested:
        return usable
    missing = [name for name in requested if name not in usable]
    if missing:
        raise UserError(
            f"backend {missing[0]!r} cannot run here (available: {', '.join(usable) or 'none'})"
        )
    return list(dict.fromkeys(requested))


@main.command()
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
    step: float,
    atol: float,
    rtol: float,
    eps: float,
    seed: int,
    as_json: bool,
) -> None:
    """Check batch norm's gradients (x, weight, bias) against central differences in float64.

    Exit status 0 when every case passes, 1 when one fails.
    """
    # Names, not the module: `cupy_bn.gradcheck` is also the exported function.
    from cupy_bn.gradcheck import CHANNEL_AXES, MODES, build_cases
    from cupy_bn.gradcheck import gradcheck as run_gradcheck

    shape_list = [_parse_shape(s, "--shape") for s in shapes] or None
    options = {
        "channel_axes": channel_axes or CHANNEL_AXES,
        "modes": MODES if mode == "both" else (mode,),
        "affine": {"both": (True, False), "on": (True,), "off": (False,)}[affine],
        "backends": _resolve_backends(backends),
    }
    try:
        cases = build_cases(shape_list, **options)
    except ValueError as e:
        raise UserError(str(e)) from None
    progress, task = _progress(not as_json, len(cases), "gradcheck")
    try:
        with progress:
            result = run_gradcheck(
                shape_list,
                **options,
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
        _emit_json(
            {
                "ok": result.passed,
                "summary": result.summary(),
                "step": result.step,
                "atol": result.atol,
                "rtol": result.rtol,
                "cases": [_case_json(c) for c in result.cases],
            }
        )
    else:
        _print_gradcheck(result)
    if not result.passed:
        raise CheckFailed(f"{len(result.failures)} of {len(result.cases)} gradient checks failed")


def _case_json(outcome: Any) -> dict[str, Any]:
    case = outcome.case
    return {
        "name": case.name,
        "backend": case.backend,
        "shape": list(case.shape),
        "channel_axis": case.channel_axis,
        "mode": case.mode,
        "affine": case.affine,
        "passed": outcome.passed,
        "error": outcome.error,
        "max_abs_error": _finite_or_none(outcome.max_abs_error),
        "max_rel_error": _finite_or_none(outcome.max_rel_error),
        "checks": {
            name: {
                "max_abs_error": _finite_or_none(c.max_abs_error),
                "max_rel_error": _finite_or_none(c.max_rel_error),
                "passed": c.passed,
            }
            for name, c in outcome.comparisons.items()
        },
    }


def _print_gradcheck(result: Any) -> None:
    table = Table(title="Gradient check (central differences, float64)")
    for column in ("backend", "mode", "shape", "axis", "affine"):
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
            case.mode,
            "x".join(str(d) for d in case.shape),
            str(case.channel_axis),
            "yes" if case.affine else "no",
            *errors,
            verdict,
        )
    console = _console()
    console.print(table)
    for outcome in result.cases:
        if outcome.error is not None:
            console.print(f"[red]{outcome.case.name}[/]: {outcome.error}", markup=True)
    console.print(("[green]" if result.passed else "[red]") + result.summary() + "[/]")


# ---------------------------------------------------------------------------------------------
# bench


@main.command()
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
            shape = _parse_shape(text, "--shape")
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

    progress, task = _progress(not to_stdout, len(cases) * len(names) * len(phase_list), "bench")
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
            _emit_json(_json_safe(payload))
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
        return _finite_or_none(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_PHASE_LABELS = {"forward_train": "fwd train", "backward": "backward", "eval": "eval"}


def _print_bench(report: Any) -> None:
    from rich import box

    console = _console()
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
