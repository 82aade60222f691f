"""`cupy-bn fold model.npz` on common PyTorch architectures: never a wrong model with exit 0.

Each model is exported as `np.savez(path, **state_dict)` and folded through the CLI. Whatever
the options, an exit status of 0 must come with a folded file that reproduces the model's own
output (the folded arrays loaded back into the model, each folded batch norm replaced by an
identity); without the options that establish the pairs, the command must refuse (exit 2,
nothing written) where the file cannot prove them. With the true pairs given explicitly,
exactly those are folded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field

import numpy as np
import pytest
from click.testing import CliRunner

from cupy_bn.cli import main

torch = pytest.importorskip("torch")
nn = torch.nn


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN -> ReLU -> conv, twice, plus the input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        return x + self.conv2(torch.relu(self.bn2(out)))


class PreActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = PreActBlock(8)
        self.block2 = PreActBlock(8)

    def forward(self, x):
        return self.block2(self.block1(self.stem(x)))


class BasicBlock(nn.Module):
    """ResNet basic block with a strided 1x1 downsample branch (torchvision's names)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out)
        )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class DenseLayer(nn.Module):
    """DenseNet layer: BN -> ReLU -> conv on the concatenation of all earlier features."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))


class DenseNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(4)
        self.layer1 = DenseLayer(4, 4)
        self.layer2 = DenseLayer(8, 4)

    def forward(self, x):
        features = [torch.relu(self.norm0(self.conv0(x)))]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        return torch.cat(features, 1)


@dataclass
class Architecture:
    build: object
    input_shape: tuple[int, ...]
    true_pairs: dict[str, str]
    """layer -> batch norm, for the batch norms that follow a layer directly."""
    transposed: list[str] = field(default_factory=list)
    folds_without_options: bool = False
    """True where the file itself proves every pair (consecutive Sequential indices)."""


ARCHITECTURES = {
    "preact_resnet_block": Architecture(
        PreActNet,
        (2, 3, 6, 6),
        {"block1.conv1": "block1.bn2", "block2.conv1": "block2.bn2"},
    ),
    "conv_relu_bn": Architecture(
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8)),
        (2, 3, 6, 6),
        {},
    ),
    "conv_transpose_groups": Architecture(
        lambda: nn.Sequential(
            nn.Conv2d(4, 16, 3), nn.ConvTranspose2d(16, 16, 3, groups=2), nn.BatchNorm2d(16)
        ),
        (2, 4, 6, 6),
        {"1": "2"},
        transposed=["1"],
    ),
    "resnet_downsample": Architecture(
        ResNetLike,
        (2, 3, 8, 8),
        {
            "conv1": "bn1",
            "layer1.0.conv1": "layer1.0.bn1",
            "layer1.0.conv2": "layer1.0.bn2",
            "layer1.0.downsample.0": "layer1.0.downsample.1",
        },
    ),
    "mlp_batchnorm1d": Architecture(
        lambda: nn.Sequential(
            nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 7), nn.BatchNorm1d(7)
        ),
        (4, 6),
        {"0": "1", "3": "4"},
        folds_without_options=True,
    ),
    "depthwise_separable": Architecture(
        lambda: nn.Sequential(
            nn.Conv2d(8, 8, 3, groups=8, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 1, bias=False),
            nn.BatchNorm2d(12),
        ),
        (2, 8, 6, 6),
        {"0": "1", "3": "4"},
    ),
    "conv1d": Architecture(
        lambda: nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.ReLU()),
        (2, 3, 9),
        {"0": "1"},
        folds_without_options=True,
    ),
    "conv3d": Architecture(
        lambda: nn.Sequential(nn.Conv3d(4, 6, 2), nn.BatchNorm3d(6)),  # 4 does not divide 6
        (2, 4, 4, 4, 4),
        {"0": "1"},
        folds_without_options=True,
    ),
    "densenet_concat": Architecture(
        DenseNetLike,
        (2, 3, 6, 6),
        {"conv0": "norm0", "layer1.conv1": "layer1.norm2", "layer2.conv1": "layer2.norm2"},
    ),
    "vgg_sequential": Architecture(
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        ),
        (2, 3, 8, 8),
        {"0": "1", "3": "4"},
    ),
}


def _model(arch: Architecture, seed: int):
    torch.manual_seed(seed)
    model = arch.build().double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.3, 2)
                module.weight.uniform_(-2, 2)
                module.bias.uniform_(-1, 1)
    return model.eval()


def _export(model, path) -> None:
    np.savez(path, **{k: v.numpy() for k, v in model.state_dict().items()})


def _apply_fold(model, folded_path, report):
    """The model with the folded arrays loaded and each folded batch norm an identity."""
    fused = copy.deepcopy(model)
    with np.load(folded_path, allow_pickle=False) as archive:
        arrays = {k: torch.from_numpy(archive[k]) for k in archive.files}
    for pair in report["pairs"]:
        layer = fused.get_submodule(pair["layer"])
        layer.weight = nn.Parameter(arrays[f"{pair['layer']}.weight"])
        layer.bias = nn.Parameter(arrays[f"{pair['layer']}.bias"])
        parent, _, name = pair["bn"].rpartition(".")
        setattr(fused.get_submodule(parent), name, nn.Identity())
    fused.load_state_dict(arrays)  # strict: the folded file has exactly the fused model's keys
    return fused.eval()


def _fold(tmp_path, arch_name, *options):
    arch = ARCHITECTURES[arch_name]
    model = _model(arch, seed=len(arch_name))
    path = tmp_path / "model.npz"
    _export(model, path)
    out = tmp_path / "model.folded.npz"
    result = CliRunner().invoke(
        main, ["fold", str(path), "-o", str(out), "--json", *options], catch_exceptions=False
    )
    return arch, model, out, result


def _assert_reproduces(arch, model, out, result):
    report = json.loads(result.stdout)
    assert report["written"] and out.exists()
    fused = _apply_fold(model, out, report)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(*arch.input_shape, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        want, got = model(x), fused(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-9, atol=1e-9)
    return report


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_without_options_folds_only_what_the_file_proves(tmp_path, name):
    arch, model, out, result = _fold(tmp_path, name)
    if result.exit_code == 0:
        report = _assert_reproduces(arch, model, out, result)
        assert {p["layer"]: p["bn"] for p in report["pairs"]} == arch.true_pairs
        assert all(p["established"] == "proven" for p in report["pairs"])
    else:
        assert result.exit_code == 2, result.output
        assert not out.exists()
        refusal = json.loads(result.stdout)
        assert refusal["written"] is False and refusal["unresolved"]
    assert (result.exit_code == 0) == arch.folds_without_options


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_true_pairs_given_explicitly_fold_exactly_and_reproduce_the_model(tmp_path, name):
    arch = ARCHITECTURES[name]
    options = [f"--pair={layer}={bn}" for layer, bn in arch.true_pairs.items()]
    options += [f"--transpose={layer}" for layer in arch.transposed]
    arch, model, out, result = _fold(tmp_path, name, *options, "--keep-unpaired")
    assert result.exit_code == 0, result.output
    report = _assert_reproduces(arch, model, out, result)
    assert {p["layer"]: p["bn"] for p in report["pairs"]} == arch.true_pairs
    assert {p["established"] for p in report["pairs"]} <= {"explicit", "proven"}
    bns = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert {k["bn"] for k in report["kept"]} == bns - set(arch.true_pairs.values())


def test_transposed_weight_that_also_fits_a_convolution_is_never_guessed(tmp_path):
    arch, model, out, result = _fold(tmp_path, "conv_transpose_groups")
    assert result.exit_code == 2 and not out.exists()
    (item,) = json.loads(result.stdout)["unresolved"]
    assert item["bn"] == "2" and "ConvTranspose with groups=2" in item["reason"]
    arch, model, out, result = _fold(tmp_path, "conv_transpose_groups", "--transpose", "1")
    assert result.exit_code == 0, result.output
    report = _assert_reproduces(arch, model, out, result)
    assert [(p["layer"], p["kind"], p["groups"]) for p in report["pairs"]] == [
        ("1", "conv_transpose2d", 2)
    ]


def test_confirmed_key_order_folds_a_resnet_and_states_the_assumption(tmp_path):
    arch, model, out, result = _fold(tmp_path, "resnet_downsample", "--assume-sequential")
    assert result.exit_code == 0, result.output
    report = _assert_reproduces(arch, model, out, result)
    how = {p["layer"]: p["established"] for p in report["pairs"]}
    assert how == {
        "conv1": "confirmed",
        "layer1.0.conv1": "confirmed",
        "layer1.0.conv2": "confirmed",
        "layer1.0.downsample.0": "proven",
    }
    assumed = {p["layer"] for p in report["pairs"] if p["assumption"]}
    # (16, 8, 3, 3), (16, 16, 3, 3), (16, 8, 1, 1) also fit ConvTransposes; (8, 3, 3, 3) doesn't
    assert assumed == {"layer1.0.conv1", "layer1.0.conv2", "layer1.0.downsample.0"}
    assert "convolution" in report["pairs"][2]["assumption"]


def test_confirmed_key_order_stops_where_the_file_shows_a_gap(tmp_path):
    arch, model, out, result = _fold(tmp_path, "conv_relu_bn", "--assume-sequential")
    assert result.exit_code == 2 and not out.exists()
    (item,) = json.loads(result.stdout)["unresolved"]
    assert "'1' lies between '0' and it" in item["reason"]


def test_refusal_lists_the_proposed_pairs_and_how_to_confirm(tmp_path):
    arch, model, out, result = _fold(tmp_path, "preact_resnet_block")
    assert result.exit_code == 2 and not out.exists()
    proposals = {u["bn"]: u["would_pair_with"] for u in json.loads(result.stdout)["unresolved"]}
    assert proposals["block1.bn2"] == "block1.conv1"  # right, but unproven
    assert proposals["block2.bn1"] == "block1.conv2"  # wrong: an add lies between
    assert proposals["block1.bn1"] == "stem"  # wrong too
    assert "--pair block1.conv1=block1.bn2" in result.stderr
    assert "--assume-sequential" in result.stderr
