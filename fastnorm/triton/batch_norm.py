"""BatchNorm in Triton: per-channel statistics, normalize + affine (+ReLU), backward reduce and
elementwise dx, for inputs viewed as (N, C, S) with S = the product of the spatial dims.

Two memory layouts, each with its own pair of kernels:
- channels-last (CL): strides (S*C, 1, C), i.e. x is an (M = N*S, C) row-major matrix. Tiles are
  [BLOCK_M rows, BLOCK_C channels], contiguous along C. (N, C) inputs always take this path.
- channels-first (CF): contiguous (N, C, S). Reductions tile [BLOCK_N images, BLOCK_S positions]
  of one channel; elementwise passes see x as N*C contiguous rows of S, channel = row % C.

Passes (each is one read of its inputs; the ideal training step is 3 passes forward, 5 backward):
- reduce (forward): per program, sums of d = x - shift and d*d over its share of one channel block,
  where shift = the channel's first element. Summing about a sample of the channel keeps the
  fp32 variance accurate when |mean| >> std (mean 1e4, std 1 loses nothing), without Welford's
  per-element division.
- reduce (backward): per program, sums of g and g*x_hat, g = dy masked by the ReLU (recomputed
  from x with the same expression as the forward, so the mask matches bit for bit).
- combine: a fixed-order sum of the per-program partials ([programs, C] in fp32) per channel,
  which for the forward also turns (shift, sums) into (mean, biased var). No atomics anywhere, so
  results are bitwise repeatable.
- elementwise: y = act((x - mean) * rstd * w + b), or dx = w * rstd * (g - sum_g/count -
  x_hat * sum_gx/count) (training) / w * rstd * g (eval), rstd = 1/sqrt(var + eps) recomputed
  per program from the per-channel var.

Reductions fill the GPU: the N*S elements of a channel block are split over `groups` programs so
that (channel blocks x groups) is several times the SM count (REDUCE_PROGRAMS_PER_SM in
_common), each summing at least MIN_TILES_PER_PROGRAM tiles so the partials stay a few % of the
traffic. Outputs are allocated with the input's strides, so they keep its memory format. The
launchers return per-channel statistics in fp32 (fp64 for fp64 input); SyncBatchNorm combines
them across ranks (fastnorm.distributed).

Launch plans are data: BatchNormReducePlan / BatchNormElementwisePlan (and plan_batch_norm for a
whole op call) hold the tiles, grid, warps and partial rows the launchers use, and the HBM bytes
of each launch (benchmarks/static_report.py checks them against the launches actually made).

Cost (HBM passes over numel * elem_size; unmeasured): training forward 3 (x for the statistics,
x again and y for the apply), backward 5 (x, dy twice, dx). The elementwise pass walks x from the
end backwards, the reverse of the reduction, so the bytes read last by the reduction (the usable
part of L2, modeled as half) come from L2: a tensor within it costs 2 / 3 passes. Running
statistics are updated by the combine kernel (UPDATE_RUNNING), not by extra torch launches.

Edge semantics as torch: the fused ReLU keeps NaN (tl.maximum with NaN propagation: sm_90's
plain max.f32 returns the non-NaN operand), its backward masks where relu(y) <= 0 (a NaN passes
dy through, as torch's threshold_backward on the output), the variance clamp keeps NaN; eps and
momentum are declared tl.float64 and the count is an integer, so fp64 inputs lose nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (LaunchCost, LaunchSpec, SpecCache, acc_dtype, as_acc, cached_plan, cdiv,
                      elem_size, launch_spec, load_affine, next_power_of_2, num_warps_for,
                      reduce_programs, run, tl_acc_dtype)
from .._layout import channels_last_strides

# Elements per tile: a few thousand keeps loads wide and registers bounded (fp32 accumulators).
TILE_ELEMS = 4096
ELEMWISE_TILE_ELEMS = 4096
COMBINE_BLOCK_P = 128
COMBINE_BLOCK_C = 32
# The grid's second dimension is limited to 65535 programs.
MAX_GROUPS = 65535
# Fewest tiles a reduce program sums: its partial row (written, then read by the combine) stays
# a few % of the bytes it reads, also for small inputs.
MIN_TILES_PER_PROGRAM = 8


def is_channels_last(x: torch.Tensor) -> bool:
    """True when the (N, C, S) view x has channels-last strides (S*C, 1, C)."""
    return channels_last_strides(x)


def as_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t, an (N, C, S) tensor, in the given layout (a no-op when it already is)."""
    if channels_last:
        return t if is_channels_last(t) else t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


