"""LayerNorm and RMSNorm in Triton, forward and backward, on a 2-D view (M rows of N features).

Every launch comes from `plan_layer_norm`, a pure function of shapes, dtypes, flags and the
device's SM count and L2 size, returning a frozen `LayerNormPlan` (path, tiles, warps, grid, rows
per program, partial rows, and each launch with the HBM bytes it reads and writes; the static
cost report, benchmarks/static_report.py, prints them with registers and occupancy).

Forward paths, by N:
- fused (padded N <= 16384; 8192 for fp64): a tile of BLOCK_M whole rows is loaded once,
  statistics come from the registers (mean refined by one correction pass, then the sum of
  squared deviations, so large means lose nothing) and y is written: one read of x, one write.
- chunked (longer rows): a persistent grid of P programs, program p taking rows p, p + P, ...
  Each row is walked twice in chunks: the first walk merges per-chunk (count, mean, M2), taken
  about a shift, with Chan's formula; the second, over the chunks backwards (the chunk read last
  first), normalizes. P is sized so that the rows in flight (P rows of x, with a residual also r
  and h) fit in the usable half of the L2 (at least one program per SM, at most two): the second
  walk is an L2 hit (1024 x 65536 bf16 on an H100: 200 programs x 128 KB = 25 MB). The model
  (`LaunchCost.l2_window`) counts the re-read as a hit for the fraction of the window that fits.

Backward: dx = rstd * (w*dy - (x_hat * c1 + c2)), c1 = mean(x_hat * w*dy), c2 = mean(w*dy)
(c2 = 0 for RMSNorm). dW = sum over rows of dy * x_hat and dB = sum of dy go through per-program
fp32 partial rows [programs, N], summed in a fixed order by `column_sum`: deterministic and
bitwise repeatable, no atomics. Paths, by N:
- fused (padded N <= 8192; 4096 for fp64): a [BLOCK_M, N] tile holds x, dy and the dW/dB
  accumulators in registers; c1/c2 come from the tile; 3 HBM passes (x, dy in, dx out). One
  program per SM (two for short rows), each with >= 64 rows, so the partial rows stay ~2-4 % of
  the traffic. (A 16384-wide tile spilled on sm_90 at 16 and at 32 warps, even with dW/dB kept in
  memory, so this path stops at 8192.)
- rows (longer rows, when the cost model prefers it): one launch, persistent, one program per SM
  (down to 3/4 of the SMs if that makes the window fit), program p taking the consecutive rows
  [p * ceil(M/P), (p + 1) * ceil(M/P)) (consecutive, not strided, so that an example's rows in
  one program are adjacent: see per-example below). Per row, a first walk over the chunks
  sums c1/c2, a second walk backwards writes dx and adds the row's dW/dB terms into the
  program's own partial row (read, add, store). The window that must stay in L2 is P rows of x
  and dy plus P partial rows (RMSNorm bf16 N = 16384 on an H100: 132 x 96 KB = 12.7 MB of 25 MB
  usable), so x and dy come from HBM once: 3 passes plus the final partial rows. The model
  counts the second walk and the partial-row updates as L2 hits for the fraction of the window
  that fits, and it does not model L2 bandwidth: the second walk and the updates put ~2-3x the
  HBM bytes through the L2, unmeasured.
- chunked (rows whose window does not fit: 1024 x 65536 bf16, 132 x 512 KB = 67 MB): a
  row-statistics kernel computes (c1, c2) per row, then a column-chunked kernel (grid: column
  blocks x row groups, dW/dB of its column block in registers, row groups last-first so the tail
  the first kernel read is still in L2) writes dx. Row chunks (`_row_chunks`): when x and dy
  exceed the model's L2 window (L2_REUSE_FRACTION of the L2) the pair runs once per chunk of
  rows, each chunk whole row groups (rows_per_program rows each, the unchunked layout of row
  groups, so slot rows and program boundaries do not move), sized so the chunk's x and dy fit
  the window next to the dW/dB partial rows, at most MAX_ROW_CHUNKS chunks of equal size. The
  chunks share the partial rows: chunk i > 0 adds into them (ACCUMULATE: read, add, store; the
  chunks run in order, so a partial row is a fixed-order sum, deterministic, no atomics; the
  dW/dB sums are not bitwise the one-chunk result, whose rows group differently; dx is). The
  dx kernel's re-read of x and dy, and the partial rows the previous chunk stored, are L2 hits
  by the model: 3 passes plus the final partial rows (1024 x 65536 bf16 on an H100: 16 chunks
  of 64 rows, 16 MB of x and dy + 8 MB of partial rows, ~1.05x the ideal bytes; the previous
  single pair read x and dy twice, 5 passes). Two launches per chunk: a chunk holds at least
  half the window (>= ~4 us of HBM traffic at 3 TB/s on an H100) for two launches of a few us
  of host time, so the host may fall behind at the smallest chunks (unmeasured; CUDA graphs
  hide it; MAX_ROW_CHUNKS = 1 turns row chunks off). fp32 at N = 64K needs more chunks than
  the cap: part of its re-read comes from HBM.
  Why not one 3-pass launch here: a row of 64K bf16 x and dy is 256 KB, more than one SM's
  registers and shared memory, so it has to be split over programs that exchange c1/c2
  partials before any of them can write dx. That needs a barrier between co-resident programs
  (thread-block clusters with distributed shared memory, or a grid barrier on a global flag)
  which Triton does not expose portably and which Triton's interpreter, running programs one
  after another, cannot run; keeping whole rows per program instead needs N-wide dW/dB
  partials per program that do not fit in L2 next to the rows. The persistent rows kernel is
  taken where its window fits the usable L2 and its grid fills the device; otherwise the cost
  model (`plan_layer_norm` compares the modeled bytes of the rows and chunked plans) picks the
  cheaper (never rows with fewer rows than 3/4 of the SMs: one program a row).

Per-example dW/dB norms (PER_EXAMPLE, layer_norm_bwd_per_example: examples of rows_per_example
consecutive rows), on every backward path, in the same pass: |dW_e|^2 = sum_j (sum_{r in e}
dy_rj x_hat_rj)^2 needs an example's terms summed per column before squaring, so every program
also sums its rows' terms per example into per-(program, example) slot rows,
PE[p * slots + e - e_first] (slots = ceil(rows per program / rows_per_example) + 1 rows of N
per program), and one more launch, _per_example_sq_kernel (fastnorm/triton/_common.py), sums
each example's slot rows over the programs it spans in program order (the range follows from
the row ranges), squares and sums over the columns, both parameters at once: the plain
backward's launches + 1. No fill launch: an example's first row (tile) in a program stores its
slot row. Whole-row and column-chunked tiles keep the current example's sums in registers and
store each slot row once (nothing read back); where that spills (16 warps, both parameters:
MAX_PE_REGISTER_WARPS) they read, add and store the slot row per tile, with a barrier before
the next tile reads it. The persistent rows kernel adds each chunk's terms into the slot row of
the row's example next to its partial-row update (one more row in flight per program, in L2
like the partial row; a barrier per row). Column-chunked: a program sums its column block's
share of each example (the squares are separable over columns, so column blocks never combine
before squaring). The slot rows are (E + programs) * N accumulation-dtype values per parameter
(plan_layer_norm_per_example models their bytes on top of the plain plan); dx and the dW/dB
partials are computed exactly as without the flag, so they are bitwise those of the plain
backward.

Feature flags (constexpr, one code path): HAS_RESIDUAL / STORE_RESIDUAL normalize h = x + r and
write h (the fused residual add), HAS_DRESIDUAL adds h's incoming gradient into dx, ROUND_XHAT
rounds x_hat to the input dtype before the weight multiply (transformers' Llama-style RMSNorm),
ROUND_DX_TERMS rounds dx's two terms separately (T5LayerNorm). eps is passed as an fp64 scalar
and converted to the accumulation dtype inside the kernels.
"""
# No `from __future__ import annotations`: Triton reads the kernels' annotations (eps: "fp64")
# as written, and a postponed annotation would reach it as the string "'fp64'" and be ignored.
import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (ELEMS_PER_WARP, L2_REUSE_FRACTION, LaunchCost, LaunchSpec, SpecCache,
                      acc_dtype, cached_plan, cdiv, column_sums, elem_size, l2_cache_bytes,
                      launch_spec, min_fill_programs, modeled_hbm_bytes, next_power_of_2,
                      num_parallel_programs, num_warps_for, per_example_max_span,
                      per_example_sq_spec, planning_override, rows_per_tile, run,
                      tl_acc_dtype)

