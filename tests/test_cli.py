"""The `cupy-bn` command: every subcommand, its JSON output, exit codes and error paths."""

from __future__ import annotations

import json
import os
import stat
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner
from fold_models import LAYERS, Layer, bn_state, layer_apply, layer_state, original_output

import cupy_bn
from cupy_bn.backends import available_backends, cupy_usable
from cupy_bn.cli import main
from cupy_bn.fold import FOLD_RECORD_KEY, PairStatement, fold_record


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments: str, code: int = 2) -> None:
    """Exit status `code`, a one-line reason on stderr, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# group, info


def test_version_and_help():
    result = run("--version")
    assert result.exit_code == 0 and cupy_bn.__version__ in result.stdout
    result = run("--help")
    assert result.exit_code == 0
    for command in ("info", "fold", "gradcheck", "bench"):
        assert command in result.stdout


def test_info_json_reports_versions_toolchain_and_backends():
    result = run("info", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.stdout)
    assert facts["cupy_bn"] == cupy_bn.__version__
    assert facts["numpy"] == np.__version__
    assert "numpy" in facts["backends"]
    assert facts["cpu_backend"] == ("numba" if facts["numba"] else "numpy")
    assert set(facts["nvrtc"]) == {"found", "version", "detail"}
    assert facts["cupy"]["usable"] == cupy_usable()
    assert (facts["gpus"] == []) == (not cupy_usable())
    assert {"available", "detail", "toolchain"} <= set(facts["simulator"])


def test_info_table_shows_brackets_as_written(monkeypatch):
    from cupy_bn import environment

    real = environment._version
    monkeypatch.setattr(environment, "_version", lambda d: None if d == "numba" else real(d))
    result = run("info")
    assert result.exit_code == 0, result.output
    assert "not installed (pip install cupy-bn[cpu])" in result.stdout


def test_info_table_for_humans():
    result = run("info")
    assert result.exit_code == 0, result.output
    rows = {}  # label -> value of every table row (cells are separated by U+2502)
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.split("\u2502")]
        if len(cells) == 4:
            rows[cells[1]] = cells[2]
    facts = json.loads(run("info", "--json").stdout)
    assert rows["cupy-bn"] == cupy_bn.__version__
    assert rows["numpy"] == np.__version__
    assert rows["cupy"] == facts["cupy"]["state"]
    assert rows["simulator"] == facts["simulator"]["detail"]
    assert rows["backends"] == ", ".join(facts["backends"])
    assert rows["auto on NumPy"] == facts["cpu_backend"]
    if facts["nvrtc"]["found"]:
        assert rows["nvrtc"] == facts["nvrtc"]["version"]


def test_info_without_the_simulator_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy_bn.sim", None)  # import fails
    facts = json.loads(run("info", "--json").stdout)
    assert facts["simulator"] == {
        "available": False,
        "detail": "not part of this install",
        "toolchain": {},
    }


def test_info_shows_the_simulator_toolchain(monkeypatch):
    fake = types.SimpleNamespace(
        find_toolchain=lambda: {"cxx": "/usr/bin/g++", "cuda_include": None},
        is_available=lambda: False,
    )
    monkeypatch.setitem(sys.modules, "cupy_bn.sim", fake)
    facts = json.loads(run("info", "--json").stdout)
    assert facts["simulator"]["toolchain"] == {"cxx": "/usr/bin/g++", "cuda_include": None}
    assert facts["simulator"]["available"] is False
    human = run("info")
    assert human.exit_code == 0 and "/usr/bin/g++" in human.stdout and "not found" in human.stdout


def test_info_survives_a_failing_toolchain_probe(monkeypatch):
    def broken():
        raise RuntimeError("g++ exploded")

    monkeypatch.setitem(sys.modules, "cupy_bn.sim", types.SimpleNamespace(find_toolchain=broken))
    result = run("info", "--json")
    assert result.exit_code == 0
    assert "g++ exploded" in json.loads(result.stdout)["simulator"]["detail"]


# ---------------------------------------------------------------------------------------------
# fold


def _write_model(path, *, orphan=False, rng=None, transposed=False, record=False):
    """`features.0 -> .1` is proven and certain; `features.3 -> .4` is proven, but its
    depthwise weight (8, 1, 3, 3) also fits a ConvTranspose; `up -> up_bn` is unproven."""
    rng = rng or np.random.default_rng(0)
    state = layer_state("features.0", LAYERS["conv2d"], rng)
    state |= bn_state("features.1", 8, rng)
    state |= layer_state("features.3", Layer("conv", 8, 8, (3, 3), groups=8), rng)
    state |= bn_state("features.4", 8, rng, affine=False)
    if transposed:
        state |= layer_state("up", Layer("conv_transpose", 8, 6, (2, 2), groups=2, bias=False), rng)
        state |= bn_state("up_bn", 6, rng)
    if orphan:
        state |= bn_state("head.norm", 5, rng)
    state |= layer_state("classifier", Layer("linear", 8, 3), rng)
    if record:
        state[FOLD_RECORD_KEY] = fold_record(
            [PairStatement("features.0", "features.1"), PairStatement("features.3", "features.4")]
        )
    np.savez(path, **state)
    return state


def test_fold_writes_the_default_output_and_reports_pairs(tmp_path):
    model = tmp_path / "net.npz"
    state = _write_model(model)
    result = run("fold", model, "--assume-sequential", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = tmp_path / "net.folded.npz"
    assert report["output"] == str(out) and report["written"] and report["ok"]
    assert [(p["layer"], p["bn"], p["established"]) for p in report["pairs"]] == [
        ("features.0", "features.1", "proven"),
        ("features.3", "features.4", "proven"),
    ]
    assert report["pairs"][0]["assumption"] is None
    assert "ConvTranspose with groups=8" in report["pairs"][1]["assumption"]
    assert all(p["algebra_ok"] and p["algebra_max_abs_error"] < 1e-4 for p in report["pairs"])
    with np.load(out, allow_pickle=False) as z:
        folded = {k: z[k] for k in z.files}
    assert list(folded) == [
        "features.0.weight",
        "features.0.bias",
        "features.3.weight",
        "features.3.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    layer = Layer("conv", 8, 8, (3, 3), groups=8)
    x = np.random.default_rng(1).standard_normal((2, 8, 5, 5))
    np.testing.assert_allclose(
        layer_apply(layer, x, folded["features.3.weight"], folded["features.3.bias"]),
        original_output(state, layer, "features.3", "features.4", x),
        atol=1e-4,
    )


def test_fold_refuses_unproven_pairs_and_lists_the_proposals(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, transposed=True)
    result = run("fold", model)
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "net.folded.npz").exists()
    assert "nothing written" in result.stderr
    assert "features.4: follows 'features.3', but its weight (8, 1, 3, 3)" in result.stderr
    assert "[--pair features.3=features.4]" in result.stderr
    assert "up_bn: nothing in the file shows what feeds it [--pair up=up_bn]" in result.stderr
    assert "--assume-sequential" in result.stderr and "--keep-unpaired" in result.stderr
    assert "Traceback" not in result.output

    result = run("fold", model, "--json")
    assert result.exit_code == 2
    refusal = json.loads(result.stdout)
    assert refusal["written"] is False
    assert [(u["bn"], u["would_pair_with"]) for u in refusal["unresolved"]] == [
        ("features.4", "features.3"),
        ("up_bn", "up"),
    ]


def test_fold_keeps_what_it_cannot_prove_when_asked(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, transposed=True)
    result = run("fold", model, "--keep-unpaired", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [p["layer"] for p in report["pairs"]] == ["features.0"]
    assert [k["bn"] for k in report["kept"]] == ["features.4", "up_bn"]
    with np.load(tmp_path / "net.folded.npz") as z:
        assert "features.4.running_var" in z.files and "up_bn.running_var" in z.files


def test_fold_follows_the_record_in_the_file_without_options(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    result = run("fold", model, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(p["layer"], p["established"]) for p in report["pairs"]] == [
        ("features.0", "recorded"),
        ("features.3", "recorded"),
    ]
    with np.load(tmp_path / "net.folded.npz") as z:
        assert FOLD_RECORD_KEY not in z.files


def test_fold_table_for_humans(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model)
    result = run("fold", model, "--assume-sequential", "-o", tmp_path / "out.npz")
    assert result.exit_code == 0, result.output
    assert "features.0" in result.stdout and "proven" in result.stdout
    assert "conv2d (assumed)" in result.stdout and "assumed for features.3" in result.stdout
    assert "not that the pair is in the model" in result.stdout
    assert "Folded 2 batch norm(s)" in result.stdout
    assert (tmp_path / "out.npz").exists()


def test_fold_transpose_groups_and_explicit_pairs(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, transposed=True)
    result = run(
        "fold", model, "--transpose", "up", "--groups", "up=2", "--assume-sequential", "--json"
    )
    assert result.exit_code == 0, result.output
    pairs = {p["layer"]: p for p in json.loads(result.stdout)["pairs"]}
    assert pairs["up"]["kind"] == "conv_transpose2d" and pairs["up"]["groups"] == 2
    assert pairs["up"]["established"] == "confirmed" and pairs["up"]["assumption"] is None
    assert pairs["up"]["algebra_ok"]

    result = run(
        "fold",
        model,
        "--transpose",
        "up",
        "--pair",
        "features.3=features.1",
        "--keep-unpaired",
        "-o",
        tmp_path / "b.npz",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert ("features.3", "features.1", "explicit") in [
        (p["layer"], p["bn"], p["established"]) for p in report["pairs"]
    ]
    assert [k["bn"] for k in report["kept"]] == ["features.4", "up_bn"]


def test_fold_no_verify_skips_the_check(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    result = run("fold", model, "--no-verify", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["verified"] is False
    assert all(
        p["algebra_max_abs_error"] is None and p["algebra_ok"] is None for p in report["pairs"]
    )


def test_fold_json_fields(tmp_path):
    """The report's field names and JSON types, pair by pair (docs/cli.md, Report)."""
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    result = run("fold", model, "--keep-unpaired", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report) == [
        "input",
        "format",
        "output",
        "written",
        "verified",
        "ok",
        "pairs",
        "kept",
    ]
    assert report["format"] == "state_dict" and report["verified"] is True
    pair = report["pairs"][0]
    assert list(pair) == [
        "layer",
        "bn",
        "kind",
        "channels",
        "groups",
        "eps",
        "created_bias",
        "established",
        "assumption",
        "algebra_max_abs_error",
        "algebra_error_to_bound",
        "algebra_ok",
    ]
    assert (pair["layer"], pair["bn"], pair["kind"]) == ("features.0", "features.1", "conv2d")
    assert (pair["channels"], pair["groups"], pair["eps"]) == (8, 1, 1e-5)
    assert isinstance(pair["algebra_error_to_bound"], float) and pair["algebra_ok"] is True
    assert all(list(k) == ["bn", "would_pair_with", "reason"] for k in report["kept"])


