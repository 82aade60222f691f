"""`cupy-bn fold`: fold batch norm into the layer that feeds it, for ONNX graphs and state
dicts (docs/cli.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cupy_bn.cli.common import (
    CheckFailed,
    UserError,
    emit_json,
    finite_or_none,
    stdout_console,
)


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


@click.command()
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
                else finite_or_none(check.max_abs_error),
                "algebra_error_to_bound": None
                if check is None
                else finite_or_none(check.error_to_bound),
                "algebra_ok": None if check is None else check.ok,
            }
        )
    kept = [_unresolved_json(u) for u in report.kept]
    if as_json:
        emit_json(
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
        console = stdout_console()
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
        emit_json(
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
    console = stdout_console()
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
            "max_abs_error": finite_or_none(check.max_abs_error),
            "max_rel_error": finite_or_none(check.max_rel_error),
            "tolerance": check.tolerance,
            "mismatches": list(check.mismatches),
            "compared": list(check.compared),
            "ok": check.ok,
        }
    if as_json:
        emit_json(
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

    console = stdout_console()
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
            + f"; {len(check['compared'])} tensors: the outputs and each folded batch norm's)"
            + f": max abs error {check['max_abs_error']:.3g}, max rel error "
            f"{check['max_rel_error']:.3g} (tolerance {check['tolerance']:.3g}) {verdict}"
        )
    if not failed:
        console.print(
            f"Folded {len(folded)} batch norm(s): {model} -> {output}"
            + (f"; kept {len(kept)}" if kept else "")
        )
