"""The CPU backend: the seven primitives in NumPy, one memory pass per tensor read or written.

Two paths, chosen by size. Small tensors (`numpy_direct.is_small`: up to 2^19 values forward,
2^15 backward, the crossovers measured by `benchmarks/crossover.py`) run as a handful of
whole-array calls on the calling thread, where a call's fixed cost is what counts. Larger ones
take the blocked path below. The training backward is also one call (`backward`, the
`FusedBackward` capability) when no all-reduce separates its two halves.

On the blocked path every primitive streams its tensors once, block by block (`tiling.py`); a
block's extra per-element passes (casting fp16/bf16 to fp32, centring) run while it is in
cache. Per-channel sums go through BLAS (`np.dot` with a vector of ones) and `np.einsum`,
several times faster than `np.sum`, and blocks' partial sums are added in float64.

Exactness when |mean| >> std. Sums of raw values lose accuracy in proportion to
`sum(x^2) / sum((x - mean)^2) = 1 + mean^2 / var`: float32 rounding in the partial sums is
amplified by that factor in the variance (the E[x^2] - E[x]^2 cancellation). So raw sums are
only kept while every channel has `|mean| <= RAW_SUMS_MAX_OFFSET` standard deviations
(`numpy_direct.raw_sums_are_exact`, the rule both paths share; the amplification is then at
most 2, and a block's float32 partials add at most a few hundred
values in sequence per accumulator). Otherwise the data are centred first: the statistics are
taken again as sums of `x - mean` (two-pass), and the gradient sums and `dx` use `x - mean`.
"""

from __future__ import annotations

import numpy as np

from cupy_bn.backends import numpy_direct as direct
from cupy_bn.backends import numpy_double_backward
from cupy_bn.backends.base import Array, DoubleBackwardCoefficients
from cupy_bn.backends.numpy_direct import raw_sums_are_exact
from cupy_bn.backends.tiling import PAGE, Plan, plan_for, store, workspace
from cupy_bn.dtypes import accumulation_dtype
from cupy_bn.layout import View

#: Outputs smaller than this are not placed by `empty_unaliased`.
UNALIASED_MIN_BYTES = 1 << 19