def test_fold_refuses_an_existing_output_unless_forced(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    out = tmp_path / "net.folded.npz"
    out.write_bytes(b"keep me")
    assert_user_error(run("fold", model), "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    result = run("fold", model, "--force")
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as z:
        assert "features.0.bias" in z.files


def test_fold_output_takes_the_umask_mode(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    old = os.umask(0o027)
    try:
        result = run("fold", model, "-o", tmp_path / "a.npz")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "a.npz").stat().st_mode) == 0o640


def test_fold_into_a_read_only_directory_names_the_output(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".out.npz.x1y2.tmp"))

    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # what a read-only directory does
    result = run("fold", model, "-o", tmp_path / "out.npz")
    assert_user_error(result, f"{tmp_path / 'out.npz'}: cannot write", "Permission denied")
    assert ".tmp" not in result.stderr


def test_fold_never_writes_over_its_input(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    before = model.read_bytes()
    assert_user_error(run("fold", model, "-o", model, "--force"), "is the input model")
    link = tmp_path / "alias.npz"
    os.symlink(model, link)
    assert_user_error(run("fold", model, "-o", link, "--force"), "is the input model")
    assert model.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"this is not a model", "not an .npz archive"),
        (None, "no such file"),
    ],
)
def test_fold_rejects_unreadable_files(tmp_path, content, fragment):
    model = tmp_path / "model.npz"
    if content is not None:
        model.write_bytes(content)
    assert_user_error(run("fold", model), fragment)
    assert not (tmp_path / "model.folded.npz").exists()


