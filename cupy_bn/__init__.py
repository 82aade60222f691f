"""cupy_bn: fast, exact batch normalization for array code (NumPy on the CPU, CuPy on the GPU)."""

__version__ = "0.1.0"
