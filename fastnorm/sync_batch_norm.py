"""SyncBatchNorm: BatchNorm statistics over the whole batch of a process group, with one
collective per direction and no host-device synchronization. Every step is a `fastnorm::` op
(its implementation called directly in eager mode, as everywhere: fastnorm/ops/_common.py), so
it runs whichever kernels the ops' router picks (Triton or CUDA C++ on CUDA tensors, the
torch reference on CPU tensors, interpreted Triton when "triton" is selected there).

Forward (training):
  1. local per-channel (mean, biased var) over this rank's batch (`fastnorm::batch_norm_stats`);
  2. ONE all_reduce of a packed fp64 tensor [count, sum x (C), sum x^2 (C)], 2C+1 values;
  3. global mean = sum x / count, var = sum x^2 / count - mean^2; the running statistics are
     updated from them on the device, so every rank ends with identical running stats (all ranks
     receive the same reduced tensor and apply the same ops);
  4. normalize + affine (+ReLU) with the global statistics (`fastnorm::batch_norm_apply`).
Backward:
  1. local per-channel (sum g, sum g*x_hat), g = dy after the ReLU mask
     (`fastnorm::batch_norm_backward_reduce`);
  2. ONE all_reduce of the packed 2C sums;
  3. dx from the global sums and the global count, which stays a device tensor
     (`fastnorm::batch_norm_backward_elemt`).
dweight / dbias are this rank's sums, as in torch's SyncBatchNorm: the data-parallel wrapper
all-reduces parameter gradients.

Why fp64 plain sums: summing x and x^2 makes the merge a single all_reduce, and in fp64 the
cancellation in E[x^2] - mean^2 costs about 2^-52 * (mean/std)^2 relative to var, 1e-8 at
mean 1e4 / std 1. The local statistics come from the shifted-sum kernels, accurate in fp32.

A rank with an empty batch joins both collectives with zero count and zero sums, so uneven and
empty batches need no special protocol and cannot deadlock. Group sizes, counts and the packing
depend only on shapes, never on tensor values, so the step is free of host syncs.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import _backend
from . import ops as _ops  # noqa: F401  (registers the fastnorm:: ops)
from ._dtypes import stats_dtype
from ._layout import channel_view
from .ops import batch_norm as _bn_ops
from .ops._common import eager
from .functional import _check_batch_norm_args, _flat, _update_running_stats

_fastnorm = torch.ops.fastnorm

__all__ = ["sync_batch_norm", "sync_group", "check_backend_device"]


def sync_group(process_group: Optional[Any] = None) -> Optional[Any]:
    """The group to synchronize statistics over, or None when no communication is needed:
    torch.distributed unavailable or not initialized, or a group of one (or this rank is not in
    the group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def check_backend_device(input: Tensor, backend: str) -> None:
    """NCCL communicates CUDA tensors only: fail early and clearly rather than inside NCCL."""
    if str(backend).lower() == "nccl" and input.device.type != "cuda":
        raise ValueError(f"SyncBatchNorm: the process group uses the NCCL backend, which needs "
                         f"CUDA tensors, but the input is on {input.device}; move the model to "
                         "the GPU or use a gloo process group for CPU tensors")



def _op(name: str, x: Tensor):
    """fastnorm::<name> for a call on x (canonical): its implementation when the call may skip
    the dispatcher (see fastnorm/ops/_common.py, `eager`), else the registered op."""
    return getattr(_bn_ops, "_" + name) if eager((x,)) else getattr(_fastnorm, name)


def _global_stats(x: Tensor, group: Optional[Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, biased var, count) over the group's whole batch, in fp64; ONE all_reduce (none
    for group=None)."""
    mean, var = _op("batch_norm_stats", x)(x)
    n = x.shape[0] * x.shape[2]
    mean64, var64 = mean.double(), var.double()
    count = torch.full((1,), n, dtype=torch.float64, device=x.device)
    packed = torch.cat([count, mean64 * n, (var64 + mean64 * mean64) * n])
    if group is not None:
        dist.all_reduce(packed, group=group)
    c = mean.numel()
    total = packed[:1]
    global_mean = packed[1:c + 1] / total
    global_var = (packed[c + 1:] / total - global_mean * global_mean).clamp_min(0.0)
    return global_mean, global_var, total


class _SyncBatchNormFunction(torch.autograd.Function):
    """x is the (N, C, S) view; the collectives run inside forward and backward. group=None
    runs the same chain without communication (the per-GPU path, for benchmarks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, group, relu):
        mean, var, count = _global_stats(x, group)
        if running_mean is not None:
            _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        mean, var = mean.to(stats_dtype(x.dtype)), var.to(stats_dtype(x.dtype))
        y = _op("batch_norm_apply", x)(x, mean, var, weight, bias, eps, relu)
        ctx.save_for_backward(x, weight, bias, mean, var, count.to(mean.dtype))
        ctx.eps, ctx.group, ctx.relu = eps, group, relu
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True; every rank raises the same way
            raise RuntimeError(
                "fastnorm.sync_batch_norm: double backward (create_graph=True) across ranks is "
                "not supported: its backward all-reduces gradient sums, which are not "
                "differentiated again")
        x, weight, bias, mean, var, count = ctx.saved_tensors
        sum_dy, sum_dy_xhat = _op("batch_norm_backward_reduce", x)(dy, x, mean, var, weight,
                                                                  bias, ctx.eps, ctx.relu)
        # Every rank joins the collective, whatever its batch or its needs_input_grad.
        packed = torch.cat([sum_dy, sum_dy_xhat])
        if ctx.group is not None:
            dist.all_reduce(packed, group=ctx.group)
        c = sum_dy.numel()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _op("batch_norm_backward_elemt", x)(dy, x, mean, var, weight, bias, packed[:c],
                                                     packed[c:], count, ctx.eps, ctx.relu)
        dweight = sum_dy_xhat.to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None, None, None


def sync_batch_norm(input: Tensor, running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], weight: Optional[Tensor],
                    bias: Optional[Tensor], momentum: Union[float, Tensor], eps: float,
                    process_group: Optional[Any] = None, *,
                    activation: Optional[str] = None) -> Tensor:
    """Training-mode batch normalization with statistics over the batches of all ranks of
    `process_group` (default: the whole world), as torch's SyncBatchNorm. Every rank of the group
    must call it, also with an empty batch. Running stats (when given) are updated with the
    global unbiased variance. Outputs keep the input's memory format.
    """
    relu, _plain = _check_batch_norm_args("sync_batch_norm", input, running_mean, running_var,
                                          weight, bias, activation)
    group = process_group if process_group is not None else dist.group.WORLD
    check_backend_device(input, dist.get_backend(group))
    _backend.resolve(input, "batch_norm")  # raises when the selection cannot run on input
    if _backend.transformed(input, weight, bias):
        raise RuntimeError(
            "fastnorm.sync_batch_norm: forward-mode AD and torch.func transforms (jvp, vmap, "
            "jacfwd, hessian, ...) are not supported across ranks: the statistics come from a "
            "collective with no jvp or batching rule. Use them on a single process (BatchNorm), "
            "or put the model in eval mode")
    x = channel_view(input)
    y = _SyncBatchNormFunction.apply(x, _flat(weight), _flat(bias), running_mean, running_var,
                                     momentum, float(eps), group, relu)
    return y.reshape(input.shape)
