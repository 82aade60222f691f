"""Ghost (virtual) batches: batch norm with statistics over consecutive chunks of the batch.

`batch_norm(x, ..., virtual_batch=G)` (and `BatchNorm2d(C, virtual_batch=G)`) splits the batch
axis (axis 0) into consecutive chunks of `G` samples, `x[0:G]`, `x[G:2G]`, ..., and normalizes
each chunk with its own batch statistics (Hoffer et al. 2017, "Train longer, generalize
better"). Conventions:

- **The last chunk** holds the `N - (K - 1) * G` remaining samples (`K = ceil(N / G)`) and is
  normalized on its own, like any other chunk, as long as it has at least two values per
  channel (samples times spatial positions). A chunk with a single value per channel has no
  variance: `ValueError` naming `virtual_batch`, before any state changes. It is not merged
  into the previous chunk: every chunk is exactly what `batch_norm` of those samples alone
  gives, so the result depends only on `G` and on the order of the batch.
- **`G >= N`** is one chunk: plain `batch_norm`, the same call and result.
- **Running statistics** are updated once per call, from the chunks together:
  `mean = sum(n_k * mean_k) / n` (the whole batch's mean, the count-weighted mean of the chunk
  means) and the pooled within-chunk variance `sum(n_k * var_k) / (n - K)`, which is the mean
  of the chunks' unbiased variances weighted by their degrees of freedom `n_k - 1` (`n_k`
  values per channel in chunk `k`, `n` in all, `var_k` biased). With equal chunks these are
  the plain means of the chunk means and of the chunks' unbiased variances. Keras
  (`BatchNormalization(virtual_batch_size=G)`) averages the chunks' means and their *biased*
  variances with equal weights (it requires `G` to divide `N`, and its virtual batches are
  the interleaved samples `x[j::N // G]` of its reshape, not consecutive ones). The unbiased
  form keeps PyTorch's convention for the running variance; pooling within chunks, rather
  than taking the whole batch's variance, estimates the spread that training normalized
  with: on a batch whose chunks differ (sorted or grouped data) the whole-batch variance also
  counts the differences between chunks, which no chunk ever saw.
- **NaN or Inf** in a chunk: as without ghost batches, `FloatingPointError` naming the
  channels (from that chunk's forward, or later on a backend that defers its checks,
  `cupy_bn.deferred`), and the running statistics are left unchanged: the error comes
  before the update, or the update gets the pooled statistics, not finite in those channels,
  and the CUDA backend skips it on the device as it does for any non-finite batch.
- **Inference** (`training=False`) ignores `virtual_batch`: the running statistics normalize
  every sample, as without ghost batches.
- **Sync batch norm** refuses ghost batches (`ValueError`): a chunk's statistics are those of
  this process's samples alone, so there is nothing to synchronize; each process can use a
  local `BatchNorm*d(virtual_batch=G)` instead.
- **The double backward** is not available for a ghost-batch forward (`TypeError` from
  `batch_norm_double_backward`: the saved state is a `GhostSaved`).

How it maps onto the primitives: in both canonical layouts (`cupy_bn.layout`) the batch axis
is the outermost one, so chunk `k` is the row range `[k * G * r, (k + 1) * G * r)` of the
canonical array (the last chunk: up to its end), with `r` rows per sample: 1 for NCS with
channels on axis 1 and for dense `(N, C)`, the spatial positions for channels-last MC. A
row range of a C-contiguous array is a C-contiguous view: of `x`'s own memory whenever the
canonical view of `x` is (contiguous input, or channels-last memory).
Each chunk runs through `functional`'s single-batch forward (`_batch_norm`) and backward
(`_batch_norm_backward`) as an input of its own: `batch_stats` (or the fused statistics) and
`apply` per chunk, `backward_reduce` and `backward_apply` (or the fused backward) per chunk.
The chunks cannot be folded into one call over `K * C` channels: a canonical array with the
chunk index beside the channel index would need the rows of a chunk to sit between them in
memory, which is a transpose (a copy) in both layouts. The outputs (`y`, `dx`, `dresidual`)
are written chunk by chunk into one array of `x`'s shape and memory order; `dweight` and
`dbias` are the sums of the chunks' gradients (each in the parameter's dtype, added in the
accumulation dtype, rounded once more).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any

from cupy_bn import functional
from cupy_bn.arrays import array_module
from cupy_bn.backends import Backend, get_backend
from cupy_bn.dtypes import accumulation_dtype
from cupy_bn.layout import MC, View, canonical
from cupy_bn.renorm import PLAIN as RENORM_PLAIN
from cupy_bn.renorm import renorm_prior
from cupy_bn.validation import (
    check_array,
    check_channel_vector,
    check_momentum,
    type_name,
)

Array = Any

__all__ = ["GhostSaved", "check_virtual_batch", "ghost_batch_norm", "ghost_batch_norm_backward"]


def check_virtual_batch(virtual_batch: object) -> int | None:
    """`virtual_batch` as an int >= 1 (NumPy integers too, not bool), or None (off)."""
    if virtual_batch is None:
        return None
    if isinstance(virtual_batch, bool) or not isinstance(virtual_batch, Integral):
        raise TypeError(
            f"virtual_batch must be an int >= 1 or None, got {type_name(virtual_batch)}"
        )
    if virtual_batch < 1:
        raise ValueError(f"virtual_batch must be an int >= 1 or None, got {virtual_batch!r}")
    return int(virtual_batch)


@dataclass(slots=True)
class GhostSaved:
    """What a ghost-batch forward keeps for `batch_norm_backward` (read-only by convention).

    `view` is the whole input's canonical view, `chunks` the `SavedForBackward` of each
    chunk's forward (its `view` the chunk's rows of the canonical array, shaped canonically),
    `rows` the canonical row range of each chunk. `count` is the number of values per channel
    of the whole batch. `batch_statistics` is always True and `reducer` None (ghost batches
    are local), as `functional.grads_collective` and the layers read them.
    """

    view: View
    chunks: tuple[functional.SavedForBackward, ...]
    rows: tuple[tuple[int, int], ...]
    virtual_batch: int
    count: int
    backend: Backend
    residual_dtype: Any = None
    batch_statistics: bool = True
    reducer: None = None


def chunk_rows(view: View, virtual_batch: int) -> tuple[tuple[int, int], ...]:
    """The canonical row range of each chunk of `virtual_batch` samples (the last may be
    shorter). Raises `ValueError` when the batch axis is the channel axis."""
    if view.channel_axis == 0:
        raise ValueError(
            "virtual_batch splits the batch axis (axis 0), which cannot be the channel axis; "
            f"got channel_axis=0 for input shape {view.shape}"
        )
    samples = view.shape[0]
    per_sample = view.data.shape[0] // samples if samples else 0
    return tuple(
        (start * per_sample, min(start + virtual_batch, samples) * per_sample)
        for start in range(0, samples, virtual_batch)
    )


def ghost_batch_norm(
    x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis, backend,
    reducer, activation=None, residual=None, renorm=RENORM_PLAIN, *,
    virtual_batch,
) -> tuple[Array, GhostSaved | functional.SavedForBackward]:  # fmt: skip
    """`functional.batch_norm` with `virtual_batch` (module docstring); the same arguments
    (`renorm`: batch renormalization's `(renorm, rmax, dmax)`, each chunk against the running
    statistics as they were before the call).

    Returns `(y, saved)`: `saved` is a `GhostSaved` when the batch has two chunks or more, and
    the plain forward's `SavedForBackward` otherwise (inference, or `virtual_batch >= N`).
    """
    args = (x, weight, bias, running_mean, running_var, training, momentum, eps, channel_axis)
    virtual_batch = check_virtual_batch(virtual_batch)
    if reducer is not None:
        raise ValueError(
            "virtual_batch is not supported by sync batch norm: each chunk's statistics are "
            "those of this process's samples, so there is nothing to synchronize (use a local "
            "batch norm with virtual_batch on each process)"
        )
    view = canonical(check_array("x", x), channel_axis)
    if not training:
        return functional._batch_norm(*args, backend, None, activation, residual, renorm)
    rows = chunk_rows(view, virtual_batch)
    if len(rows) <= 1:
        return functional._batch_norm(*args, backend, None, activation, residual, renorm)
    _check_chunks(view, rows, virtual_batch)
    xp = array_module(x)
    be = get_backend(backend, x)
    _check_running(running_mean, running_var, view.num_channels, xp)
    momentum = check_momentum(momentum)
    prior = renorm_prior(
        renorm,
        True,
        running_mean,
        running_var,
        accumulation_dtype(view.data.dtype),
        not functional._defers_checks(be),
    )
    residual_data = None if residual is None else functional._residual_view(view, residual, xp).data

    out = xp.empty(view.data.shape, view.data.dtype)
    chunks = []
    for start, stop in rows:
        z = None if residual_data is None else residual_data[start:stop]
        y, saved = functional._batch_norm(
            view.data[start:stop], weight, bias, None, None, True, momentum, eps, 1, backend,
            None, activation, z, prior or renorm,
        )  # fmt: skip
        out[start:stop] = y
        if saved.output is not None:  # keep the ReLU's mask in the returned y, not in a copy
            saved.output = functional._like(saved.view, out[start:stop])
        chunks.append(saved)
    if running_mean is not None:
        _update_running(be, running_mean, running_var, chunks, momentum, eps)
    ghost = GhostSaved(
        view,
        tuple(chunks),
        rows,
        virtual_batch,
        view.count,
        be,
        None if residual is None else residual.dtype,
    )
    return view.restore(out), ghost


def _check_chunks(view: View, rows: tuple[tuple[int, int], ...], virtual_batch: int) -> None:
    """Every chunk needs two values per channel (the last one is the smallest)."""
    start, stop = rows[-1]
    values = (stop - start) * (1 if view.layout == MC else view.data.shape[2])
    if values < 2:
        samples = view.shape[0]
        raise ValueError(
            f"virtual_batch={virtual_batch} leaves a chunk with {values} value(s) per channel "
            f"(the last chunk of a batch of {samples}: {samples - (len(rows) - 1) * virtual_batch}"
            f" sample(s) of input shape {view.shape}); a training chunk needs two or more"
        )


def _check_running(running_mean, running_var, channels: int, xp) -> None:
    """The running statistics' checks of `functional.batch_norm`, before any chunk runs."""
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if v is not None:
            check_channel_vector(name, v, channels, xp)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")


