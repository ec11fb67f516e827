"""fastnorm: fast normalization layers for PyTorch.

Pure Python by default. The CUDA C++ extension (fastnorm._C: csrc/ops.cpp, the torch-facing
binding, plus the torch-free kernels csrc/*.cu) is built only when csrc/ops.cpp exists, a CUDA
toolkit is found and the installed torch is a CUDA build. Target GPUs come from
TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when unset); FASTNORM_BUILD_CUDA=0 turns the build off.
Without the extension the install still succeeds and the Triton backend serves every op.
"""
import glob
import os
import re

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_extensions():
    if os.environ.get("FASTNORM_BUILD_CUDA", "1") == "0":
        return [], {}
    # The kernels have no Python entry point until the binding exists (it lands with the op-set
    # refactor of issue 9); building them without it would only cost install time.
    if not os.path.exists(os.path.join(_HERE, "csrc", "ops.cpp")):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    # torch turns TORCH_CUDA_ARCH_LIST into -gencode flags; explicit -gencode flags here would make
    # it ignore the variable. sm_90 also gets the thread-block-cluster LayerNorm path.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources = ["csrc/ops.cpp"] + sorted(
        os.path.relpath(p, _HERE) for p in glob.glob(os.path.join(_HERE, "csrc", "*.cu")))
    ext = CUDAExtension("fastnorm._C", sources,
                        include_dirs=[os.path.join(_HERE, "csrc", "include")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


def _version(name: str = "__version__") -> str:
    """fastnorm/_version.py is the single source of the version and of the oldest supported
    torch (read as text: setup.py must not import torch through the package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastnorm", "_version.py")
    with open(path) as f:
        return re.search(rf'^{name} = "([^"]+)"', f.read(), re.M).group(1)


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="fastnorm",
    version=_version(),
    description=("Fast normalization layers (LayerNorm, RMSNorm, GroupNorm, BatchNorm) for "
                 "PyTorch, in Triton and CUDA C++"),
    packages=find_packages(include=["fastnorm", "fastnorm.*"]),
    # py.typed: PEP 561, the package ships its type hints; _auto_table.json: the "auto" router table.
    package_data={"fastnorm": ["py.typed", "_auto_table.json"]},
    license="MIT",
    python_requires=">=3.9",
    install_requires=[
        f"torch>={_version('MIN_TORCH')}",
        "triton>=3.1; platform_system=='Linux'",
        "numpy",
    ],
    extras_require={
        # numpy<2.4: Triton 3.6's CPU interpreter calls int() on 1-element arrays, which
        # numpy 2.4 rejects; the tests run the kernels through that interpreter.
        # scikit-learn/tqdm/matplotlib: the trainer's embedded dataset, progress bar and
        # plots; the test suite runs the trainer.
        # transformers: tests/test_convert.py builds tiny Llama/Mistral/Qwen2/Gemma/T5 models
        # from configs (no download); it does not depend on torch (~170 MB, ~20 small packages).
        # pytest-xdist: `make test` spreads the suite over the cores (-n auto, at most 4).
        # expecttest: imported by torch.testing._internal, whose OpInfo samples
        # tests/test_opinfo.py runs (PyTorch's own test helper, pure Python).
        "test": ["pytest", "pytest-xdist", "expecttest", "numpy<2.4", "matplotlib",
                 "scikit-learn", "tqdm", "transformers>=4.45"],
        "bench": ["matplotlib"],
        "train": ["scikit-learn", "tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
