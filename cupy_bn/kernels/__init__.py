"""CUDA C sources of the batch-norm kernels, ElementwiseKernel snippets, and their loader."""

from cupy_bn.kernels.loader import (
    KERNEL_FILES,
    CupyLoader,
    DeviceSpec,
    KernelLoader,
    SimLoader,
    read_source,
)

__all__ = ["KERNEL_FILES", "CupyLoader", "DeviceSpec", "KernelLoader", "SimLoader", "read_source"]
