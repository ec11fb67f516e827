"""Channels-first LayerNorm and RMSNorm in Triton: normalize over C at every (n, s) of an
(N, C, S) view (S = product of the spatial dims), forward and backward, in one of two layouts:

- channels-last (strides (S*C, 1, C); also any view with S == 1 or C == 1): the C values of one
  position are contiguous, so x *is* an (N*S, C) matrix of rows with unit column stride. Those
  calls run the row LayerNorm kernels of fastnorm/triton/layer_norm.py on that view (no copy,
  no new kernel): same plans, paths and limits as `fastnorm.layer_norm`.
- NCHW (contiguous): the C values of a position are S elements apart. The kernels below work
  on tiles of [BLOCK_C channels, BLOCK_S positions] of one sample, contiguous along S (each
  channel row of a tile is a run of BLOCK_S * elem_size bytes: at least one 32-byte sector,
  128 bytes where the tile allows), and reduce each column over C. Nothing is transposed.

NCHW forward (`_layer_norm_2d_fwd_kernel`, one program per tile, 2 HBM passes: x in, y out):
- whole-C tile (padded C x the smallest sector-sized run fits MAX_TILE_FWD = 16384 elements,
  halved for fp64; bf16 C <= 1024, fp32 C <= 2048): the [C, BLOCK_S] tile is loaded once,
  mean (refined by one correction pass, as the row kernel) and the sum of squared deviations
  come from registers, y is written.
- chunked C (wider C): the program walks C in chunks of BLOCK_C channels twice. The first walk
  merges per-chunk (count, mean, M2) per column about a shift (the first chunk's mean) with
  Chan's formula, so large means lose nothing; the second walk, over the chunks backwards,
  normalizes. The second walk re-reads the program's own C x BLOCK_S slab (BLOCK_S = one
  32-byte run: 768 bf16 channels x 16 = 24 KB), from L1/L2, not HBM.
NCHW backward (`_layer_norm_2d_bwd_kernel`, 3 HBM passes: x, dy in, dx out): dx = rstd * (w*dy
- (x_hat * c1 + c2)), c1 = mean over C of x_hat * w*dy, c2 = mean of w*dy (0 for RMSNorm), per
column of the tile. A persistent grid (1-2 programs per SM, as the row backward: a second one
per SM only with >= 64 positions each) walks consecutive tiles; each program keeps its
dW = sum dy * x_hat and dB = sum dy over its tiles as one fp32 partial row [C] (in
registers on the whole-C path: padded C up to 512 bf16 / 256 fp32 channels and at most
MAX_TILE_BWD = 8192 elements of x and dy; in the program's own partial row in memory,
read-add-store per chunk, with a barrier per tile, on the chunked path: wider C, e.g.
ConvNeXt's 768), and `column_sums` adds the partial rows in a fixed order: deterministic, no
atomics. Forward + backward: 5 passes (the chunked path's second walk from L1/L2).

Tiles: BLOCK_S is as wide as 128 bytes of a channel row allows within the tile limit, then
halved (down to one 32-byte sector) while N * ceil(S / BLOCK_S) programs would not fill the
device (2 per SM): 64x768x7x7 bf16 runs [1024, 16] forward tiles, 4 per sample. Padding C to a power of two
costs lanes, not bandwidth (ConvNeXt's 96..768 channels: 25 % of the lanes masked).
Statistics (mean, rstd: [N, S]) are fp32, fp64 for fp64 input; eps arrives as fp64. A NaN or
Inf stays in its column (its (n, s) position): every reduction is over C.
Limits: one sample's C * S must stay below 2**31 elements (int32 offsets within a sample);
the launchers raise beyond.
"""
# No `from __future__ import annotations`: Triton reads the kernels' annotations (eps: "fp64")
# as written.
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._layout import channels_last_strides
from . import layer_norm as _rows
from ._common import (LaunchCost, LaunchSpec, SpecCache, acc_dtype, as_acc, cached_plan, cdiv,
                      column_sums, elem_size, launch_spec, load_affine, min_fill_programs,
                      next_power_of_2, num_parallel_programs, num_warps_for, run,
                      tl_acc_dtype)

