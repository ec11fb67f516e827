"""Loader for the compiled CUDA C++ extension `fastnorm._C`.

The extension is built by setup.py only when a CUDA toolkit and a CUDA build of torch are present
(FASTNORM_BUILD_CUDA=0 turns it off). No kernel is compiled into it yet: the CUDA C++ kernels come
with a later issue, so this backend reports itself unavailable and says why.
"""
from __future__ import annotations

import importlib


def unavailable_reason() -> str | None:
    """Why the 'cuda' backend cannot run here, or None when it can."""
    try:
        importlib.import_module("fastnorm._C")
    except ImportError as exc:
        return ("the CUDA C++ extension fastnorm._C is not built (it needs a CUDA toolkit and a "
                f"CUDA build of torch at install time): {exc}")
    return ("the CUDA C++ kernels are not implemented yet; use backend 'triton' or 'auto'")
