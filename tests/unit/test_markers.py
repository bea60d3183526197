"""The suite's markers: `gpu` tests run only where CUDA is available (tests/conftest.py skips them elsewhere)."""

import pytest
import torch


@pytest.mark.gpu
def test_gpu_marked_tests_run_only_where_cuda_is_available():
    # Fails on a machine without CUDA unless the conftest hook skipped it.
    assert torch.cuda.is_available()
