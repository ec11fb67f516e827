"""fastnorm: fast normalization layers for PyTorch.

Pure Python by default. The CUDA C++ extension (fastnorm._C, sources in csrc/) is built only when
csrc/ holds CUDA sources, a CUDA toolkit is found and the installed torch is a CUDA build;
FASTNORM_BUILD_CUDA=0 turns it off.
"""
import glob
import os

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


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="fastnorm",
    version="0.1.0",
    description="Fast normalization layers (LayerNorm, RMSNorm, ...) for PyTorch, in Triton",
    packages=find_packages(include=["fastnorm", "fastnorm.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system=='Linux'",
        "numpy",
    ],
    extras_require={
        # numpy<2.4: Triton 3.6's CPU interpreter calls int() on 1-element arrays, which
        # numpy 2.4 rejects; the tests run the kernels through that interpreter.
        # transformers: tests/test_convert.py builds tiny Llama/Mistral/Qwen2/Gemma/T5 models
        # from configs (no download); it does not depend on torch (~170 MB, ~20 small packages).
        "test": ["pytest", "numpy<2.4", "matplotlib", "transformers>=4.45"],
        "bench": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
