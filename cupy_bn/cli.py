"""The `cupy-bn` command.

Conventions shared by every command: `--json` prints machine-readable output on stdout (no
styling); exit status 0 on success, 1 when a check fails, 2 on usage or input errors, which
print a one-line reason on stderr without a traceback.
"""

from __future__ import annotations

import json
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


class CheckFailed(click.ClickException):
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
    return value if value == value and abs(value) != float("inf") else None


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
            raise click.BadParameter(f"expected {what}, got {value!r}", param_hint=option)
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
            raise click.BadParameter(
                f"expected LAYER=G with an integer G, got {name}={value}", param_hint="--groups"
            ) from None
    output = output if output is not None else _default_output(model)
    if output.exists() and _same_file(output, model) or output.resolve() == model.resolve():
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
    table = Table(title="Folded pairs")
    for column in ("layer", "batch norm", "kind"):
        table.add_column(column, overflow="fold")
    for column in ("channels", "groups"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("new bias", no_wrap=True)
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
            "yes" if row["created_bias"] else "",
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
