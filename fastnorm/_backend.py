"""Backend selection: which implementation runs a normalization op.

Names:
  "auto"      (default) fastnorm's ops for CUDA tensors, whose router runs Triton, or the CUDA
              C++ kernels where the committed auto table measured them faster; torch's own ops
              otherwise, so CPU users never get slower (a CPU tensor goes to torch first).
  "triton"    fastnorm's Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1).
  "cuda"      fastnorm's CUDA C++ kernels (fastnorm._C; fp64 and ops it lacks run Triton).
  "reference" fastnorm's ops with the torch reference kernels (fastnorm/reference.py), on any
              device: the op layer (checks, autograd, saved statistics) without Triton or C++.
  "torch"     torch's own ops (torch.nn.functional).

Chosen with `set_backend`, the `use_backend` context manager, or the FASTNORM_BACKEND
environment variable (read at import; a bad value raises at the first op, not at import).

Whatever the selection, a call whose inputs carry a forward-mode tangent or are wrapped by a
torch.func transform (vmap, grad, jvp, jacrev, jacfwd, hessian) runs torch's own op: torch's
derivative and batching rules then apply exactly.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator, Optional

import torch
import torch.autograd.forward_ad as _fwAD
from torch import Tensor

BACKENDS = ("auto", "triton", "cuda", "reference", "torch")

_peek_transform = torch._C._functorch.peek_interpreter_stack  # None outside torch.func transforms

def _interpret_env() -> bool:
    """TRITON_INTERPRET as Triton itself reads it: its knobs where they exist (Triton >= 3.4:
    "1", "true", "on", "yes", "y", any case), else the older releases' rule, exactly "1" (Triton
    3.3's JITFunction; with "true" it compiles, so fastnorm must not assume the interpreter)."""
    try:
        from triton import knobs
    except ImportError:  # no triton, or a release before triton.knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


# Triton picks interpreter or compiler when a kernel is *defined* (fastnorm's import), so that
# moment's value is the one that counts; a later change is reported, not silently ignored.
_INTERPRETED_AT_IMPORT = _interpret_env()


def triton_interpreted() -> bool:
    """True when fastnorm's Triton kernels run through the CPU interpreter (TRITON_INTERPRET
    set, the way Triton reads it, when fastnorm was imported)."""
    return _INTERPRETED_AT_IMPORT


def _interpret_changed() -> Optional[str]:
    now = _interpret_env()
    if now == _INTERPRETED_AT_IMPORT:
        return None
    return (f"TRITON_INTERPRET changed after fastnorm was imported (interpreter "
            f"{'on' if _INTERPRETED_AT_IMPORT else 'off'} at import, "
            f"{'on' if now else 'off'} now): Triton reads it when the kernels are defined, so set "
            "it before importing fastnorm")


@functools.lru_cache(maxsize=None)
def _triton_base_reason() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the 'triton' package is not installed (pip install triton)"
    if not (torch.cuda.is_available() or _INTERPRETED_AT_IMPORT):
        return ("no CUDA device is available; set TRITON_INTERPRET=1 before importing fastnorm "
                "to run the Triton kernels on the CPU through the interpreter (slow, for tests)")
    return None


def _triton_unavailable_reason() -> Optional[str]:
    reason = _triton_base_reason()
    if reason is not None and not torch.cuda.is_available():
        changed = _interpret_changed()
        if changed is not None:
            reason = f"{reason}; {changed}"
    return reason


@functools.lru_cache(maxsize=None)
def _cuda_unavailable_reason() -> Optional[str]:
    from . import cuda

    return cuda.unavailable_reason()


def _unavailable_reason(name: str) -> Optional[str]:
    if name == "triton":
        return _triton_unavailable_reason()
    if name == "cuda":
        return _cuda_unavailable_reason()
    return None


def available_backends() -> list[str]:
    """Concrete backends usable in this process, fastest first ("reference" and "torch" are
    always there)."""
    return [name for name in ("cuda", "triton", "reference", "torch")
            if _unavailable_reason(name) is None]


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastnorm: unknown backend {name!r}; expected one of {BACKENDS}")
    reason = _unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"fastnorm: backend {name!r} is not available: {reason}")
    return name


