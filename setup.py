"""fastnorm: fast normalization layers for PyTorch.

Pure Python by default. The CUDA C++ extension (fastnorm._C, sources in csrc/) is built only when
csrc/ holds CUDA sources, a CUDA toolkit is found and the installed torch is a CUDA build;
FASTNORM_BUILD_CUDA=0 turns it off.
"""
import glob
import os
import re

from setuptools import find_packages, setup


def _cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if os.environ.get("FASTNORM_BUILD_CUDA", "1") == "0" or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    arch = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    ext = CUDAExtension("fastnorm._C", sources, include_dirs=[os.path.abspath("csrc/include")],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *arch]})
    return [ext], {"build_ext": BuildExtension}


def _version() -> str:
    """fastnorm/_version.py is the single source (read as text: setup.py must not import torch
    through the package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastnorm", "_version.py")
    with open(path) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="fastnorm",
    version=_version(),
    description="Fast normalization layers (LayerNorm, RMSNorm, ...) for PyTorch, in Triton",
    packages=find_packages(include=["fastnorm", "fastnorm.*"]),
    package_data={"fastnorm": ["py.typed"]},  # PEP 561: the package ships its type hints
    license="MIT",
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.5",
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
        "test": ["pytest", "numpy<2.4", "matplotlib", "scikit-learn", "tqdm",
                 "transformers>=4.45"],
        "bench": ["matplotlib"],
        "train": ["scikit-learn", "tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
