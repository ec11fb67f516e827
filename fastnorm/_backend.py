"""Backend selection: which implementation runs a normalization op.

Names:
  "auto"   (default) fastest available GPU kernel for CUDA tensors; torch's own ops otherwise,
           so CPU users never get slower.
  "triton" fastnorm's Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
  "cuda"   fastnorm's CUDA C++ extension (fastnorm._C), when it was built.
  "torch"  torch's own ops (torch.nn.functional).

Chosen with `set_backend`, the `use_backend` context manager, or the FASTNORM_BACKEND
environment variable (read at import).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")

_current = "auto"


def triton_interpreted() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install triton)"
    if not (torch.cuda.is_available() or triton_interpreted()):
        return ("no CUDA device is available; set TRITON_INTERPRET=1 before importing fastnorm "
                "to run the Triton kernels on the CPU through the interpreter (slow, for tests)")
    return None


def _cuda_unavailable_reason() -> str | None:
    from . import cuda  # lazily loads fastnorm._C

    return cuda.unavailable_reason()


def _unavailable_reason(name: str) -> str | None:
    if name == "triton":
        return _triton_unavailable_reason()
    if name == "cuda":
        return _cuda_unavailable_reason()
    return None


def available_backends() -> list[str]:
    """Concrete backends usable in this process, fastest first ("torch" is always there)."""
    return [name for name in ("cuda", "triton", "torch") if _unavailable_reason(name) is None]


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastnorm: unknown backend {name!r}; expected one of {BACKENDS}")
    reason = _unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"fastnorm: backend {name!r} is not available: {reason}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every later fastnorm call in this process."""
    global _current
    _current = _check_name(name)


def get_backend() -> str:
    """The backend name currently selected (may be "auto")."""
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed fastnorm calls with backend `name`."""
    global _current
    previous = _current
    _current = _check_name(name)
    try:
        yield
    finally:
        _current = previous


def resolve(x: torch.Tensor, op: str, supported: tuple[str, ...] = ("triton", "torch")) -> str:
    """The concrete backend that runs `op` on tensor `x` under the current selection.

    `supported` lists the backends that implement `op` (a later issue adds "cuda" per op).
    """
    name = _current
    if name == "auto":
        if x.device.type == "cuda":
            for candidate in ("cuda", "triton"):
                if candidate in supported and _unavailable_reason(candidate) is None:
                    return candidate
        return "torch"
    if name not in supported:
        raise RuntimeError(f"fastnorm: backend {name!r} does not implement {op} yet; "
                           f"supported: {supported}")
    if name == "triton" and x.device.type != "cuda" and not (x.device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"fastnorm: backend 'triton' runs on CUDA tensors, but {op} got a tensor on "
            f"{x.device}. Use backend 'auto' or 'torch' for CPU tensors, or set TRITON_INTERPRET=1 "
            "before importing fastnorm to run the kernels on the CPU through the interpreter.")
    if name == "cuda" and x.device.type != "cuda":
        raise RuntimeError(f"fastnorm: backend 'cuda' runs on CUDA tensors, but {op} got a tensor "
                           f"on {x.device}")
    return name


_env = os.environ.get("FASTNORM_BACKEND")
if _env:
    if _env not in BACKENDS:
        raise ValueError(f"fastnorm: FASTNORM_BACKEND={_env!r} is not one of {BACKENDS}")
    _current = _env  # availability is checked when an op runs, so importing never fails on it