def _env_backend() -> str:
    value = os.environ.get("FASTNORM_BACKEND") or "auto"
    if value not in BACKENDS:
        raise ValueError(f"fastnorm: FASTNORM_BACKEND={value!r} is not one of {BACKENDS}; fix "
                         "or unset the environment variable")
    return value


# The FASTNORM_BACKEND value is validated at the first op (or get_backend), so a bad value never
# breaks `import fastnorm`.
_current = os.environ.get("FASTNORM_BACKEND") or "auto"


def set_backend(name: str) -> None:
    """Select the backend for every later fastnorm call in this process."""
    global _current
    _current = _check_name(name)


def get_backend() -> str:
    """The backend name currently selected (may be "auto")."""
    return _current if _current in BACKENDS else _env_backend()


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


def torch_selected(x: object) -> bool:
    """The cheap first test of every fastnorm op: True when torch's own op runs the call because
    "torch" is selected or "auto" got a non-CUDA input. Validation, `transformed` and `resolve`
    come only after a False."""
    name = _current
    if name == "auto":
        try:
            return not x.is_cuda  # (is_cuda: the cheapest device test, ~10x faster than .device)
        except AttributeError:  # not a tensor: torch's op raises its own error
            return True
    if name == "torch":
        return True
    if name not in BACKENDS:
        _env_backend()  # raises the FASTNORM_BACKEND error
    return False


def transformed(*tensors: object) -> bool:
    """Does any input carry a forward-mode tangent or a torch.func wrapper (vmap, grad, jvp,
    jacrev, jacfwd, hessian)? The kernels have no jvp or batching rule, so such calls go to
    torch's ops. Under torch.compile these checks are skipped (Dynamo traces the transforms)."""
    if _fwAD._current_level < 0 and _peek_transform() is None:
        return False  # the common case, in ~50 ns: no dual level, no torch.func transform active
    if torch.compiler.is_compiling():
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for t in tensors:
        if isinstance(t, Tensor) and is_wrapped(t):
            return True
    if _fwAD._current_level >= 0:  # inside a forward_ad.dual_level()
        for t in tensors:
            if isinstance(t, Tensor) and _fwAD.unpack_dual(t).tangent is not None:
                return True
    return False


def resolve(x: Tensor, op: str) -> str:
    """What runs `op` (a functional name: "layer_norm", ...) on tensor `x` now: "torch" (torch's
    own op, the functional layer calls it) or the kernel set fastnorm's ops start from
    ("triton", "cuda" or "reference"; under "auto" and "cuda" the ops' router may still pick
    per call, see fastnorm/ops/_router.py). Raises when the selection cannot run on `x`.
    Only cached availability is read: nothing is probed per call."""
    name = _current
    if name not in BACKENDS:
        name = _env_backend()
    if name == "auto":
        if x.device.type == "cuda":
            if _triton_base_reason() is None:
                return "triton"
            if _cuda_unavailable_reason() is None:
                return "cuda"
        return "torch"
    if name in ("torch", "reference"):
        return name
    if name == "triton" and x.device.type != "cuda":
        # (Not under torch.compile: the environment is read by Triton's C++, opaque to Dynamo.)
        changed = (_interpret_changed() if x.device.type == "cpu"
                   and not torch.compiler.is_compiling() else None)
        if changed is not None or not (x.device.type == "cpu" and triton_interpreted()):
            hint = changed + "." if changed is not None else (
                "Use backend 'auto' or 'torch' for CPU tensors, or set TRITON_INTERPRET=1 before "
                "importing fastnorm to run the kernels on the CPU through the interpreter.")
            raise RuntimeError(f"fastnorm: backend 'triton' runs on CUDA tensors, but {op} got a "
                               f"tensor on {x.device}. {hint}")
    if name == "cuda":
        _check_name("cuda")
        if x.device.type != "cuda":
            raise RuntimeError(f"fastnorm: backend 'cuda' runs on CUDA tensors, but {op} got a "
                               f"tensor on {x.device}; use 'auto' or 'torch' for it")
    return name