def empty_unaliased(like: np.ndarray, *avoid: np.ndarray) -> np.ndarray:
    """An empty C-contiguous array of `like`'s shape and dtype whose address is far, modulo a
    page, from those of `avoid`.

    Three-operand ufuncs run 2-3x slower when input and output share a page offset (4K aliasing
    in the CPU's store forwarding), so outputs start in the middle of the widest gap between
    their inputs' page offsets.
    """
    nbytes = like.nbytes
    if nbytes < UNALIASED_MIN_BYTES or not avoid:  # aliasing costs less than the search
        return np.empty(like.shape, like.dtype)
    taken = sorted({a.__array_interface__["data"][0] % PAGE for a in avoid})
    gap, start = max(
        ((later - t) % PAGE or PAGE, t)
        for t, later in zip(taken, taken[1:] + taken[:1], strict=True)
    )
    raw = np.empty(nbytes + PAGE, np.uint8)
    target = (start + gap // 2) // 64 * 64  # cache-line aligned
    offset = (target - raw.__array_interface__["data"][0]) % PAGE
    return raw[offset : offset + nbytes].view(like.dtype).reshape(like.shape)


def _in_acc(block: np.ndarray, acc: np.dtype, slot: int) -> np.ndarray:
    """The block itself when it has the accumulation dtype, else an fp32 copy in cache."""
    if block.dtype == acc:
        return block
    buf = workspace(slot, block.shape, acc)
    np.copyto(buf, block, casting="unsafe")
    return buf


def dx_coefficients(
    invstd: Array, gamma: Array, sum_dy: Array, sum_dy_xmu: Array, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(p, q, r)` of `dx = p * dy + q * (x - mean) + r` (see `Backend.backward_apply`):
    `p = gamma * invstd`, `q = -p * invstd^2 * sum_dy_xmu / count`, `r = -p * sum_dy / count`,
    in the dtype of the vectors given."""
    p = gamma * invstd
    k = p * (-1.0 / count)
    q = k * invstd
    q *= invstd
    q *= sum_dy_xmu
    return p, q, k * sum_dy


def _effective_var(invstd: Array) -> np.ndarray:
    """`var + eps` from `invstd`: the spread that sets the gradients' scale."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.square(np.asarray(invstd, np.float64))


class NumpyBackend:
    """Batch-norm primitives on NumPy arrays (see `cupy_bn.backends.base` for the contract)."""

    name = "numpy"
    xp = np

    # -- statistics -----------------------------------------------------------------------
    def batch_stats(self, x: View) -> tuple[Array, Array]:
        acc = accumulation_dtype(x.data.dtype)
        if x.count == 0:
            return np.zeros(x.num_channels, acc), np.zeros(x.num_channels, acc)
        if direct.is_small(x):
            return direct.batch_stats(x, acc)
        plan = plan_for(x)
        mean, var = self._moments(x, plan, acc, None)
        if not raw_sums_are_exact(mean, var):
            mean, var = self._moments(x, plan, acc, mean.astype(acc))
        return mean.astype(acc), var.astype(acc)

    @staticmethod
    def _moments(x: View, plan: Plan, acc: np.dtype, shift: np.ndarray | None):
        """Float64 mean and biased variance from the sums of `x - shift` (or of `x`)."""
        k = None if shift is None else plan.coefficients(acc, shift)[0]
        partials = plan.partials(acc, 2)

        def block_sums(i, block) -> None:
            a = plan.block(x.data, block)
            if k is None:
                a = _in_acc(a, acc, 0)
            else:
                centred = workspace(0, a.shape, acc)
                with np.errstate(invalid="ignore"):  # Inf - Inf: reported by the caller's check
                    np.subtract(a, k(block), out=centred)
                a = centred
            # the einsum reads the block from memory, then BLAS sums it from cache: this order
            # is the faster one. An overflowing x*x makes the caller take the centred pass.
            with np.errstate(over="ignore"):
                squares = plan.dot_sums(a, a)
            store(partials, i, plan.sums(a), squares)

        plan.run(block_sums)
        n = x.count
        offset, squares = plan.total(partials) / n  # mean - shift, mean of (x - shift)^2
        with np.errstate(invalid="ignore"):
            var = np.maximum(squares - offset * offset, 0.0)
        return (offset if shift is None else shift.astype(np.float64) + offset), var

    # -- forward apply --------------------------------------------------------------------
    def apply(self, x: View, scale: Array, shift: Array) -> Array:
        """`x * scale + shift`; one pass fewer when `shift` is all zeros (gradients in eval)."""
        if direct.is_small(x):
            return direct.apply(x, scale, shift)
        acc = accumulation_dtype(x.data.dtype)
        out = empty_unaliased(x.data, x.data)
        if x.data.size == 0:
            return out
        plan = plan_for(x, coefficients=True)
        sc, *sh = plan.coefficients(acc, scale, *([shift] if np.any(shift) else []))
        sh = sh[0] if sh else None

        def block_apply(i, block) -> None:
            a, target = plan.block(x.data, block), plan.block(out, block)
            if sh is None:
                np.multiply(a, sc(block), out=target, casting="unsafe")
                return
            work = target if target.dtype == acc else workspace(0, a.shape, acc)
            np.multiply(a, sc(block), out=work)
            np.add(work, sh(block), out=target, casting="unsafe")

        plan.run(block_apply)
        return out

    def apply_activation(
        self, x: View, scale: Array, shift: Array, residual: View | None, relu: bool
    ) -> Array:
        """`act(x * scale + shift + residual)` (`FusedActivation`): each block is summed in
        the accumulation dtype while in cache, the ReLU taken there, and rounded once."""
        if direct.is_small(x):
            return direct.apply_activation(x, scale, shift, residual, relu)
        acc = accumulation_dtype(x.data.dtype)
        operands = (x.data,) if residual is None else (x.data, residual.data)
        out = empty_unaliased(x.data, *operands)
        if x.data.size == 0:
            return out
        plan = plan_for(x, coefficients=True)
        sc, sh = plan.coefficients(acc, scale, shift)

        def block_apply(i, block) -> None:
            target = plan.block(out, block)
            work = target if target.dtype == acc else workspace(0, target.shape, acc)
            np.multiply(plan.block(x.data, block), sc(block), out=work)
            np.add(work, sh(block), out=work)
            if residual is not None:
                np.add(work, plan.block(residual.data, block), out=work)
            if relu:
                np.maximum(work, 0.0, out=work)
            if work is not target:
                np.copyto(target, work, casting="unsafe")

        plan.run(block_apply)
        return out

    def relu_gradient(self, dy: View, y: View) -> Array:
        """`dy` where `y > 0`, else zero (`FusedActivation`): one pass over `dy` and `y`."""
        if direct.is_small(dy):
            return direct.relu_gradient(dy, y)
        out = empty_unaliased(dy.data, dy.data, y.data)
        if dy.data.size == 0:
            return out
        plan = plan_for(dy)
        zero = np.zeros((), dy.data.dtype)

        def block_mask(i, block) -> None:
            positive = workspace(0, plan.block(y.data, block).shape, np.bool_)
            np.greater(plan.block(y.data, block), 0, out=positive)
            np.copyto(plan.block(out, block), zero)
            np.copyto(plan.block(out, block), plan.block(dy.data, block), where=positive)

        plan.run(block_mask)
        return out

    # -- backward -------------------------------------------------------------------------
    def backward_reduce(
        self, dy: View, x: View, mean: Array, invstd: Array | None = None
    ) -> tuple[Array, Array]:
        """`sum(dy)` and `sum(dy * (x - mean))`; `invstd` chooses how they are summed.

        With `invstd` showing every channel's `|mean|` within RAW_SUMS_MAX_OFFSET standard
        deviations, `sum(dy * (x - mean))` is taken as `sum(dy * x) - mean * sum(dy)` (exact
        there, and one subtraction per element fewer); otherwise, and without `invstd`, `x` is
        centred before the product.
        """
        acc = accumulation_dtype(x.data.dtype)
        if x.count == 0:
            return np.zeros(x.num_channels, acc), np.zeros(x.num_channels, acc)
        if direct.is_small_backward(x):
            return direct.gradient_sums(dy, direct.centred(x, np.asarray(mean, acc), acc))
        plan = plan_for(x)
        raw = invstd is not None and raw_sums_are_exact(mean, _effective_var(invstd))
        mu = None if raw else plan.coefficients(acc, mean)[0]
        partials = plan.partials(acc, 2)

        def block_reduce(i, block) -> None:
            g = _in_acc(plan.block(dy.data, block), acc, 0)
            if raw:
                a = _in_acc(plan.block(x.data, block), acc, 1)
            else:
                a = workspace(1, g.shape, acc)
                np.subtract(plan.block(x.data, block), mu(block), out=a)
            products = plan.dot_sums(g, a)
            store(partials, i, plan.sums(g), products)

        plan.run(block_reduce)
        total_dy, total_dy_x = plan.total(partials)
        if raw:
            total_dy_x -= np.asarray(mean, np.float64) * total_dy
        return total_dy.astype(acc), total_dy_x.astype(acc)

    def backward_apply(
        self,
        dy: View,
        x: View,
        mean: Array,
        invstd: Array,
        gamma: Array,
        sum_dy: Array,
        sum_dy_xmu: Array,
        count: int,
    ) -> Array:
        """`dx = p * dy + q * (x - mean) + r`, with per-channel p, q, r computed in float64.

        When raw sums are exact (see the module docstring) `q * mean` is folded into `r`,
        which saves a pass: `dx = p * dy + q * x + (r - q * mean)`.
        """
        acc = accumulation_dtype(dy.data.dtype)
        if direct.is_small_backward(x):
            vectors = (np.asarray(v, acc) for v in (invstd, gamma, sum_dy, sum_dy_xmu))
            p, q, r = dx_coefficients(*vectors, count)
            xmu = direct.centred(x, np.asarray(mean, acc), acc)
            return direct.input_gradient(dy, xmu, p, q, r)
        out = empty_unaliased(dy.data, dy.data, x.data)
        if dy.data.size == 0:
            return out
        invstd64 = np.asarray(invstd, np.float64)
        mean64 = np.asarray(mean, np.float64)
        p, q, r = dx_coefficients(
            invstd64,
            np.asarray(gamma, np.float64),
            np.asarray(sum_dy, np.float64),
            np.asarray(sum_dy_xmu, np.float64),
            count,
        )
        raw = raw_sums_are_exact(mean64, _effective_var(invstd64))
        plan = plan_for(x, coefficients=True)
        pc, qc, rc, *mu = plan.coefficients(acc, p, q, *([r - q * mean64] if raw else [r, mean]))
        mu = mu[0] if mu else None

        def block_dx(i, block) -> None:
            target = plan.block(out, block)
            xq = workspace(1, target.shape, acc)
            if raw:
                np.multiply(plan.block(x.data, block), qc(block), out=xq)
            else:
                np.subtract(plan.block(x.data, block), mu(block), out=xq)
                np.multiply(xq, qc(block), out=xq)
            work = target if target.dtype == acc else workspace(0, target.shape, acc)
            np.multiply(plan.block(dy.data, block), pc(block), out=work)
            np.add(work, xq, out=work)
            np.add(work, rc(block), out=target, casting="unsafe")

        plan.run(block_dx)
        return out

    def backward(
        self, dy: View, x: View, mean: Array, invstd: Array, gamma: Array, count: int
    ) -> tuple[Array, Array, Array]:
        """`(sum_dy, sum_dy_xmu, dx)`: `backward_reduce`, then `backward_apply` with its sums.

        A small tensor centres `x` once for both; a larger one runs the two primitives.
        """
        if x.count and direct.is_small_backward(x):  # mean, invstd and gamma come in the acc dtype
            xmu = direct.centred(x, mean, invstd.dtype)
            sum_dy, sum_dy_xmu = direct.gradient_sums(dy, xmu)
            p, q, r = dx_coefficients(invstd, gamma, sum_dy, sum_dy_xmu, count)
            return sum_dy, sum_dy_xmu, direct.input_gradient(dy, xmu, p, q, r)
        sum_dy, sum_dy_xmu = self.backward_reduce(dy, x, mean, invstd)
        dx = self.backward_apply(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xmu, count)
        return sum_dy, sum_dy_xmu, dx

    # -- double backward (whole-array NumPy: numpy_double_backward.py) ---------------------
    def double_backward_reduce(
        self, dy: View, x: View, ddx: View, mean: Array
    ) -> tuple[Array, Array, Array, Array, Array]:
        return numpy_double_backward.double_backward_reduce(dy, x, ddx, mean)

    def double_backward_apply(
        self,
        dy: View,
        x: View,
        ddx: View | None,
        mean: Array,
        coefficients: DoubleBackwardCoefficients,
    ) -> tuple[Array, Array]:
        return numpy_double_backward.double_backward_apply(dy, x, ddx, mean, coefficients)

    # -- running statistics ---------------------------------------------------------------
    def update_running(
        self,
        running_mean: Array,
        running_var: Array,
        mean: Array,
        var: Array,
        count: int,
        momentum: float,
    ) -> None:
        """In place, in the running statistics' dtype (as PyTorch does)."""
        running_mean *= 1.0 - momentum
        running_mean += mean * momentum
        running_var *= 1.0 - momentum
        running_var += var * (momentum * count / (count - 1))