# Most elements of a whole-C tile: x in the forward, x and dy in the backward (the limits of the
# row kernels' whole-row tiles, which ptxas compiles without spills; the static compile test
# checks these kernels too). fp64 halves both.
MAX_TILE_FWD = 16384
MAX_TILE_BWD = 8192
# Widest padded C of a whole-C backward tile, in bytes of x per position: 512 bf16/fp16, 256
# fp32, 128 fp64 channels. At 16 warps ptxas held fp32 tiles of [1024, 8] (sm_90) and [512, 16]
# (sm_80) to 128 registers and spilled 8 bytes; bf16 [512, 16] and fp32 [256, 32] do not.
# Wider C takes the chunked backward.
MAX_WHOLE_C_BWD_BYTES = 1024
# Tile elements aimed for: few channels take more positions per tile (C = 96: [128, 64] in
# bf16), and the chunked path's chunk is [TILE // BLOCK_S, BLOCK_S].
TILE_FWD = 4096
TILE_BWD = 2048
# Bytes of a channel row within a tile: at least one 32-byte sector (a narrower run would make
# the L2 move a whole sector for half of it), up to a 128-byte line where the tile allows.
MIN_RUN_BYTES = 32
RUN_BYTES = 128
# Elements per warp (16 per thread, as the row kernels' tiles).
ELEMS_PER_WARP_2D = 512
MAX_SAMPLE_ELEMS = 2**31


