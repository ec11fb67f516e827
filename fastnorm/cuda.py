"""The "cuda" backend: fastnorm._C, the CUDA C++ kernels (csrc/) registered as private ops
`torch.ops.fastnorm_C.*` with the public ops' schemas. Loaded lazily, once, by the first
availability check; when it cannot be used, `unavailable_reason()` says why.

setup.py builds fastnorm._C only when csrc/ops.cpp exists, a CUDA toolkit is found and torch is
a CUDA build; without it the router runs Triton on every CUDA tensor.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why the 'cuda' backend cannot run here, or None when it can (cached: probed once)."""
    try:
        importlib.import_module("fastnorm._C")
    except ImportError as exc:
        return (f"the CUDA C++ extension fastnorm._C is not built or cannot be loaded ({exc}); "
                "it is built at install time when a CUDA toolkit and a CUDA build of torch are "
                "present (FASTNORM_BUILD_CUDA=0 turns it off); use backend 'auto' or 'triton'")
    if not torch.cuda.is_available():
        return "fastnorm._C is built but no CUDA device is available"
    if not hasattr(torch.ops, "fastnorm_C") or not hasattr(torch.ops.fastnorm_C,
                                                           "layer_norm_fwd"):
        return "fastnorm._C loaded but registered no torch.ops.fastnorm_C ops"
    _register_fakes()
    return None


def _register_fakes() -> None:
    """Fake (meta) kernels for the private ops: each is the public op's, whose schema the
    private op shares (tests/test_cuda_binding.py checks), so a private op met under fake
    tensors (torch.compile's tracing, opcheck) gets the public op's shapes, dtypes and argument
    checks."""
    import importlib

    from .ops import _router

    for op in _router.OPS:
        if not hasattr(torch.ops.fastnorm_C, op):
            continue
        public = getattr(importlib.import_module(f"fastnorm.ops.{_router.family(op)}"), op)
        torch.library.register_fake(f"fastnorm_C::{op}", public._abstract_fn)
