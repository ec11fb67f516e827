"""Which kernel set runs one call of a `fastnorm::` op, decided inside the op body (opaque to
torch.compile, so its guards never see size buckets), per call, from the selected backend and
the call's (op, dtype, layout, size bucket):

  tensor   selected             kernel set
  any      "reference", "torch" reference (torch; "torch" reaches the ops only through direct
                                calls and SyncBatchNorm)
  CUDA     "cuda"               cuda C++ when fastnorm._C implements the op for the dtype
                                (fp32/fp16/bf16), else Triton
  CUDA     "auto"               cuda C++ only where fastnorm/_auto_table.json has a measured
                                entry saying so and fastnorm._C implements the case, else Triton
  CUDA     "triton"             Triton
  CUDA     any, no Triton       cuda C++ where it implements the case, else reference
  CPU      "triton" + TRITON_INTERPRET at import   Triton through the interpreter
  CPU/other anything else       reference

Availability (Triton importable, fastnorm._C loaded and which ops it registers) and the auto
table are read once and cached: a call costs a few attribute reads and, only with fastnorm._C
loaded under "auto", one dict lookup. Every kernel set honours the same saved-tensor contract
(fastnorm/reference.py), so a forward and its backward may run on different sets.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable

import torch
from torch import Tensor

from .. import _backend
from .. import reference as _reference
from .._layout import is_channels_last

KERNEL_SETS = ("reference", "triton", "cuda")
OPS = ("layer_norm_fwd", "layer_norm_bwd", "layer_norm_bwd_pe", "rms_norm_fwd", "rms_norm_bwd", "add_layer_norm_fwd",
       "add_layer_norm_bwd", "add_layer_norm_inplace", "group_norm_fwd", "group_norm_bwd", "group_norm_bwd_pe",
       "batch_norm_stats", "batch_norm_apply", "batch_norm_backward_reduce",
       "batch_norm_backward_elemt", "batch_norm_fwd", "batch_norm_bwd",
       "batch_norm_stats_update", "batch_norm_train_apply", "gns_sums",
       "layer_norm_2d_fwd", "layer_norm_2d_bwd", "rms_norm_2d_fwd", "rms_norm_2d_bwd")
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp64 falls back to Triton
_TABLE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "_auto_table.json")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


@functools.lru_cache(maxsize=None)
def _triton_set():
    """The Triton adapters, imported on first use (registration never imports Triton)."""
    from . import _triton

    return _triton


@functools.lru_cache(maxsize=None)
def _triton_ok() -> bool:
    return _backend._triton_base_reason() is None


@functools.lru_cache(maxsize=None)
def cuda_ops() -> frozenset[str]:
    """The ops fastnorm._C registers as torch.ops.fastnorm_C.* (empty when it is not loaded)."""
    from .. import cuda

    if cuda.unavailable_reason() is not None:
        return frozenset()
    return frozenset(op for op in OPS if hasattr(torch.ops.fastnorm_C, op))


@functools.lru_cache(maxsize=None)
def auto_table() -> dict:
    """The committed auto table (fastnorm/_auto_table.json): {"entries": {key: set}, ...}."""
    with open(_TABLE_PATH) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def _auto_ops() -> frozenset[str]:
    """The ops the auto table has any entry for (others never compute a case key)."""
    return frozenset(key.split(":", 1)[0] for key in auto_table()["entries"])


def family(op: str) -> str:
    if op.startswith(("layer_norm_2d", "rms_norm_2d")):
        return "layer_norm_2d"
    if op.startswith(("layer_norm", "rms_norm", "add_layer_norm")):
        return "layer_norm"
    return "group_norm" if op.startswith("group_norm") else "batch_norm"


def case_key(op: str, x: Tensor) -> str:
    """The auto table's key for a call: "op:dtype:layout:bucket". layout: "rows" (LayerNorm
    family), "cl"/"cf" (channels-last / channels-first (N, C, S)); bucket: the power of two at
    or above the normalized size (LayerNorm: N features; LayerNorm2d: C; GroupNorm: C*S per
    sample; BatchNorm: N*S per channel)."""
    fam = family(op)
    if fam == "layer_norm":
        layout, size = "rows", x.shape[-1]
    else:
        n, c, s = x.shape
        layout = "cl" if is_channels_last(x) else "cf"
        size = {"layer_norm_2d": c, "group_norm": c * s}.get(fam, n * s)
    bucket = 1 << max(0, int(size) - 1).bit_length()
    return f"{op}:{_DTYPE_NAMES.get(x.dtype, str(x.dtype))}:{layout}:{bucket}"


def choose(op: str, x: Tensor) -> str:
    """The kernel set ("reference", "triton" or "cuda") that runs `op` on `x` now."""
    name = _backend._current
    if name not in _backend.BACKENDS:
        name = _backend._env_backend()  # raises the FASTNORM_BACKEND error
    if name in ("reference", "torch"):
        return "reference"
    if x.is_cuda:
        cuda_ok = op in cuda_ops() and x.dtype in CUDA_DTYPES
        if cuda_ok and name == "cuda":
            return "cuda"
        if cuda_ok and name != "triton" and op in _auto_ops() and \
                auto_table()["entries"].get(case_key(op, x)) == "cuda":
            return "cuda"
        if _triton_ok():
            return "triton"
        return "cuda" if cuda_ok else "reference"
    if name == "triton" and x.device.type == "cpu" and _backend.triton_interpreted():
        return "triton"
    return "reference"


def kernel(op: str, x: Tensor) -> Callable:
    """The implementation of `op` chosen for `x` (see `choose`)."""
    name = _backend._current
    if name == "reference" or name == "torch":  # (what choose says, without its frame)
        return getattr(_reference, op)
    chosen = choose(op, x)
    if chosen == "reference":
        return getattr(_reference, op)
    if chosen == "triton":
        fn = getattr(_triton_set(), op)
        # Triton launches on the current device: make x's current when it is not (a context
        # switch only then; the C++ ops carry their own device guard). A CUDA tensor exists, so
        # CUDA is initialized: the C query, not torch.cuda.current_device()'s lazy-init check.
        if x.is_cuda and x.get_device() != torch._C._cuda_getDevice():
            return functools.partial(_on_device, fn, x.device)
        return fn
    return getattr(torch.ops.fastnorm_C, op)


def _on_device(fn: Callable, device: torch.device, *args):
    with torch.cuda.device(device):
        return fn(*args)
