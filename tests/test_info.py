"""`cupy-bn --version` and `cupy-bn info`."""

import numpy as np
from click.testing import CliRunner

import cupy_bn
from cupy_bn.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert cupy_bn.__version__ in result.output


def test_info_reports_versions_and_backends():
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert cupy_bn.__version__ in result.output
    assert np.__version__ in result.output
    assert "numpy" in result.output and "cupy" in result.output