def _check_layout(x: torch.Tensor) -> bool:
    if x.dim() != 3:
        raise ValueError(f"fastnorm batch_norm kernels take an (N, C, S) view, got {x.dim()}-D")
    if is_channels_last(x):
        return True
    if x.is_contiguous():
        return False
    raise ValueError("fastnorm batch_norm kernels need a contiguous or channels-last (N, C, S) "
                     f"view, got strides {x.stride()}")


# --- kernels -----------------------------------------------------------------------------------

@triton.jit
def _relu(y):
    """max(y, 0) with NaN kept: sm_90's plain max.f32 would return 0 for a NaN y."""
    return tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu_grad(y, dy):
    """torch's ReLU backward, written on the pre-activation y: 0 where relu(y) <= 0, else dy, so
    a NaN y passes dy through (torch masks with `output <= 0`, which is false for NaN)."""
    return tl.where(y <= 0.0, 0.0, dy)


@triton.jit
def _batch_norm_reduce_cl_kernel(X, DY, Mean, Var, W, B, Partial1, Partial2, M, C,
                                 rows_per_program, eps: tl.float64,
                                 BACKWARD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (channel blocks, row groups). Partial sums over rows [g*rows_per_program, ...) of an
    (M, C) row-major x: forward (d, d*d) with d = x - x[0, c]; backward (g, g*x_hat)."""
    col_block = tl.program_id(0)
    group = tl.program_id(1)
    cols = col_block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if BACKWARD:
        mean = tl.load(Mean + cols, mask=col_mask, other=0.0).to(ACC)
        rstd = 1.0 / tl.sqrt(tl.load(Var + cols, mask=col_mask, other=0.0).to(ACC)
                             + as_acc(eps, ACC))
        w, b = load_affine(W, B, cols, col_mask, mean, HAS_WEIGHT, HAS_BIAS, ACC)
    else:
        shift = tl.load(X + cols, mask=col_mask, other=0.0).to(ACC)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    row_start = group * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for first_row in range(row_start, row_end, BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        if BACKWARD:
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
            x_hat = (x - mean[None, :]) * rstd[None, :]
            if RELU:
                y = x_hat
                if HAS_WEIGHT:
                    y = y * w[None, :]
                if HAS_BIAS:
                    y = y + b[None, :]
                dy = _relu_grad(y, dy)
            acc1 += dy
            acc2 += dy * x_hat
        else:
            d = tl.where(mask, x - shift[None, :], 0.0)
            acc1 += d
            acc2 += d * d
    tl.store(Partial1 + group * C + cols, tl.sum(acc1, axis=0), mask=col_mask)
    tl.store(Partial2 + group * C + cols, tl.sum(acc2, axis=0), mask=col_mask)


@triton.jit
def _batch_norm_reduce_cf_kernel(X, DY, Mean, Var, W, B, Partial1, Partial2, N, C, S,
                                 chunks_per_program, eps: tl.float64,
                                 BACKWARD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (C, groups). The N*S values of channel c of a contiguous (N, C, S) x are cut into
    [BLOCK_N, BLOCK_S] chunks; group g sums chunks [g*chunks_per_program, ...)."""
    c = tl.program_id(0)
    group = tl.program_id(1)
    if BACKWARD:
        mean = tl.load(Mean + c).to(ACC)
        rstd = 1.0 / tl.sqrt(tl.load(Var + c).to(ACC) + as_acc(eps, ACC))
        if HAS_WEIGHT:
            w = tl.load(W + c).to(ACC)
        if HAS_BIAS:
            b = tl.load(B + c).to(ACC)
    else:
        shift = tl.load(X + c.to(tl.int64) * S).to(ACC)
    s_blocks = tl.cdiv(S, BLOCK_S)
    num_chunks = tl.cdiv(N, BLOCK_N) * s_blocks
    chunk_start = group * chunks_per_program
    chunk_end = tl.minimum(chunk_start + chunks_per_program, num_chunks)
    channel_offset = c.to(tl.int64) * S
    acc1 = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC)
    acc2 = tl.zeros([BLOCK_N, BLOCK_S], dtype=ACC)
    for chunk in range(chunk_start, chunk_end):
        ns = (chunk // s_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        ss = (chunk % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (ns < N)[:, None] & (ss < S)[None, :]
        offsets = channel_offset + ns.to(tl.int64)[:, None] * C * S + ss[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
        if BACKWARD:
            dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
            x_hat = (x - mean) * rstd
            if RELU:
                y = x_hat
                if HAS_WEIGHT:
                    y = y * w
                if HAS_BIAS:
                    y = y + b
                dy = _relu_grad(y, dy)
            acc1 += dy
            acc2 += dy * x_hat
        else:
            d = tl.where(mask, x - shift, 0.0)
            acc1 += d
            acc2 += d * d
    tl.store(Partial1 + group * C + c, tl.sum(tl.sum(acc1, axis=1), axis=0))
    tl.store(Partial2 + group * C + c, tl.sum(tl.sum(acc2, axis=1), axis=0))


@triton.jit
def _batch_norm_combine_kernel(Partial1, Partial2, X, Out1, Out2, RunningMean, RunningVar,
                               Momentum, num_partials, C, shift_stride, count,
                               momentum: tl.float64, BACKWARD: tl.constexpr,
                               UPDATE_RUNNING: tl.constexpr, MOMENTUM_PTR: tl.constexpr,
                               ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Second stage, fixed order: per channel, the sums of the [num_partials, C] partials.
    Forward: Out1 = mean = shift + s1/count, Out2 = biased var = s2/count - (s1/count)^2 with
    shift = X[c * shift_stride] as in the reduce kernels; with UPDATE_RUNNING also
    running = (1 - m) * running + m * batch (unbiased var) in place, m = `momentum` or, with
    MOMENTUM_PTR, the 1-element tensor Momentum (no host sync). count is an integer: exact in
    fp64. Backward: Out1, Out2 = the sums."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    acc1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    acc2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for start in range(0, num_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < num_partials)[:, None] & col_mask[None, :]
        offsets = rows[:, None] * C + cols[None, :]
        acc1 += tl.load(Partial1 + offsets, mask=mask, other=0.0)
        acc2 += tl.load(Partial2 + offsets, mask=mask, other=0.0)
    s1 = tl.sum(acc1, axis=0)
    s2 = tl.sum(acc2, axis=0)
    if BACKWARD:
        tl.store(Out1 + cols, s1, mask=col_mask)
        tl.store(Out2 + cols, s2, mask=col_mask)
    else:
        n = tl.cast(count, ACC)
        shift = tl.load(X + cols.to(tl.int64) * shift_stride, mask=col_mask, other=0.0).to(ACC)
        mean_shifted = s1 / n
        # Rounding can take the difference below 0; the clamp keeps a NaN (sm_90 max.f32 would not).
        var = tl.maximum(s2 / n - mean_shifted * mean_shifted, 0.0,
                         propagate_nan=tl.PropagateNan.ALL)
        mean = shift + mean_shifted
        tl.store(Out1 + cols, mean, mask=col_mask)
        tl.store(Out2 + cols, var, mask=col_mask)
        if UPDATE_RUNNING:
            if MOMENTUM_PTR:
                m = tl.load(Momentum).to(ACC)
            else:
                m = as_acc(momentum, ACC)
            running_mean = tl.load(RunningMean + cols, mask=col_mask, other=0.0).to(ACC)
            running_var = tl.load(RunningVar + cols, mask=col_mask, other=0.0).to(ACC)
            # count - 1 == 0 never reaches here: training with one value per channel raises.
            unbiased = var * (n / (n - 1.0))
            running_mean = (1.0 - m) * running_mean + m * mean
            running_var = (1.0 - m) * running_var + m * unbiased
            tl.store(RunningMean + cols, running_mean.to(RunningMean.dtype.element_ty),
                     mask=col_mask)
            tl.store(RunningVar + cols, running_var.to(RunningVar.dtype.element_ty),
                     mask=col_mask)


@triton.jit
def _batch_norm_elementwise(x, dy, mean, rstd, w, b, mean_dy, mean_dy_xhat,
                            BACKWARD: tl.constexpr, TRAINING: tl.constexpr,
                            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                            RELU: tl.constexpr):
    """y (forward) or dx (backward) from broadcast per-channel values; shared by both layouts so
    the forward and the backward's ReLU mask use the same expression."""
    x_hat = (x - mean) * rstd
    y = x_hat
    if HAS_WEIGHT:
        y = y * w
    if HAS_BIAS:
        y = y + b
    if BACKWARD:
        g = dy
        if RELU:
            g = _relu_grad(y, dy)
        if TRAINING:
            g = g - (mean_dy + x_hat * mean_dy_xhat)
        out = g * rstd
        if HAS_WEIGHT:
            out = out * w
    else:
        out = y
        if RELU:
            out = _relu(y)
    return out


@triton.jit
def _channel_params(Mean, Var, W, B, SumDy, SumDyXhat, Count, count_value, ch, ch_mask, eps,
                    BACKWARD: tl.constexpr, TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, COUNT_PTR: tl.constexpr, ACC: tl.constexpr):
    """Per-channel values the elementwise pass needs, for channel indices `ch`: mean, rstd,
    weight, bias and (backward, training) the means of g and g*x_hat over the count of values
    per channel: the 1-element tensor Count with COUNT_PTR (SyncBatchNorm's global count, no
    host sync), else the integer count_value. Absent ones are placeholders the constexpr flags
    never read."""
    mean = tl.load(Mean + ch, mask=ch_mask, other=0.0).to(ACC)
    rstd = 1.0 / tl.sqrt(tl.load(Var + ch, mask=ch_mask, other=0.0).to(ACC) + as_acc(eps, ACC))
    w, b = load_affine(W, B, ch, ch_mask, mean, HAS_WEIGHT, HAS_BIAS, ACC)
    mean_dy = mean
    mean_dy_xhat = mean
    if BACKWARD and TRAINING:
        if COUNT_PTR:
            count = tl.load(Count).to(ACC)
        else:
            count = tl.cast(count_value, ACC)
        mean_dy = tl.load(SumDy + ch, mask=ch_mask, other=0.0).to(ACC) / count
        mean_dy_xhat = tl.load(SumDyXhat + ch, mask=ch_mask, other=0.0).to(ACC) / count
    return mean, rstd, w, b, mean_dy, mean_dy_xhat


@triton.jit
def _batch_norm_elementwise_cl_kernel(X, DY, Out, Mean, Var, W, B, SumDy, SumDyXhat, Count,
                                      M, C, eps: tl.float64, count_value,
                                      BACKWARD: tl.constexpr, TRAINING: tl.constexpr,
                                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                      RELU: tl.constexpr, COUNT_PTR: tl.constexpr,
                                      ACC: tl.constexpr,
                                      BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (row blocks, channel blocks) over an (M, C) row-major x: y or dx, see
    _batch_norm_elementwise. Row blocks run last to first: the reduce pass read the end last."""
    rows = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = (rows < M)[:, None] & col_mask[None, :]
    mean, rstd, w, b, mean_dy, mean_dy_xhat = _channel_params(
        Mean, Var, W, B, SumDy, SumDyXhat, Count, count_value, cols, col_mask, eps,
        BACKWARD, TRAINING, HAS_WEIGHT, HAS_BIAS, COUNT_PTR, ACC)
    offsets = rows.to(tl.int64)[:, None] * C + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    dy = x
    if BACKWARD:
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
    out = _batch_norm_elementwise(x, dy, mean[None, :], rstd[None, :], w[None, :], b[None, :],
                                  mean_dy[None, :], mean_dy_xhat[None, :], BACKWARD, TRAINING,
                                  HAS_WEIGHT, HAS_BIAS, RELU)
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _batch_norm_elementwise_cf_kernel(X, DY, Out, Mean, Var, W, B, SumDy, SumDyXhat, Count,
                                      R, C, S, eps: tl.float64, count_value,
                                      BACKWARD: tl.constexpr, TRAINING: tl.constexpr,
                                      HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                      RELU: tl.constexpr, COUNT_PTR: tl.constexpr,
                                      ACC: tl.constexpr,
                                      BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (row blocks, position blocks) over a contiguous (N, C, S) x seen as R = N*C rows of
    S values; row r holds channel r % C. Several short rows share a tile when S is small. Row
    blocks run last to first: the reduce pass read the last images last."""
    rows = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_R + tl.arange(0, BLOCK_R)
    ss = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < R
    mask = row_mask[:, None] & (ss < S)[None, :]
    ch = rows % C
    mean, rstd, w, b, mean_dy, mean_dy_xhat = _channel_params(
        Mean, Var, W, B, SumDy, SumDyXhat, Count, count_value, ch, row_mask, eps,
        BACKWARD, TRAINING, HAS_WEIGHT, HAS_BIAS, COUNT_PTR, ACC)
    offsets = rows.to(tl.int64)[:, None] * S + ss[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(ACC)
    dy = x
    if BACKWARD:
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(ACC)
    out = _batch_norm_elementwise(x, dy, mean[:, None], rstd[:, None], w[:, None], b[:, None],
                                  mean_dy[:, None], mean_dy_xhat[:, None], BACKWARD, TRAINING,
                                  HAS_WEIGHT, HAS_BIAS, RELU)
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=mask)


# --- launch planning ---------------------------------------------------------------------------

def _cl_tile(c: int, tile_elems: int) -> tuple[int, int]:
    block_c = min(next_power_of_2(c), 256)
    return max(1, tile_elems // block_c), block_c


def _cf_tile(n: int, s: int, tile_elems: int) -> tuple[int, int]:
    """[rows, positions] for contiguous rows of s values: the BLOCK_S of 128..2048 that pads s
    least (ties: the wider), e.g. 128 for 56*56 = 3136 where 2048 would idle 23 % of the lanes;
    rows fill the tile. Short rows (s <= 128) take one block each."""
    if s <= 128:
        block_s = next_power_of_2(s)
    else:
        block_s = min((128, 256, 512, 1024, 2048), key=lambda b: (cdiv(s, b) * b, -b))
    return max(1, min(next_power_of_2(n), tile_elems // block_s)), block_s


_elem_size = elem_size


@dataclass(frozen=True)
class BatchNormReducePlan:
    """A reduction pass (forward statistics or backward sums) and its combine. Tiles are
    [block_0, block_1] = [BLOCK_M rows, BLOCK_C channels] (channels-last) or [BLOCK_N images,
    BLOCK_S positions] (channels-first); `groups` programs per channel block each sum
    `per_program` rows (CL) or chunks (CF) into a partial row of [groups, C]."""
    channels_last: bool
    backward: bool
    block_0: int
    block_1: int
    groups: int
    per_program: int
    grid: tuple[int, int]
    num_warps: int
    combine_block_c: int
    combine_grid: tuple[int]
    launches: tuple[LaunchCost, ...]

    @classmethod
    @cached_plan
    def make(cls, n: int, c: int, s: int, dtype: torch.dtype, channels_last: bool,
             backward: bool, device: torch.device,
             running_dtype: torch.dtype | None = None) -> "BatchNormReducePlan":
        """The heuristic: tiles of TILE_ELEMS; (channel blocks x groups) ~ reduce_programs().
        `running_dtype` (forward): the running statistics updated in the combine."""
        target = reduce_programs(device)
        if channels_last:
            m = n * s
            block_0, block_1 = _cl_tile(c, TILE_ELEMS)
            col_blocks = cdiv(c, block_1)
            groups = max(1, min(cdiv(m, block_0 * MIN_TILES_PER_PROGRAM),
                                cdiv(target, col_blocks), MAX_GROUPS))
            per_program = cdiv(cdiv(m, groups), block_0) * block_0
            groups = cdiv(m, per_program)
            grid = (col_blocks, groups)
            name = "_batch_norm_reduce_cl_kernel"
        else:
            block_0, block_1 = _cf_tile(n, s, TILE_ELEMS)
            num_chunks = cdiv(n, block_0) * cdiv(s, block_1)
            groups = max(1, min(cdiv(num_chunks, MIN_TILES_PER_PROGRAM),
                                cdiv(target, c), MAX_GROUPS))
            per_program = cdiv(num_chunks, groups)
            groups = cdiv(num_chunks, per_program)
            grid = (c, groups)
            name = "_batch_norm_reduce_cf_kernel"
        num_warps = num_warps_for(block_0 * block_1)
        # Narrow channel blocks and tall tiles: few channels still get several programs, and each
        # walks its ~REDUCE_PROGRAMS_PER_SM * SMs partial rows in a handful of iterations.
        combine_block_c = min(next_power_of_2(c), COMBINE_BLOCK_C)
        combine_grid = (cdiv(c, combine_block_c),)
        data = n * c * s * _elem_size(dtype)
        acc = _elem_size(acc_dtype(dtype))
        partials = 2 * groups * c * acc
        reads = data * (2 if backward else 1)
        reduce = LaunchCost(name, grid, num_warps,
                            reads=reads + (3 if backward else 0) * c * acc, writes=partials)
        running = 0 if running_dtype is None else 2 * c * _elem_size(running_dtype)
        combine = LaunchCost("_batch_norm_combine_kernel", combine_grid, 4,
                             reads=partials + running, writes=2 * c * acc + running)
        return cls(channels_last, backward, block_0, block_1, groups, per_program, grid,
                   num_warps, combine_block_c, combine_grid, (reduce, combine))


@dataclass(frozen=True)
class BatchNormElementwisePlan:
    """The elementwise pass (y, or dx): tiles [block_0, block_1] = [BLOCK_M rows, BLOCK_C
    channels] (channels-last) or [BLOCK_R rows of S, BLOCK_S positions] (channels-first).
    Programs walk the tiles from the end of x backwards, the reverse of the reduce pass before,
    so its last-read bytes may still be in L2 (`l2_reread` of the launch)."""
    channels_last: bool
    block_0: int
    block_1: int
    grid: tuple[int, int]
    num_warps: int
    launches: tuple[LaunchCost, ...]

    @classmethod
    @cached_plan
    def make(cls, n: int, c: int, s: int, dtype: torch.dtype, channels_last: bool,
             backward: bool, after_reduce: bool) -> "BatchNormElementwisePlan":
        """`after_reduce`: a reduction over the same x (and dy) ran just before (training)."""
        if channels_last:
            block_0, block_1 = _cl_tile(c, ELEMWISE_TILE_ELEMS)
            grid = (cdiv(n * s, block_0), cdiv(c, block_1))
            name = "_batch_norm_elementwise_cl_kernel"
        else:
            block_0, block_1 = _cf_tile(n * c, s, ELEMWISE_TILE_ELEMS)
            grid = (cdiv(n * c, block_0), cdiv(s, block_1))
            name = "_batch_norm_elementwise_cf_kernel"
        num_warps = num_warps_for(block_0 * block_1)
        data = n * c * s * _elem_size(dtype)
        reads = data * (2 if backward else 1)
        launch = LaunchCost(name, grid, num_warps, reads=reads, writes=data,
                            l2_reread=reads if after_reduce else 0)
        return cls(channels_last, block_0, block_1, grid, num_warps, (launch,))


@cached_plan
def plan_batch_norm(n: int, c: int, s: int, dtype: torch.dtype, channels_last: bool,
                    mode: str, device: torch.device,
                    running_dtype: torch.dtype | None = None) -> tuple[LaunchCost, ...]:
    """Every launch of one op call, in order: mode "fwd" (training forward, stats + apply),
    "bwd" (training backward, reduce + dx), "eval" (apply with running statistics) or
    "eval_bwd"."""
    if mode in ("fwd", "bwd"):
        backward = mode == "bwd"
        red = BatchNormReducePlan.make(n, c, s, dtype, channels_last, backward, device,
                                       None if backward else running_dtype)
        ew = BatchNormElementwisePlan.make(n, c, s, dtype, channels_last, backward, True)
        return red.launches + ew.launches
    if mode == "eval_bwd":
        red = BatchNormReducePlan.make(n, c, s, dtype, channels_last, True, device)
        ew = BatchNormElementwisePlan.make(n, c, s, dtype, channels_last, True, True)
        return red.launches + ew.launches
    if mode == "eval":
        return BatchNormElementwisePlan.make(n, c, s, dtype, channels_last, False, False).launches
    raise ValueError(f"unknown batch_norm plan mode {mode!r}")


# --- launchers ---------------------------------------------------------------------------------

def _reduce(x: torch.Tensor, dy: torch.Tensor | None, mean: torch.Tensor | None,
            var: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
            eps: float, relu: bool, running_mean: torch.Tensor | None = None,
            running_var: torch.Tensor | None = None, momentum: float | torch.Tensor = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel sums of one reduction pass (forward when dy is None) as two length-C
    vectors: forward (mean, biased var), backward (sum g, sum g*x_hat). x must be non-empty.
    Forward with running_mean/running_var: those are updated in place by the combine kernel."""
    n, c, s = x.shape
    channels_last = _check_layout(x)
    dtype = acc_dtype(x.dtype)
    backward = dy is not None
    update = running_mean is not None
    momentum_ptr = isinstance(momentum, torch.Tensor)
    specs = _REDUCE_SPECS[n, c, s, x.dtype, channels_last, backward, x.device,
                          running_mean.dtype if update else None, weight is not None,
                          bias is not None, relu, momentum_ptr]
    plan = specs.plan
    out1 = torch.empty(c, dtype=dtype, device=x.device)
    out2 = torch.empty(c, dtype=dtype, device=x.device)
    partial1 = torch.empty(plan.groups, c, dtype=dtype, device=x.device)
    partial2 = torch.empty(plan.groups, c, dtype=dtype, device=x.device)
    # Unused pointer arguments still need a tensor; out1 stands in for them.
    sizes = (n * s, c) if channels_last else (n, c, s)
    run(specs.reduce, x, dy if backward else out1, mean if backward else out1,
        var if backward else out1, weight if weight is not None else out1,
        bias if bias is not None else out1, partial1, partial2, *sizes, plan.per_program, eps)
    run(specs.combine, partial1, partial2, x, out1, out2, running_mean if update else out1,
        running_var if update else out1, momentum if momentum_ptr else out1, plan.groups, c,
        1 if channels_last else s, n * s, 0.0 if momentum_ptr else float(momentum))
    return out1, out2


class _ReduceSpecs(NamedTuple):
    plan: BatchNormReducePlan
    reduce: LaunchSpec
    combine: LaunchSpec


def _reduce_specs(n: int, c: int, s: int, dtype: torch.dtype, channels_last: bool,
                  backward: bool, device: torch.device, running_dtype: Optional[torch.dtype],
                  has_weight: bool, has_bias: bool, relu: bool,
                  momentum_ptr: bool) -> _ReduceSpecs:
    plan = BatchNormReducePlan.make(n, c, s, dtype, channels_last, backward, device,
                                    running_dtype)
    acc = tl_acc_dtype(dtype)
    kernel = _batch_norm_reduce_cl_kernel if channels_last else _batch_norm_reduce_cf_kernel
    blocks = (dict(BLOCK_M=plan.block_0, BLOCK_C=plan.block_1) if channels_last
              else dict(BLOCK_N=plan.block_0, BLOCK_S=plan.block_1))
    reduce = launch_spec(kernel, plan.grid, BACKWARD=backward, HAS_WEIGHT=has_weight,
                         HAS_BIAS=has_bias, RELU=relu, ACC=acc, **blocks,
                         num_warps=plan.num_warps)
    combine = launch_spec(_batch_norm_combine_kernel, plan.combine_grid, BACKWARD=backward,
                          UPDATE_RUNNING=running_dtype is not None, MOMENTUM_PTR=momentum_ptr,
                          ACC=acc, BLOCK_P=COMBINE_BLOCK_P, BLOCK_C=plan.combine_block_c,
                          num_warps=4)
    return _ReduceSpecs(plan, reduce, combine)


_REDUCE_SPECS = SpecCache(_reduce_specs)


def _elementwise(x: torch.Tensor, dy: torch.Tensor | None, mean: torch.Tensor,
                 var: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 sum_dy: torch.Tensor | None, sum_dy_xhat: torch.Tensor | None,
                 count: torch.Tensor | int | None, eps: float, relu: bool) -> torch.Tensor:
    """y (dy is None) or dx, with x's strides. Backward with sum_dy None is eval mode (the
    statistics are constants). `count` (training backward): a 1-element tensor or an int."""
    n, c, s = x.shape
    channels_last = _check_layout(x)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    backward = dy is not None
    training = sum_dy is not None
    count_ptr = isinstance(count, torch.Tensor)
    spec = _ELEMENTWISE_SPECS[n, c, s, x.dtype, channels_last, backward, training,
                              weight is not None, bias is not None, relu, count_ptr]
    p = mean  # stands in for the pointers the flags never read
    sizes = (n * s, c) if channels_last else (n * c, c, s)
    run(spec, x, dy if backward else p, out, mean, var, weight if weight is not None else p,
        bias if bias is not None else p, sum_dy if training else p,
        sum_dy_xhat if training else p, count if count_ptr else p, *sizes, eps,
        0 if count_ptr or count is None else count)
    return out


def _elementwise_spec(n: int, c: int, s: int, dtype: torch.dtype, channels_last: bool,
                      backward: bool, training: bool, has_weight: bool, has_bias: bool,
                      relu: bool, count_ptr: bool) -> LaunchSpec:
    plan = BatchNormElementwisePlan.make(n, c, s, dtype, channels_last, backward,
                                         after_reduce=backward or training)
    flags = dict(BACKWARD=backward, TRAINING=backward and training, HAS_WEIGHT=has_weight,
                 HAS_BIAS=has_bias, RELU=relu, COUNT_PTR=count_ptr, ACC=tl_acc_dtype(dtype))
    if channels_last:
        return launch_spec(_batch_norm_elementwise_cl_kernel, plan.grid, **flags,
                           BLOCK_M=plan.block_0, BLOCK_C=plan.block_1, num_warps=plan.num_warps)
    return launch_spec(_batch_norm_elementwise_cf_kernel, plan.grid, **flags,
                       BLOCK_R=plan.block_0, BLOCK_S=plan.block_1, num_warps=plan.num_warps)


_ELEMENTWISE_SPECS = SpecCache(_elementwise_spec)


def batch_norm_stats(x: torch.Tensor, running_mean: torch.Tensor | None = None,
                     running_var: torch.Tensor | None = None,
                     momentum: float | torch.Tensor = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased var) of an (N, C, S) x, in fp32 (fp64 for fp64 x). An empty x
    gives zeros (a rank with no samples contributes nothing to a SyncBatchNorm merge).

    With running_mean/running_var (length C, any float dtype) they are updated in place in the
    same launch that finalizes the statistics: running = (1 - momentum) * running + momentum *
    batch, the variance unbiased by count / (count - 1), count = N*S (> 1 for a non-empty x).
    `momentum` may be a 1-element tensor on x's device (e.g. 1 / num_batches_tracked)."""
    c = x.shape[1]
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=acc_dtype(x.dtype), device=x.device)
        return zeros, zeros.clone()
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if running_mean is not None and x.numel() // c < 2:
        raise ValueError("updating running statistics needs more than 1 value per channel")
    return _reduce(x, None, None, None, None, None, 0.0, False, running_mean, running_var,
                   momentum)


def batch_norm_apply(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                     relu: bool) -> torch.Tensor:
    """y = act((x - mean) / sqrt(var + eps) * weight + bias), with x's layout."""
    return _elementwise(x, None, mean, var, weight, bias, None, None, None, eps, relu)


def batch_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, relu: bool, running_mean: torch.Tensor | None = None,
                   running_var: torch.Tensor | None = None,
                   momentum: float | torch.Tensor = 0.1
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward on batch statistics: y, mean, biased var (3 passes over x). Running
    statistics, when given, are updated in place without another launch (batch_norm_stats)."""
    mean, var = batch_norm_stats(x, running_mean, running_var, momentum)
    return batch_norm_apply(x, mean, var, weight, bias, eps, relu), mean, var


def batch_norm_backward_reduce(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                               var: torch.Tensor, weight: torch.Tensor | None,
                               bias: torch.Tensor | None, eps: float,
                               relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (sum g, sum g*x_hat), g = dy after the ReLU mask; dy in x's layout. These are
    dbias and dweight; zeros for an empty x."""
    c = x.shape[1]
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=acc_dtype(x.dtype), device=x.device)
        return zeros, zeros.clone()
    return _reduce(x, dy, mean, var, weight, bias, eps, relu)


def batch_norm_backward_elemt(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                              var: torch.Tensor, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, sum_dy: torch.Tensor | None,
                              sum_dy_xhat: torch.Tensor | None, count: torch.Tensor | None,
                              eps: float, relu: bool) -> torch.Tensor:
    """dx with x's layout. Training (sums given): the sums are over `count` values (a 1-element
    tensor, so a global count needs no host sync). Eval (sums None): statistics are constants."""
    return _elementwise(x, dy, mean, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, relu)


def batch_norm_bwd(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   relu: bool, training: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, sum g (dbias) and sum g*x_hat (dweight) in fp32 (fp64 for fp64 x): a reduce pass, then
    the dx pass, each reading x and dy. Eval mode needs the sums only for dweight/dbias; they are
    computed regardless, which keeps one code path."""
    sum_dy, sum_dy_xhat = batch_norm_backward_reduce(dy, x, mean, var, weight, bias, eps, relu)
    if training:
        n, _c, s = x.shape  # the count as an integer argument: no tensor, no fill launch
        dx = _elementwise(x, dy, mean, var, weight, bias, sum_dy, sum_dy_xhat, n * s, eps, relu)
    else:
        dx = batch_norm_backward_elemt(dy, x, mean, var, weight, bias, None, None, None, eps,
                                       relu)
    return dx, sum_dy, sum_dy_xhat
