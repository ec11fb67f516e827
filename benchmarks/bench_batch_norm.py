"""BatchNorm2d effective bandwidth: fastnorm-triton vs torch eager and torch.compile, and the
per-GPU SyncBatchNorm path without communication (fastnorm's vs torch's kernel chain).

Ideal bytes (weights, biases and statistics ignored, as in benchmarks/anchors-h100.md):
  training forward          read x + write y                          = 2 * numel * elem_size
  training forward+backward forward + read x + read dy + write dx     = 5 * numel * elem_size
  training backward alone   read x + read dy + write dx (mode "bwd")  = 3 * numel * elem_size
  eval forward              read x + write y                          = 2 * numel * elem_size
fastnorm's backend is selected once around the timing, not inside the timed call.
A training step needs at least 3 passes forward and 8 forward+backward unless x stays on chip,
so these numbers top out near 67 % / 62.5 % of the copy bandwidth for activations beyond L2.

Weights and running statistics are fp32, the input bf16 or fp32, NCHW or NHWC.
torch's SyncBN chain is what nn.SyncBatchNorm runs per GPU: batch_norm_stats,
batch_norm_gather_stats_with_counts, batch_norm_elemt; backward batch_norm_backward_reduce,
batch_norm_backward_elemt (CUDA only).

    python benchmarks/bench_batch_norm.py            # anchor shapes on a GPU, tiny ones on CPU
    python benchmarks/bench_batch_norm.py --quick --out /tmp/bench
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

import fastnorm  # noqa: E402
from fastnorm import sync_batch_norm  # noqa: E402
from fastnorm._layout import channel_view  # noqa: E402

GPU_SHAPES = [(256, 64, 56, 56), (256, 256, 28, 28), (64, 1024, 14, 14)]
CPU_SHAPES = [(4, 8, 6, 6)]
# torch.compile compiles anew per shape, dtype, layout and mode; running it on the anchor
# table's torch.compile cases only keeps the GPU check within its time limit.
COMPILE_CASES = {((256, 64, 56, 56), torch.bfloat16)}
DTYPES = [torch.bfloat16, torch.float32]
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
MOMENTUM, EPS = 0.1, 1e-5


def _torch_bn(x, w, b, rm, rv, training):
    return F.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)


def _fastnorm_bn(x, w, b, rm, rv, training):
    return fastnorm.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)


def _fastnorm_sync_chain(x, w, b, rm, rv, training):
    """fastnorm's SyncBatchNorm function with no process group: stats -> apply, reduce -> elemt,
    exactly the per-GPU work of a synchronized step."""
    y = sync_batch_norm._SyncBatchNormFunction.apply(channel_view(x), w, b, rm, rv, MOMENTUM,
                                                     EPS, None, False)
    return y.view(x.shape)


def _keep_channels_last(t: torch.Tensor) -> torch.Tensor:
    """As torch's SyncBatchNorm: channels-last stays, anything else is made contiguous."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


class _TorchSyncChain(torch.autograd.Function):
    """torch.nn.SyncBatchNorm's per-GPU kernels (torch/nn/modules/_functions.py) without the
    all_gather / all_reduce: what its communication wraps."""

    @staticmethod
    def forward(ctx, x, w, b, rm, rv):
        x = _keep_channels_last(x)
        mean, invstd = torch.batch_norm_stats(x, EPS)
        counts = torch.full((1,), x.numel() // x.size(1), dtype=mean.dtype, device=x.device)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(
            x, mean[None], invstd[None], rm, rv, MOMENTUM, EPS, counts)
        ctx.save_for_backward(x, w, mean, invstd, counts.to(torch.int32))
        return torch.batch_norm_elemt(x, w, b, mean, invstd, EPS)

    @staticmethod
    def backward(ctx, dy):
        x, w, mean, invstd, counts = ctx.saved_tensors
        dy = _keep_channels_last(dy)
        sum_dy, sum_dy_xmu, dw, db = torch.batch_norm_backward_reduce(dy, x, mean, invstd, w,
                                                                      True, True, True)
        dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, counts)
        return dx, dw, db, None, None


def _torch_sync_chain(x, w, b, rm, rv, training):
    return _TorchSyncChain.apply(x, w, b, rm, rv)


def providers(device: torch.device, shape: tuple, dtype: torch.dtype
              ) -> dict[str, tuple[Callable, tuple[str, ...]]]:
    """Name -> (fn(x, w, b, running_mean, running_var, training), modes it runs)."""
    all_modes = ("fwd", "fwdbwd", "bwd", "eval")
    out: dict[str, tuple[Callable, tuple[str, ...]]] = {"torch": (_torch_bn, all_modes)}
    if "triton" in fastnorm.available_backends():
        out["fastnorm-triton"] = (_fastnorm_bn, all_modes)
        out["fastnorm-syncbn-chain"] = (_fastnorm_sync_chain, ("fwd", "fwdbwd", "bwd"))
    if "cuda" in fastnorm.available_backends():  # the CUDA C++ kernels (fastnorm._C)
        out["fastnorm-cuda"] = (_fastnorm_bn, all_modes)
    if device.type == "cuda":
        if (shape, dtype) in COMPILE_CASES:
            out["torch.compile"] = (torch.compile(_torch_bn, dynamic=False), all_modes)
        out["torch-syncbn-chain"] = (_torch_sync_chain, ("fwd", "fwdbwd", "bwd"))
    return out


def main(argv=None) -> _harness.Run:
    args = _harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = _harness.start(args)
    device = run.device
    shapes = CPU_SHAPES if run.quick and device.type == "cpu" else GPU_SHAPES
    for shape in shapes:
        for dtype in DTYPES:
            for layout, fmt in LAYOUTS.items():
                torch.manual_seed(0)
                x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                c = shape[1]
                w = torch.rand(c, device=device) + 0.5
                b = torch.randn(c, device=device)
                rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
                size = x.numel() * x.element_size()
                case = "x".join(map(str, shape))
                for name, (fn, modes) in providers(device, shape, dtype).items():
                    if not _harness.wanted(args, name):
                        continue
                    common = dict(op="batch_norm", case=case, dtype=dtype, layout=layout,
                                  backend="cuda" if name == "fastnorm-cuda" else
                                  "triton" if name.startswith("fastnorm") else None)
                    if "fwd" in modes:
                        _harness.run_case(run, **common, mode="fwd", provider=name,
                                          ideal_bytes=2 * size,
                                          fn=lambda fn=fn: fn(x, w, b, rm, rv, True))
                    if "fwdbwd" in modes:
                        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
                        _harness.run_case(
                            run, **common, mode="fwdbwd", provider=name, ideal_bytes=5 * size,
                            fn=_harness.forward_backward(
                                lambda fn=fn, leaves=leaves: fn(*leaves, rm, rv, True), dy),
                            grad_to_none=leaves)
                    if "bwd" in modes:
                        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
                        _harness.run_case(
                            run, **common, mode="bwd", provider=name, ideal_bytes=3 * size,
                            fn=_harness.backward_only(
                                lambda fn=fn, leaves=leaves: fn(*leaves, rm, rv, True), dy),
                            grad_to_none=leaves)
                    if "eval" in modes:
                        _harness.run_case(run, **common, mode="eval", provider=name,
                                          ideal_bytes=2 * size,
                                          fn=lambda fn=fn: fn(x, w, b, rm, rv, False))
    _harness.finish(run, args, "batch_norm")
    return run


if __name__ == "__main__":
    main()
