"""Ghost batches against PyTorch: `F.batch_norm` run on each chunk of G samples
(`torch.split(x, G)`) and the outputs concatenated, with autograd's gradients for x, weight and
bias; in float64, float32, float16 and bfloat16 (PyTorch's CPU kernels in the same dtype), both
layouts, both backends, with a shorter last chunk and the fused ReLU and residual."""

from __future__ import annotations

import numpy as np
import pytest

from cupy_bn.dtypes import BFLOAT16
from cupy_bn.functional import batch_norm, batch_norm_backward
from tests.test_ghost import BACKENDS, make
from tests.torch_reference import from_channels_first, to_channels_first, torch

F = torch.nn.functional
G = 3
#: (channel_axis, shape): batches of 7 give chunks of 3, 3 and 1 samples.
LAYOUTS = [(1, (7, 3, 4, 5)), (-1, (7, 4, 5, 3)), (1, (8, 3))]
#: Agreement with PyTorch per dtype, relative to the values' scale: both round float32
#: results to the output dtype once, so 16-bit values may differ by an ulp at that scale
#: (2**-11 for float16, 2**-8 for bfloat16) where the float32 results straddle a rounding.
TOLERANCE = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float16): 1e-3,
}
DTYPES = [np.float64, np.float32, np.float16]
TORCH_DTYPES = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}
TORCH_DTYPES[np.dtype(np.float16)] = torch.float16
if BFLOAT16 is not None:
    DTYPES.append(BFLOAT16)
    TOLERANCE[BFLOAT16] = 8e-3
    TORCH_DTYPES[BFLOAT16] = torch.bfloat16


def to_torch(a: np.ndarray, requires_grad: bool = False):
    t = torch.tensor(a.astype(np.float64)).to(TORCH_DTYPES[a.dtype])
    return t.requires_grad_(requires_grad)


def to_numpy(t) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def torch_chunks(case, channel_axis, activation=None, z=None):
    """PyTorch's y and gradients (x, weight, bias[, residual]) with batch norm per chunk."""
    x, w, b = (to_torch(case[k], True) for k in ("x", "weight", "bias"))
    zt = None if z is None else to_torch(z, True)
    parts = []
    for chunk in torch.split(x, G):
        y = F.batch_norm(to_channels_first(chunk, channel_axis), None, None, w, b, True)
        parts.append(from_channels_first(y, channel_axis))
    y = torch.cat(parts)
    if zt is not None:
        y = y + zt
    if activation == "relu":
        y = F.relu(y)
    inputs = (x, w, b) if zt is None else (x, w, b, zt)
    grads = torch.autograd.grad(y, inputs, to_torch(case["dy"]))
    return to_numpy(y), [to_numpy(g) for g in grads]


def run_ours(case, channel_axis, backend, activation=None, z=None):
    y, saved = batch_norm(
        case["x"], case["weight"], case["bias"], channel_axis=channel_axis, backend=backend,
        activation=activation, residual=z, virtual_batch=G,
    )  # fmt: skip
    return y, batch_norm_backward(case["dy"], saved)


def assert_agrees(got, want, dtype, what):
    tol = TOLERANCE[np.dtype(dtype)]
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    assert err <= tol * scale, f"{what}: max difference {err:.3g} > {tol * scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("channel_axis", "shape"), LAYOUTS, ids=["NCHW", "NHWC", "NC"])
def test_matches_pytorch_per_chunk(channel_axis, shape, dtype, backend):
    case = make(shape, channel_axis, dtype)
    y, grads = run_ours(case, channel_axis, backend)
    want_y, want_grads = torch_chunks(case, channel_axis)
    assert y.dtype == grads[0].dtype == np.dtype(dtype)
    assert_agrees(y, want_y, dtype, "y")
    for got, want, name in zip(grads, want_grads, ("dx", "dweight", "dbias"), strict=True):
        assert_agrees(got, want, got.dtype if name != "dx" else dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize(("channel_axis", "shape"), LAYOUTS[:2], ids=["NCHW", "NHWC"])
def test_fused_relu_and_residual_match_pytorch(channel_axis, shape, with_residual, backend):
    case = make(shape, channel_axis, np.float32)
    z = make(shape, channel_axis, np.float32, seed=1)["x"] if with_residual else None
    y, grads = run_ours(case, channel_axis, backend, "relu", z)
    want_y, want_grads = torch_chunks(case, channel_axis, "relu", z)
    assert len(grads) == len(want_grads)
    assert_agrees(y, want_y, np.float32, "y")
    for got, want, name in zip(grads, want_grads, ("dx", "dw", "db", "dz"), strict=False):
        assert_agrees(got, want, np.float32, name)
