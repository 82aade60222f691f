"""ElementwiseKernel snippets: per-channel updates that are one line of C each.

CuPy's `ElementwiseKernel` and the simulator's take the same four strings, so a spec compiles
for either target through `cupy_bn.kernels.loader`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ElementwiseSpec:
    """The arguments of `ElementwiseKernel(in_params, out_params, operation, name, preamble)`."""

    in_params: str
    out_params: str
    operation: str
    name: str
    preamble: str = ""


#: Running statistics in place (PyTorch's convention: `momentum` weights the new batch; the
#: variance entering the average is the unbiased one, `var * unbias` with
#: `unbias = count / (count - 1)`). Computed in double, rounded once to the running dtype T
#: (float32 or float64). `skip` is a one-element array, nonzero when some channel's statistics
#: are not finite: then no channel changes (`NONFINITE_CHANNELS` and its `any()`), so the host
#: need not read the check back first. One launch, no tensor passes.
UPDATE_RUNNING = ElementwiseSpec(
    in_params="T mean, T var, float64 momentum, float64 unbias, raw bool skip",
    out_params="T running_mean, T running_var",
    operation=(
        "if (!skip[0]) {\n"
        "  running_mean = (T)((1.0 - momentum) * (double)running_mean"
        " + momentum * (double)mean);\n"
        "  running_var = (T)((1.0 - momentum) * (double)running_var"
        " + momentum * ((double)var * unbias));\n"
        "}"
    ),
    name="cupy_bn_update_running",
)

#: 1 for each channel whose mean or variance is NaN or Inf, else 0 (the statistics check
#: that runs on the device: `cupy_bn.deferred`).
NONFINITE_CHANNELS = ElementwiseSpec(
    in_params="T mean, T var",
    out_params="uint8 bad",
    operation="bad = !(isfinite(mean) && isfinite(var));",
    name="cupy_bn_nonfinite_channels",
)

ALL = (UPDATE_RUNNING, NONFINITE_CHANNELS)