def _update_running(be: Backend, running_mean, running_var, chunks, momentum, eps) -> None:
    """One update from all chunks (module docstring): the count-weighted mean of the chunk
    means, the pooled within-chunk variance `sum(n_k * var_k) / (n - K)`.

    A chunk's biased variance is read back from its `invstd` as `1 / invstd**2 - eps`, in
    float64 (exact to the rounding of `var + eps` in the accumulation dtype). The backend's
    `update_running` takes the biased variance of `count` values and applies
    `count / (count - 1)`; it is given `pooled * (n - 1) / n` with `count = n`.
    """
    xp = be.xp
    acc = chunks[0].mean.dtype
    n = sum(saved.count for saved in chunks)
    total = xp.zeros(chunks[0].mean.shape, "float64")
    m2 = xp.zeros_like(total)
    for saved in chunks:
        invstd = saved.invstd.astype("float64")
        var = xp.maximum(1.0 / (invstd * invstd) - eps, 0.0)
        total += saved.count * saved.mean.astype("float64")
        m2 += saved.count * var
    mean = total / n
    pooled = m2 / (n - len(chunks))
    be.update_running(
        running_mean,
        running_var,
        mean.astype(acc),
        (pooled * ((n - 1) / n)).astype(acc),
        n,
        momentum,
    )


