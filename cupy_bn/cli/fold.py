"""`cupy-bn fold`: fold batch norm into the layer that feeds it, for ONNX graphs and state
dicts (docs/cli.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from cupy_bn.cli.common import CheckFailed, UserError, emit_json, stdout_console
from cupy_bn.fold.pairing import display


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
        checks = verify_fold(state, folded, report, seed=seed) if verify else []
    except UnresolvedPairsError as e:
        _refuse_unresolved(model, output, e.unresolved, as_json)
    except (ModelFileError, FoldError) as e:
        raise UserError(str(e)) from None
    failed = [c for c in checks if not c.ok]
    if not failed:
        try:
            save_npz(output, folded, overwrite=force)
        except (ModelFileError, OSError) as e:
            raise UserError(str(e)) from None

    if as_json:
        _emit_fold_json(model, "state_dict", output, not failed, verify, report.to_json(checks))
    else:
        _print_fold_table(report, checks if verify else None)
        console = stdout_console()
        for item in report.kept:
            console.print(f"kept unfolded: {display(item.bn)} ({item.reason})", markup=False)
        if not failed:
            console.print(
                f"Folded {len(report.pairs)} batch norm(s): {model} -> {output}"
                + (f"; kept {len(report.kept)} unfolded" if report.kept else ""),
                markup=False,
            )
    if failed:
        names = ", ".join(f"{c.layer}+{c.bn}" for c in failed)
        raise CheckFailed(f"fold check failed for {names}; nothing written")


def _emit_fold_json(
    model: Path,
    kind: str,
    output: Path,
    written: bool,
    verified: bool | None,
    details: dict[str, Any],
) -> None:
    """The JSON report: what was read and written, whether it was checked, then `details`.

    `verified` is None where the command stopped before any check (refused pairs)."""
    head: dict[str, Any] = {"input": str(model), "format": kind, "output": str(output)}
    head["written"] = written
    if verified is not None:
        head["verified"] = verified
    head["ok"] = written
    emit_json({**head, **details})


def _refuse_unresolved(model: Path, output: Path, unresolved: list, as_json: bool) -> None:
    """Exit 2 for batch norms without an established layer, listing the proposed pairs."""
    if as_json:
        details = {"unresolved": [u.to_json() for u in unresolved]}
        _emit_fold_json(model, "state_dict", output, False, None, details)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(
        f"{model}: {len(unresolved)} batch norm(s) have no established layer; nothing written."
    )
    err.print("A state dict holds no graph (activations, adds and concats have no keys).")
    for u in unresolved:
        proposal = f"--pair {u.candidate}={u.bn}" if u.candidate is not None else "no proposal"
        err.print(f"  {display(u.bn)}: {u.reason} [{proposal}]", markup=False)
    err.print(
        "Confirm with --pair LAYER=BN for each true pair (and --transpose LAYER for a "
        "ConvTranspose), or --assume-sequential if the key order is the data flow with nothing "
        "between a layer and its batch norm; --keep-unpaired leaves the others unfolded. "
        "Exporting the model to ONNX shows the graph: cupy-bn fold model.onnx.",
        markup=False,
    )
    raise click.exceptions.Exit(2)


def _print_fold_table(report: Any, checks: list[Any] | None) -> None:
    """The folded pairs; with `checks` (from `verify_fold`), each pair's algebra check."""
    from rich import box

    by_pair = {(c.layer, c.bn): c for c in checks or ()}
    table = Table(title="Folded pairs", box=box.SIMPLE_HEAD)
    table.add_column("layer", overflow="fold")
    table.add_column("batch norm", overflow="fold")
    table.add_column("kind", no_wrap=True)
    table.add_column("C", justify="right", no_wrap=True)
    table.add_column("groups", justify="right", no_wrap=True)
    table.add_column("bias", no_wrap=True)
    table.add_column("pair", no_wrap=True)
    if checks is not None:
        table.add_column("algebra err", justify="right", no_wrap=True)
        table.add_column("algebra", no_wrap=True)
    for pair in report.pairs:
        cells = [
            display(pair.layer),
            display(pair.bn),
            pair.kind + (" (assumed)" if pair.assumption else ""),
            str(pair.channels),
            str(pair.groups),
            "new" if pair.created_bias else "",
            pair.established,
        ]
        if checks is not None:
            check = by_pair[(pair.layer, pair.bn)]
            cells += [
                f"{check.max_abs_error:.2e}",
                "[green]ok[/]" if check.ok else "[red]FAIL[/]",
            ]
        table.add_row(*cells)
    console = stdout_console()
    console.print(table)
    for pair in report.pairs:
        if pair.assumption:
            console.print(f"assumed for {pair.layer}: {pair.assumption}", markup=False)
    if checks is not None:
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
    if as_json:
        details = {**report.to_json(), "check": None if check is None else check.to_json()}
        _emit_fold_json(model, "onnx", output, not failed, verify, details)
    else:
        _print_onnx_report(model, output, report, check)
    if failed:
        problems = [*check.mismatches, f"max relative error {check.max_rel_error:.3g}"]
        raise CheckFailed(
            f"folded graph differs from the original ({'; '.join(problems)}, tolerance "
            f"{check.tolerance:.3g}); nothing written"
        )


def _print_onnx_report(model: Path, output: Path, report: Any, check: Any | None) -> None:
    from rich import box

    console = stdout_console()
    table = Table(title="Folded batch norms", box=box.SIMPLE_HEAD)
    table.add_column("batch norm", overflow="fold")
    table.add_column("into", overflow="fold")
    table.add_column("op", no_wrap=True)
    table.add_column("C", justify="right", no_wrap=True)
    for node in report.folded:
        table.add_row(node.bn, node.layer, node.op, str(node.channels))
    console.print(table)
    for node in report.kept:
        console.print(f"kept: {node.bn} ({node.reason})", markup=False)
    if check is None:
        console.print("not verified (--no-verify): the folded graph was not run")
    else:
        verdict = "[green]ok[/]" if check.ok else "[red]FAIL[/]"
        console.print(
            f"end-to-end check ({check.runtime}, inputs "
            + ", ".join(f"{n}{tuple(s)}" for n, s in check.inputs.items())
            + f"; {len(check.compared)} tensors: the outputs and each folded batch norm's)"
            + f": max abs error {check.max_abs_error:.3g}, max rel error "
            f"{check.max_rel_error:.3g} (tolerance {check.tolerance:.3g}) {verdict}"
        )
    if check is None or check.ok:
        console.print(
            f"Folded {len(report.folded)} batch norm(s): {model} -> {output}"
            + (f"; kept {len(report.kept)}" if report.kept else "")
        )