# Widest row (in elements) kept whole in registers. Forward holds x only; backward also holds dy
# and the dW/dB accumulators, so it switches to the column-chunked path sooner: a 16384-wide
# backward tile spills on sm_90 at 16 warps (x, dy, dW, dB: 32 each per thread) and at 32 (64
# registers per thread), even with dW/dB kept in memory instead. fp64 halves both.
MAX_FUSED_N_FWD = 16384
MAX_FUSED_N_BWD = 8192
CHUNK_N = 4096
# Elements per tile the launchers aim for (fused paths: rows per tile = TILE // padded N).
FWD_TILE = 4096
BWD_TILE = 2048
# Tile elements per warp: 16 per thread. The backward's tile lives with dy and two accumulators,
# the forward's with x and y; both had no spills at this density at every benchmark shape.
ELEMS_PER_WARP_LN = 512
# Per-example backward, tile paths: each program keeps its current example's dW and dB sums
# in registers next to the dW/dB accumulators (each slot row written once, nothing read back)
# up to this many warps a program; with more (BLOCK_N 8192: 16 warps, ptxas's 128 registers a
# thread) two running sums spilled 120-300 bytes on sm_90 (static report), so there, with both
# parameters, the sums are added into the slot rows instead (read, add, store per tile: in L2,
# ~2.7x the tile's HBM bytes through the L2 for 16-bit x, unmodeled). One parameter fits.
MAX_PE_REGISTER_WARPS = 8
# Fewest rows per backward program before adding programs (each adds a row of dW/dB partials:
# N fp32 written and read again, next to ~3 * rows * N * elem_size of x, dy and dx).
MIN_ROWS_PER_PARTIAL = 64
# Most row chunks the column-chunked backward cuts a call into (two launches each): enough that
# x and dy of 1024 x 65536 bf16 (256 MB) go through a 25 MB L2 window in chunks that fit next to
# the partial rows; beyond it chunks grow past the window (fp32 at N = 64K) and part of the
# re-read comes from HBM. 1 turns row chunks off.
MAX_ROW_CHUNKS = 16


@triton.jit
def _eps_in(eps, ACC: tl.constexpr):
    """eps in the accumulation dtype. The launchers pass eps as an fp64 scalar (a plain Python
    float would reach a compiled kernel as fp32, rounding e.g. 1e-10 for fp64 inputs)."""
    return (tl.zeros([], dtype=tl.float64) + eps).to(ACC)