def test_fold_rejects_pickled_npz(tmp_path):
    model = tmp_path / "pickled.npz"
    np.savez(
        model,
        **{"conv.weight": np.ones((2, 1, 1, 1)), "meta": np.array([{"epoch": 3}], dtype=object)},
    )
    assert_user_error(run("fold", model), "'meta'", "Python objects")


def test_fold_names_the_orphan_batch_norm(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, orphan=True, record=True)
    result = run("fold", model)
    assert result.exit_code == 2 and "head.norm" in result.stderr
    assert not (tmp_path / "net.folded.npz").exists()
    result = run("fold", model, "--keep-unpaired", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert [k["bn"] for k in report["kept"]] == ["head.norm"]
    with np.load(tmp_path / "net.folded.npz") as z:
        assert "head.norm.running_var" in z.files


def test_fold_rejects_bad_statistics(tmp_path):
    rng = np.random.default_rng(2)
    state = layer_state("c.0", Layer("conv", 2, 3, (1, 1)), rng) | bn_state("c.1", 3, rng)
    state["c.1.running_var"][1] = -0.5
    np.savez(tmp_path / "neg.npz", **state)
    assert_user_error(run("fold", tmp_path / "neg.npz"), "c.1.running_var", "negative")
    state["c.1.running_var"][1] = np.inf
    np.savez(tmp_path / "inf.npz", **state)
    assert_user_error(run("fold", tmp_path / "inf.npz"), "c.1.running_var", "non-finite")
    state["c.1.running_var"] = np.ones(4, np.float32)
    np.savez(tmp_path / "shape.npz", **state)
    assert_user_error(run("fold", tmp_path / "shape.npz"), "c.1.running_var", "shape")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--pair", "features.0"], "--pair: expected LAYER=BN"),
        (["--pair", "missing=features.1"], "'missing' is not a layer"),
        (["--groups", "features.0=two"], "--groups: expected LAYER=G"),
        (["--transpose", "classifier"], "rank-2 weight"),
        (["--transpose", "nothing"], "'nothing'"),
        (["--eps", "0"], "eps must be a positive finite number, got 0.0"),
        (["--tolerance", "1e-3"], "--tolerance: applies to ONNX"),
        (["--seed", "-1"], "seed must be an integer >= 0, got -1"),
    ],
)
def test_fold_bad_options(tmp_path, args, fragment):
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    assert_user_error(run("fold", model, *args), fragment)


