"""Folding batch norm into conv/linear weights: math, pairing, validation, model files."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
import zlib

import numpy as np
import pytest
from fold_models import (
    LAYERS,
    Layer,
    bn_state,
    folded_output,
    layer_apply,
    layer_state,
    original_output,
    random_input,
)

from cupy_bn.fold import (
    FOLD_RECORD_KEY,
    FoldDtypeError,
    FoldError,
    PairStatement,
    UnresolvedPairsError,
    fold_conv_bn,
    fold_linear_bn,
    fold_record,
    fold_state_dict,
    read_fold_record,
)
from cupy_bn.fold.check import verify_fold
from cupy_bn.modelfile import ModelFileError, atomic_output, load_npz, save_npz


def _model(layer: Layer, rng, affine=True, dtype=np.float32, conv="block.0", bn="block.1"):
    state = layer_state(conv, layer, rng, dtype)
    state |= bn_state(bn, layer.out_channels, rng, affine=affine, dtype=dtype)
    return state


def _tol(dtype) -> float:
    return {np.float16: 2e-2, np.float32: 2e-5, np.float64: 1e-12}[dtype]


# ---------------------------------------------------------------------------------------------
# The fold against an independent float64 reference


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_folded_layer_matches_layer_then_bn(name, affine):
    layer = LAYERS[name]
    rng = np.random.default_rng(zlib.crc32(f"{name}-{affine}".encode()))
    state = _model(layer, rng, affine=affine)
    transpose = ["block.0"] if layer.kind == "conv_transpose" else []
    folded, report = fold_state_dict(state, pairs={"block.0": "block.1"}, transpose=transpose)

    assert [(p.layer, p.bn) for p in report.pairs] == [("block.0", "block.1")]
    assert report.pairs[0].created_bias == (not layer.bias)
    assert report.pairs[0].channels == layer.out_channels
    assert list(folded) == ["block.0.weight", "block.0.bias"]
    assert folded["block.0.weight"].dtype == np.float32
    assert folded["block.0.bias"].dtype == np.float32
    x = random_input(layer, rng)
    expected = original_output(state, layer, "block.0", "block.1", x)
    got = folded_output(folded, layer, "block.0", x)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=_tol(np.float32) * scale)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_fold_is_computed_in_float64_and_stored_in_the_weight_dtype(dtype):
    rng = np.random.default_rng(1)
    layer = LAYERS["conv2d"]
    state = _model(layer, rng, dtype=dtype)
    w, b, bn = (state["block.0.weight"], state["block.0.bias"], "block.1")
    new_w, new_b = fold_conv_bn(
        w,
        b,
        state[f"{bn}.running_mean"],
        state[f"{bn}.running_var"],
        state[f"{bn}.weight"],
        state[f"{bn}.bias"],
        eps=1e-3,
    )
    s = state[f"{bn}.weight"].astype(np.float64) / np.sqrt(
        state[f"{bn}.running_var"].astype(np.float64) + 1e-3
    )
    expect_w = (w.astype(np.float64) * s[:, None, None, None]).astype(dtype)
    expect_b = (
        (b.astype(np.float64) - state[f"{bn}.running_mean"].astype(np.float64)) * s
        + state[f"{bn}.bias"].astype(np.float64)
    ).astype(dtype)
    assert new_w.dtype == dtype and new_b.dtype == dtype
    np.testing.assert_array_equal(new_w, expect_w)  # one rounding, from float64
    np.testing.assert_array_equal(new_b, expect_b)


def test_affine_false_is_gamma_one_beta_zero():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3))
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    got = fold_linear_bn(w, None, mean, var)
    want = fold_linear_bn(w, np.zeros(4), mean, var, np.ones(4), np.zeros(4))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[1], -mean / np.sqrt(var + 1e-5))


def test_transposed_groups_scale_the_right_columns():
    # ConvTranspose(in=4, out=6, groups=2): weight (4, 3, 1); output channel g*3 + j is
    # column j of rows 2g, 2g+1. Scaling along axis 1 alone (3 entries) cannot express it.
    w = np.ones((4, 3, 1))
    scale = np.arange(1.0, 7.0)  # var + eps = 1/scale^2 with gamma=1
    eps = 1e-5
    var = 1.0 / scale**2 - eps
    new_w, new_b = fold_conv_bn(w, None, np.zeros(6), var, transpose=True, groups=2, eps=eps)
    expected = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6], [4, 5, 6]], dtype=float)[..., None]
    np.testing.assert_allclose(new_w, expected, rtol=1e-12)
    np.testing.assert_array_equal(new_b, np.zeros(6))


def test_transpose_groups_are_inferred_from_the_batch_norm():
    rng = np.random.default_rng(3)
    layer = LAYERS["conv_transpose3d_groups"]
    state = _model(layer, rng)
    folded, report = fold_state_dict(state, transpose=["block.0"])
    assert report.pairs[0].groups == 3
    assert report.pairs[0].kind == "conv_transpose3d"
    folded_given, _ = fold_state_dict(state, transpose=["block.0"], groups={"block.0": 3})
    np.testing.assert_array_equal(folded["block.0.weight"], folded_given["block.0.weight"])
    with pytest.raises(FoldError, match="block.1"):
        fold_state_dict(state, transpose=["block.0"], groups={"block.0": 2})


def test_reference_layers_agree_with_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    for name, layer in LAYERS.items():
        nd = len(layer.kernel)
        if layer.kind == "linear":
            module = torch.nn.Linear(layer.in_channels, layer.out_channels, bias=layer.bias)
        else:
            cls = getattr(torch.nn, f"{'Conv' if layer.kind == 'conv' else 'ConvTranspose'}{nd}d")
            module = cls(
                layer.in_channels,
                layer.out_channels,
                layer.kernel,
                groups=layer.groups,
                bias=layer.bias,
            )
        module = module.double()
        assert tuple(module.weight.shape) == layer.weight_shape, name
        x = random_input(layer, rng)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        got = layer_apply(
            layer,
            x,
            module.weight.detach().numpy(),
            None if module.bias is None else module.bias.detach().numpy(),
        )
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_pytorch_model_export_folds_exactly():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, groups=8),
        torch.nn.BatchNorm2d(8, affine=False),
        torch.nn.ConvTranspose2d(8, 6, 2, groups=2),
        torch.nn.BatchNorm2d(6),
    ).double()
    with torch.no_grad():
        for m in model:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 2)
                if m.affine:
                    m.weight.uniform_(-2, 2)
                    m.bias.uniform_(-1, 1)
    model.eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    folded, report = fold_state_dict(state, transpose=["5"], assume_sequential=True)
    assert [(p.layer, p.bn) for p in report.pairs] == [("0", "1"), ("3", "4"), ("5", "6")]
    assert [p.established for p in report.pairs] == ["proven"] * 3
    assert [p.assumption is not None for p in report.pairs] == [False, True, False]
    fused = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, groups=8),
        torch.nn.ConvTranspose2d(8, 6, 2, groups=2),
    ).double()
    fused.load_state_dict(
        {
            k.replace("3.", "2.", 1).replace("5.", "3.", 1): torch.from_numpy(v)
            for k, v in folded.items()
        }
    )
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(fused(x).numpy(), model(x).numpy(), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Whole state dicts: pairing, order, unpaired batch norms


def _two_blocks(rng) -> dict[str, np.ndarray]:
    """A ResNet-like layout: stem, a block with a downsample branch, a classifier."""
    state = {}
    state |= layer_state("conv1", Layer("conv", 3, 8, (3, 3), bias=False), rng)
    state |= bn_state("bn1", 8, rng)
    state |= layer_state("layer1.0.conv1", Layer("conv", 8, 16, (3, 3), bias=False), rng)
    state |= bn_state("layer1.0.bn1", 16, rng)
    state |= layer_state("layer1.0.conv2", Layer("conv", 16, 16, (1, 1), bias=False), rng)
    state |= bn_state("layer1.0.bn2", 16, rng)
    state |= layer_state("layer1.0.downsample.0", Layer("conv", 8, 16, (1, 1), bias=False), rng)
    state |= bn_state("layer1.0.downsample.1", 16, rng)
    state |= layer_state("fc", Layer("linear", 16, 10), rng)
    return state


def test_two_blocks_pair_in_order_and_keep_everything_else():
    rng = np.random.default_rng(5)
    state = _two_blocks(rng)
    snapshot = {k: v.copy() for k, v in state.items()}
    folded, report = fold_state_dict(state, assume_sequential=True)
    assert [(p.layer, p.bn, p.established) for p in report.pairs] == [
        ("conv1", "bn1", "confirmed"),
        ("layer1.0.conv1", "layer1.0.bn1", "confirmed"),
        ("layer1.0.conv2", "layer1.0.bn2", "confirmed"),
        ("layer1.0.downsample.0", "layer1.0.downsample.1", "proven"),
    ]
    assert list(folded) == [
        "conv1.weight",
        "conv1.bias",
        "layer1.0.conv1.weight",
        "layer1.0.conv1.bias",
        "layer1.0.conv2.weight",
        "layer1.0.conv2.bias",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.0.bias",
        "fc.weight",
        "fc.bias",
    ]
    assert folded["fc.weight"] is state["fc.weight"]
    for key, value in snapshot.items():  # the input is not modified
        np.testing.assert_array_equal(state[key], value)
    for pair in report.pairs:
        shape = state[f"{pair.layer}.weight"].shape
        layer = Layer("conv", shape[1], shape[0], shape[2:], bias=False)
        x = random_input(layer, rng)
        np.testing.assert_allclose(
            folded_output(folded, layer, pair.layer, x),
            original_output(state, layer, pair.layer, pair.bn, x),
            atol=1e-4,
        )
    assert all(check.ok for check in verify_fold(state, folded, report))


def test_without_a_statement_only_consecutive_indices_pair():
    rng = np.random.default_rng(6)
    state = _two_blocks(rng)
    with pytest.raises(UnresolvedPairsError) as caught:
        fold_state_dict(state)
    proposals = {u.bn: u.candidate for u in caught.value.unresolved}
    assert proposals == {
        "bn1": "conv1",
        "layer1.0.bn1": "layer1.0.conv1",
        "layer1.0.bn2": "layer1.0.conv2",
        "layer1.0.downsample.1": "layer1.0.downsample.0",
    }
    assert "would pair with 'conv1'" in str(caught.value)
    # downsample.0 -> downsample.1 is proven adjacent, but (16, 8, 1, 1) also fits a
    # ConvTranspose with groups=2: its kind has to be stated
    (downsample,) = [u for u in caught.value.unresolved if u.bn == "layer1.0.downsample.1"]
    assert "follows 'layer1.0.downsample.0'" in downsample.reason
    folded, report = fold_state_dict(state, keep_unpaired=True)
    assert report.pairs == [] and list(folded) == list(state)
    folded, report = fold_state_dict(
        state, keep_unpaired=True, pairs={"layer1.0.downsample.0": "layer1.0.downsample.1"}
    )
    assert [(p.layer, p.established) for p in report.pairs] == [
        ("layer1.0.downsample.0", "explicit")
    ]
    assert [k.bn for k in report.kept] == ["bn1", "layer1.0.bn1", "layer1.0.bn2"]


@pytest.mark.parametrize(
    ("layer", "bn", "proven"),
    [
        ("features.3", "features.4", True),
        ("3", "4", True),
        ("features.3", "features.5", False),  # an activation between takes index 4
        ("features.0.3", "features.1.0", False),  # different containers
        ("features.09", "features.10", False),  # not PyTorch's numbering
        ("conv", "bn", False),
    ],
)
def test_proof_is_consecutive_indices_of_one_container(layer, bn, proven):
    rng = np.random.default_rng(14)
    state = layer_state(layer, Layer("conv", 3, 8, (3, 3)), rng) | bn_state(bn, 8, rng)
    folded, report = fold_state_dict(state, keep_unpaired=True)
    assert [p.layer for p in report.pairs] == ([layer] if proven else [])
    assert [k.bn for k in report.kept] == ([] if proven else [bn])


def test_proven_neighbour_with_an_ambiguous_weight_needs_its_kind():
    rng = np.random.default_rng(15)
    state = layer_state("up.0", Layer("conv_transpose", 8, 8, (2, 2), groups=2), rng)
    state |= bn_state("up.1", 8, rng)
    with pytest.raises(UnresolvedPairsError, match="ConvTranspose with groups=2"):
        fold_state_dict(state)
    _, report = fold_state_dict(state, transpose=["up.0"])
    assert [(p.kind, p.groups, p.established, p.assumption) for p in report.pairs] == [
        ("conv_transpose2d", 2, "proven", None)
    ]
    _, report = fold_state_dict(state, pairs={"up.0": "up.1"})
    assert report.pairs[0].kind == "conv2d" and "ConvTranspose" in report.pairs[0].assumption


def test_a_weight_that_fits_only_a_conv_transpose_is_one():
    rng = np.random.default_rng(16)
    state = layer_state("net.0", Layer("conv_transpose", 8, 6, (2, 2)), rng)  # (8, 6, 2, 2)
    state |= bn_state("net.1", 6, rng)
    _, report = fold_state_dict(state)
    assert [(p.kind, p.groups, p.assumption) for p in report.pairs] == [
        ("conv_transpose2d", 1, None)
    ]


def test_confirmed_key_order_takes_the_module_just_before():
    rng = np.random.default_rng(6)
    state = layer_state("a", Layer("conv", 3, 8, (1, 1)), rng)
    state |= layer_state("proj", Layer("linear", 8, 5), rng)  # just before, 5 outputs
    state |= bn_state("bn", 8, rng)
    with pytest.raises(UnresolvedPairsError, match=r"'proj' \(weight \(5, 8\)\) does not"):
        fold_state_dict(state, assume_sequential=True)


def test_confirmed_key_order_does_not_cross_a_gap_in_the_indices():
    rng = np.random.default_rng(19)
    state = layer_state("features.0", Layer("conv", 3, 8, (3, 3)), rng)
    state |= bn_state("features.2", 8, rng)  # features.1 is a ReLU: no keys
    with pytest.raises(UnresolvedPairsError, match="'features.1' lies between 'features.0'"):
        fold_state_dict(state, assume_sequential=True)
    _, report = fold_state_dict(state, pairs={"features.0": "features.2"})
    assert [p.established for p in report.pairs] == ["explicit"]


def test_explicit_pair_overrides_the_key_order():
    rng = np.random.default_rng(7)
    state = layer_state("a", Layer("conv", 3, 8, (1, 1)), rng)
    state |= layer_state("b", Layer("conv", 8, 8, (1, 1)), rng)
    state |= bn_state("bn", 8, rng)
    _, auto = fold_state_dict(state, assume_sequential=True)
    assert [(p.layer, p.established) for p in auto.pairs] == [("b", "confirmed")]
    folded, report = fold_state_dict(state, pairs={"a": "bn"})
    assert [(p.layer, p.bn, p.established) for p in report.pairs] == [("a", "bn", "explicit")]
    assert folded["b.weight"] is state["b.weight"]


def test_orphan_batch_norm_is_named_unless_kept():
    rng = np.random.default_rng(8)
    state = bn_state("features.norm0", 4, rng)  # nothing before it
    state |= layer_state("features.conv0", Layer("conv", 4, 6, (3, 3)), rng)
    with pytest.raises(FoldError, match="features.norm0.*no module comes before it"):
        fold_state_dict(state, assume_sequential=True)
    folded, report = fold_state_dict(state, keep_unpaired=True, assume_sequential=True)
    assert [k.bn for k in report.kept] == ["features.norm0"] and report.pairs == []
    assert list(folded) == list(state)


def test_second_batch_norm_after_a_paired_layer_is_unpaired():
    rng = np.random.default_rng(9)
    state = layer_state("conv", Layer("conv", 3, 4, (1, 1)), rng)
    state |= bn_state("bn_a", 4, rng)
    state |= bn_state("bn_b", 4, rng)
    with pytest.raises(FoldError, match=r"bn_b.*the module before it, 'bn_a', is a batch norm"):
        fold_state_dict(state, assume_sequential=True)
    folded, report = fold_state_dict(state, keep_unpaired=True, assume_sequential=True)
    assert [k.bn for k in report.kept] == ["bn_b"]
    assert "bn_b.running_var" in folded and "bn_a.running_var" not in folded


def test_statements_that_contradict_each_other_or_the_weights_are_errors():
    rng = np.random.default_rng(17)
    state = layer_state("a", Layer("conv", 3, 8, (1, 1)), rng)
    state |= bn_state("bn1", 8, rng) | bn_state("bn2", 8, rng)
    with pytest.raises(FoldError, match="layer 'a' is paired with two batch norms"):
        fold_state_dict(state, pairs=[("a", "bn1"), ("a", "bn2")])
    with pytest.raises(FoldError, match="batch norm 'bn1' is paired twice"):
        fold_state_dict(state, pairs=[("a", "bn1"), ("a", "bn1")])
    with pytest.raises(FoldError, match="as a ConvTranspose"):
        fold_state_dict(state, pairs={"a": "bn1"}, transpose=["a"], keep_unpaired=True)


# ---------------------------------------------------------------------------------------------
# The fold record a model file may carry


def test_recorded_pairs_fold_without_options_and_leave_no_record():
    rng = np.random.default_rng(18)
    state = layer_state("enc", Layer("conv", 4, 8, (3, 3), bias=False), rng)
    state |= bn_state("enc_bn", 8, rng)
    state |= layer_state("up", Layer("conv_transpose", 8, 8, (2, 2), groups=2), rng)
    state |= bn_state("up_bn", 8, rng)
    state[FOLD_RECORD_KEY] = fold_record(
        [
            PairStatement("enc", "enc_bn", eps=1e-3),
            PairStatement("up", "up_bn", transpose=True, groups=2),
        ]
    )
    folded, report = fold_state_dict(state)
    assert [(p.layer, p.established, p.kind, p.groups, p.eps) for p in report.pairs] == [
        ("enc", "recorded", "conv2d", 1, 1e-3),
        ("up", "recorded", "conv_transpose2d", 2, 1e-5),
    ]
    assert FOLD_RECORD_KEY not in folded
    layer = Layer("conv_transpose", 8, 8, (2, 2), groups=2)
    x = random_input(layer, rng)
    np.testing.assert_allclose(
        folded_output(folded, layer, "up", x),
        original_output(state, layer, "up", "up_bn", x),
        atol=1e-4,
    )
    enc = Layer("conv", 4, 8, (3, 3))
    x = random_input(enc, rng)
    np.testing.assert_allclose(
        folded_output(folded, enc, "enc", x),
        original_output(state, enc, "enc", "enc_bn", x, eps=1e-3),
        atol=1e-4,
    )


def test_record_survives_an_npz_round_trip_without_pickle(tmp_path):
    record = fold_record([PairStatement("a", "b", transpose=True, groups=3, eps=0.001)])
    np.savez(tmp_path / "m.npz", **{FOLD_RECORD_KEY: record, "a.weight": np.ones((3, 1, 1))})
    with np.load(tmp_path / "m.npz", allow_pickle=False) as archive:
        assert read_fold_record(archive[FOLD_RECORD_KEY]) == [
            PairStatement("a", "b", transpose=True, groups=3, eps=0.001)
        ]
    assert json.loads(str(record))["format"] == "cupy-bn.fold-pairs/1"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.array([1.0]), "0-d unicode string"),
        (np.array("not json"), "not valid JSON"),
        (np.array('{"pairs": []}'), "format"),
        (np.array('{"format": "cupy-bn.fold-pairs/1", "pairs": [{"layer": 1}]}'), "strings"),
        (
            np.array(
                '{"format": "cupy-bn.fold-pairs/1", "pairs": [{"layer": "a", "bn": "b", '
                '"groups": 0}]}'
            ),
            "'groups' must be positive",
        ),
        (
            np.array(
                '{"format": "cupy-bn.fold-pairs/1", "pairs": [{"layer": "a", "bn": "b", '
                '"kind": "conv"}]}'
            ),
            "unknown fields",
        ),
    ],
)
def test_malformed_record_is_an_error_naming_it(value, message):
    with pytest.raises(FoldError, match=message) as caught:
        read_fold_record(value)
    assert FOLD_RECORD_KEY in str(caught.value)


def test_top_level_keys_fold():
    rng = np.random.default_rng(10)
    state = layer_state("x", Layer("linear", 3, 4), rng)
    state = {"weight": state["x.weight"], "bias": state["x.bias"]} | bn_state("bn", 4, rng)
    folded, report = fold_state_dict(state, assume_sequential=True)
    assert report.pairs[0].layer == "" and list(folded) == ["weight", "bias"]


# ---------------------------------------------------------------------------------------------
# Bad input


def _simple(rng=None):
    rng = rng or np.random.default_rng(11)
    return _model(LAYERS["conv2d"], rng)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: s.__setitem__("block.1.running_var", -s["block.1.running_var"]),
            r"block\.1\.running_var: negative variance",
        ),
        (
            lambda s: s["block.1.running_var"].__setitem__(2, np.nan),
            r"block\.1\.running_var: non-finite values at channels \[2\]",
        ),
        (
            lambda s: s["block.1.running_mean"].__setitem__(0, np.inf),
            r"block\.1\.running_mean: non-finite",
        ),
        (
            lambda s: s.__setitem__("block.1.running_var", np.ones(7, np.float32)),
            r"block\.1\.running_var: expected shape \(8,\)",
        ),
        (
            lambda s: s.__setitem__("block.1.weight", np.ones(3, np.float32)),
            r"block\.1\.weight: expected shape \(8,\)",
        ),
        (
            lambda s: s.__setitem__("block.0.bias", np.ones(5, np.float32)),
            r"block\.0\.bias: expected shape \(8,\)",
        ),
        (
            lambda s: s.__setitem__("block.1.running_mean", np.ones((8, 1), np.float32)),
            r"block\.1\.running_mean: expected a vector",
        ),
        (lambda s: s.pop("block.1.running_var"), r"has running_mean but no running_var"),
    ],
)
def test_bad_statistics_are_rejected_with_the_key(change, message):
    state = _simple()
    change(state)
    with pytest.raises(FoldError, match=message):
        fold_state_dict(state)


def test_integer_weight_is_a_dtype_error():
    state = _simple()
    state["block.0.weight"] = state["block.0.weight"].astype(np.int32)
    with pytest.raises(FoldDtypeError, match=r"block\.0\.weight: expected a floating"):
        fold_state_dict(state, pairs={"block.0": "block.1"})
    with pytest.raises(TypeError):
        fold_conv_bn(np.ones((2, 2, 1), np.int64), None, np.zeros(2), np.ones(2))


def test_object_array_is_rejected():
    state = _simple()
    state["meta"] = np.array([{"a": 1}], dtype=object)
    with pytest.raises(FoldDtypeError, match="meta"):
        fold_state_dict(state)


def test_overflowing_fold_is_an_error():
    w = np.full((2, 1, 1), 60000, np.float16)
    with pytest.raises(FoldError, match="overflow float16"):
        fold_conv_bn(w, None, np.zeros(2), np.zeros(2), np.full(2, 100.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"pairs": {"nope": "block.1"}}, r"pairs: 'nope' is not a layer"),
        ({"pairs": {"block.0": "block.0"}}, r"pairs: 'block.0' is not a batch norm"),
        ({"pairs": [("block.0",)]}, r"pairs: expected \(layer, bn\)"),
        ({"transpose": ["missing"]}, r"transpose: 'missing'"),
        ({"groups": {"block.0": 0}}, r"groups: 'block.0' needs a positive integer"),
        ({"groups": {"block.0": 3}}, r"not divisible by groups=3"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(FoldError, match=message):
        fold_state_dict(_simple(), **kwargs)


def test_explicit_pair_with_wrong_channel_count():
    rng = np.random.default_rng(12)
    state = layer_state("a", Layer("conv", 3, 4, (1, 1)), rng) | bn_state("bn", 5, rng)
    message = r"pair a=bn: .a. \(weight \(4, 3, 1, 1\)\) does not have 5"
    with pytest.raises(FoldError, match=message):
        fold_state_dict(state, pairs={"a": "bn"})


def test_direct_function_argument_errors():
    with pytest.raises(FoldError, match="weight: a linear layer"):
        fold_linear_bn(np.ones((2, 2, 2)), None, np.zeros(2), np.ones(2))
    with pytest.raises(FoldError, match="running_mean: expected shape"):
        fold_conv_bn(np.ones((3, 2, 1)), None, np.zeros(2), np.ones(3))
    with pytest.raises(FoldError, match="groups"):
        fold_conv_bn(np.ones((3, 2, 1)), None, np.zeros(2), np.ones(2), transpose=True, groups=2)


# ---------------------------------------------------------------------------------------------
# The numeric check of a fold


def test_verify_fold_flags_a_wrong_fold():
    rng = np.random.default_rng(13)
    layer = LAYERS["conv_transpose2d_groups"]
    state = _model(layer, rng)
    folded, report = fold_state_dict(state, transpose=["block.0"])
    assert all(c.ok for c in verify_fold(state, folded, report))
    # PyTorch's transposed fold scales axis 1 only, which is wrong for groups > 1.
    w = state["block.0.weight"].astype(np.float64)
    s = state["block.1.weight"] / np.sqrt(state["block.1.running_var"].astype(np.float64) + 1e-5)
    wrong = dict(folded)
    wrong["block.0.weight"] = (w * s[:4].reshape(1, 4, 1, 1)).astype(np.float32)
    (check,) = verify_fold(state, wrong, report)
    assert not check.ok and check.max_abs_error > 1e-2


# ---------------------------------------------------------------------------------------------
# Model files


def test_npz_round_trip_keeps_order_dtypes_and_awkward_names(tmp_path):
    arrays = {
        "z.weight": np.arange(6, dtype=np.float16).reshape(2, 3),
        "file": np.ones(2),
        "allow_pickle": np.zeros((1, 2), np.float32),
        "a.num_batches_tracked": np.array(3),
    }
    path = tmp_path / "m.npz"
    save_npz(path, arrays)
    loaded = load_npz(path)
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype
        np.testing.assert_array_equal(loaded[key], value)
    with np.load(path, allow_pickle=False) as z:  # numpy reads what we write
        assert list(z.files) == list(arrays)


def test_load_npz_reads_numpy_savez(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, **{"conv.weight": np.ones((2, 1, 1, 1)), "bn.running_var": np.ones(2)})
    assert list(load_npz(path)) == ["conv.weight", "bn.running_var"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"\x00garbage" * 10), "not an .npz archive"),
        (lambda p: p.write_bytes(_npy_bytes(np.ones(3))), "single .npy array"),
        (lambda p: np.savez(p, a=np.array([{"x": 1}], dtype=object)), "Python objects"),
        (lambda p: zipfile.ZipFile(p, "w").close(), "holds no arrays|not an .npz"),
        (lambda p: _zip_with(p, "notes.txt", b"hello"), "'notes.txt' is not a .npy array"),
        (lambda p: _zip_with(p, "a.npy", b"\x93NUMPY broken"), "'a' is unreadable"),
        (lambda p: p.mkdir(), "not a regular file"),
        (lambda p: None, "no such file"),
    ],
)
def test_load_npz_rejects_bad_files(tmp_path, make, message):
    path = tmp_path / "model.npz"
    make(path)
    with pytest.raises(ModelFileError, match=message):
        load_npz(path)


def test_load_npz_rejects_a_truncated_archive(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, a=np.ones(1000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(ModelFileError, match="m.npz"):
        load_npz(path)


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _zip_with(path, name, payload):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, payload)


def test_save_npz_refuses_to_overwrite_and_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "out.npz"
    path.write_bytes(b"precious")
    with pytest.raises(ModelFileError, match="already exists"):
        save_npz(path, {"a": np.ones(2)})
    assert path.read_bytes() == b"precious"

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        save_npz(path, {"a": np.ones(2)}, overwrite=True)
    assert path.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]  # no temp file left


def test_atomic_output_never_replaces_a_file_that_appears(tmp_path):
    path = tmp_path / "late.npz"
    with pytest.raises(ModelFileError, match="already exists"):
        with atomic_output(path) as f:
            f.write(b"new")
            path.write_bytes(b"someone else")
    assert path.read_bytes() == b"someone else"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.npz"]


def test_save_npz_rejects_object_arrays(tmp_path):
    with pytest.raises(ModelFileError, match="Python objects"):
        save_npz(tmp_path / "x.npz", {"a": np.array([None], dtype=object)})
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_save_npz_gives_the_file_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_npz(tmp_path / "m.npz", {"a": np.ones(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.npz").stat().st_mode) == 0o666 & ~umask
