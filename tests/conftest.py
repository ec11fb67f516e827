"""Test setup. Without a CUDA device the Triton kernels run on CPU tensors through Triton's
interpreter, which must be switched on before any kernel is defined, i.e. before fastnorm is
imported. On a CUDA machine the same tests run on the GPU, compiled."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastnorm  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running under the Triton CPU interpreter")
    # Triton's interpreter converts 1-element arrays to ints, which numpy 1.25+ deprecates.
    config.addinivalue_line("filterwarnings",
                            "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kernel_backends() -> list[str]:
    """The kernel sets the per-backend tests run on: on CPU the torch reference and Triton under
    the interpreter; on a GPU Triton and, when fastnorm._C is loaded, the CUDA C++ kernels."""
    if torch.cuda.is_available():
        return ["triton"] + (["cuda"] if "cuda" in fastnorm.available_backends() else [])
    return ["reference", "triton"]


@pytest.fixture(params=kernel_backends())
def backend(request):
    """Run the test body once per kernel set (kernel_backends), selected for fastnorm's ops."""
    with fastnorm.use_backend(request.param):
        yield request.param


@pytest.fixture
def triton_backend():
    """Run the test body with fastnorm's Triton kernels forced (the interpreter on CPU)."""
    with fastnorm.use_backend("triton"):
        yield