def test_fold_output_directory_must_exist(tmp_path):
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    assert_user_error(run("fold", model, "-o", tmp_path / "no" / "out.npz"), "does not exist")


def test_fold_usage_error_exits_2():
    result = run("fold")
    assert result.exit_code == 2 and "Missing argument" in result.stderr


def test_fold_check_failure_exits_1_and_writes_nothing(tmp_path, monkeypatch):
    import cupy_bn.fold as fold_package

    real = fold_package.fold_state_dict

    def wrong(*args, **kwargs):
        folded, report = real(*args, **kwargs)
        folded["features.0.weight"] = folded["features.0.weight"] * np.float32(1.01)
        return folded, report

    monkeypatch.setattr(fold_package, "fold_state_dict", wrong)
    model = tmp_path / "net.npz"
    _write_model(model, record=True)
    result = run("fold", model, "--json")
    assert_user_error(result, "fold check failed", "features.0", code=1)
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["written"] is False
    assert [p["algebra_ok"] for p in report["pairs"]] == [False, True]
    assert not (tmp_path / "net.folded.npz").exists()


# ---------------------------------------------------------------------------------------------
# gradcheck


def test_gradcheck_default_matrix_passes():
    result = run("gradcheck", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and len(report["cases"]) == 32
    assert {len(c["shape"]) for c in report["cases"]} == {2, 3, 4, 5}
    assert {c["channel_axis"] for c in report["cases"]} == {1, -1}
    assert {(c["mode"], c["affine"]) for c in report["cases"]} == {
        ("train", True),
        ("train", False),
        ("eval", True),
        ("eval", False),
    }
    assert all(c["max_rel_error"] < 1e-3 for c in report["cases"])


def test_gradcheck_human_table_and_summary():
    result = run("gradcheck", "--shape", "4,3,5,5", "--channel-axis", "-1", "--mode", "train")
    assert result.exit_code == 0, result.output
    fast = run("gradcheck", "--shape", "4,3,5,5", "--mode", "eval", "--fast")
    assert fast.exit_code == 0 and "gradcheck passed: 4/4 cases" in fast.stdout
    assert "gradcheck passed: 2/2 cases" in result.stdout
    assert "4x3x5x5" in result.stdout


def test_gradcheck_catches_a_broken_backward(monkeypatch):
    from cupy_bn.backends import numpy_backend

    real = numpy_backend.dx_coefficients

    def off_by_one(invstd, gamma, sum_dy, sum_dy_xmu, count):
        return real(invstd, gamma, sum_dy, sum_dy_xmu, count + 1)

    monkeypatch.setattr(numpy_backend, "dx_coefficients", off_by_one)
    result = run("gradcheck", "--json")
    assert_user_error(result, "16 of 32 gradient checks failed", code=1)
    cases = json.loads(result.stdout)["cases"]
    assert all(c["passed"] == (c["mode"] == "eval") for c in cases)
    assert all(not c["checks"]["x"]["passed"] for c in cases if c["mode"] == "train")


def test_gradcheck_second_order():
    result = run("gradcheck", "--order", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and len(report["cases"]) == 32
    for case in report["cases"]:
        assert case["order"] == 2 and case["name"].endswith(" order=2")
        assert set(case["checks"]) == ({"x", "weight", "dy"} if case["affine"] else {"x", "dy"})
    both = run("gradcheck", "--order", "both", "--shape", "4,3", "--fast")
    assert both.exit_code == 0, both.output
    assert "gradcheck passed: 16/16 cases" in both.stdout and "order" in both.stdout
    refused = run("gradcheck", "--order", "3")
    assert refused.exit_code == 2 and "'3' is not one of '1', '2', 'both'" in refused.stderr


def test_gradcheck_second_order_catches_a_broken_double_backward(monkeypatch):
    from cupy_bn.backends.numpy_backend import NumpyBackend

    real = NumpyBackend.double_backward_apply

    def wrong_gdy(self, dy, x, ddx, mean, coefficients):
        gx, gdy = real(self, dy, x, ddx, mean, coefficients)
        return gx, gdy + 1e-2

    monkeypatch.setattr(NumpyBackend, "double_backward_apply", wrong_gdy)
    assert run("gradcheck", "--json").exit_code == 0  # first order does not use it
    result = run("gradcheck", "--order", "2", "--json")
    assert_user_error(result, "32 of 32 gradient checks failed", code=1)
    cases = json.loads(result.stdout)["cases"]
    assert all(not c["checks"]["dy"]["passed"] and c["checks"]["x"]["passed"] for c in cases)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--shape", "4"], "rank 2 to 5"),
        (["--shape", "4,a"], "expected sizes"),
        (["--shape", "1,3", "--mode", "train"], "training needs two"),
        (["--shape", "4,3", "--channel-axis", "2"], "not an axis"),
        (["--step", "0"], "step must be a positive finite number, got 0.0"),
        (["--rtol", "nan"], "rtol must be a positive finite number"),
        (["--seed", "-1"], "seed must be an integer >= 0, got -1"),
    ],
)
def test_gradcheck_bad_options(args, fragment):
    assert_user_error(run("gradcheck", *args), fragment)


