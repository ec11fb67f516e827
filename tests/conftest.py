"""Test setup. Without a CUDA device the Triton kernels run on CPU tensors through Triton's
interpreter, which must be switched on before any kernel is defined, i.e. before fastnorm is
imported. On a CUDA machine the same tests run on the GPU, compiled."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastnorm  # noqa: E402
from helpers import DEVICE  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running under the Triton CPU interpreter")
    config.addinivalue_line(
        "markers", "interpreter: about Triton's CPU interpreter itself (TRITON_INTERPRET); "
        "skipped where the kernels are compiled")
    # Triton's interpreter converts 1-element arrays to ints, which numpy 1.25+ deprecates.
    config.addinivalue_line("filterwarnings",
                            "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if _INTERPRETED:
        return
    skip = pytest.mark.skip(reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1); "
                                   "the kernels are compiled on this machine")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


# Device guard. On a GPU machine a test that hands the Triton kernels CPU tensors fails (or, at
# the op layer, silently runs the reference instead), while here the interpreter takes them - so
# such a test is green on CPU and wrong on a GPU. On CPU-only machines every interpreted launch is
# therefore checked: it must come from a test that runs on the suite's device (takes the `device`
# fixture or uses a module-level DEVICE) or is marked `interpreter`.
_INTERPRETED = fastnorm._backend.triton_interpreted()
_device_aware = True


@pytest.fixture(autouse=True)
def _device_guard(request):
    global _device_aware
    _device_aware = ("device" in request.fixturenames or hasattr(request.module, "DEVICE")
                     or request.node.get_closest_marker("interpreter") is not None)
    yield
    _device_aware = True


def _install_device_guard() -> None:
    # Every Triton launch (dry runs included) goes through these two names in _common.
    from fastnorm.triton import _common

    def check(kernel, args):
        if not _device_aware and any(isinstance(a, torch.Tensor) and a.device.type == "cpu"
                                     for a in args):
            raise AssertionError(
                f"this test launches the Triton kernel {kernel.fn.__name__} on CPU tensors "
                "without running on the suite's device: on a GPU machine it fails or tests the "
                "reference instead. Create its tensors on the `device` fixture (or "
                "tests/helpers.py DEVICE), or mark it `interpreter` if it is about the "
                "interpreter itself.")

    launch, launch_with = _common.launch, _common.launch_with

    def guarded_launch(kernel, grid, *args, **meta):
        check(kernel, args)
        return launch(kernel, grid, *args, **meta)

    def guarded_launch_with(kernel, grid, args, meta, meta_key):
        check(kernel, args)
        return launch_with(kernel, grid, args, meta, meta_key)

    _common.launch, _common.launch_with = guarded_launch, guarded_launch_with


if _INTERPRETED and os.environ.get("FASTNORM_DEVICE_GUARD", "1") != "0":
    _install_device_guard()


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
