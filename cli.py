"""Run the `cupy-bn` command from a checkout: `python cli.py info`."""

from cupy_bn.cli import main

if __name__ == "__main__":
    main()
