"""The GPU case set of `cupy-bn bench`, runnable from a checkout without installing.

    python benchmarks/gpu.py [bench options]   # = cupy-bn bench --suite gpu [bench options]

ResNet-50's nine batch-norm inputs (batch 256) in NCHW and NHWC memory, float16, bfloat16 and
float32, the L2 cache flushed before every timed call: the CUDA backend through the functional
API (`cupy_bn.cuda`) and as bare primitive launches (`cupy_bn.cuda.kernels`), against a naive
CuPy composition (`cupy.naive`), PyTorch's native CUDA kernels (`torch.cuda`) and cuDNN
(`torch.cuda.cudnn`, what `F.batch_norm` runs). GB/s divide
`cupy_bn.traffic`'s minimal traffic for every implementation, "moved" GB/s the traffic the
kernels make; % bw relates both to the device's peak. Options, output and exit codes are those
of `cupy-bn bench` (docs/cli.md); without a usable GPU it exits 2 with one line on stderr.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's cupy_bn first

from cupy_bn.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["bench", "--suite", "gpu", *sys.argv[1:]], prog_name="benchmarks/gpu.py")
