"""The `cupy-bn` command.

Conventions shared by every command: `--json` prints machine-readable output on stdout (no
styling); exit status 0 on success, 1 when a check fails, 2 on usage or input errors, which
print a one-line reason on stderr without a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
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
    """Rich output on stdout; when piped, wide enough that tables keep one row per line."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


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


def _is_onnx(model: Path) -> bool:
    return model.suffix.lower() == ".onnx"


def _default_output(model: Path) -> Path:
    suffix = ".onnx" if _is_onnx(model) else ".npz"
    stem = model.name[: -len(suffix)] if model.name.lower().endswith(suffix) else model.name
    return model.with_name(stem + ".folded" + suffix)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


_STATE_DICT_OPTIONS = {
    "pairs": "--pair",
    "transpose": "--transpose",
    "groups": "--groups",
    "assume_sequential": "--assume-sequential",
    "keep_unpaired": "--keep-unpaired",
    "eps": "--eps",
}
"""Options of `fold` that apply to state dicts only (parameter name -> option)."""


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Where to write the folded model [default: MODEL.folded.npz / MODEL.folded.onnx].",
)
@click.option(
    "--pair",
    "pairs",
    multiple=True,
    metavar="LAYER=BN",
    help="State dicts: fold batch norm BN into LAYER (key prefixes); repeatable.",
)
@click.option(
    "--transpose",
    multiple=True,
    metavar="LAYER",
    help="State dicts: LAYER is a ConvTranspose (weight (in, out/groups, *k)); repeatable.",
)
@click.option(
    "--groups",
    "groups",
    multiple=True,
    metavar="LAYER=G",
    help="State dicts: groups of a ConvTranspose LAYER [default: channels / weight.shape[1]].",
)
@click.option(
    "--assume-sequential",
    is_flag=True,
    help="State dicts: the key order is the data flow: each batch norm takes the output of the "
    "layer just before it, with nothing between, and layers not named by --transpose are "
    "convolutions where the weight fits both.",
)
@click.option(
    "--keep-unpaired", is_flag=True, help="State dicts: keep batch norms without a layer unfolded."
)
@click.option(
    "--eps", type=float, default=1e-5, show_default=True, help="State dicts: batch norms' eps."
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="ONNX: run both graphs on random input; state dicts: check each pair's algebra.",
)
@click.option(
    "--tolerance",
    type=float,
    default=None,
    help="ONNX: largest relative output error accepted [default: 1e-4; 1e-2 for float16].",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the check input.")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists (never the input).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
@click.pass_context
def fold(
    ctx: click.Context,
    model: Path,
    output: Path | None,
    verify: bool,
    tolerance: float | None,
    seed: int,
    force: bool,
    as_json: bool,
    **state_dict_options: Any,
) -> None:
    """Fold each inference BatchNorm of MODEL into the conv/linear layer that feeds it.

    MODEL.onnx: the graph shows which layer feeds which batch norm; every foldable one is
    folded, the rest are listed with the reason, and both graphs are run on random input.

    MODEL.npz: arrays under PyTorch state-dict names, e.g. written by
    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()}). A state dict
    holds no graph, so a pair is folded only when named (--pair), recorded in the file,
    proven by consecutive indices of one container (features.3 -> features.4), or confirmed
    (--assume-sequential). Otherwise nothing is written and the proposed pairs are listed.
    """
    output = output if output is not None else _default_output(model)
    if _same_file(output, model):
        raise UserError(f"{output}: is the input model; refusing to write over it")
    if output.exists() and not force:
        raise UserError(f"{output}: already exists (use --force to overwrite it)")
    if _is_onnx(model):
        given = [
            option
            for name, option in _STATE_DICT_OPTIONS.items()
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise UserError(
                f"{given[0]}: applies to state dicts (.npz); an ONNX graph shows its pairs itself"
            )
        _fold_onnx(model, output, verify, tolerance, seed, force, as_json)
    else:
        if tolerance is not None:
            raise UserError(
                "--tolerance: applies to ONNX graphs; state-dict pairs are checked "
                "against their rounding bound"
            )
        _fold_state_dict(model, output, verify, seed, force, as_json, **state_dict_options)


def _fold_state_dict(
    model: Path,
    output: Path,
    verify: bool,
    seed: int,
    force: bool,
    as_json: bool,
    *,
    pairs: tuple[str, ...],
    transpose: tuple[str, ...],
    groups: tuple[str, ...],
    assume_sequential: bool,
    keep_unpaired: bool,
    eps: float,
) -> None:
    from cupy_bn.fold import FoldError, UnresolvedPairsError, fold_state_dict
    from cupy_bn.fold.check import verify_fold
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
    try:
        state = load_npz(model)
        folded, report = fold_state_dict(
            state,
            pairs=pair_list,
            transpose=transpose,
            groups=group_map,
            eps=eps,
            keep_unpaired=keep_unpaired,
            assume_sequential=assume_sequential,
        )
    except UnresolvedPairsError as e:
        _refuse_unresolved(model, output, e.unresolved, as_json)
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
                "eps": pair.eps,
                "created_bias": pair.created_bias,
                "established": pair.established,
                "assumption": pair.assumption,
                "algebra_max_abs_error": None
                if check is None
                else _finite_or_none(check.max_abs_error),
                "algebra_error_to_bound": None
                if check is None
                else _finite_or_none(check.error_to_bound),
                "algebra_ok": None if check is None else check.ok,
            }
        )
    kept = [_unresolved_json(u) for u in report.kept]
    if as_json:
        _emit_json(
            {
                "input": str(model),
                "format": "state_dict",
                "output": str(output),
                "written": not failed,
                "verified": verify,
                "ok": not failed,
                "pairs": rows,
                "kept": kept,
            }
        )
    else:
        _print_fold_table(rows, verify)
        console = _console()
        for item in kept:
            console.print(f"kept unfolded: {_display_prefix(item['bn'])} ({item['reason']})")
        if not failed:
            console.print(
                f"Folded {len(rows)} batch norm(s): {model} -> {output}"
                + (f"; kept {len(kept)} unfolded" if kept else "")
            )
    if failed:
        names = ", ".join(f"{c.layer}+{c.bn}" for c in failed)
        raise CheckFailed(f"fold check failed for {names}; nothing written")


