"""Helpers shared by the Triton launchers: accumulation dtype, launch sizing, the second-stage
column reduction used by every deterministic weight-gradient path."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._dtypes import stats_dtype


acc_dtype = stats_dtype  # statistics / accumulation dtype of an input dtype


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_parallel_programs(device: torch.device) -> int:
    """How many programs fill the device for a persistent / partial-sum grid.

    Under the interpreter programs run one after another, so a handful is enough to exercise the
    multi-program partial sums without making the tests slow.
    """
    if device.type == "cuda" and not triton_interpreted():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@triton.jit
def load_affine(W, B, idx, mask, placeholder, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                ACC: tl.constexpr):
    """(weight, bias) at channel indices `idx` in ACC; `placeholder` stands in for an absent one
    (the HAS_* flags keep the caller from reading it)."""
    w = placeholder
    b = placeholder
    if HAS_WEIGHT:
        w = tl.load(W + idx, mask=mask, other=0.0).to(ACC)
    if HAS_BIAS:
        b = tl.load(B + idx, mask=mask, other=0.0).to(ACC)
    return w, b


@triton.jit
def _column_sum_kernel(P, Out, num_rows, N, stride_p,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[n] = sum_p P[p, n], in a fixed order: the second stage of a deterministic reduction."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=P.dtype.element_ty)
    for start in range(0, num_rows, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < num_rows)[:, None] & col_mask[None, :]
        p = tl.load(P + rows[:, None].to(tl.int64) * stride_p + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(p, axis=0)
    tl.store(Out + cols, acc, mask=col_mask)


def column_sum(partial: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum a [P, N] tensor of per-program partial sums over P; the result is cast to out_dtype."""
    num_rows, n = partial.shape
    out = torch.empty(n, dtype=partial.dtype, device=partial.device)
    if n == 0:
        return out.to(out_dtype)
    block_n = 128
    block_p = 32
    _column_sum_kernel[(triton.cdiv(n, block_n),)](
        partial, out, num_rows, n, partial.stride(0), BLOCK_P=block_p, BLOCK_N=block_n)
    return out.to(out_dtype)
