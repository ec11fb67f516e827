"""`fastnorm.explain(x, op)`: which backend an op would run on a tensor, and why."""
from __future__ import annotations

from typing import Union

from torch import Tensor

from . import _backend

OPS = ("layer_norm", "rms_norm", "group_norm", "batch_norm", "layer_norm_2d", "rms_norm_2d")


def explain(x: Tensor, op: str = "layer_norm") -> dict[str, Union[str, dict[str, str]]]:
    """What `fastnorm.<op>` would run on `x` under the current backend selection.

    Returns a dict: "op", "selected" (the selection, e.g. "auto"), "backend" (the concrete one:
    "triton", "cuda", "torch", or "error"), "reason" (one sentence) and "unavailable" (each
    backend that cannot run here -> why). Nothing runs: it only asks the selection logic.
    Example: `fastnorm.explain(torch.randn(4, 8))["backend"]` is "torch" on a CPU tensor."""
    if op not in OPS:
        raise ValueError(f"fastnorm.explain: unknown op {op!r}; expected one of {OPS}")
    if not isinstance(x, Tensor):
        raise TypeError(f"fastnorm.explain: expected a Tensor, got {type(x).__name__}")
    selected = _backend.get_backend()
    unavailable = {name: reason for name in ("cuda", "triton")
                   if (reason := _backend._unavailable_reason(name)) is not None}
    try:
        backend = _backend.resolve(x, op)
    except (RuntimeError, ValueError) as exc:
        return {"op": op, "selected": selected, "backend": "error", "reason": str(exc),
                "unavailable": unavailable}
    if selected != "auto":
        reason = f"backend {selected!r} was selected (set_backend / use_backend / FASTNORM_BACKEND)"
    elif backend == "torch" and x.device.type != "cuda":
        reason = (f"'auto' runs torch's own op for tensors on {x.device.type}: fastnorm's kernels "
                  "target CUDA devices")
    elif backend == "torch":
        reason = "'auto' found no fastnorm GPU backend available: " + \
            "; ".join(f"{k}: {v}" for k, v in unavailable.items())
    else:
        reason = f"'auto' picks the fastest available GPU backend for a CUDA tensor: {backend!r}"
    return {"op": op, "selected": selected, "backend": backend, "reason": reason,
            "unavailable": unavailable}