def test_gradcheck_reports_what_decides_pass_or_fail():
    """The shown relative errors are within rtol exactly where a case passes; a large step
    fails (exit 1) with its errors shown above rtol."""
    for step, code in (("1e-2", 0), ("1e-1", 1)):
        result = run("gradcheck", "--step", step, "--json")
        assert result.exit_code == code, result.output
        report = json.loads(result.stdout)
        assert report["ok"] == (code == 0)
        for case in report["cases"]:
            assert case["passed"] == (case["max_rel_error"] <= report["rtol"])
            for check in case["checks"].values():
                assert check["passed"] == (check["max_rel_error"] <= report["rtol"])
        worst = max(c["max_rel_error"] for c in report["cases"])
        assert (worst <= report["rtol"]) == report["ok"]
        assert f"worst relative error {worst:.2e}" in report["summary"]


def _errors_by_case(*args: str) -> dict[tuple, dict]:
    result = run("gradcheck", "--json", *args)
    assert result.exit_code == 0, result.output
    return {
        (c["backend"], tuple(c["shape"]), c["channel_axis"], c["mode"], c["affine"]): c["checks"]
        for c in json.loads(result.stdout)["cases"]
    }


def test_gradcheck_seed_gives_the_same_data_whatever_else_runs():
    alone = _errors_by_case("--shape", "4,3", "--seed", "4")
    with_another = _errors_by_case("--shape", "2,3,4", "--shape", "4,3", "--seed", "4")
    assert alone and set(alone) < set(with_another)
    assert all(with_another[key] == checks for key, checks in alone.items())
    other_seed = _errors_by_case("--shape", "4,3", "--seed", "5")
    assert other_seed != alone