def _display_prefix(prefix: str) -> str:
    return prefix if prefix else "<top level>"


def _unresolved_json(item: Any) -> dict[str, Any]:
    return {"bn": item.bn, "would_pair_with": item.candidate, "reason": item.reason}


def _refuse_unresolved(model: Path, output: Path, unresolved: list, as_json: bool) -> None:
    """Exit 2 for batch norms without an established layer, listing the proposed pairs."""
    if as_json:
        _emit_json(
            {
                "input": str(model),
                "format": "state_dict",
                "output": str(output),
                "written": False,
                "ok": False,
                "unresolved": [_unresolved_json(u) for u in unresolved],
            }
        )
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(
        f"{model}: {len(unresolved)} batch norm(s) have no established layer; nothing written."
    )
    err.print("A state dict holds no graph (activations, adds and concats have no keys).")
    for u in unresolved:
        proposal = f"--pair {u.candidate}={u.bn}" if u.candidate is not None else "no proposal"
        err.print(f"  {_display_prefix(u.bn)}: {u.reason} [{proposal}]", markup=False)
    err.print(
        "Confirm with --pair LAYER=BN for each true pair (and --transpose LAYER for a "
        "ConvTranspose), or --assume-sequential if the key order is the data flow with nothing "
        "between a layer and its batch norm; --keep-unpaired leaves the others unfolded. "
        "Exporting the model to ONNX shows the graph: cupy-bn fold model.onnx.",
        markup=False,
    )
    raise click.exceptions.Exit(2)