def ghost_batch_norm_backward(dy: Array, saved: GhostSaved) -> tuple[Array | None, ...]:
    """`(dx, dweight, dbias)` (and `dresidual` after a forward with a residual) of a ghost-batch
    forward: each chunk's backward with its own statistics, on its rows of `dy`."""
    view = saved.view
    dyv = view.match(check_array("dy", dy), "dy")
    xp = saved.backend.xp
    dx = xp.empty(view.data.shape, dyv.data.dtype)
    dresidual = None
    if saved.residual_dtype is not None:
        dresidual = xp.empty(view.data.shape, saved.residual_dtype)
    sums: list[Array | None] = [None, None]
    for chunk, (start, stop) in zip(saved.chunks, saved.rows, strict=True):
        grads = functional._batch_norm_backward(dyv.data[start:stop], chunk)
        dx[start:stop] = grads[0]
        if dresidual is not None:
            dresidual[start:stop] = grads[3]
        for i, g in enumerate(grads[1:3]):
            if g is not None:
                g = g.astype(accumulation_dtype(g.dtype))
                sums[i] = g if sums[i] is None else sums[i] + g
    first = saved.chunks[0]
    dweight = None if sums[0] is None else sums[0].astype(first.weight.dtype)
    dbias = None if sums[1] is None else sums[1].astype(first.bias_dtype)
    grads = (view.restore(dx), dweight, dbias)
    return grads if dresidual is None else (*grads, view.restore(dresidual))