@pytest.mark.skipif("sim" not in available_backends(), reason="needs the CUDA simulator")
def test_gradcheck_seed_gives_the_same_data_on_every_backend():
    options = ("--shape", "4,3", "--mode", "eval", "--fast", "--seed", "4")
    alone = _errors_by_case("--backend", "numpy", *options)
    beside_sim = _errors_by_case("--backend", "numpy", "--backend", "sim", *options)
    assert alone and all(beside_sim[key] == checks for key, checks in alone.items())


def test_gradcheck_backend_that_cannot_run_here(monkeypatch):
    import cupy_bn.backends as backends

    monkeypatch.setattr(backends, "available_backends", lambda: ["numpy"])
    assert_user_error(
        run("gradcheck", "--backend", "cuda"),
        "backends: 'cuda' cannot run on this machine (available: numpy)",
    )
    result = run("gradcheck", "--backend", "all", "--shape", "3,2", "--json")
    assert result.exit_code == 0
    assert {c["backend"] for c in json.loads(result.stdout)["cases"]} == {"numpy"}


def test_gradcheck_backend_all_runs_every_available_backend():
    result = run("gradcheck", "--backend", "all", "--shape", "4,3", "--mode", "eval", "--json")
    assert result.exit_code == 0, result.output
    ran = {c["backend"] for c in json.loads(result.stdout)["cases"]}
    assert ran == set(available_backends())


# ---------------------------------------------------------------------------------------------
# bench

QUICK = ["--repeat", "2", "--warmup", "0", "--copy-mb", "1"]


def test_bench_json_on_stdout_has_pytest_benchmark_shape():
    result = run(
        "bench",
        "--shape",
        "4,3,5,5",
        *QUICK,
        "--impl",
        "cupy_bn.numpy",
        "--impl",
        "numpy.textbook",
        "--json",
        "-",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(payload)
    assert payload["machine_info"]["cpu_copy_bandwidth"] > 0
    benchmarks = payload["benchmarks"]
    assert len(benchmarks) == 2 * 3
    for entry in benchmarks:
        assert {"group", "name", "fullname", "params", "stats"} <= set(entry)
        assert entry["stats"]["rounds"] == 2
        assert entry["stats"]["min"] <= entry["stats"]["median"] <= entry["stats"]["max"]
        assert entry["params"]["shape"] == [4, 3, 5, 5]
        extra = entry["extra_info"]
        assert extra["gbps"] == pytest.approx(
            extra["minimal_bytes"] / entry["stats"]["median"] / 1e9
        )
    textbook = [b for b in benchmarks if b["params"]["implementation"] == "numpy.textbook"]
    assert all(b["extra_info"]["ratio_to_fastest_peer"] == 1.0 for b in textbook)


def test_bench_table_file_json_and_notes(tmp_path):
    out = tmp_path / "bench.json"
    result = run(
        "bench",
        "--shape",
        "6,4",
        "--channel-axis",
        "-1",
        *QUICK,
        "--phase",
        "eval",
        "--impl",
        "cupy_bn.numpy",
        "--impl",
        "cupy.naive",
        "--json",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "cupy_bn.numpy" in result.stdout and "eval" in result.stdout
    assert "moved GB/s" in result.stdout
    assert "minimal traffic / median, every implementation alike (fwd train R1 W1" in result.stdout
    assert "traffic cupy-bn's backends make / median (fwd train R2 W1" in result.stdout
    payload = json.loads(out.read_text())
    assert [b["params"]["phase"] for b in payload["benchmarks"]][0] == "eval"
    if not cupy_usable():
        assert "cupy.naive skipped" in result.stdout
        assert "Traceback" not in result.output


def test_bench_skips_unavailable_peers_beside_a_runnable_implementation():
    if cupy_usable():
        pytest.skip("a GPU is usable here")
    result = run(
        "bench",
        "--shape",
        "4,2",
        *QUICK,
        "--impl",
        "numpy.textbook",
        "--impl",
        "torch.cuda",
        "--impl",
        "cupy.naive",
    )
    assert result.exit_code == 0, result.output
    assert "torch.cuda skipped" in result.stdout
    assert "cupy.naive skipped" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--impl", "cupy_bn.cuda"], ["cupy_bn.cuda cannot run here", "no usable GPU"]),
        (["--impl", "cupy_bn.numpy", "--impl", "cupy_bn.cuda.kernels"], ["cupy_bn.cuda.kernels"]),
        (["--impl", "torch.cuda", "--impl", "cupy.naive"], ["none of the requested", "cupy.naive"]),
        (["--suite", "gpu"], ["case set 'gpu' needs a GPU", "no usable GPU"]),
        (["--suite", "gpu", "--impl", "numpy.textbook"], ["case set 'gpu' needs a GPU"]),
    ],
)
def test_bench_refuses_what_cannot_run_here_before_timing(monkeypatch, args, fragments):
    from cupy_bn import bench

    if cupy_usable():
        pytest.skip("a GPU is usable here")
    monkeypatch.setattr(bench, "run_bench", _must_not_run)
    assert_user_error(run("bench", "--shape", "4,2", *QUICK, *args), *fragments)