@triton.jit
def _load_row_input(X, R, H, offs, mask, HAS_RESIDUAL: tl.constexpr, STORE: tl.constexpr,
                    ACC: tl.constexpr):
    """The norm's input at `offs` in ACC: x, or with HAS_RESIDUAL h = x + r rounded to H's
    dtype (stored to H when STORE), so the norm sees the residual stream exactly as it is
    stored: the same result as the unfused `h = x + r; norm(h)`."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        h = (x + tl.load(R + offs, mask=mask, other=0.0).to(ACC)).to(H.dtype.element_ty)
        if STORE:
            tl.store(H + offs, h, mask=mask)
        x = h.to(ACC)
    return x


@triton.jit
def _layer_norm_fwd_kernel(X, Y, W, B, Mean, Rstd, R, H, M, N, stride_x, stride_y, stride_r,
                           stride_h, eps: "fp64",
                           IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
                           ROUND_XHAT: tl.constexpr,
                           ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """HAS_RESIDUAL: normalize h = x + r (R, row stride stride_r), rounded to H's dtype, and with
    STORE_RESIDUAL store it (H, stride_h); without, H only gives the dtype (inference, y only).
    Safe in place (Y is X, H is R): a tile is read whole before it is written.
    ROUND_XHAT: round x_hat to the input dtype before the weight multiply (transformers' Llama:
    `weight * hidden.to(input_dtype)`)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)
    if HAS_RESIDUAL:
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(ACC)
        h = (x + r).to(H.dtype.element_ty)
        if STORE_RESIDUAL:
            tl.store(H + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(ACC)
    else:
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / N
        # One correction step: the plain fp32 sum of a row with a large mean is off by many
        # ulps; the sum of deviations from the first estimate is small and nearly exact.
        mean += tl.sum(tl.where(mask, x - mean[:, None], 0.0), axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(Mean + rows, mean, mask=row_mask)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + _eps_in(eps, ACC))
    tl.store(Rstd + rows, rstd, mask=row_mask)
    y = xc * rstd[:, None]
    if ROUND_XHAT:
        y = y.to(X.dtype.element_ty).to(ACC)
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_fwd_chunked_kernel(X, Y, W, B, Mean, Rstd, R, H, M, N, stride_x, stride_y,
                                   stride_r, stride_h, eps: "fp64",
                                   IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                   HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                   STORE_RESIDUAL: tl.constexpr, ROUND_XHAT: tl.constexpr,
                                   ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Persistent: program p normalizes rows p, p + P, p + 2P, ... (P programs), so only P rows
    are in flight and the second walk over a row finds it in L2 (the plan sizes P to the L2).
    Flags as in _layer_norm_fwd_kernel; with HAS_RESIDUAL the first walk stores h and the
    second walk reads it back (without STORE_RESIDUAL it adds x + r again). Safe in place
    (Y is X, H is R): each element of x and r is read before it is overwritten."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    for k in range(0, tl.cdiv(M - pid, programs)):
        row = pid.to(tl.int64) + k * programs.to(tl.int64)
        _layer_norm_fwd_chunked_row(X, Y, W, B, Mean, Rstd, R, H, row, N,
                                    stride_x, stride_y, stride_r, stride_h, eps, IS_RMS,
                                    HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL, STORE_RESIDUAL,
                                    ROUND_XHAT, ACC, BLOCK_N)


@triton.jit
def _layer_norm_fwd_chunked_row(X, Y, W, B, Mean, Rstd, R, H, row, N, stride_x, stride_y,
                                stride_r, stride_h, eps, IS_RMS: tl.constexpr,
                                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                HAS_RESIDUAL: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
                                ROUND_XHAT: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_N: tl.constexpr):
    """One row of _layer_norm_fwd_chunked_kernel: statistics walk, then the output walk."""
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    h_row = H + row * stride_h
    y_row = Y + row * stride_y
    # Statistics relative to a shift (the first chunk's mean): with means like 1e4 a running
    # mean in fp32 would round at every merge; the relative mean stays O(std), and the merged
    # M2 is a sum of non-negative terms (Chan et al.), so an outlier shift costs no precision.
    if IS_RMS:
        shift = tl.full([], 0.0, ACC)
    else:
        first = tl.arange(0, BLOCK_N) < N
        # Not stored yet: in place (H is R) the walk below still has to read this chunk's r.
        x0 = _load_row_input(x_row, r_row, h_row, tl.arange(0, BLOCK_N), first, HAS_RESIDUAL,
                             False, ACC)
        shift = tl.sum(x0) / tl.minimum(N, BLOCK_N)
    mean = tl.full([], 0.0, ACC)
    m2 = tl.full([], 0.0, ACC)
    count = tl.full([], 0.0, ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        x = _load_row_input(x_row, r_row, h_row, cols, mask, HAS_RESIDUAL, STORE_RESIDUAL, ACC)
        if IS_RMS:
            m2 += tl.sum(x * x)
        else:
            x = tl.where(mask, x - shift, 0.0)
            n_chunk = tl.minimum(N - start, BLOCK_N).to(ACC)
            chunk_mean = tl.sum(x) / n_chunk
            dev = tl.where(mask, x - chunk_mean, 0.0)
            delta = chunk_mean - mean
            total = count + n_chunk
            mean += delta * (n_chunk / total)
            m2 += tl.sum(dev * dev) + delta * delta * (count * n_chunk / total)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / N + _eps_in(eps, ACC))
    tl.store(Rstd + row, rstd)
    if not IS_RMS:
        tl.store(Mean + row, shift + mean)
    # Backwards over the chunks: the chunk read last (most likely still in L2) first.
    num_chunks = tl.cdiv(N, BLOCK_N)
    for i in range(0, num_chunks):
        cols = (num_chunks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_RESIDUAL and STORE_RESIDUAL:
            x = tl.load(h_row + cols, mask=mask, other=0.0).to(ACC)
        else:
            x = _load_row_input(x_row, r_row, h_row, cols, mask, HAS_RESIDUAL, False, ACC)
        if IS_RMS:
            y = x * rstd
        else:
            y = ((x - shift) - mean) * rstd
        if ROUND_XHAT:
            y = y.to(X.dtype.element_ty).to(ACC)
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(ACC)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_row_stats_kernel(X, W, DY, Mean, Rstd, C1, C2, N, stride_x, stride_dy,
                                     IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                     ROUND_XHAT: tl.constexpr, ACC: tl.constexpr,
                                     BLOCK_N: tl.constexpr):
    """Per row: c1 = mean(x_hat * w*dy) and c2 = mean(w*dy), for the column-chunked backward."""
    row = tl.program_id(0).to(tl.int64)
    rstd = tl.load(Rstd + row).to(ACC)
    mean = rstd  # unused for RMSNorm
    if not IS_RMS:
        mean = tl.load(Mean + row).to(ACC)
    c1, c2 = _row_dots(X, W, DY, X + row * stride_x, DY + row * stride_dy, N, mean, rstd,
                       IS_RMS, HAS_WEIGHT, ROUND_XHAT, ACC, BLOCK_N)
    tl.store(C1 + row, c1)
    if not IS_RMS:
        tl.store(C2 + row, c2)


@triton.jit
def _dx(x_hat, wdy, c1, c2, rstd, DX, IS_RMS: tl.constexpr, ROUND_DX_TERMS: tl.constexpr,
        ACC: tl.constexpr):
    """dx = rstd * (w*dy - (x_hat * c1 + c2)) (c2 absent for RMSNorm); ROUND_DX_TERMS: the two
    terms rounded to dx's dtype separately (see _layer_norm_bwd_kernel)."""
    if IS_RMS and ROUND_DX_TERMS:
        dx = ((wdy * rstd).to(DX.dtype.element_ty).to(ACC)
              + (-(x_hat * c1) * rstd).to(DX.dtype.element_ty).to(ACC))
    elif IS_RMS:
        dx = (wdy - x_hat * c1) * rstd
    else:
        dx = (wdy - (x_hat * c1 + c2)) * rstd
    return dx


@triton.jit
def _dw_term(dy, x_hat, DY, ROUND_XHAT: tl.constexpr, ACC: tl.constexpr):
    """One row's dW contribution dy * x_hat; ROUND_XHAT: as torch's autograd computes it through
    `weight * x_hat.to(dtype)` (x_hat and the product rounded to the input dtype)."""
    if ROUND_XHAT:
        x_hat_in = x_hat.to(DY.dtype.element_ty).to(ACC)
        term = (dy * x_hat_in).to(DY.dtype.element_ty).to(ACC)
    else:
        term = dy * x_hat
    return term


@triton.jit
def _bwd_chunk(X, W, DY, x_row, dy_row, cols, mask, mean, rstd, IS_RMS: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, ROUND_XHAT: tl.constexpr, ACC: tl.constexpr):
    """(dy, w*dy, x_hat) of one chunk of a row, in ACC (masked lanes 0)."""
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_row + cols, mask=mask, other=0.0).to(ACC)
    wdy = dy
    if HAS_WEIGHT:
        wdy = dy * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        if ROUND_XHAT:
            wdy = wdy.to(DY.dtype.element_ty).to(ACC)
    if IS_RMS:
        x_hat = x * rstd
    else:
        x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    return dy, wdy, x_hat


@triton.jit
def _row_dots(X, W, DY, x_row, dy_row, N, mean, rstd, IS_RMS: tl.constexpr,
              HAS_WEIGHT: tl.constexpr, ROUND_XHAT: tl.constexpr, ACC: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """(c1, c2) of one row, walked in BLOCK_N chunks: c1 = mean(x_hat * w*dy), c2 = mean(w*dy)
    (0 for RMSNorm)."""
    sum1 = tl.zeros([BLOCK_N], dtype=ACC)
    sum2 = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = cols < N
        _dy, wdy, x_hat = _bwd_chunk(X, W, DY, x_row, dy_row, cols, mask, mean, rstd,
                                     IS_RMS, HAS_WEIGHT, ROUND_XHAT, ACC)
        sum1 += x_hat * wdy
        if not IS_RMS:
            sum2 += wdy
    return tl.sum(sum1) / N, tl.sum(sum2) / N


@triton.jit
def _layer_norm_bwd_rows_kernel(X, W, DY, DX, Mean, Rstd, DW_partial, DB_partial, DRES,
                                PE_DW, PE_DB, M, N, stride_x, stride_dy, stride_dx, stride_dres,
                                rows_per_program, rows_per_example, slots_per_program,
                                IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                HAS_BIAS: tl.constexpr, HAS_DRESIDUAL: tl.constexpr,
                                ROUND_XHAT: tl.constexpr, ROUND_DX_TERMS: tl.constexpr,
                                PER_EXAMPLE: tl.constexpr,
                                ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Long rows in one launch, persistent: program p takes the consecutive rows
    [p * rows_per_program, (p + 1) * rows_per_program) (P programs, P * rows_per_program >= M).
    Per row, a first walk over the chunks sums c1 = mean(x_hat * w*dy), c2 = mean(w*dy); a
    second walk, over the chunks backwards (the last read first), writes dx and adds the row's
    dW/dB terms into the program's own partial row (DW_partial[p], DB_partial[p], zeroed by the
    program first: read, add, store). Only P rows and P partial rows are live at a time, so the plan
    sizes P for the second walk's reads and the partial rows to stay in L2. Flags as in
    _layer_norm_bwd_kernel.
    PER_EXAMPLE: the second walk also adds the same dW (dB) terms into the slot row of the
    row's example, PE_DW[p * slots_per_program + e - e_first] (e = row // rows_per_example,
    e_first the example of the program's first row): stored by the example's first row in the
    program (no zero fill), read, added to and stored by its later rows. Consecutive rows make
    an example's rows in one program one slot row, summed over the programs the example spans
    by _per_example_sq_kernel before squaring. dx and the partial rows are computed as without
    it."""
    pid = tl.program_id(0)
    dw_row = DW_partial + pid.to(tl.int64) * N
    db_row = DB_partial + pid.to(tl.int64) * N
    num_chunks = tl.cdiv(N, BLOCK_N)
    # The program's partial rows start at zero (written here, not by a fill launch; the same
    # threads read them back below, so no barrier is needed).
    for i in range(0, num_chunks):
        cols = i * BLOCK_N + tl.arange(0, BLOCK_N)
        zero = tl.zeros([BLOCK_N], dtype=DW_partial.dtype.element_ty)
        if HAS_WEIGHT:
            tl.store(dw_row + cols, zero, mask=cols < N)
        if HAS_BIAS:
            tl.store(db_row + cols, zero, mask=cols < N)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row_i in range(row_start, row_end):
        row = tl.cast(row_i, tl.int64)
        x_row = X + row * stride_x
        dy_row = DY + row * stride_dy
        rstd = tl.load(Rstd + row).to(ACC)
        mean = rstd  # unused for RMSNorm
        if not IS_RMS:
            mean = tl.load(Mean + row).to(ACC)
        c1, c2 = _row_dots(X, W, DY, x_row, dy_row, N, mean, rstd, IS_RMS, HAS_WEIGHT,
                           ROUND_XHAT, ACC, BLOCK_N)
        slot = (pid * slots_per_program + row_i // rows_per_example
                - row_start // rows_per_example).to(tl.int64) * N
        # Later rows of the example add into its slot row; its first row in the program stores.
        pe_add = (row_i != row_start) & (row_i % rows_per_example != 0)
        for i in range(0, num_chunks):
            cols = (num_chunks - 1 - i) * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = cols < N
            dy, wdy, x_hat = _bwd_chunk(X, W, DY, x_row, dy_row, cols, mask, mean, rstd,
                                        IS_RMS, HAS_WEIGHT, ROUND_XHAT, ACC)
            dx = _dx(x_hat, wdy, c1, c2, rstd, DX, IS_RMS, ROUND_DX_TERMS, ACC)
            if HAS_DRESIDUAL:
                dx += tl.load(DRES + row * stride_dres + cols, mask=mask, other=0.0).to(ACC)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                term = _dw_term(dy, x_hat, DY, ROUND_XHAT, ACC)
                dw = tl.load(dw_row + cols, mask=mask, other=0.0)
                tl.store(dw_row + cols, dw + term, mask=mask)
                if PER_EXAMPLE:
                    prev = tl.load(PE_DW + slot + cols, mask=mask & pe_add, other=0.0)
                    tl.store(PE_DW + slot + cols, prev + term, mask=mask)
            if HAS_BIAS:
                db = tl.load(db_row + cols, mask=mask, other=0.0)
                tl.store(db_row + cols, db + dy, mask=mask)
                if PER_EXAMPLE:
                    prev = tl.load(PE_DB + slot + cols, mask=mask & pe_add, other=0.0)
                    tl.store(PE_DB + slot + cols, prev + dy, mask=mask)
        if PER_EXAMPLE:
            # The next row reads the slot row back: make every thread's store visible first
            # (whichever threads the compiler gives the load and the store).
            tl.debug_barrier()


@triton.jit
def _example_sums(PE_DW, PE_DB, dw_term, dy, pe_w, pe_b, sel, e, e_first, group,
                  slots_per_program, rows_per_example, row_start, row_end, first_row, tile_end,
                  cols, col_mask, N, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SEGMENTED: tl.constexpr, IN_SLOT: tl.constexpr):
    """Example e's dW / dB terms in this tile into e's slot row of this program
    (_example_sum): SEGMENTED, a masked sum over the tile's rows (`sel`), pe_w / pe_b of shape
    [BLOCK_N]; else the tile is one row of e, taken as it is ([1, BLOCK_N], the tile's own
    layout: no reduction, no layout conversion)."""
    # Whether e's first / last row in this program is in this tile.
    starts = tl.maximum(row_start, e * rows_per_example) >= first_row
    ends = tl.minimum(row_end, (e + 1) * rows_per_example) <= tile_end
    slot = (group * slots_per_program + (e - e_first)).to(tl.int64) * N
    if SEGMENTED:
        offs = slot + cols
        mask = col_mask
    else:
        offs = slot + cols[None, :]
        mask = col_mask[None, :]
    if HAS_WEIGHT:
        part = dw_term
        if SEGMENTED:
            part = tl.sum(tl.where(sel, dw_term, 0.0), axis=0)
        pe_w = _example_sum(PE_DW + offs, part, pe_w, starts, ends, mask, IN_SLOT)
    if HAS_BIAS:
        part = dy
        if SEGMENTED:
            part = tl.sum(tl.where(sel, dy, 0.0), axis=0)
        pe_b = _example_sum(PE_DB + offs, part, pe_b, starts, ends, mask, IN_SLOT)
    return pe_w, pe_b


@triton.jit
def _example_sum(slot_ptrs, part, pe, starts, ends, mask, IN_SLOT: tl.constexpr):
    """Adds `part` (an example's terms in this tile) to the example's sum in this program, which
    starts at its first row in the program (no zero fill) and ends in its slot row: IN_SLOT,
    read, added to and stored in the slot row by every tile (the caller puts a barrier
    between tiles); else `pe`, a running sum in registers restarted at the example's first
    tile and stored once, at its last (no slot traffic but the one write, more registers)."""
    if IN_SLOT:
        prev = tl.load(slot_ptrs, mask=mask & (starts == 0), other=0.0)
        tl.store(slot_ptrs, prev + part, mask=mask)
    else:
        pe = tl.where(starts, part, pe + part)
        tl.store(slot_ptrs, pe, mask=mask & ends)
    return pe


@triton.jit
def _layer_norm_bwd_kernel(X, W, DY, DX, Mean, Rstd, C1, C2, DW_partial, DB_partial, DRES,
                           PE_DW, PE_DB, M, N, stride_x, stride_dy, stride_dx, stride_dres,
                           rows_per_program, rows_per_example, slots_per_program, first_group,
                           IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_DRESIDUAL: tl.constexpr, ROUND_XHAT: tl.constexpr,
                           ROUND_DX_TERMS: tl.constexpr, ROW_STATS_IN_TILE: tl.constexpr,
                           PER_EXAMPLE: tl.constexpr, PE_IN_SLOT: tl.constexpr,
                           ACCUMULATE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """Grid (column blocks, row groups). Program (c, j) is row group g = first_group + j: it
    owns rows [g*rows_per_program, ...) of column block c, writes dx there and row j of the
    dW/dB partial sums (ACCUMULATE: adds into it, a row chunk after the first; the launcher
    runs the chunks in order, so each partial row is a fixed-order sum).

    ROW_STATS_IN_TILE: the column block is the whole row, so c1/c2 come from the tile itself;
    otherwise they were computed by _layer_norm_bwd_row_stats_kernel.
    HAS_DRESIDUAL: the gradient of the stored residual stream h (DRES) is added into dx.
    ROUND_XHAT: reproduce the forward's rounding: w*dy and the dW terms dy*x_hat are rounded to
    the input dtype, x_hat too (what torch's autograd does through `weight * x_hat.to(dtype)`).
    ROUND_DX_TERMS (RMSNorm): dx = round(wdy * rstd) + round(-x_hat * c1 * rstd), each term
    rounded to dx's dtype, as torch's autograd does for T5LayerNorm, whose input enters its two
    uses (the variance in fp32, `x * rsqrt(...)` promoted) separately.
    PER_EXAMPLE: rows are grouped into examples of rows_per_example consecutive rows; the
    program also sums, from the tile already in registers, each example's dW (dB) terms of its
    column block in registers (_example_sums) and stores the sum once to its own slot row
    PE_DW[group * slots_per_program + e - e_first] (column blocks write disjoint columns; no
    zero fill, no atomics, nothing read back); PE_IN_SLOT: adds them into the slot row per
    tile instead (fewer registers; see MAX_PE_REGISTER_WARPS). _per_example_sq_kernel sums the
    slots of an example over the programs it spans. The dW/dB partials and dx are computed
    exactly as without the flag (the weight is then loaded per tile: same values).
    """
    col_block = tl.program_id(0)
    # Row groups from the last: after the row-statistics kernel the last rows are in L2, and
    # the programs launched first take them.
    local = tl.num_programs(1) - 1 - tl.program_id(1)
    group = first_group + local
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT and not PER_EXAMPLE:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    row_start = group * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # PER_EXAMPLE without PE_IN_SLOT: the current example's terms so far (_example_sums)
    if BLOCK_M == 1:
        pe_w = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        pe_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    else:
        pe_w = tl.zeros([BLOCK_N], dtype=ACC)
        pe_b = tl.zeros([BLOCK_N], dtype=ACC)
    e_first = row_start // rows_per_example
    for first_row in range(row_start, row_end, BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask,
                     other=0.0).to(ACC)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0).to(ACC)
        if IS_RMS:
            x_hat = x * rstd[:, None]
        else:
            mean = tl.load(Mean + rows, mask=row_mask, other=0.0).to(ACC)
            x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            if PER_EXAMPLE:
                # Loaded per tile (from L1/L2): the per-example sums take its registers.
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
            wdy = dy * w[None, :]
            if ROUND_XHAT:
                wdy = wdy.to(DY.dtype.element_ty).to(ACC)
        else:
            wdy = dy
        if ROW_STATS_IN_TILE:
            c1 = tl.sum(x_hat * wdy, axis=1) / N
            if not IS_RMS:
                c2 = tl.sum(wdy, axis=1) / N
        else:
            c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)
            if not IS_RMS:
                c2 = tl.load(C2 + rows, mask=row_mask, other=0.0)
        c2_b = c1[:, None]  # unused for RMSNorm
        if not IS_RMS:
            c2_b = c2[:, None]
        dx = _dx(x_hat, wdy, c1[:, None], c2_b, rstd[:, None], DX, IS_RMS, ROUND_DX_TERMS, ACC)
        if HAS_DRESIDUAL:
            dx += tl.load(DRES + rows64[:, None] * stride_dres + cols[None, :], mask=mask,
                          other=0.0).to(ACC)
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=mask)
        dw_term = dy  # (unused without a weight)
        if HAS_WEIGHT:
            dw_term = _dw_term(dy, x_hat, DY, ROUND_XHAT, ACC)
            dw_acc += dw_term
        if HAS_BIAS:
            db_acc += dy
        if PER_EXAMPLE:
            tile_end = tl.minimum(first_row + BLOCK_M, row_end)
            if BLOCK_M == 1:  # one row, one example: no segmented sum
                e = first_row // rows_per_example
                pe_w, pe_b = _example_sums(PE_DW, PE_DB, dw_term, dy, pe_w, pe_b, row_mask,
                                           e, e_first, group, slots_per_program,
                                           rows_per_example, row_start, row_end, first_row,
                                           tile_end, cols, col_mask, N, HAS_WEIGHT, HAS_BIAS,
                                           False, PE_IN_SLOT)
            else:
                # The examples this tile touches (few unless rows_per_example is small).
                e_lo = first_row // rows_per_example
                e_hi = (tile_end - 1) // rows_per_example
                for e in range(e_lo, e_hi + 1):
                    sel = (row_mask & (rows // rows_per_example == e))[:, None]
                    pe_w, pe_b = _example_sums(PE_DW, PE_DB, dw_term, dy, pe_w, pe_b, sel,
                                               e, e_first, group, slots_per_program,
                                               rows_per_example, row_start, row_end,
                                               first_row, tile_end, cols, col_mask, N,
                                               HAS_WEIGHT, HAS_BIAS, True, PE_IN_SLOT)
        if PER_EXAMPLE and PE_IN_SLOT:
            # The next tile reads the slot rows back: every thread's store first.
            tl.debug_barrier()
    if HAS_WEIGHT:
        dw = tl.sum(dw_acc, axis=0)
        if ACCUMULATE:
            dw += tl.load(DW_partial + local * N + cols, mask=col_mask, other=0.0)
        tl.store(DW_partial + local * N + cols, dw, mask=col_mask)
    if HAS_BIAS:
        db = tl.sum(db_acc, axis=0)
        if ACCUMULATE:
            db += tl.load(DB_partial + local * N + cols, mask=col_mask, other=0.0)
        tl.store(DB_partial + local * N + cols, db, mask=col_mask)


# --- launch plans ------------------------------------------------------------------------------

_forced_bwd_path: Optional[str] = None


def force_backward_path(path: str):
    """Within the block, backward launches for rows longer than MAX_FUSED_N_BWD take `path`
    ("rows": the persistent kernel, "chunked": row statistics then the column-chunked kernel)
    whatever the cost model prefers: for tests and tuning."""
    if path not in ("rows", "chunked"):
        raise ValueError(f"unknown long-row backward path {path!r}; expected 'rows' or 'chunked'")
    return planning_override(sys.modules[__name__], "_forced_bwd_path", path)


_elem_size = elem_size


def _fused_limit(limit: int, dtype: torch.dtype) -> int:
    return limit // 2 if dtype == torch.float64 else limit


@dataclass(frozen=True)
class LayerNormPlan:
    """The launches of one layer_norm_fwd / add_layer_norm_fwd (mode "fwd") or layer_norm_bwd
    ("bwd") call: path "fused" (whole rows in a [block_m, block_n] tile) or "chunked" (rows
    walked in chunks of block_n), the main kernel's grid and warps, the rows each backward
    program owns and the number of dW/dB partial rows, and every launch with its bytes."""
    mode: str
    path: str
    block_m: int
    block_n: int
    num_warps: int
    grid: tuple[int, ...]
    rows_per_program: int
    partial_rows: int
    launches: tuple[LaunchCost, ...]
    # Column-chunked backward: rows per row chunk (whole programs), each chunk one launch pair
    # (see _row_chunks); 0: one pair over all rows.
    chunk_rows: int = 0

    @staticmethod
    def row_chunks(m: int, chunk_rows: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges, one launch pair each (all rows when chunk_rows is 0)."""
        step = chunk_rows or max(m, 1)
        return [(r0, min(m, r0 + step)) for r0 in range(0, m, step)] or [(0, 0)]


@cached_plan
def plan_layer_norm(m: int, n: int, dtype: torch.dtype, mode: str, device: torch.device, *,
                    is_rms: bool, has_weight: bool = True, has_bias: bool = True,
                    weight_dtype: Optional[torch.dtype] = None,
                    residual_dtype: Optional[torch.dtype] = None, store_residual: bool = False,
                    has_dresidual: bool = False, dy_dtype: Optional[torch.dtype] = None,
                    dx_dtype: Optional[torch.dtype] = None) -> LayerNormPlan:
    """The launch plan for M rows of N features: the same choices the launchers make (a pure
    function of shapes, dtypes and flags). `dtype`: x's (forward) or the norm input's
    (backward: h for the fused residual form). Forward: `residual_dtype` set means a residual
    is added (h in that dtype), stored when `store_residual`. Backward: `dy_dtype`, `dx_dtype`
    default to `dtype`; `has_dresidual` adds h's other gradient into dx. Without a weight the
    plan has no dW partials (and likewise for the bias; RMSNorm has none)."""
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"unknown layer_norm plan mode {mode!r}")
    has_bias = has_bias and not is_rms
    es = _elem_size(dtype)
    acc = _elem_size(acc_dtype(dtype))
    w_es = _elem_size(weight_dtype or dtype)
    affine = n * w_es * (int(has_weight) + int(has_bias))
    stats = m * acc * (1 if is_rms else 2)
    data = m * n * es
    block_n = next_power_of_2(max(n, 1))
    if mode == "fwd":
        has_residual = residual_dtype is not None
        r_es = _elem_size(residual_dtype) if has_residual else 0
        store = has_residual and store_residual
        # Bytes of one row's first walk: x (and r) in, h out; the second walk reads x (and r)
        # again, or h where it was stored.
        walk1 = n * (es + r_es) + (n * r_es if store else 0)
        walk2 = n * (r_es if store else es + r_es)
        writes = data + stats + (m * n * r_es if store else 0)
        if block_n <= _fused_limit(MAX_FUSED_N_FWD, dtype):
            block_m = rows_per_tile(block_n, FWD_TILE, 64)
            warps = num_warps_for(block_m * block_n, elems_per_warp=ELEMS_PER_WARP_LN)
            grid = (cdiv(m, block_m),)
            launch = LaunchCost("_layer_norm_fwd_kernel", grid, warps,
                                reads=m * n * (es + r_es) + affine, writes=writes)
            return LayerNormPlan("fwd", "fused", block_m, block_n, warps, grid, block_m, 0,
                                 (launch,))
        chunk = _fused_limit(CHUNK_N, dtype)
        # 16-bit: 16 warps, 8 elements per thread (at 16 per thread fp16 spilled a few bytes on
        # sm_80 and sm_90); 32/64-bit: 4 warps (at 8 and 16 warps ptxas kept fp32 to 40-80
        # registers on sm_80 and spilled 8 bytes). Found by the static cost report.
        warps = num_warps_for(CHUNK_N, elems_per_warp=ELEMS_PER_WARP if es == 2 else 1024)
        # Persistent grid: as many rows in flight as fit in the usable L2 (the second walk then
        # hits it), at least one program per SM (bandwidth first), at most two.
        budget = int(L2_REUSE_FRACTION * l2_cache_bytes(device))
        sms = num_parallel_programs(device)
        programs = max(1, min(m, max(sms, min(min_fill_programs(device), budget // walk1))))
        grid = (programs,)
        launch = LaunchCost("_layer_norm_fwd_chunked_kernel", grid, warps,
                            reads=m * (walk1 - (n * r_es if store else 0) + walk2) + affine,
                            writes=writes, l2_reread=m * walk2, l2_window=programs * walk1)
        return LayerNormPlan("fwd", "chunked", 1, chunk, warps, grid, 1, 0, (launch,))

    dy_es = _elem_size(dy_dtype or dtype)
    dx_es = _elem_size(dx_dtype or dtype)
    inputs = m * n * (es + dy_es)
    dres = m * n * es if has_dresidual else 0
    n_partials = int(has_weight) + int(has_bias)
    whole_row = block_n <= _fused_limit(MAX_FUSED_N_BWD, dtype)
    if not whole_row:
        block_n = _fused_limit(CHUNK_N, dtype)
    block_m = rows_per_tile(block_n, BWD_TILE, 16)
    col_blocks = cdiv(n, block_n)
    row_tiles = cdiv(m, block_m)
    if whole_row:
        # One row of dW/dB partial sums per program: a program per SM (two for short rows),
        # each with enough rows that the partials stay small next to x, dy and dx.
        groups = min(row_tiles, max(num_parallel_programs(device),
                                    min(min_fill_programs(device), m // MIN_ROWS_PER_PARTIAL)))
    else:
        groups = min(row_tiles, cdiv(min_fill_programs(device), col_blocks))
    groups = max(1, groups)
    rows_per_program = cdiv(max(m, 1), groups)
    warps = num_warps_for(block_m * block_n, elems_per_warp=ELEMS_PER_WARP_LN)
    w_bytes = n * w_es * int(has_weight)
    if whole_row:
        partial_bytes = groups * n * acc * n_partials
        grid = (col_blocks, groups)
        launches = [LaunchCost("_layer_norm_bwd_kernel", grid, warps,
                               reads=inputs + dres + stats + w_bytes,
                               writes=m * n * dx_es + partial_bytes)]
        launches += _column_sums(n, groups, acc, w_es, has_weight, has_bias)
        return LayerNormPlan("bwd", "fused", block_m, block_n, warps, grid, rows_per_program,
                             groups, tuple(launches))
    rows = _rows_plan(m, n, dtype, device, has_weight, has_bias, w_es, es, dy_es, dx_es,
                      dres, stats, acc, n_partials)
    rows_per_program, groups, chunk_rows = _row_chunks(m, n * (es + dy_es),
                                                       n * acc * n_partials, groups, device)
    c_bytes = acc * (1 if is_rms else 2)  # c1 (and c2) per row
    launches = []
    chunks = LayerNormPlan.row_chunks(m, chunk_rows)
    for i, (r0, r1) in enumerate(chunks):
        rows_c = r1 - r0
        inputs_c = rows_c * n * (es + dy_es)
        stats_c = stats // max(m, 1) * rows_c
        groups_c = cdiv(rows_c, rows_per_program)
        partial_c = groups_c * n * acc * n_partials
        launches.append(LaunchCost("_layer_norm_bwd_row_stats_kernel", (rows_c,),
                                   num_warps_for(block_n, elems_per_warp=ELEMS_PER_WARP_LN),
                                   reads=inputs_c + stats_c + w_bytes, writes=rows_c * c_bytes))
        if len(chunks) == 1:
            # The dx kernel re-reads x and dy after the row-statistics kernel read all of them:
            # from L2 only the tail (its row groups run last-first for that).
            launches.append(LaunchCost(
                "_layer_norm_bwd_kernel", (col_blocks, groups), warps,
                reads=inputs + dres + stats + w_bytes + m * c_bytes,
                writes=m * n * dx_es + partial_c, l2_reread=inputs))
            continue
        # Row chunks: the chunk's x and dy were just read by its row-statistics kernel, and
        # the partial rows (read, added to, stored again by every chunk after the first) were
        # stored by the previous chunk with only this chunk's x and dy read since: a window of
        # inputs_c + the partial rows, sized by _row_chunks to fit the usable L2. Only the last
        # chunk's partial rows reach HBM (as in the persistent rows kernel's updates).
        earlier = partial_c if i > 0 else 0
        later = partial_c if i < len(chunks) - 1 else 0
        launches.append(LaunchCost(
            "_layer_norm_bwd_kernel", (col_blocks, groups_c), warps,
            reads=inputs_c + rows_c * n * es * int(has_dresidual) + stats_c + w_bytes
            + rows_c * c_bytes + earlier,
            writes=rows_c * n * dx_es + partial_c, l2_reread=inputs_c + earlier + later,
            l2_window=inputs_c + partial_c))
    launches += _column_sums(n, groups, acc, w_es, has_weight, has_bias)
    chunked = LayerNormPlan("bwd", "chunked", block_m, block_n, warps, (col_blocks, groups),
                            rows_per_program, groups, tuple(launches), chunk_rows)
    # The persistent kernel where its grid fills the device (not with a handful of rows, one
    # program each, where the column-chunked grid has column blocks x row groups) and its
    # window fits the usable L2 (3 passes by the model, one launch instead of two per row
    # chunk) or the cost model finds it no dearer.
    budget_l2 = l2_cache_bytes(device)
    fills = rows.grid[0] >= cdiv(3 * num_parallel_programs(device), 4)
    rows_fit = rows.launches[0].l2_window <= int(L2_REUSE_FRACTION * budget_l2)
    if _forced_bwd_path == "rows" or (_forced_bwd_path is None and fills and (
            rows_fit or modeled_hbm_bytes(rows.launches, budget_l2)
            <= modeled_hbm_bytes(chunked.launches, budget_l2))):
        return rows
    return chunked


def _row_chunks(m: int, row_bytes: int, partial_row_bytes: int, groups: int,
                device: torch.device) -> tuple[int, int, int]:
    """(rows per program, dW/dB partial rows, rows per row chunk; 0: one chunk) of the
    column-chunked backward. Its dx kernel re-reads the x and dy (`row_bytes` a row) that the
    row-statistics kernel just read: when all of them fit the cost model's L2 window
    (L2_REUSE_FRACTION of the L2), one launch pair over all rows with `groups` programs per
    column block. Otherwise the pair runs once per row chunk, chunk_rows = groups * rows per
    program (whole programs, so example slot rows and program boundaries are the unchunked
    layout's): the most rows whose x and dy fit the window next to the `groups` partial rows
    (`partial_row_bytes` each) the chunks accumulate into, at least one, at most
    MAX_ROW_CHUNKS chunks of about equal size."""
    window = int(L2_REUSE_FRACTION * l2_cache_bytes(device))
    if m * row_bytes <= window or MAX_ROW_CHUNKS <= 1:
        return cdiv(max(m, 1), groups), groups, 0
    fit = max(1, (window - groups * partial_row_bytes) // row_bytes)
    chunk_rows = cdiv(m, min(MAX_ROW_CHUNKS, cdiv(m, fit)))
    rows_per_program = cdiv(chunk_rows, groups)
    groups = cdiv(chunk_rows, rows_per_program)  # fewer when rows do not divide evenly
    return rows_per_program, groups, groups * rows_per_program


def _column_sums(n: int, rows: int, acc: int, w_es: int, has_weight: bool,
                 has_bias: bool) -> list[LaunchCost]:
    params = int(has_weight) + int(has_bias)  # one launch sums dW's and dB's partials
    return [LaunchCost("_column_sum_kernel", (cdiv(n, 128),), 4,
                       reads=params * rows * n * acc, writes=params * n * w_es)] if params else []


def _rows_plan(m: int, n: int, dtype: torch.dtype, device: torch.device, has_weight: bool,
               has_bias: bool, w_es: int, es: int, dy_es: int, dx_es: int, dres: int,
               stats: int, acc: int, n_partials: int) -> LayerNormPlan:
    """The persistent long-row backward (_layer_norm_bwd_rows_kernel): one program per SM, each
    walking its rows twice and updating its own dW/dB partial row after every row."""
    chunk = _fused_limit(CHUNK_N, dtype)
    # 8 elements per thread: at 16 (8 warps) ptxas held the kernel to 128 registers and spilled
    # 16-32 bytes for unaligned N (no vector loads) on sm_90.
    warps = num_warps_for(chunk)
    # One program per SM, or down to 3/4 of the SMs where that makes the window (below) fit in
    # the usable L2 (fp32 LayerNorm at N = 16384: 100 programs of 256 KB on an H100).
    sms = num_parallel_programs(device)
    per_program = n * (es + dy_es + acc * n_partials)
    budget = int(L2_REUSE_FRACTION * l2_cache_bytes(device))
    programs = max(1, min(m, max(cdiv(3 * sms, 4), min(sms, budget // per_program))))
    inputs = m * n * (es + dy_es)
    # A partial row is read and written once per row the program takes: those bytes stay in L2
    # when the window (the rows in flight and the partial rows) fits; only the final partial
    # rows reach HBM.
    updates = m * n * acc * n_partials
    window = programs * per_program
    launch = LaunchCost("_layer_norm_bwd_rows_kernel", (programs,), warps,
                        reads=2 * inputs + dres + stats + 2 * n * w_es * int(has_weight)
                        + updates,
                        writes=m * n * dx_es + updates,
                        l2_reread=inputs + 2 * updates - programs * n * acc * n_partials,
                        l2_window=window)
    launches = (launch,) + tuple(_column_sums(n, programs, acc, w_es, has_weight, has_bias))
    return LayerNormPlan("bwd", "rows", 1, chunk, warps, (programs,),
                         cdiv(m, programs), programs, launches)



_MAIN_BWD_KERNELS = ("_layer_norm_bwd_rows_kernel", "_layer_norm_bwd_kernel")


def pe_in_slot(plan: LayerNormPlan, has_weight: bool, has_bias: bool) -> bool:
    """Whether the per-example backward's tile kernel adds into its slot rows (read, add,
    store per tile) rather than summing each example in registers (see MAX_PE_REGISTER_WARPS;
    the persistent rows kernel always adds into them)."""
    return plan.path != "rows" and plan.num_warps > MAX_PE_REGISTER_WARPS and has_weight \
        and has_bias


def slot_pairs(r0: int, r1: int, rows_per_program: int, rows_per_example: int) -> int:
    """The (row group, example) pairs of rows [r0, r1) cut into row groups of rows_per_program
    rows from r0: the per-example backward's slot rows (each pair is one)."""
    return sum((min(a + rows_per_program, r1) - 1) // rows_per_example - a // rows_per_example
               + 1 for a in range(r0, r1, rows_per_program))


@cached_plan
def plan_layer_norm_per_example(m: int, n: int, dtype: torch.dtype, device: torch.device, *,
                                rows_per_example: int, is_rms: bool, has_weight: bool = True,
                                has_bias: bool = True,
                                weight_dtype: Optional[torch.dtype] = None) -> LayerNormPlan:
    """The plan of one layer_norm_bwd_per_example call: plan_layer_norm's backward plan (same
    path, grid, partial rows and launches) with, after each main kernel launch, a bytes-only
    entry "<main kernel>.slots" (its slot-row traffic; a "." in the name: not a launch), and
    one more launch, _per_example_sq_kernel. Per parameter (accumulation dtype, rows of N):
    one slot row per (row group, example) pair (`slot_pairs`: E + programs at most). The tile
    kernels (whole-row, column-chunked) sum an example's terms in registers and write each
    slot row once, or (`pe_in_slot`) store it at the example's first tile in the program and
    read, add and store it at every later tile, as the persistent rows kernel does at every
    later row: in L2 while the window (one slot row per program; on the rows path next to
    its rows in flight and partial rows, which the plain plan's program count does not allow
    for, so that the partial-row updates may then miss the L2 too: counted here) fits; only
    the final slot rows reach HBM. The reduction reads every slot row once (from HBM: the
    model gives no L2 credit for the main kernel's last writes) and writes E values."""
    plan = plan_layer_norm(m, n, dtype, "bwd", device, is_rms=is_rms, has_weight=has_weight,
                           has_bias=has_bias, weight_dtype=weight_dtype)
    rpe = int(rows_per_example)
    if rpe < 1 or m % rpe != 0:
        raise ValueError(f"plan_layer_norm_per_example: rows_per_example {rows_per_example} "
                         f"does not divide {m} rows")
    params = int(has_weight) + int(has_bias and not is_rms)
    acc = _elem_size(acc_dtype(dtype))
    row = n * acc * params  # one slot row of every parameter
    examples = m // rpe
    groups, rpp = plan.partial_rows, plan.rows_per_program
    in_slot = pe_in_slot(plan, has_weight, has_bias and not is_rms)
    launches = []
    mains = iter(LayerNormPlan.row_chunks(m, plan.chunk_rows))
    for launch in plan.launches:
        launches.append(launch)
        if launch.kernel not in _MAIN_BWD_KERNELS:
            continue
        r0, r1 = (0, m) if plan.path == "rows" else next(mains)
        written = slot_pairs(r0, r1, rpp, rpe) * row
        if plan.path == "rows":
            # One more row per program and parameter in flight: the kernel's own re-reads see
            # the larger window as well.
            window = launch.l2_window + groups * row
            launches[-1] = LaunchCost(launch.kernel, launch.grid, launch.num_warps,
                                      launch.reads, launch.writes, launch.l2_reread, window)
            updates = m * row
        elif in_slot:
            # Every tile reads, adds to and stores its example's slot row: one per program in
            # flight.
            window = groups * row
            updates = cdiv(r1 - r0, plan.block_m) * row
        else:
            launches.append(LaunchCost(launch.kernel + ".slots", (), 0, reads=0,
                                       writes=written))
            continue
        launches.append(LaunchCost(launch.kernel + ".slots", (), 0, reads=updates - written,
                                   writes=updates, l2_reread=2 * (updates - written),
                                   l2_window=window))
    spec = per_example_sq_spec(examples, n, has_weight, has_bias and not is_rms,
                               acc_dtype(dtype))
    launches.append(LaunchCost("_per_example_sq_kernel", spec.grid, spec.meta["num_warps"],
                               reads=slot_pairs(0, m, rpp, rpe) * row,
                               writes=examples * acc * params))
    return LayerNormPlan("bwd", plan.path, plan.block_m, plan.block_n, plan.num_warps,
                         plan.grid, rpp, groups, tuple(launches), plan.chunk_rows)

# --- launchers ---------------------------------------------------------------------------------

def layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, is_rms: bool, out: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd for a 2-D x (rows of N features, unit column stride). For RMSNorm `mean`
    is empty. mean/rstd are fp32 (fp64 for fp64 x). y is written into `out` when given (2-D
    like x, unit column stride: a view of the caller's output)."""
    y, mean, rstd, _h = add_layer_norm_fwd(x, None, weight, bias, eps, is_rms, out=out)
    return y, mean, rstd


def add_layer_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor],
                       weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                       is_rms: bool, residual_dtype: Optional[torch.dtype] = None,
                       round_xhat: bool = False, inplace: bool = False,
                       store_residual: bool = True, out: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd, h. With a `residual` (2-D like x, unit column stride) the norm runs on
    h = x + residual, stored in `residual_dtype` (default: residual's dtype) and returned;
    otherwise h is empty. `round_xhat` rounds x_hat to x's dtype before the weight multiply.
    `inplace`: y is written into x and h into residual (which must be given, in x's dtype).
    `out`: y is written into it (2-D like x, unit column stride).
    `store_residual=False`: h is not written (and comes back empty): y only, one write less.
    Without a residual h is None."""
    M, N = x.shape
    device = x.device
    has_residual = residual is not None
    store_residual = has_residual and (store_residual or inplace)
    stats_dtype = acc_dtype(x.dtype)
    y = x if inplace else out if out is not None else torch.empty(M, N, dtype=x.dtype,
                                                                  device=device)
    rstd = torch.empty(M, dtype=stats_dtype, device=device)
    mean = torch.empty(0 if is_rms else M, dtype=stats_dtype, device=device)
    if M == 0 or N == 0:
        if N == 0:  # like torch: no features means NaN statistics
            rstd.fill_(float("nan"))
            mean.fill_(float("nan"))
        if residual is None:
            return y, mean, rstd, None
        h = (x + residual).to(residual_dtype or residual.dtype) if store_residual \
            else x.new_empty(0)
        return y, mean, rstd, h
    # Unused pointers still need a tensor argument; rstd stands in for them.
    w = weight if weight is not None else rstd
    b = bias if bias is not None else rstd
    mean_arg = rstd if is_rms else mean
    r = residual if has_residual else rstd
    h = h_arg = rstd
    if inplace:
        h = h_arg = residual
    elif has_residual:
        # Not stored: an empty tensor still tells the kernel h's dtype.
        h = h_arg = torch.empty((M, N) if store_residual else (0,),
                                dtype=residual_dtype or residual.dtype, device=device)
    spec = _FWD_SPECS[M, N, x.dtype, device, is_rms, weight.dtype if weight is not None else None,
                      bias is not None, h_arg.dtype if has_residual else None, store_residual,
                      round_xhat]
    # eps as a float: the kernels declare it "fp64" and convert it to their ACC dtype.
    run(spec, x, y, w, b, mean_arg, rstd, r, h_arg, M, N, x.stride(0), y.stride(0),
        r.stride(0) if has_residual else 0, h.stride(0) if store_residual else 0, float(eps))
    if store_residual:
        return y, mean, rstd, h
    return y, mean, rstd, None if residual is None else x.new_empty(0)


def _fwd_spec(m: int, n: int, dtype: torch.dtype, device: torch.device, is_rms: bool,
              weight_dtype: Optional[torch.dtype], has_bias: bool,
              residual_dtype: Optional[torch.dtype], store_residual: bool,
              round_xhat: bool) -> LaunchSpec:
    plan = plan_layer_norm(m, n, dtype, "fwd", device, is_rms=is_rms,
                           has_weight=weight_dtype is not None, has_bias=has_bias,
                           weight_dtype=weight_dtype, residual_dtype=residual_dtype,
                           store_residual=store_residual)
    flags = dict(IS_RMS=is_rms, HAS_WEIGHT=weight_dtype is not None, HAS_BIAS=has_bias,
                 HAS_RESIDUAL=residual_dtype is not None, STORE_RESIDUAL=store_residual,
                 ROUND_XHAT=round_xhat, ACC=tl_acc_dtype(dtype))
    if plan.path == "fused":
        return launch_spec(_layer_norm_fwd_kernel, plan.grid, **flags, BLOCK_M=plan.block_m,
                           BLOCK_N=plan.block_n, num_warps=plan.num_warps)
    return launch_spec(_layer_norm_fwd_chunked_kernel, plan.grid, **flags,
                       BLOCK_N=plan.block_n, num_warps=plan.num_warps)


_FWD_SPECS = SpecCache(_fwd_spec)


def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                   is_rms: bool, dresidual: Optional[torch.Tensor] = None,
                   round_xhat: bool = False, dx_dtype: Optional[torch.dtype] = None,
                   round_dx_terms: bool = False
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dx, dweight, dbias (None where there is no weight / bias) for a 2-D x and dy.
    Only the dtype of `bias` is used: dbias comes back in it. `x` is the norm's input (h for the
    fused residual form); `dresidual`, the gradient of h from its other uses, is added into dx.
    dx has `dx_dtype` (default x's dtype); `round_xhat` as in the forward; `round_dx_terms`
    (RMSNorm) rounds dx's two terms separately (T5LayerNorm's autograd)."""
    dx, dweight, dbias, _, _ = _layer_norm_bwd(dy, x, weight, bias, mean, rstd, is_rms,
                                               dresidual, round_xhat, dx_dtype, round_dx_terms,
                                               0)
    return dx, dweight, dbias


def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                    is_rms: bool, dresidual: Optional[torch.Tensor], round_xhat: bool,
                    dx_dtype: Optional[torch.dtype], round_dx_terms: bool, rows_per_example: int
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor],
                               Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The backward on every path: dx, dweight, dbias, and with rows_per_example > 0 (M > 0 and
    N > 0) each example's squared dW and dB norms ([M // rows_per_example] in the accumulation
    dtype; None where there is no weight / bias, and without rows_per_example)."""
    M, N = x.shape
    device = x.device
    dx = torch.empty(M, N, dtype=dx_dtype or x.dtype, device=device)
    has_dresidual = dresidual is not None
    has_weight = weight is not None
    has_bias = bias is not None
    if M == 0 or N == 0:  # nothing to launch: zero weight gradients
        return (dx, weight.new_zeros(N) if has_weight else None,
                bias.new_zeros(N) if has_bias else None, None, None)
    bwd = _BWD_SPECS[M, N, x.dtype, device, is_rms, weight.dtype if has_weight else None,
                     has_bias, has_dresidual, dy.dtype, dx.dtype, round_xhat, round_dx_terms,
                     rows_per_example]
    plan = bwd.plan
    partial_dtype = acc_dtype(x.dtype)
    groups, rpp = plan.partial_rows, plan.rows_per_program
    # Every partial row and every slot row that is read is written first (the whole-row and
    # column-chunked kernels store their rows; the persistent rows kernel zeroes its partial
    # rows and stores a slot row at its example's first row), so no fill launch.
    # Unused pointers still need a tensor argument; rstd stands in for them.
    dw_partial = torch.empty(groups, N, dtype=partial_dtype, device=device) \
        if has_weight else rstd
    db_partial = torch.empty(groups, N, dtype=partial_dtype, device=device) \
        if has_bias else rstd
    rpe = max(rows_per_example, 1)
    slots = bwd.slots
    pe_dw = pe_db = rstd  # written only with PER_EXAMPLE
    if rows_per_example and has_weight:
        pe_dw = torch.empty(bwd.slot_rows, N, dtype=partial_dtype, device=device)
    if rows_per_example and has_bias:
        pe_db = torch.empty(bwd.slot_rows, N, dtype=partial_dtype, device=device)
    w = weight if has_weight else rstd
    mean_arg = rstd if is_rms else mean
    dres_arg = dresidual if has_dresidual else rstd
    stride_dres = dresidual.stride(0) if has_dresidual else 0
    if plan.path == "rows":
        run(bwd.main[0], x, w, dy, dx, mean_arg, rstd, dw_partial, db_partial, dres_arg, pe_dw,
            pe_db, M, N, x.stride(0), dy.stride(0), dx.stride(0), stride_dres, rpp, rpe, slots)
    else:
        c1 = c2 = rstd  # placeholders, read only when the row stats come from a first kernel
        if plan.path != "fused":
            c1 = torch.empty(M, dtype=partial_dtype, device=device)
            c2 = c1 if is_rms else torch.empty(M, dtype=partial_dtype, device=device)
        # One launch pair per row chunk (plan.launches lists them in this order), the chunks'
        # dx kernels adding into the same partial rows in chunk order; whole rows: one launch.
        for i, (r0, r1) in enumerate(bwd.chunks):
            if bwd.stats:
                # Views of the chunk's rows: the kernel indexes by row only.
                run(bwd.stats[i], x[r0:r1], w, dy[r0:r1],
                    mean_arg if is_rms else mean_arg[r0:r1], rstd[r0:r1], c1[r0:r1],
                    c2[r0:r1], N, x.stride(0), dy.stride(0))
            # Full tensors and the chunk's first row group: row groups, slot rows and program
            # boundaries are those of the whole call.
            run(bwd.main[i], x, w, dy, dx, mean_arg, rstd, c1, c2, dw_partial, db_partial,
                dres_arg, pe_dw, pe_db, M, N, x.stride(0), dy.stride(0), dx.stride(0),
                stride_dres, rpp, rpe, slots, r0 // rpp)
    dweight, dbias = column_sums(dw_partial if has_weight else None,
                                 weight.dtype if has_weight else None,
                                 db_partial if has_bias else None,
                                 bias.dtype if has_bias else None)
    if not rows_per_example:
        return dx, dweight, dbias, None, None
    examples = M // rpe
    dw_sq = torch.empty(examples, dtype=partial_dtype, device=device) if has_weight else None
    db_sq = torch.empty(examples, dtype=partial_dtype, device=device) if has_bias else None
    run(bwd.pe_sq, pe_dw, pe_db, rstd if dw_sq is None else dw_sq,
        rstd if db_sq is None else db_sq, examples, N, rpp, rpe, slots,
        per_example_max_span(rpp, rpe))
    return dx, dweight, dbias, dw_sq, db_sq


class _BackwardSpecs(NamedTuple):
    """A backward's plan and launches: `main` one LaunchSpec per row chunk (one for the
    whole-row and persistent rows paths), `stats` the row-statistics launch per chunk (the
    column-chunked path only), `chunks` the [start, stop) rows of each chunk; per-example
    mode: `pe_sq` the per-example reduction, `slots` slot rows per row group (the most
    examples its rows can touch), `slot_rows` slot rows in all (every row group of the whole
    call has its own, row chunks or not)."""
    plan: LayerNormPlan
    main: tuple
    stats: tuple
    chunks: tuple
    pe_sq: Optional[LaunchSpec] = None
    slots: int = 0
    slot_rows: int = 0


def _bwd_specs(m: int, n: int, dtype: torch.dtype, device: torch.device, is_rms: bool,
               weight_dtype: Optional[torch.dtype], has_bias: bool, has_dresidual: bool,
               dy_dtype: torch.dtype, dx_dtype: torch.dtype, round_xhat: bool,
               round_dx_terms: bool, rows_per_example: int) -> _BackwardSpecs:
    specs = _main_specs(m, n, dtype, device, is_rms, weight_dtype, has_bias, has_dresidual,
                        dy_dtype, dx_dtype, round_xhat, round_dx_terms, rows_per_example > 0)
    if not rows_per_example:
        return specs
    rpp = specs.plan.rows_per_program
    slots = cdiv(rpp, rows_per_example) + 1
    slot_rows = max(specs.plan.partial_rows, cdiv(m, rpp)) * slots
    pe_sq = per_example_sq_spec(m // rows_per_example, n, weight_dtype is not None, has_bias,
                                acc_dtype(dtype))
    return specs._replace(pe_sq=pe_sq, slots=slots, slot_rows=slot_rows)


def _main_specs(m: int, n: int, dtype: torch.dtype, device: torch.device, is_rms: bool,
                weight_dtype: Optional[torch.dtype], has_bias: bool, has_dresidual: bool,
                dy_dtype: torch.dtype, dx_dtype: torch.dtype, round_xhat: bool,
                round_dx_terms: bool, per_example: bool) -> _BackwardSpecs:
    has_weight = weight_dtype is not None
    plan = plan_layer_norm(m, n, dtype, "bwd", device, is_rms=is_rms, has_weight=has_weight,
                           has_bias=has_bias, weight_dtype=weight_dtype,
                           has_dresidual=has_dresidual, dy_dtype=dy_dtype, dx_dtype=dx_dtype)
    flags = dict(IS_RMS=is_rms, HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
                 HAS_DRESIDUAL=has_dresidual, ROUND_XHAT=round_xhat,
                 ROUND_DX_TERMS=round_dx_terms)
    acc = tl_acc_dtype(dtype)
    if plan.path == "rows":
        main = launch_spec(_layer_norm_bwd_rows_kernel, plan.grid, **flags,
                           PER_EXAMPLE=per_example, ACC=acc, BLOCK_N=plan.block_n,
                           num_warps=plan.num_warps)
        return _BackwardSpecs(plan, (main,), (), ((0, m),))
    whole_row = plan.path == "fused"
    chunks = ((0, m),) if whole_row else tuple(LayerNormPlan.row_chunks(m, plan.chunk_rows))
    main, stats = [], []
    for i, (r0, r1) in enumerate(chunks):
        if not whole_row:
            launch = plan.launches[2 * i]
            stats.append(launch_spec(_layer_norm_bwd_row_stats_kernel, launch.grid,
                                     IS_RMS=is_rms, HAS_WEIGHT=has_weight,
                                     ROUND_XHAT=round_xhat, ACC=acc, BLOCK_N=plan.block_n,
                                     num_warps=launch.num_warps))
        grid = plan.grid if len(chunks) == 1 else \
            (plan.grid[0], cdiv(r1 - r0, plan.rows_per_program))
        main.append(launch_spec(_layer_norm_bwd_kernel, grid, **flags, ACC=acc,
                                ROW_STATS_IN_TILE=whole_row, PER_EXAMPLE=per_example,
                                PE_IN_SLOT=per_example and pe_in_slot(plan, has_weight,
                                                                      has_bias),
                                ACCUMULATE=i > 0, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
                                num_warps=plan.num_warps))
    return _BackwardSpecs(plan, tuple(main), tuple(stats), chunks)


_BWD_SPECS = SpecCache(_bwd_specs)


def layer_norm_bwd_per_example(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                               bias: Optional[torch.Tensor], mean: torch.Tensor,
                               rstd: torch.Tensor, is_rms: bool, rows_per_example: int
                               ) -> tuple[torch.Tensor, Optional[torch.Tensor],
                                          Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """`layer_norm_bwd` (no residual, no rounding) plus, per example (rows_per_example
    consecutive rows; M must be a multiple of it), the squared norms of that example's dW and
    dB: (dx, dweight, dbias, dw_sq [E], db_sq [E]) in the accumulation dtype, dw_sq / db_sq empty
    where there is no weight / bias. dx, dweight and dbias are bitwise those of layer_norm_bwd.

    The plain backward's launches, each program also summing its rows' terms per example into
    per-(program, example) slot rows ((E + programs) * N values of the accumulation dtype per
    parameter), plus one launch (_per_example_sq_kernel) that sums each example's slot rows
    over the programs it spans (a fixed order, no atomics), squares and sums over N."""
    M, N = x.shape
    rpe = int(rows_per_example)
    if rpe < 1 or M % rpe != 0:
        raise ValueError(f"layer_norm_bwd_per_example: expected rows_per_example >= 1 dividing "
                         f"the {M} rows, got {rows_per_example}")
    has_bias = bias is not None and not is_rms
    acc = acc_dtype(x.dtype)
    if M == 0 or N == 0:  # nothing to launch: every example's norms are 0
        dx, dweight, dbias, _, _ = _layer_norm_bwd(dy, x, weight, bias if has_bias else None,
                                                   mean, rstd, is_rms, None, False, None,
                                                   False, 0)
        sq = [x.new_zeros(M // rpe if present else 0, dtype=acc)
              for present in (weight is not None, has_bias)]
        return dx, dweight, dbias, *sq
    dx, dweight, dbias, dw_sq, db_sq = _layer_norm_bwd(dy, x, weight, bias if has_bias else None,
                                                       mean, rstd, is_rms, None, False, None,
                                                       False, rpe)
    return (dx, dweight, dbias, x.new_empty(0, dtype=acc) if dw_sq is None else dw_sq,
            x.new_empty(0, dtype=acc) if db_sq is None else db_sq)
