"""cupy_bn.integrations.torch: the custom ops against PyTorch's batch norm, their tracing,
and the BatchNorm modules against torch.nn's."""

from __future__ import annotations

import numpy as np
import pytest
from torch_reference import (
    DTYPES,
    LAYOUTS,
    MOMENTUM,
    assert_close,
    assert_matches,
    case,
    gradient_penalty,
    torch,
    torch_batch_norm,
    torch_first_order,
)

from cupy_bn.integrations.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d, batch_norm

make_fx = pytest.importorskip("torch.fx.experimental.proxy_tensor").make_fx


def first_order(c, training: bool) -> dict[str, np.ndarray]:
    x, w, b = (torch.tensor(a, requires_grad=True) for a in (c.x, c.weight, c.bias))
    rm, rv = (torch.tensor(a) for a in c.running())
    y = batch_norm(x, w, b, rm, rv, training, MOMENTUM, 1e-5, c.channel_axis)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.tensor(c.dy))
    with torch.no_grad():
        inference = batch_norm(x, w, b, rm, rv, False, channel_axis=c.channel_axis)
    return {
        "y": y.detach().numpy(),
        "dx": dx.numpy(),
        "dweight": dw.numpy(),
        "dbias": db.numpy(),
        "running_mean": rm.numpy(),
        "running_var": rv.numpy(),
        "inference": inference.numpy(),
    }


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("channel_axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_first_order_matches_pytorch(dtype, channel_axis, shape, training):
    c = case(dtype, channel_axis, shape)
    assert_matches(first_order(c, training), torch_first_order(c, training))


def test_cpu_tensors_reach_the_core_and_come_back_without_a_copy(monkeypatch):
    import cupy_bn.integrations.torch as integration

    seen = {}

    def spy(x, *args, **kwargs):
        y, saved = core_batch_norm(x, *args, **kwargs)
        seen.update(x=x, y=y)
        return y, saved

    core_batch_norm = integration._batch_norm
    monkeypatch.setattr(integration, "_batch_norm", spy)
    x = torch.tensor(case(np.float32, 1, (4, 3, 5)).x, requires_grad=True)
    y = batch_norm(x)
    assert isinstance(seen["x"], np.ndarray) and np.shares_memory(seen["x"], x.detach().numpy())
    assert y.data_ptr() == seen["y"].ctypes.data


def gradcheck_inputs(shape, channel_axis: int = 1, seed: int = 2):
    rng = np.random.default_rng(seed)
    channels = shape[channel_axis]
    x = torch.tensor(rng.standard_normal(shape), requires_grad=True)
    w = torch.tensor(rng.uniform(0.5, 1.5, channels), requires_grad=True)
    b = torch.tensor(rng.standard_normal(channels), requires_grad=True)
    rm, rv = (
        torch.tensor(rng.standard_normal(channels)),
        torch.tensor(rng.uniform(0.5, 2, channels)),
    )
    return (x, w, b), (rm, rv)


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_gradcheck(channel_axis):
    inputs, (rm, rv) = gradcheck_inputs((4, 3, 5), channel_axis)
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm(x, w, b, channel_axis=channel_axis), inputs
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm(x, w, b, rm, rv, False, channel_axis=channel_axis), inputs
    )


