"""cupy_bn: fast, exact batch normalization for array code (NumPy on the CPU, CuPy on the GPU).

    import cupy_bn as cbn
    bn = cbn.BatchNorm2d(64)
    y = bn(x); dx = bn.backward(dy)
    bn = cbn.BatchNorm2d(64, renorm=True)  # batch renormalization; set bn.rmax, bn.dmax per step
    y, saved = cbn.batch_norm(x, weight, bias, running_mean, running_var, training=True)
    y, saved = cbn.batch_norm(x, weight, bias, virtual_batch=32)  # ghost batches of 32 samples
    dx, dweight, dbias = cbn.batch_norm_backward(dy, saved)
    gx, gweight, gdy = cbn.batch_norm_double_backward(ddx, ddweight, ddbias, dy, saved)

Momentum follows PyTorch: the weight of the new batch in the running averages.
"""

from cupy_bn.backends import Backend, available_backends, get_backend
from cupy_bn.deferred import check_errors, set_deferred_checks
from cupy_bn.distributed import (
    RemoteFailure,
    SyncBatchNorm,
    convert_sync_batchnorm,
    sync_batch_norm,
)
from cupy_bn.double_backward import batch_norm_double_backward
from cupy_bn.fold import FoldError, fold_conv_bn, fold_linear_bn, fold_state_dict
from cupy_bn.functional import SavedForBackward, batch_norm, batch_norm_backward
from cupy_bn.ghost import GhostSaved
from cupy_bn.gradient_check import gradcheck
from cupy_bn.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FoldError",
    "GhostSaved",
    "RemoteFailure",
    "SavedForBackward",
    "SyncBatchNorm",
    "__version__",
    "available_backends",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_double_backward",
    "check_errors",
    "convert_sync_batchnorm",
    "fold_conv_bn",
    "fold_linear_bn",
    "fold_state_dict",
    "get_backend",
    "gradcheck",
    "set_deferred_checks",
    "sync_batch_norm",
]
