import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without CUDA, the Triton tests run the kernels on CPU tensors through Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def require_cpu_matmul():
    """``require_cpu_matmul(dtype)`` skips the test where this torch cannot multiply CPU
    matrices of ``dtype`` (float16 in older releases)."""
    def require(dtype):
        try:
            torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        except RuntimeError:
            pytest.skip(f"torch {torch.__version__} has no {dtype} matmul on CPU")
    return require
