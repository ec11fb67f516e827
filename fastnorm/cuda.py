"""The "cuda" backend's slot: fastnorm has no CUDA C++ kernels yet.

setup.py builds an extension `fastnorm._C` only when csrc/ holds CUDA sources (it holds none
today), so this backend always reports itself unavailable and says so plainly; the Triton
kernels ("auto" or "triton") are what runs on CUDA tensors.
"""
from __future__ import annotations

from typing import Optional


def unavailable_reason() -> Optional[str]:
    """Why the 'cuda' backend cannot run here, or None when it can."""
    return ("fastnorm has no CUDA C++ kernels yet (there is nothing to build or install); use "
            "backend 'auto' or 'triton' for CUDA tensors")
