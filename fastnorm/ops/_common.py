"""Helpers shared by the custom-op files."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def torch_grads(fn: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]],
                needs: Sequence[bool], dy: Tensor) -> tuple[Optional[Tensor], ...]:
    """Double backward: the gradients of `fn(*inputs)` (torch's own op) for the inputs in
    `needs`, built with create_graph so they are differentiable again.

    The backward of every op calls this instead of its kernel when autograd records the backward
    itself (`torch.is_grad_enabled()` there means create_graph=True: double backward, hessians);
    a plain backward, eager or compiled, runs the kernel.
    """
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    with torch.enable_grad():
        out = fn(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(inputs, needs))


def register_fp32_autocast(op) -> None:
    """Autocast as torch's for layer_norm / rms_norm / group_norm: under CUDA autocast torch runs
    them in float32 (float16/bfloat16 inputs and parameters cast up, float64 left alone) and
    returns float32. CPU autocast leaves torch's norms alone, so fastnorm's too.
    (The cast is a separate pass over x; reading low precision and writing fp32 inside the kernel
    would save it.)"""
    torch.library.register_autocast(op, "cuda", torch.float32)