def _must_not_run(*args, **kwargs):
    raise AssertionError("timing started")


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_checks_output_paths_before_timing(monkeypatch, tmp_path, option):
    from cupy_bn import bench

    monkeypatch.setattr(bench, "run_bench", _must_not_run)
    if option == "--plot":
        pytest.importorskip("matplotlib")
    missing = tmp_path / "no" / "out"
    assert_user_error(run("bench", option, missing), option, "directory", "does not exist")
    under_a_file = tmp_path / "file"
    under_a_file.write_text("")
    assert_user_error(run("bench", option, under_a_file / "out"), option, "does not exist")
    assert_user_error(run("bench", option, tmp_path), option, "is a directory")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # what a read-only directory does
    assert_user_error(run("bench", option, tmp_path / "out"), option, "Permission denied")


def test_bench_plot_without_matplotlib_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run("bench", "--shape", "4,2", *QUICK, "--plot", tmp_path / "p.png")
    assert_user_error(result, "matplotlib", "cupy-bn[plot]")


def test_bench_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    result = run("bench", "--shape", "4,2", *QUICK, "--impl", "cupy_bn.numpy", "--plot", path)
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--impl", "fastest"], "unknown 'fastest'"),
        (["--shape", "3"], "rank 2 to 5"),
        (["--shape", "4,3", "--channel-axis", "0"], "not a channel axis"),
    ],
)
def test_bench_bad_options(args, fragment):
    assert_user_error(run("bench", *QUICK, *args), fragment)


def test_bench_suite_choices_are_the_library_case_sets():
    from cupy_bn.bench import SUITES
    from cupy_bn.cli.bench import bench

    (suite,) = [p for p in bench.params if p.name == "suite"]
    assert list(suite.type.choices) == list(SUITES)


def test_bench_failure_of_our_backend_exits_1(monkeypatch):
    from cupy_bn import functional

    def broken(dy, saved):
        raise RuntimeError("kernel fell over")

    monkeypatch.setattr(functional, "batch_norm_backward", broken)
    result = run("bench", "--shape", "4,2", *QUICK, "--impl", "cupy_bn.numpy")
    assert_user_error(result, "kernel fell over", code=1)


def test_bench_times_every_dtype_asked_for():
    result = run(
        "bench", "--shape", "4,3", *QUICK, "--impl", "cupy_bn.numpy",
        "--dtype", "float32", "--dtype", "bfloat16", "--dtype", "float32", "--json", "-",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    benchmarks = json.loads(result.stdout)["benchmarks"]
    assert sorted({b["params"]["dtype"] for b in benchmarks}) == ["bfloat16", "float32"]
    assert len(benchmarks) == 2 * 3