@triton.jit
def _layer_norm_2d_fwd_kernel(X, Y, W, B, Mean, Rstd, C, S, s_blocks, eps: "fp64",
                              IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                              HAS_BIAS: tl.constexpr, WHOLE_C: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """NCHW x: program t normalizes positions [sb * BLOCK_S, (sb + 1) * BLOCK_S) of sample n
    (t = n * s_blocks + sb) over all C channels. WHOLE_C: the [C, BLOCK_S] tile is loaded once;
    otherwise C is walked in BLOCK_C chunks twice (statistics, then output)."""
    pid = tl.program_id(0)
    n = pid // s_blocks
    s = (pid % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < S
    sample = n.to(tl.int64) * C * S
    x_ptr = X + sample
    y_ptr = Y + sample
    stat = n.to(tl.int64) * S + s
    ch = tl.arange(0, BLOCK_C)
    eps_acc = as_acc(eps, ACC)
    if WHOLE_C:
        c_mask = ch < C
        mask = c_mask[:, None] & s_mask[None, :]
        offs = ch[:, None] * S + s[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / C
            # One correction step: the plain fp32 sum of a column with a large mean is off by
            # many ulps; the sum of deviations from the first estimate is small and nearly exact.
            mean += tl.sum(tl.where(mask, x - mean[None, :], 0.0), axis=0) / C
            xc = tl.where(mask, x - mean[None, :], 0.0)
            tl.store(Mean + stat, mean, mask=s_mask)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps_acc)
        tl.store(Rstd + stat, rstd, mask=s_mask)
        w, b = load_affine(W, B, ch, c_mask, tl.zeros([BLOCK_C], dtype=ACC), HAS_WEIGHT,
                           HAS_BIAS, ACC)
        y = xc * rstd[None, :]
        if HAS_WEIGHT:
            y = y * w[:, None]
        if HAS_BIAS:
            y = y + b[:, None]
        tl.store(y_ptr + offs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Statistics about a shift (the first chunk's mean per column): with means like 1e4 a
        # running fp32 mean would round at every merge; relative to the shift it stays O(std).
        if IS_RMS:
            shift = tl.zeros([BLOCK_S], dtype=ACC)
        else:
            first = (ch < C)[:, None] & s_mask[None, :]
            x0 = tl.load(x_ptr + ch[:, None] * S + s[None, :], mask=first, other=0.0).to(ACC)
            shift = tl.sum(x0, axis=0) / tl.minimum(C, BLOCK_C)
        mean = tl.zeros([BLOCK_S], dtype=ACC)
        m2 = tl.zeros([BLOCK_S], dtype=ACC)
        count = tl.full([], 0.0, ACC)
        for c0 in range(0, C, BLOCK_C):
            chans = c0 + ch
            mask = (chans < C)[:, None] & s_mask[None, :]
            x = tl.load(x_ptr + chans[:, None] * S + s[None, :], mask=mask, other=0.0).to(ACC)
            if IS_RMS:
                m2 += tl.sum(x * x, axis=0)
            else:
                x = tl.where(mask, x - shift[None, :], 0.0)
                n_chunk = tl.minimum(C - c0, BLOCK_C).to(ACC)
                chunk_mean = tl.sum(x, axis=0) / n_chunk
                dev = tl.where(mask, x - chunk_mean[None, :], 0.0)
                delta = chunk_mean - mean
                total = count + n_chunk
                mean += delta * (n_chunk / total)
                m2 += tl.sum(dev * dev, axis=0) + delta * delta * (count * n_chunk / total)
                count = total
        rstd = 1.0 / tl.sqrt(m2 / C + eps_acc)
        tl.store(Rstd + stat, rstd, mask=s_mask)
        if not IS_RMS:
            tl.store(Mean + stat, shift + mean, mask=s_mask)
        # Backwards over the chunks: the chunk read last (most likely still in L1) first.
        num_chunks = tl.cdiv(C, BLOCK_C)
        for i in range(0, num_chunks):
            chans = (num_chunks - 1 - i) * BLOCK_C + ch
            c_mask = chans < C
            mask = c_mask[:, None] & s_mask[None, :]
            offs = chans[:, None] * S + s[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            if IS_RMS:
                y = x * rstd[None, :]
            else:
                y = ((x - shift[None, :]) - mean[None, :]) * rstd[None, :]
            w, b = load_affine(W, B, chans, c_mask, tl.zeros([BLOCK_C], dtype=ACC), HAS_WEIGHT,
                               HAS_BIAS, ACC)
            if HAS_WEIGHT:
                y = y * w[:, None]
            if HAS_BIAS:
                y = y + b[:, None]
            tl.store(y_ptr + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_chunk(X, W, DY, x_ptr, dy_ptr, chans, s, s_mask, C, S, mean, rstd,
               IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """(dy, w*dy, x_hat, mask, offsets) of the channels `chans` x positions `s` of one sample,
    in ACC (masked lanes 0)."""
    c_mask = chans < C
    mask = c_mask[:, None] & s_mask[None, :]
    offs = chans[:, None] * S + s[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    wdy = dy
    if HAS_WEIGHT:
        wdy = dy * tl.load(W + chans, mask=c_mask, other=0.0).to(ACC)[:, None]
    if IS_RMS:
        x_hat = x * rstd[None, :]
    else:
        x_hat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    return dy, wdy, x_hat, mask, offs


@triton.jit
def _layer_norm_2d_bwd_kernel(X, W, DY, DX, Mean, Rstd, DW_partial, DB_partial, C, S, s_blocks,
                              num_tiles, tiles_per_program,
                              IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                              HAS_BIAS: tl.constexpr, WHOLE_C: tl.constexpr, ACC: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """NCHW x and dy: program p takes the consecutive tiles [p * tiles_per_program, ...) (tiles
    numbered as in the forward), writes their dx and its own row p of the dW/dB partial sums
    (DW_partial[p, :C], DB_partial[p, :C]). WHOLE_C: x and dy of a tile in registers, the
    partial rows accumulated in registers and stored once. Otherwise C is walked in BLOCK_C
    chunks twice per tile (c1/c2, then dx and the dW/dB terms read-added-stored into the
    program's own partial rows, which it zeroes first)."""
    pid = tl.program_id(0)
    ch = tl.arange(0, BLOCK_C)
    t0 = pid * tiles_per_program
    t1 = tl.minimum(t0 + tiles_per_program, num_tiles)
    dw_row = DW_partial + pid.to(tl.int64) * C
    db_row = DB_partial + pid.to(tl.int64) * C
    if WHOLE_C:
        c_mask = ch < C
        dw_acc = tl.zeros([BLOCK_C], dtype=ACC)
        db_acc = tl.zeros([BLOCK_C], dtype=ACC)
        for t in range(t0, t1):
            n = t // s_blocks
            s = (t % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
            s_mask = s < S
            sample = n.to(tl.int64) * C * S
            stat = n.to(tl.int64) * S + s
            rstd = tl.load(Rstd + stat, mask=s_mask, other=0.0).to(ACC)
            mean = rstd  # unused for RMSNorm
            if not IS_RMS:
                mean = tl.load(Mean + stat, mask=s_mask, other=0.0).to(ACC)
            dy, wdy, x_hat, mask, offs = _bwd_chunk(X, W, DY, X + sample, DY + sample, ch, s,
                                                    s_mask, C, S, mean, rstd, IS_RMS,
                                                    HAS_WEIGHT, ACC)
            c1 = tl.sum(x_hat * wdy, axis=0) / C
            if IS_RMS:
                dx = (wdy - x_hat * c1[None, :]) * rstd[None, :]
            else:
                c2 = tl.sum(wdy, axis=0) / C
                dx = (wdy - (x_hat * c1[None, :] + c2[None, :])) * rstd[None, :]
            tl.store(DX + sample + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw_acc += tl.sum(dy * x_hat, axis=1)
            if HAS_BIAS:
                db_acc += tl.sum(dy, axis=1)
        if HAS_WEIGHT:
            tl.store(dw_row + ch, dw_acc, mask=c_mask)
        if HAS_BIAS:
            tl.store(db_row + ch, db_acc, mask=c_mask)
    else:
        # The program's partial rows start at zero (no fill launch).
        for c0 in range(0, C, BLOCK_C):
            zero = tl.zeros([BLOCK_C], dtype=DW_partial.dtype.element_ty)
            if HAS_WEIGHT:
                tl.store(dw_row + c0 + ch, zero, mask=c0 + ch < C)
            if HAS_BIAS:
                tl.store(db_row + c0 + ch, zero, mask=c0 + ch < C)
        num_chunks = tl.cdiv(C, BLOCK_C)
        for t in range(t0, t1):
            # A partial-row element may be read by another thread than the one that stored it
            # (replicated layouts store once): a barrier orders every update of the previous
            # tile (and the zeroing) before this tile's.
            tl.debug_barrier()
            n = t // s_blocks
            s = (t % s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
            s_mask = s < S
            sample = n.to(tl.int64) * C * S
            stat = n.to(tl.int64) * S + s
            rstd = tl.load(Rstd + stat, mask=s_mask, other=0.0).to(ACC)
            mean = rstd  # unused for RMSNorm
            if not IS_RMS:
                mean = tl.load(Mean + stat, mask=s_mask, other=0.0).to(ACC)
            sum1 = tl.zeros([BLOCK_S], dtype=ACC)
            sum2 = tl.zeros([BLOCK_S], dtype=ACC)
            for c0 in range(0, C, BLOCK_C):
                _dy, wdy, x_hat, _mask, _offs = _bwd_chunk(X, W, DY, X + sample, DY + sample,
                                                           c0 + ch, s, s_mask, C, S, mean, rstd,
                                                           IS_RMS, HAS_WEIGHT, ACC)
                sum1 += tl.sum(x_hat * wdy, axis=0)
                if not IS_RMS:
                    sum2 += tl.sum(wdy, axis=0)
            c1 = sum1 / C
            c2 = sum2 / C
            # Backwards over the chunks: the chunk read last (most likely still in L1) first.
            for i in range(0, num_chunks):
                chans = (num_chunks - 1 - i) * BLOCK_C + ch
                dy, wdy, x_hat, mask, offs = _bwd_chunk(X, W, DY, X + sample, DY + sample,
                                                        chans, s, s_mask, C, S, mean, rstd,
                                                        IS_RMS, HAS_WEIGHT, ACC)
                if IS_RMS:
                    dx = (wdy - x_hat * c1[None, :]) * rstd[None, :]
                else:
                    dx = (wdy - (x_hat * c1[None, :] + c2[None, :])) * rstd[None, :]
                tl.store(DX + sample + offs, dx.to(DX.dtype.element_ty), mask=mask)
                c_mask = chans < C
                if HAS_WEIGHT:
                    dw = tl.load(dw_row + chans, mask=c_mask, other=0.0)
                    tl.store(dw_row + chans, dw + tl.sum(dy * x_hat, axis=1), mask=c_mask)
                if HAS_BIAS:
                    db = tl.load(db_row + chans, mask=c_mask, other=0.0)
                    tl.store(db_row + chans, db + tl.sum(dy, axis=1), mask=c_mask)


# --- launch plans ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerNorm2dPlan:
    """The launches of one layer_norm_2d_fwd ("fwd") or layer_norm_2d_bwd ("bwd") call: path
    "rows" (channels-last: the row LayerNorm plan of the (N*S, C) view, `rows`), "tile" (NCHW,
    whole C in a [block_c, block_s] tile) or "chunked" (NCHW, C walked in block_c chunks);
    the NCHW kernel's grid and warps, `s_blocks` tiles per sample, the tiles each backward
    program walks and the number of dW/dB partial rows, and every launch with its bytes."""
    mode: str
    path: str
    block_c: int
    block_s: int
    num_warps: int
    grid: tuple[int, ...]
    s_blocks: int
    tiles_per_program: int
    partial_rows: int
    launches: tuple[LaunchCost, ...]
    rows: Optional[_rows.LayerNormPlan] = None


def _tile(n: int, c: int, s: int, dtype: torch.dtype, mode: str,
          device: torch.device) -> tuple[bool, int, int]:
    """(whole C, BLOCK_C, BLOCK_S) of the NCHW kernels (see the module docstring)."""
    es = elem_size(dtype)
    halve = 2 if dtype == torch.float64 else 1
    max_tile = (MAX_TILE_FWD if mode == "fwd" else MAX_TILE_BWD) // halve
    tile = (TILE_FWD if mode == "fwd" else TILE_BWD) // halve
    c_pad = next_power_of_2(max(c, 1))
    s_pad = next_power_of_2(max(s, 1))
    floor_s = min(max(1, MIN_RUN_BYTES // es), s_pad)
    whole = c_pad * floor_s <= max_tile and (mode == "fwd" or
                                             c_pad * es <= MAX_WHOLE_C_BWD_BYTES)
    if whole:
        block_c = c_pad
        block_s = min(s_pad, max_tile // c_pad, max(RUN_BYTES // es, tile // c_pad))
    else:
        block_s = floor_s
        block_c = min(c_pad, max(1, tile // block_s))
    # Narrower tiles (down to one sector a channel row) while the grid would not fill the device.
    while block_s > floor_s and n * cdiv(s, block_s) < min_fill_programs(device):
        block_s //= 2
    return whole, block_c, block_s


@cached_plan
def plan_layer_norm_2d(n: int, c: int, s: int, dtype: torch.dtype, mode: str,
                       device: torch.device, *, channels_last: bool, is_rms: bool,
                       has_weight: bool = True, has_bias: bool = True,
                       weight_dtype: Optional[torch.dtype] = None) -> LayerNorm2dPlan:
    """The launch plan of an (N, C, S) call, the same choices the launchers make. `mode` "fwd"
    or "bwd"; `channels_last` (x's strides are channels-last, or S == 1 or C == 1) takes the row
    LayerNorm plan of the (N*S, C) view. Bytes: every launch's HBM reads and writes, the
    chunked path's second walk counted as re-reads of a window of the programs in flight."""
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"unknown layer_norm_2d plan mode {mode!r}")
    has_bias = has_bias and not is_rms
    if channels_last:
        rows = _rows.plan_layer_norm(n * s, c, dtype, mode, device, is_rms=is_rms,
                                     has_weight=has_weight, has_bias=has_bias,
                                     weight_dtype=weight_dtype)
        return LayerNorm2dPlan(mode, "rows", rows.block_n, rows.block_m, rows.num_warps,
                               rows.grid, 0, rows.rows_per_program, rows.partial_rows,
                               rows.launches, rows)
    whole, block_c, block_s = _tile(n, c, s, dtype, mode, device)
    path = "tile" if whole else "chunked"
    warps = num_warps_for(block_c * block_s, elems_per_warp=ELEMS_PER_WARP_2D)
    s_blocks = cdiv(s, block_s)
    num_tiles = n * s_blocks
    es = elem_size(dtype)
    acc = elem_size(acc_dtype(dtype))
    w_es = elem_size(weight_dtype or dtype)
    params = int(has_weight) + int(has_bias)
    data = n * c * s * es
    stats = n * s * acc * (1 if is_rms else 2)
    # The programs in flight (2 per SM) and the slab of C x BLOCK_S each walks twice.
    in_flight = min(num_tiles, min_fill_programs(device))
    if mode == "fwd":
        grid = (num_tiles,)
        walk2 = 0 if whole else data
        launch = LaunchCost("_layer_norm_2d_fwd_kernel", grid, warps,
                            reads=data + walk2 + c * w_es * params, writes=data + stats,
                            l2_reread=walk2, l2_window=in_flight * c * block_s * es)
        return LayerNorm2dPlan("fwd", path, block_c, block_s, warps, grid, s_blocks, 1, 0,
                               (launch,))
    # One program per SM, two where each gets enough positions that its dW/dB partial rows
    # (read again by the column sums) stay small next to its x, dy and dx (as the row plan).
    programs = max(1, min(num_tiles, max(num_parallel_programs(device),
                                         min(min_fill_programs(device),
                                             n * s // _rows.MIN_ROWS_PER_PARTIAL))))
    tiles_per_program = cdiv(num_tiles, programs)
    programs = cdiv(num_tiles, tiles_per_program) if num_tiles else 1
    grid = (programs,)
    inputs = 2 * data  # x and dy (dy in x's dtype)
    partials = programs * c * acc * params
    walk2 = 0 if whole else inputs
    # Chunked: each tile reads, adds to and stores the program's partial rows (L2-resident
    # next to the slab in flight); only the final rows reach HBM.
    updates = 0 if whole else num_tiles * c * acc * params
    launch = LaunchCost("_layer_norm_2d_bwd_kernel", grid, warps,
                        reads=inputs + walk2 + stats + c * w_es * int(has_weight) + updates,
                        writes=data + (updates if updates else partials),
                        l2_reread=walk2 + (2 * updates - partials if updates else 0),
                        l2_window=programs * (c * block_s * 2 * es + c * acc * params))
    launches = (launch,) + tuple(_rows._column_sums(c, programs, acc, w_es, has_weight,
                                                    has_bias))
    return LayerNorm2dPlan("bwd", path, block_c, block_s, warps, grid, s_blocks,
                           tiles_per_program, programs, launches)


# --- launchers ---------------------------------------------------------------------------------

def _check_sample_size(c: int, s: int) -> None:
    if c * s >= MAX_SAMPLE_ELEMS:
        raise ValueError(f"layer_norm_2d: one sample of {c} x {s} elements exceeds the NCHW "
                         f"kernels' int32 offsets (< 2**31); use a channels-last input")


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """An (N, C, S) tensor as (N*S, C) rows with unit column stride: a view (one op) for
    channels-last strides (size-1 dims' strides aside, the memory is then addressed as
    n*S*C + s*C + c), else a copy in that order."""
    n, c, s = t.shape
    if channels_last_strides(t):
        return t.as_strided((n * s, c), (c, 1))
    return t.transpose(1, 2).reshape(n * s, c).contiguous()


def _channels_view(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N*S, C) contiguous rows as the (N, C, S) tensor they are, with the strides of `like`
    (channels-last strides: the same addressing, size-1 dims aside), so the result is what
    torch.empty_like(like) would have given (the op contract: the fakes and the reference)."""
    return rows.as_strided(like.shape, like.stride())


def layer_norm_2d_fwd(x: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], eps: float, is_rms: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd for x of shape (N, C, S), NCHW-contiguous or channels-last; y has x's
    layout, mean/rstd are (N, S) in fp32 (fp64 for fp64 x), mean empty for RMSNorm."""
    n, c, s = x.shape
    if channels_last_strides(x):
        # y made in x's layout and written through its rows view: returned as a view, it
        # would refuse in-place ops after it (an inplace ReLU) under autograd
        y = torch.empty_like(x)
        _y, mean, rstd = _rows.layer_norm_fwd(_rows_view(x), weight, bias, eps, is_rms,
                                              out=_rows_view(y))
        return y, mean if is_rms else mean.view(n, s), rstd.view(n, s)
    _check_sample_size(c, s)
    stats_dtype = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    rstd = torch.empty(n, s, dtype=stats_dtype, device=x.device)
    mean = torch.empty((0,) if is_rms else (n, s), dtype=stats_dtype, device=x.device)
    if n == 0 or s == 0:
        return y, mean, rstd
    if c == 0:  # like torch: no features means NaN statistics
        return y, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    spec, s_blocks = _FWD_SPECS[n, c, s, x.dtype, x.device, is_rms,
                                weight.dtype if weight is not None else None, bias is not None]
    # Unused pointers still need a tensor argument; rstd stands in for them.
    run(spec, x, y, weight if weight is not None else rstd, bias if bias is not None else rstd,
        rstd if is_rms else mean, rstd, c, s, s_blocks, float(eps))
    return y, mean, rstd


def _fwd_spec(n: int, c: int, s: int, dtype: torch.dtype, device: torch.device, is_rms: bool,
              weight_dtype: Optional[torch.dtype], has_bias: bool) -> tuple[LaunchSpec, int]:
    plan = plan_layer_norm_2d(n, c, s, dtype, "fwd", device, channels_last=False,
                              is_rms=is_rms, has_weight=weight_dtype is not None,
                              has_bias=has_bias, weight_dtype=weight_dtype)
    spec = launch_spec(_layer_norm_2d_fwd_kernel, plan.grid, IS_RMS=is_rms,
                       HAS_WEIGHT=weight_dtype is not None, HAS_BIAS=has_bias and not is_rms,
                       WHOLE_C=plan.path == "tile", ACC=tl_acc_dtype(dtype),
                       BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    return spec, plan.s_blocks


_FWD_SPECS = SpecCache(_fwd_spec)


def layer_norm_2d_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                      is_rms: bool
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dx (in x's layout), dweight, dbias (None where there is no weight / bias; only bias's
    dtype is used) for x of shape (N, C, S), NCHW-contiguous or channels-last, and dy of its
    shape in any layout (brought into x's)."""
    n, c, s = x.shape
    if channels_last_strides(x):
        rows = _rows_view(x)
        dx, dweight, dbias = _rows.layer_norm_bwd(
            _rows_view(dy), rows, weight, None if is_rms else bias,
            rstd.view(-1) if is_rms else mean.view(-1), rstd.view(-1), is_rms)
        return _channels_view(dx, x), dweight, dbias
    _check_sample_size(c, s)
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    has_weight = weight is not None
    has_bias = bias is not None and not is_rms
    if n == 0 or c == 0 or s == 0:  # nothing to launch: zero weight gradients
        return (dx, weight.new_zeros(c) if has_weight else None,
                bias.new_zeros(c) if has_bias else None)
    spec, plan = _BWD_SPECS[n, c, s, x.dtype, x.device, is_rms,
                            weight.dtype if has_weight else None, has_bias]
    partial_dtype = acc_dtype(x.dtype)
    # Every program writes its partial rows (the whole-C path stores them, the chunked path
    # zeroes them first), so no fill launch.
    dw_partial = torch.empty((plan.partial_rows, c) if has_weight else (0,),
                             dtype=partial_dtype, device=x.device)
    db_partial = torch.empty((plan.partial_rows, c) if has_bias else (0,),
                             dtype=partial_dtype, device=x.device)
    run(spec, x, weight if has_weight else rstd, dy, dx, rstd if is_rms else mean, rstd,
        dw_partial if has_weight else rstd, db_partial if has_bias else rstd, c, s,
        plan.s_blocks, n * plan.s_blocks, plan.tiles_per_program)
    dweight, dbias = column_sums(dw_partial if has_weight else None,
                                 weight.dtype if has_weight else None,
                                 db_partial if has_bias else None,
                                 bias.dtype if has_bias else None)
    return dx, dweight, dbias


class _BackwardSpec(NamedTuple):
    spec: LaunchSpec
    plan: LayerNorm2dPlan


def _bwd_spec(n: int, c: int, s: int, dtype: torch.dtype, device: torch.device, is_rms: bool,
              weight_dtype: Optional[torch.dtype], has_bias: bool) -> _BackwardSpec:
    plan = plan_layer_norm_2d(n, c, s, dtype, "bwd", device, channels_last=False,
                              is_rms=is_rms, has_weight=weight_dtype is not None,
                              has_bias=has_bias, weight_dtype=weight_dtype)
    spec = launch_spec(_layer_norm_2d_bwd_kernel, plan.grid, IS_RMS=is_rms,
                       HAS_WEIGHT=weight_dtype is not None, HAS_BIAS=has_bias,
                       WHOLE_C=plan.path == "tile", ACC=tl_acc_dtype(dtype),
                       BLOCK_C=plan.block_c, BLOCK_S=plan.block_s, num_warps=plan.num_warps)
    return _BackwardSpec(spec, plan)


_BWD_SPECS = SpecCache(_bwd_spec)
