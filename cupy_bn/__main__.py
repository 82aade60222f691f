"""`python -m cupy_bn ...` runs the `cupy-bn` command."""

from cupy_bn.cli import main

main()