@pytest.mark.parametrize("channel_axis", [1, -1])
def test_gradgradcheck(channel_axis):
    inputs, (rm, rv) = gradcheck_inputs((4, 3, 5), channel_axis)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: batch_norm(x, w, b, channel_axis=channel_axis), inputs
    )
    assert torch.autograd.gradgradcheck(
        lambda x, w, b: batch_norm(x, w, b, rm, rv, False, channel_axis=channel_axis), inputs
    )
    x = inputs[0]
    assert torch.autograd.gradgradcheck(lambda x: batch_norm(x, channel_axis=channel_axis), (x,))


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("channel_axis,shape", LAYOUTS, ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_second_order_matches_pytorchs_double_backward(dtype, channel_axis, shape, training):
    c = case(dtype, channel_axis, shape)
    ours = gradient_penalty(batch_norm, c, training)
    theirs = gradient_penalty(torch_batch_norm, c, training)
    for name, a, b in zip(("x", "weight", "bias"), ours, theirs, strict=True):
        assert_close(a, b, f"d penalty / d {name}")


def test_third_derivatives_raise_and_say_so():
    x = torch.tensor(case(np.float64, 1, (4, 3, 5)).x, requires_grad=True)
    (gx,) = torch.autograd.grad(batch_norm(x).pow(3).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first and second derivatives only"):
        hv.sum().backward()


def test_modules_second_order_matches_torch_nn():
    c = case(np.float64, 1, (6, 3, 4, 5))
    grads = []
    for module in (BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()):
        x = torch.tensor(c.x, requires_grad=True)
        (gx,) = torch.autograd.grad(module(x).pow(3).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
        grads.append((x.grad.numpy(), module.weight.grad.numpy(), module.bias.grad.numpy()))
    for name, a, b in zip(("x", "weight", "bias"), *grads, strict=True):
        assert_close(a, b, name)


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_the_op_shows_in_make_fx_traces(mode):
    c = case(np.float32, 1, (4, 3, 5, 2))

    def step(x, w, b, rm, rv):
        y = batch_norm(x, w, b, rm, rv)
        return torch.autograd.grad((y * y).sum(), (x, w, b))

    args = [torch.tensor(a) for a in (c.x, c.weight, c.bias, *c.running())]
    for a in args[:3]:
        a.requires_grad_()
    graph = make_fx(step, tracing_mode=mode)(*args)
    code = graph.code
    assert "torch.ops.cupy_bn.batch_norm.default" in code
    assert "torch.ops.cupy_bn.batch_norm_backward.default" in code
    assert code.count("torch.ops.aten.copy_.default") == 2  # the running statistics


def test_the_double_backward_shows_in_make_fx_traces():
    c = case(np.float32, -1, (4, 5, 3))

    def penalty_step(x, w, b):
        y = batch_norm(x, w, b, channel_axis=-1)
        (gx,) = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (x, w))

    args = [torch.tensor(a, requires_grad=True) for a in (c.x, c.weight, c.bias)]
    code = make_fx(penalty_step, tracing_mode="fake")(*args).code
    assert "torch.ops.cupy_bn.batch_norm_double_backward.default" in code


def test_torch_export_keeps_the_op():
    c = case(np.float32, 1, (4, 3, 5, 2))
    module, x = BatchNorm2d(3), torch.tensor(c.x)
    module(x * 2 + 1)  # running statistics away from their start
    module.eval()
    exported = torch.export.export(module, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert "cupy_bn.batch_norm.default" in targets
    torch.testing.assert_close(exported.module()(x), module(x), rtol=0, atol=0)


def test_opcheck():
    c = case(np.float64, 1, (4, 3, 5))
    x, w, b, rm, rv = (torch.tensor(a) for a in (c.x, c.weight, c.bias, *c.running()))
    x.requires_grad_()
    w.requires_grad_()
    channels_last = torch.tensor(case(np.float32, 1, (4, 3, 5, 2)).x).to(
        memory_format=torch.channels_last
    )
    for args in [
        (x, w, b, rm, rv, True, 0.1, 1e-5, 1),
        (x, w, None, rm, rv, False, 0.1, 1e-5, 1),
        (x, None, None, None, None, True, 0.1, 1e-5, -1),
        (channels_last, None, None, None, None, True, 0.1, 1e-5, 1),
    ]:
        torch.library.opcheck(torch.ops.cupy_bn.batch_norm.default, args)
    dy = torch.tensor(c.dy, requires_grad=True)
    mean = x.detach().mean((0, 2))
    invstd = torch.rsqrt(x.detach().var((0, 2), unbiased=False) + 1e-5)
    for training in (True, False):
        torch.library.opcheck(
            torch.ops.cupy_bn.batch_norm_backward.default,
            (dy, x, w, b, mean, invstd, training, 1),
        )
    torch.manual_seed(0)
    ddx, ddw = torch.randn_like(x.detach()), torch.randn_like(w.detach())
    for args in [
        (ddx, ddw, torch.randn_like(b), dy.detach(), x.detach(), w.detach(), b),
        (ddx, None, None, dy.detach(), x.detach(), None, None),
        (None, ddw, None, dy.detach(), x.detach(), w.detach(), None),
    ]:
        torch.library.opcheck(
            torch.ops.cupy_bn.batch_norm_double_backward.default, (*args, mean, invstd, True, 1)
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_its_dtype(dtype):
    if dtype == torch.bfloat16:
        pytest.importorskip("ml_dtypes")
    c = case(np.float32, 1, (8, 3, 4))
    x = torch.tensor(c.x).to(dtype).requires_grad_()
    w = torch.tensor(c.weight).to(dtype).requires_grad_()
    y = batch_norm(x, w, None)
    y.backward(torch.tensor(c.dy).to(dtype))
    assert y.dtype == x.grad.dtype == w.grad.dtype == dtype
    xf, wf = (t.detach().float().requires_grad_() for t in (x, w))
    expected = torch.nn.functional.batch_norm(xf, None, None, wf, None, True)
    expected.backward(torch.tensor(c.dy).to(dtype).float())
    tol = 2**-7 if dtype == torch.bfloat16 else 2**-10  # one unit in the last place
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=4 * tol)
    torch.testing.assert_close(x.grad.float(), xf.grad, rtol=tol, atol=4 * tol)


def test_channels_last_memory_is_kept():
    c = case(np.float32, 1, (4, 3, 5, 2))
    x = torch.tensor(c.x).to(memory_format=torch.channels_last)
    y = batch_norm(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = torch.nn.functional.batch_norm(torch.tensor(c.x), None, None, training=True)
    assert_close(y.numpy(), expected.numpy(), "y")


# -- the modules ---------------------------------------------------------------------------
MODULES = [
    (BatchNorm1d, torch.nn.BatchNorm1d, (8, 4)),
    (BatchNorm1d, torch.nn.BatchNorm1d, (8, 4, 5)),
    (BatchNorm2d, torch.nn.BatchNorm2d, (8, 4, 5, 3)),
    (BatchNorm3d, torch.nn.BatchNorm3d, (8, 4, 3, 2, 2)),
]


def run_both(ours, theirs, shape, steps: int = 3):
    rng = np.random.default_rng(0)
    for module in (ours, theirs):
        module.double()
    with torch.no_grad():
        if theirs.affine:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for step in range(steps + 1):
        training = step < steps
        ours.train(training)
        theirs.train(training)
        x = rng.standard_normal(shape) * 2 + 1
        xs = [torch.tensor(x, requires_grad=True) for _ in range(2)]
        ys = [ours(xs[0]), theirs(xs[1])]
        dy = torch.tensor(rng.standard_normal(shape))
        for y in ys:
            y.backward(dy)
        assert_close(ys[0].detach().numpy(), ys[1].detach().numpy(), f"y, step {step}")
        assert_close(xs[0].grad.numpy(), xs[1].grad.numpy(), f"dx, step {step}")
        if theirs.affine:
            assert_close(ours.weight.grad.numpy(), theirs.weight.grad.numpy(), "dweight")
            assert_close(ours.bias.grad.numpy(), theirs.bias.grad.numpy(), "dbias")
            ours.zero_grad()
            theirs.zero_grad()
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    for key in reference:
        assert mine[key].dtype == reference[key].dtype, key
        assert torch.equal(mine[key], reference[key]) or (
            np.testing.assert_allclose(mine[key], reference[key], rtol=1e-10, atol=1e-10) is None
        ), key


@pytest.mark.parametrize("ours,theirs,shape", MODULES, ids=["1d-NC", "1d-NCL", "2d", "3d"])
def test_modules_match_torch_nn_in_train_and_eval(ours, theirs, shape):
    run_both(ours(4, momentum=MOMENTUM), theirs(4, momentum=MOMENTUM), shape)


@pytest.mark.parametrize(
    "options",
    [
        {"momentum": None},
        {"affine": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
    ],
    ids=["cumulative", "no-affine", "no-running-stats", "neither"],
)
def test_module_options_as_pytorch_handles_them(options):
    run_both(BatchNorm2d(4, **options), torch.nn.BatchNorm2d(4, **options), (8, 4, 3, 3))


def test_state_dict_equals_torch_nn():
    ours, theirs = BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    assert isinstance(ours, torch.nn.BatchNorm2d)
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    assert all(torch.equal(mine[k], reference[k]) for k in reference)
    theirs.load_state_dict(mine)  # and the other way round


def test_float32_module_matches_torch_nn():
    ours, theirs = BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.tensor(case(np.float32, 1, (8, 4, 5, 5)).x)
    assert_close(ours(x).detach().numpy(), theirs(x).detach().numpy(), "y")
    assert_close(ours.running_var.numpy(), theirs.running_var.numpy(), "running_var")
    ours.eval()
    theirs.eval()
    assert_close(ours(x).detach().numpy(), theirs(x).detach().numpy(), "inference")


def test_errors_are_the_cores():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="more than one value per channel"):
        BatchNorm1d(3)(x)
    with pytest.raises(FloatingPointError, match="channel"):
        layer = BatchNorm1d(3)
        layer(torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 2.0]]))
    assert int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3))


def test_cuda_tensors_run_the_cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cupy = pytest.importorskip("cupy")
    assert cupy.is_available()
    c = case(np.float32, 1, (8, 4, 6, 5))
    layer, reference = BatchNorm2d(4).cuda(), torch.nn.BatchNorm2d(4).cuda()
    x = torch.tensor(c.x, device="cuda", requires_grad=True)
    y = layer(x)
    y.backward(torch.tensor(c.dy, device="cuda"))
    xr = torch.tensor(c.x, device="cuda", requires_grad=True)
    reference(xr).backward(torch.tensor(c.dy, device="cuda"))
    assert y.device == x.device
    assert_close(y.detach().cpu().numpy(), reference(xr).detach().cpu().numpy(), "y")
    assert_close(x.grad.cpu().numpy(), xr.grad.cpu().numpy(), "dx")