def _print_fold_table(rows: list[dict[str, Any]], verified: bool) -> None:
    from rich import box

    table = Table(title="Folded pairs", box=box.SIMPLE_HEAD)
    table.add_column("layer", overflow="fold")
    table.add_column("batch norm", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("C", justify="right", no_wrap=True)
    table.add_column("groups", justify="right", no_wrap=True)
    table.add_column("bias", no_wrap=True)
    table.add_column("pair", no_wrap=True)
    if verified:
        table.add_column("algebra err", justify="right", no_wrap=True)
        table.add_column("algebra", no_wrap=True)
    for row in rows:
        cells = [
            _display_prefix(row["layer"]),
            _display_prefix(row["bn"]),
            row["kind"] + (" (assumed)" if row["assumption"] else ""),
            str(row["channels"]),
            str(row["groups"]),
            "new" if row["created_bias"] else "",
            row["established"],
        ]
        if verified:
            err = row["algebra_max_abs_error"]
            cells += [
                "nan" if err is None else f"{err:.2e}",
                "[green]ok[/]" if row["algebra_ok"] else "[red]FAIL[/]",
            ]
        table.add_row(*cells)
    console = _console()
    console.print(table)
    for row in rows:
        if row["assumption"]:
            console.print(f"assumed for {row['layer']}: {row['assumption']}", markup=False)
    if verified:
        console.print(
            "The algebra check verifies each pair's fold, not that the pair is in the model; "
            "the 'pair' column says how each pair is known.",
            markup=False,
        )


def _fold_onnx(
    model: Path,
    output: Path,
    verify: bool,
    tolerance: float | None,
    seed: int,
    force: bool,
    as_json: bool,
) -> None:
    from cupy_bn.fold.onnx_check import verify_onnx_fold
    from cupy_bn.fold.onnx_files import has_external_data, load_onnx, save_onnx
    from cupy_bn.fold.onnx_graph import OnnxFoldError, fold_onnx

    try:
        original = load_onnx(model)
        folded, report = fold_onnx(original)
        check = (
            verify_onnx_fold(original, folded, seed=seed, tolerance=tolerance) if verify else None
        )
        failed = check is not None and not check.ok
        if not failed:
            save_onnx(output, folded, overwrite=force, external_data=has_external_data(model))
    except OnnxFoldError as e:
        raise UserError(str(e)) from None
    folded_rows = [
        {"bn": f.bn, "layer": f.layer, "op": f.op, "channels": f.channels} for f in report.folded
    ]
    kept_rows = [{"bn": k.bn, "reason": k.reason} for k in report.kept]
    check_json = None
    if check is not None:
        check_json = {
            "runtime": check.runtime,
            "inputs": {name: list(shape) for name, shape in check.inputs.items()},
            "max_abs_error": _finite_or_none(check.max_abs_error),
            "max_rel_error": _finite_or_none(check.max_rel_error),
            "tolerance": check.tolerance,
            "mismatches": list(check.mismatches),
            "ok": check.ok,
        }
    if as_json:
        _emit_json(
            {
                "input": str(model),
                "format": "onnx",
                "output": str(output),
                "written": not failed,
                "verified": verify,
                "ok": not failed,
                "opset": report.opset,
                "folded": folded_rows,
                "kept": kept_rows,
                "check": check_json,
            }
        )
    else:
        _print_onnx_report(model, output, folded_rows, kept_rows, check_json, failed)
    if failed:
        problems = [*check.mismatches, f"max relative error {check.max_rel_error:.3g}"]
        raise CheckFailed(
            f"folded graph differs from the original ({'; '.join(problems)}, tolerance "
            f"{check.tolerance:.3g}); nothing written"
        )


def _print_onnx_report(
    model: Path,
    output: Path,
    folded: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    check: dict[str, Any] | None,
    failed: bool,
) -> None:
    from rich import box

    console = _console()
    table = Table(title="Folded batch norms", box=box.SIMPLE_HEAD)
    table.add_column("batch norm", overflow="fold")
    table.add_column("into", overflow="fold")
    table.add_column("op", no_wrap=True)
    table.add_column("C", justify="right", no_wrap=True)
    for row in folded:
        table.add_row(row["bn"], row["layer"], row["op"], str(row["channels"]))
    console.print(table)
    for row in kept:
        console.print(f"kept: {row['bn']} ({row['reason']})", markup=False)
    if check is None:
        console.print("not verified (--no-verify): the folded graph was not run")
    else:
        verdict = "[red]FAIL[/]" if failed else "[green]ok[/]"
        console.print(
            f"end-to-end check ({check['runtime']}, inputs "
            + ", ".join(f"{n}{tuple(s)}" for n, s in check["inputs"].items())
            + f"): max abs error {check['max_abs_error']:.3g}, max rel error "
            f"{check['max_rel_error']:.3g} (tolerance {check['tolerance']:.3g}) {verdict}"
        )
    if not failed:
        console.print(
            f"Folded {len(folded)} batch norm(s): {model} -> {output}"
            + (f"; kept {len(kept)}" if kept else "")
        )


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
