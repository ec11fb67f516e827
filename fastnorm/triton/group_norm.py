"""GroupNorm in Triton, forward and backward, optionally fused with SiLU, on a 3-D view
(N, C, HW) in one of two memory layouts:

- NCHW (contiguous): element (n, c, s) at n*C*HW + c*HW + s;
- channels-last (NHWC, NDHWC, NLC): element (n, c, s) at n*C*HW + s*C + c (CHANNELS_LAST).

Every kernel works on tiles of [BLOCK_S spatial positions, BLOCK_C channels] of one sample. In
NCHW the split-path tile is a few channels by a long contiguous spatial run; in channels-last it is a few
spatial positions by a contiguous run of channels (BLOCK_C a power of two dividing C where one
exists, so each row segment fills whole 32-byte sectors). Neither layout does strided
per-channel access, and neither needs a transpose.

Fused path (NCHW, a group padded to a [pow2 HW, pow2 C/G] tile of at most MAX_FUSED_FWD /
MAX_FUSED_BWD elements, and N*G >= 2 programs per SM): one program per (n, g) loads its group
(contiguous in NCHW) into registers once and does statistics and output, or the whole backward of
the group, in one launch. Everything else takes the split path below.

Split path, forward, three launches:
1. stats: the spatial extent is cut into `num_splits` splits so that N * channel blocks * splits
   programs fill the GPU even when N*G is small and groups are large (8 x 32 groups of 10 x 128^2
   elements). Each program reduces its tiles to per-channel (mean, M2) over its split, from sums
   of x - shift and its square (shift: the channel's mean over the split's first tile, so no
   cancellation at large means), and writes them to partials [N, num_splits, C]. Per-channel partials make one
   kernel serve both layouts: a channel never straddles two groups.
2. combine: one program per (n, g) merges the split x channel partials of its group in a fixed
   order (mean = sum(count_i * mean_i) / count, M2 = sum(M2_i) + sum(count_i * (mean_i - mean)^2)),
   so statistics stay exact at large means (no E[x^2] - E[x]^2) and are deterministic (no
   atomics). mean and rstd are stored [N, G] in fp32 (fp64 for fp64 input).
3. apply: y = (x - mean) * rstd * w + b, then SiLU. It walks the tiles in the reverse order of the
   stats pass, so the data the stats pass read last (still in L2) is read first.

Sample chunks: a tensor whose x (dy too in the backward) exceeds the L2 window of the cost model
(L2_REUSE_FRACTION of the L2) runs the three launches once per chunk of whole samples
(`samples_per_chunk`: the most samples that fit the window, at least one, at most MAX_CHUNKS
chunks), on views of x, y, the partial rows and the statistics. A chunk's second walk then
re-reads only what its first walk just read, within the window. Groups lie within a sample and a
sample's partial rows do not depend on the chunk, so the results are bitwise those of one chunk.
The split count is chosen so that one chunk's reduce programs fill the GPU.
Launch cost: balanced chunks hold at least half the window (12.5 MB of x on an H100, >= ~8 us of
HBM traffic at 3 TB/s) for their three launches of a few us of host time each, so the GPU should
stay ahead of the host; whether it does is unmeasured (MAX_CHUNKS = 1 turns chunking off).

Split path, backward, the same three-step shape:
1. reduce: per (n, split, c) partials P1 = sum(dz * x_hat) and P2 = sum(dz), where dz is dy, or
   with SiLU dy * silu'(z) for the recomputed pre-activation z = x_hat * w + b
   (silu'(z) = s + z*s*(1-s), s = sigmoid(z)). x_hat comes from the saved mean/rstd, so no
   cancellation at large means.
2. combine: per (n, g): c1 = sum_c w[c] * P1 / count, c2 = sum_c w[c] * P2 / count. dweight and
   dbias are the column sums of P1 and P2 over (n, split), done by `column_sums` (fixed order).
3. dx = rstd * (w * dz - x_hat * c1 - c2), again walking the tiles in reverse order.

Cost (HBM passes over numel * elem_size, unmeasured so far): the fused path does the minimum,
2 forward and 3 backward. The split path: forward 2 (x in, y out) when the re-read of x hits L2,
3 at worst (ceiling ~67 % of copy bandwidth); backward 3 (x, dy in, dx out) to 5; with sample
chunks the worst case is only one sample over the window (fp32 backward of 320 x 128^2
channels: 42 MB of x and dy per sample). The partials are C floats per (sample, split): noise
next to x but for small tensors. The model (`plan_group_norm`, which states every launch, chunk
by chunk, with its grid, warps and bytes; _common.modeled_hbm_bytes) counts each chunk's
reversed re-read as an L2 hit up to half the L2 (H100: 25 of 50 MB), the rest from HBM;
benchmarks/static_report.py prints it per shape and the GPU check compares it with measurements.
The combine stays its own launch (not yet folded into apply / dx): there every tile program
would redo the merges of all its groups (several per channels-last tile), and they must stay
bitwise the mean/rstd that one program saves for the backward.
NaN/Inf propagate to the group's statistics and outputs (the M2 clamp is NaN-preserving), and
eps is declared tl.float64 so fp64 inputs get it exactly. Why the split path is not one kernel: a group
split over several programs needs its statistics before any program can normalize, and programs
cannot wait on each other without grid-wide synchronisation (which Triton's interpreter could not
run either), so the statistics go through memory and the next launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import (L2_REUSE_FRACTION, LaunchCost, LaunchSpec, SpecCache, acc_dtype, as_acc,
                      cached_plan, cdiv, column_sums, elem_size, l2_cache_bytes, launch_spec,
                      load_affine, min_fill_programs, next_power_of_2, num_warps_for,
                      per_example_sq_spec, reduce_programs, run, tl_acc_dtype)
from .._layout import as_layout, channels_last_strides

# Elements per tile: 4096 keeps x (and dy in the backward) in registers at 8 warps. fp64 halves it.
TILE = 4096
# Widest channel block in channels-last: 256 bf16 = 512 contiguous bytes per row segment.
MAX_BLOCK_C = 256
# Most channels in an NCHW tile (short spatial extents): each channel brings its own statistics
# and affine values; the static report found a 64 x 64 dx tile spilling on sm_90, 64 x 32 not.
MAX_NCHW_BLOCK_C = 32
# Partial entries merged per iteration of a combine kernel.
COMBINE_BLOCK = 1024
# Largest NCHW group (padded to a [pow2 HW, pow2 C/G] tile) that one program holds in registers:
# the fused path. The backward holds x and dy, so its limit is lower. fp64 halves both.
MAX_FUSED_FWD = 16384
MAX_FUSED_BWD = 8192
# Most sample chunks the split path cuts a call into (3 launches each, a few µs of CPU apiece):
# beyond it the chunks grow past the L2 window and the tail of each re-read comes from HBM.
MAX_CHUNKS = 8

ACTIVATIONS = ("none", "silu")


# --- kernels -----------------------------------------------------------------------------------

@triton.jit
def _offsets(s, chans, C, HW, CHANNELS_LAST: tl.constexpr):
    """Offsets of the [BLOCK_S, BLOCK_C] tile (spatial s, channels chans) within one sample."""
    if CHANNELS_LAST:
        offs = s[:, None] * C + chans[None, :]
    else:
        offs = s[:, None] + chans[None, :] * HW
    return offs


@triton.jit
def _split_coords(pid, num_splits, num_c_blocks, CHANNELS_LAST: tl.constexpr):
    """(n, split, channel block) of a reduce program, numbered in memory order."""
    if CHANNELS_LAST:
        cb = pid % num_c_blocks
        sp = (pid // num_c_blocks) % num_splits
        n = pid // (num_c_blocks * num_splits)
    else:
        sp = pid % num_splits
        cb = (pid // num_splits) % num_c_blocks
        n = pid // (num_splits * num_c_blocks)
    return n, sp, cb


@triton.jit
def _tile_coords(pid, num_tiles, num_s_blocks, num_c_blocks, CHANNELS_LAST: tl.constexpr):
    """(n, spatial block, channel block) of an elementwise program. Tiles are numbered in memory
    order and visited backwards: the reduce pass before read them forwards, so the tail it read
    last is still in L2 when this pass starts."""
    # Same numbering as the reduce programs, with spatial blocks in place of splits.
    return _split_coords(num_tiles - 1 - pid, num_s_blocks, num_c_blocks, CHANNELS_LAST)


@triton.jit
def _silu_input_grad(dy, x_hat, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """dy * silu'(z) for the pre-activation z = x_hat * w + b recomputed from x_hat."""
    z = x_hat
    if HAS_WEIGHT:
        z = z * w[None, :]
    if HAS_BIAS:
        z = z + b[None, :]
    sig = 1.0 / (1.0 + tl.exp(-z))
    return dy * (sig + z * sig * (1.0 - sig))


@triton.jit
def _group_norm_fwd_stats_kernel(X, PMean, PM2, C, HW, split_size, num_splits, num_c_blocks,
                                 CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel (mean, M2) over one spatial split of one sample -> PMean/PM2[n, split, c]."""
    n, sp, cb = _split_coords(tl.program_id(0), num_splits, num_c_blocks, CHANNELS_LAST)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = chans < C
    x_base = X + n.to(tl.int64) * C * HW
    s_start = sp * split_size
    s_end = tl.minimum(s_start + split_size, HW)
    # Sums of d = x - shift and d^2, the shift being the per-channel mean of the split's first
    # tile: d is O(std) however large the mean, so M2 = sum(d^2) - sum(d)^2 / count does not
    # cancel catastrophically. The sums accumulate elementwise, reduced once at the end. (The
    # first tile is read again by the loop, from cache.)
    s = s_start + tl.arange(0, BLOCK_S)
    mask = (s < s_end)[:, None] & c_mask[None, :]
    x = tl.load(x_base + _offsets(s, chans, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(ACC)
    shift = tl.sum(x, axis=0) / tl.minimum(s_end - s_start, BLOCK_S).to(ACC)
    sum_d = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    sum_d2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_end)[:, None] & c_mask[None, :]
        x = tl.load(x_base + _offsets(s, chans, C, HW, CHANNELS_LAST), mask=mask,
                    other=0.0).to(ACC)
        d = tl.where(mask, x - shift[None, :], 0.0)
        sum_d += d
        sum_d2 += d * d
    count = (s_end - s_start).to(ACC)
    s1 = tl.sum(sum_d, axis=0)
    mean = shift + s1 / count
    # Rounding can take M2 below 0; the clamp keeps a NaN (sm_90's max.f32 would drop it).
    m2 = tl.maximum(tl.sum(sum_d2, axis=0) - s1 * (s1 / count), 0.0,
                    propagate_nan=tl.PropagateNan.ALL)
    out = (n * num_splits + sp).to(tl.int64) * C + chans
    tl.store(PMean + out, mean, mask=c_mask)
    tl.store(PM2 + out, m2, mask=c_mask)


@triton.jit
def _group_norm_fwd_combine_kernel(PMean, PM2, Mean, Rstd, C, HW, G, group_size, split_size,
                                   num_splits, eps: tl.float64,
                                   ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per (n, g): merges the num_splits x group_size partials into mean, rstd."""
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    num_partials = num_splits * group_size
    total = tl.cast(group_size, ACC) * HW  # tl.cast: group_size may arrive as constexpr 1
    row0 = n.to(tl.int64) * num_splits
    weighted = tl.zeros([BLOCK_K], dtype=ACC)
    for k0 in range(0, num_partials, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < num_partials
        sp = k // group_size
        offs = (row0 + sp) * C + g * group_size + k % group_size
        count = tl.minimum(tl.maximum(HW - sp * split_size, 0), split_size).to(ACC)
        weighted += count * tl.load(PMean + offs, mask=mask, other=0.0)
    mean = tl.sum(weighted, axis=0) / total
    m2 = tl.zeros([BLOCK_K], dtype=ACC)
    for k0 in range(0, num_partials, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < num_partials
        sp = k // group_size
        offs = (row0 + sp) * C + g * group_size + k % group_size
        count = tl.minimum(tl.maximum(HW - sp * split_size, 0), split_size).to(ACC)
        delta = tl.load(PMean + offs, mask=mask, other=0.0) - mean
        m2 += tl.where(mask, tl.load(PM2 + offs, mask=mask, other=0.0) + count * delta * delta,
                       0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(m2, axis=0) / total + as_acc(eps, ACC))
    tl.store(Mean + ng, mean)
    tl.store(Rstd + ng, rstd)


@triton.jit
def _tile(pid, num_tiles, num_s_blocks, num_c_blocks, C, HW, G, group_size,
          CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Where the elementwise program `pid` works: its channels (and their mask), the tile mask,
    the (n, g) statistics index of each channel, and the tile's element offsets (base + offs)."""
    n, sb, cb = _tile_coords(pid, num_tiles, num_s_blocks, num_c_blocks, CHANNELS_LAST)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = chans < C
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (s < HW)[:, None] & c_mask[None, :]
    stat = n * G + chans // group_size
    base = n.to(tl.int64) * C * HW
    return chans, c_mask, mask, stat, base, _offsets(s, chans, C, HW, CHANNELS_LAST)


@triton.jit
def _group_norm_fwd_apply_kernel(X, Y, W, B, Mean, Rstd, C, HW, G, group_size, num_s_blocks,
                                 num_c_blocks, num_tiles,
                                 CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                 HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                                 ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act((x - mean) * rstd * w + b) on one tile."""
    chans, c_mask, mask, stat, base, offs = _tile(
        tl.program_id(0), num_tiles, num_s_blocks, num_c_blocks, C, HW, G, group_size,
        CHANNELS_LAST, BLOCK_S, BLOCK_C)
    mean = tl.load(Mean + stat, mask=c_mask, other=0.0)
    scale = tl.load(Rstd + stat, mask=c_mask, other=0.0)
    if HAS_WEIGHT:
        scale = scale * tl.load(W + chans, mask=c_mask, other=0.0).to(ACC)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)
    # (x - mean) * scale rather than x * scale - mean * scale: exact at large means.
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + chans, mask=c_mask, other=0.0).to(ACC)[None, :]
    if ACTIVATION == "silu":
        y = y / (1.0 + tl.exp(-y))
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_bwd_reduce_kernel(X, DY, W, B, Mean, Rstd, P1, P2, C, HW, G, group_size,
                                  split_size, num_splits, num_c_blocks,
                                  CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                                  HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                                  ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
    """P1[n, split, c] = sum(dz * x_hat), P2[n, split, c] = sum(dz) over one spatial split."""
    n, sp, cb = _split_coords(tl.program_id(0), num_splits, num_c_blocks, CHANNELS_LAST)
    chans = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = chans < C
    stat = n * G + chans // group_size
    mean = tl.load(Mean + stat, mask=c_mask, other=0.0)
    rstd = tl.load(Rstd + stat, mask=c_mask, other=0.0)
    w, b = load_affine(W, B, chans, c_mask, mean, HAS_WEIGHT, HAS_BIAS, ACC)
    base = n.to(tl.int64) * C * HW
    s_start = sp * split_size
    s_end = tl.minimum(s_start + split_size, HW)
    # Elementwise accumulators: one cross-warp reduction at the end, not one per tile.
    sum1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    sum2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=ACC)
    for s0 in range(s_start, s_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < s_end)[:, None] & c_mask[None, :]
        offs = _offsets(s, chans, C, HW, CHANNELS_LAST)
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)
        dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(ACC)
        x_hat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        if ACTIVATION == "silu":
            dz = _silu_input_grad(dz, x_hat, w, b, HAS_WEIGHT, HAS_BIAS)
        sum1 += dz * x_hat
        sum2 += dz
    out = (n * num_splits + sp).to(tl.int64) * C + chans
    tl.store(P1 + out, tl.sum(sum1, axis=0), mask=c_mask)
    tl.store(P2 + out, tl.sum(sum2, axis=0), mask=c_mask)


@triton.jit
def _group_norm_bwd_combine_kernel(P1, P2, W, C1, C2, C, HW, G, group_size, num_splits,
                                   HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
    """One program per (n, g): c1 = mean(w * dz * x_hat), c2 = mean(w * dz) over the group."""
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    num_partials = num_splits * group_size
    row0 = n.to(tl.int64) * num_splits
    sum1 = tl.zeros([BLOCK_K], dtype=ACC)
    sum2 = tl.zeros([BLOCK_K], dtype=ACC)
    for k0 in range(0, num_partials, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < num_partials
        chans = g * group_size + k % group_size
        offs = (row0 + k // group_size) * C + chans
        p1 = tl.load(P1 + offs, mask=mask, other=0.0)
        p2 = tl.load(P2 + offs, mask=mask, other=0.0)
        if HAS_WEIGHT:
            w = tl.load(W + chans, mask=mask, other=0.0).to(ACC)
            p1 = p1 * w
            p2 = p2 * w
        sum1 += p1
        sum2 += p2
    total = tl.cast(group_size, ACC) * HW  # tl.cast: group_size may arrive as constexpr 1
    tl.store(C1 + ng, tl.sum(sum1, axis=0) / total)
    tl.store(C2 + ng, tl.sum(sum2, axis=0) / total)


@triton.jit
def _group_norm_bwd_dx_kernel(X, DY, DX, W, B, Mean, Rstd, C1, C2, C, HW, G, group_size,
                              num_s_blocks, num_c_blocks, num_tiles,
                              CHANNELS_LAST: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                              ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx = rstd * (w * dz - x_hat * c1 - c2) on one tile."""
    chans, c_mask, mask, stat, base, offs = _tile(
        tl.program_id(0), num_tiles, num_s_blocks, num_c_blocks, C, HW, G, group_size,
        CHANNELS_LAST, BLOCK_S, BLOCK_C)
    mean = tl.load(Mean + stat, mask=c_mask, other=0.0)
    rstd = tl.load(Rstd + stat, mask=c_mask, other=0.0)
    c1 = tl.load(C1 + stat, mask=c_mask, other=0.0)
    c2 = tl.load(C2 + stat, mask=c_mask, other=0.0)
    w, b = load_affine(W, B, chans, c_mask, mean, HAS_WEIGHT, HAS_BIAS, ACC)
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(ACC)
    x_hat = (x - mean[None, :]) * rstd[None, :]
    if ACTIVATION == "silu":
        dz = _silu_input_grad(dz, x_hat, w, b, HAS_WEIGHT, HAS_BIAS)
    if HAS_WEIGHT:
        dz = dz * w[None, :]
    dx = (dz - (x_hat * c1[None, :] + c2[None, :])) * rstd[None, :]
    tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_fwd_fused_kernel(X, Y, W, B, Mean, Rstd, HW, G, group_size, eps: tl.float64,
                                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 ACTIVATION: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """NCHW, one program per (n, g) whose group fits in one tile: statistics from registers
    (two-pass: mean, then squared deviations), then y. One read of x, one launch."""
    ng = tl.program_id(0)
    j = tl.arange(0, BLOCK_C)
    chans = (ng % G) * group_size + j
    c_mask = j < group_size
    s = tl.arange(0, BLOCK_S)
    mask = (s < HW)[:, None] & c_mask[None, :]
    # In NCHW a group is one contiguous run of group_size * HW elements.
    offs = ng.to(tl.int64) * group_size * HW + s[:, None] + j[None, :] * HW
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    count = tl.cast(group_size, ACC) * HW
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(xc * xc, axis=1), axis=0) / count + as_acc(eps, ACC))
    tl.store(Mean + ng, mean)
    tl.store(Rstd + ng, rstd)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + chans, mask=c_mask, other=0.0).to(ACC)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + chans, mask=c_mask, other=0.0).to(ACC)[None, :]
    if ACTIVATION == "silu":
        y = y / (1.0 + tl.exp(-y))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_bwd_fused_kernel(X, DY, DX, W, B, Mean, Rstd, P1, P2, C, HW, G, group_size,
                                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 ACTIVATION: tl.constexpr, ACC: tl.constexpr,
                                 BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """NCHW, one program per (n, g) whose group fits in one tile: per-channel P1/P2 (the dweight
    and dbias partials, [N, C]), c1/c2 and dx from registers."""
    ng = tl.program_id(0)
    n = ng // G
    j = tl.arange(0, BLOCK_C)
    chans = (ng % G) * group_size + j
    c_mask = j < group_size
    s = tl.arange(0, BLOCK_S)
    mask = (s < HW)[:, None] & c_mask[None, :]
    offs = ng.to(tl.int64) * group_size * HW + s[:, None] + j[None, :] * HW
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(Mean + ng)
    rstd = tl.load(Rstd + ng)
    x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
    w, b = load_affine(W, B, chans, c_mask, tl.zeros([BLOCK_C], dtype=ACC), HAS_WEIGHT,
                          HAS_BIAS, ACC)
    if ACTIVATION == "silu":
        dz = _silu_input_grad(dz, x_hat, w, b, HAS_WEIGHT, HAS_BIAS)
    p1 = tl.sum(dz * x_hat, axis=0)
    p2 = tl.sum(dz, axis=0)
    out = n.to(tl.int64) * C + chans
    tl.store(P1 + out, p1, mask=c_mask)
    tl.store(P2 + out, p2, mask=c_mask)
    if HAS_WEIGHT:
        p1 = p1 * w
        p2 = p2 * w
        dz = dz * w[None, :]
    count = tl.cast(group_size, ACC) * HW
    c1 = tl.sum(p1, axis=0) / count
    c2 = tl.sum(p2, axis=0) / count
    dx = (dz - (x_hat * c1 + c2)) * rstd
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


# --- launch planning ---------------------------------------------------------------------------

@cached_plan
def samples_per_chunk(n: int, sample_bytes: int, device: torch.device) -> int:
    """Samples per launch sequence of the split path, whose elementwise pass re-reads the
    `sample_bytes` per sample (x, and dy in the backward) that its reduce pass just read: all n
    when they fit the L2 window the cost model uses (L2_REUSE_FRACTION of the L2), else the most
    samples that fit (at least one), and at most MAX_CHUNKS chunks of equal size (the last one
    smaller). Groups lie within one sample, so a chunk's statistics are the whole call's."""
    window = int(L2_REUSE_FRACTION * l2_cache_bytes(device))
    if n * sample_bytes <= window:
        return max(1, n)
    chunks = min(MAX_CHUNKS, cdiv(n, max(1, window // max(1, sample_bytes))))
    return cdiv(n, chunks)


@dataclass(frozen=True)
class GroupNormPlan:
    """Tiling of an (N, C, HW) tensor: tiles of block_s x block_c; the reduce passes cut the
    spatial extent into num_splits splits of split_size positions (a multiple of block_s). The
    three launches run once per chunk of `chunk` samples (see samples_per_chunk)."""
    channels_last: bool
    block_s: int
    block_c: int
    num_c_blocks: int
    num_s_blocks: int
    split_size: int
    num_splits: int
    num_warps: int
    chunk: int

    @classmethod
    @cached_plan
    def make(cls, n: int, c: int, hw: int, dtype: torch.dtype, channels_last: bool,
             device: torch.device, split_size: int | None = None,
             backward: bool = False) -> "GroupNormPlan":
        """The heuristic. `split_size` (spatial positions per split, rounded up to a multiple of
        block_s) overrides the choice of splits, for tests and tuning. `backward`: the passes
        read x and dy (twice the bytes per sample in the L2 window)."""
        chunk = samples_per_chunk(n, c * hw * _elem_size(dtype) * (2 if backward else 1), device)
        tile = TILE // 2 if dtype == torch.float64 else TILE
        if channels_last:
            # The largest power-of-two divisor of C keeps row segments sector-aligned and
            # unmasked (320 -> 64, 640 -> 128, 1280 -> 256); odd C falls back to masking.
            pow2_divisor = c & -c
            block_c = min(MAX_BLOCK_C, pow2_divisor if pow2_divisor >= 32
                          else next_power_of_2(c))
            block_s = max(1, min(next_power_of_2(hw), tile // block_c))
        else:
            block_s = min(next_power_of_2(hw), tile)
            block_c = max(1, min(next_power_of_2(c), tile // block_s, MAX_NCHW_BLOCK_C))
        num_c_blocks = cdiv(c, block_c)
        num_s_blocks = cdiv(hw, block_s)
        if split_size is None:
            # Enough reduce programs per chunk to fill the GPU; never less than one tile per
            # split.
            target = reduce_programs(device)
            splits = max(1, min(num_s_blocks, cdiv(target, max(1, chunk * num_c_blocks))))
            split_blocks = cdiv(num_s_blocks, splits)
        else:
            split_blocks = max(1, cdiv(split_size, block_s))
        split = split_blocks * block_s
        num_warps = num_warps_for(block_s * block_c)
        return cls(channels_last, block_s, block_c, num_c_blocks, num_s_blocks, split,
                   max(1, cdiv(hw, split)), num_warps, chunk)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """[start, stop) sample ranges, one launch sequence each."""
        return [(n0, min(n, n0 + self.chunk)) for n0 in range(0, n, self.chunk)]

    def reduce_grid(self, n: int) -> tuple[int]:
        return (n * self.num_c_blocks * self.num_splits,)

    def num_tiles(self, n: int) -> int:
        return n * self.num_c_blocks * self.num_s_blocks


@cached_plan
def fused_tile(n: int, c: int, hw: int, num_groups: int, dtype: torch.dtype,
               channels_last: bool, device: torch.device, limit: int
               ) -> tuple[int, int, int] | None:
    """(block_s, block_c, num_warps) when one program per (n, g) holding its whole group beats
    the split path: NCHW (the group is contiguous), the padded group fits in `limit` elements,
    and there are enough groups to fill the device. None otherwise."""
    if channels_last:
        return None
    block_s = next_power_of_2(hw)
    block_c = next_power_of_2(c // num_groups)
    if dtype == torch.float64:
        limit //= 2
    if block_s * block_c > limit or n * num_groups < min_fill_programs(device):
        return None
    return block_s, block_c, num_warps_for(block_s * block_c)


_elem_size = elem_size


@cached_plan
def plan_group_norm(n: int, c: int, hw: int, num_groups: int, dtype: torch.dtype,
                    channels_last: bool, mode: str, device: torch.device,
                    has_weight: bool = True, has_bias: bool = True,
                    split_size: int | None = None, per_example: bool = False
                    ) -> tuple[str, tuple[LaunchCost, ...]]:
    """(path, launches) of one group_norm_fwd (mode "fwd") or group_norm_bwd ("bwd") call, in
    launch order, with the HBM bytes each reads and writes: the same choices the launchers
    make. Path "fused" (one program per group) or "split" (reduce, combine, elementwise per
    chunk of samples, GroupNormPlan.chunks; the elementwise pass re-reads the chunk's x (and dy)
    in the reverse order, `l2_reread`). `per_example` (backward): group_norm_bwd(per_example=True)
    also reduces each sample's partial rows to its squared dweight / dbias norms
    (_per_example_sq_kernel, one program per sample, both parameters, after the column
    sums)."""
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"unknown group_norm plan mode {mode!r}")
    backward = mode == "bwd"
    data = n * c * hw * _elem_size(dtype)
    acc = _elem_size(acc_dtype(dtype))
    stats = 2 * n * num_groups * acc
    inputs = data * (2 if backward else 1)
    launches: list[LaunchCost] = []
    fused = None if split_size is not None else fused_tile(
        n, c, hw, num_groups, dtype, channels_last, device,
        MAX_FUSED_BWD if backward else MAX_FUSED_FWD)
    if fused is not None:
        path = "fused"
        name = "_group_norm_bwd_fused_kernel" if backward else "_group_norm_fwd_fused_kernel"
        partials = 2 * n * c * acc if backward else 0
        launches.append(LaunchCost(name, (n * num_groups,), fused[2],
                                   reads=inputs + (stats if backward else 0),
                                   writes=data + (partials if backward else stats)))
        rows = n
    else:
        path = "split"
        plan = GroupNormPlan.make(n, c, hw, dtype, channels_last, device, split_size, backward)
        names = (("_group_norm_bwd_reduce_kernel", "_group_norm_bwd_combine_kernel",
                  "_group_norm_bwd_dx_kernel") if backward else
                 ("_group_norm_fwd_stats_kernel", "_group_norm_fwd_combine_kernel",
                  "_group_norm_fwd_apply_kernel"))
        # One launch sequence per sample chunk, each re-reading only its own chunk's x (and dy).
        for n0, n1 in plan.chunks(n):
            m = n1 - n0
            part = 2 * m * plan.num_splits * c * acc
            chunk_data = data // n * m
            chunk_in = inputs // n * m
            chunk_stats = stats // n * m
            launches.append(LaunchCost(names[0], plan.reduce_grid(m), plan.num_warps,
                                       reads=chunk_in + (chunk_stats if backward else 0),
                                       writes=part))
            launches.append(LaunchCost(names[1], (m * num_groups,), 4, reads=part,
                                       writes=chunk_stats))
            launches.append(LaunchCost(names[2], (plan.num_tiles(m),), plan.num_warps,
                                       reads=chunk_in + chunk_stats * (2 if backward else 1),
                                       writes=chunk_data, l2_reread=chunk_in))
        rows = n * plan.num_splits
    if backward and (has_weight or has_bias):
        # One launch sums both parameters' partial rows.
        params = int(has_weight) + int(has_bias)
        launches.append(LaunchCost("_column_sum_kernel", (cdiv(c, 128),), 4,
                                   reads=params * rows * c * acc,
                                   writes=params * c * _elem_size(dtype)))
    if backward and per_example and (has_weight or has_bias):
        # One launch for both parameters, re-reading the partial rows the column sums just
        # read: from L2 while they fit.
        params = int(has_weight) + int(has_bias)
        both = rows * c * acc * params
        spec = per_example_sq_spec(n, c, has_weight, has_bias, acc_dtype(dtype))
        launches.append(LaunchCost("_per_example_sq_kernel", spec.grid, spec.meta["num_warps"],
                                   reads=both, writes=n * acc * params, l2_reread=both,
                                   l2_window=both))
    return path, tuple(launches)


def is_channels_last(x: torch.Tensor) -> bool:
    """True when the (N, C, HW) view x is laid out (N, HW, C) in memory and not also contiguous
    (size-1 dims make both true; then the NCHW path is taken)."""
    return not x.is_contiguous() and channels_last_strides(x)


def canonical(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is NCHW-contiguous or channels-last, else a contiguous copy."""
    if x.is_contiguous() or is_channels_last(x):
        return x
    return x.contiguous()


_as_layout = as_layout


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastnorm.group_norm: unknown activation {activation!r}; expected one "
                         f"of {ACTIVATIONS}")


def group_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   num_groups: int, eps: float, activation: str = "none",
                   split_size: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd for x of shape (N, C, HW). y has x's layout (NCHW or channels-last; any
    other strides are made contiguous first); mean/rstd are (N, G) in fp32 (fp64 for fp64).
    `split_size` forces the split path with that many spatial positions per split (tests)."""
    _check_activation(activation)
    x = canonical(x)
    n, c, hw = x.shape
    g = num_groups
    stats_dtype = acc_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty(n, g, dtype=stats_dtype, device=x.device)
    rstd = torch.empty(n, g, dtype=stats_dtype, device=x.device)
    if n == 0 or c == 0:
        return y, mean, rstd
    if hw == 0:  # as torch's native_group_norm: zero mean, NaN rstd, empty output
        mean.zero_()
        rstd.fill_(float("nan"))
        return y, mean, rstd
    channels_last = is_channels_last(x)
    group_size = c // g
    # Unused pointers still need a tensor argument; mean stands in for them.
    w = weight if weight is not None else mean
    b = bias if bias is not None else mean
    specs = _FWD_SPECS[n, c, hw, g, x.dtype, channels_last, x.device, weight is not None,
                       bias is not None, activation, split_size]
    if specs.plan is None:
        run(specs.chunks[0][2], x, y, w, b, mean, rstd, hw, g, group_size, eps)
        return y, mean, rstd
    plan = specs.plan
    stats_dtype = mean.dtype
    p_mean = torch.empty(n * plan.num_splits, c, dtype=stats_dtype, device=x.device)
    p_m2 = torch.empty_like(p_mean)
    # Per chunk of samples (views; groups never cross samples): the apply pass re-reads only
    # the chunk the stats pass just read, which the chunk size keeps within the L2 window.
    for n0, n1, (stats, combine, apply) in specs.chunks:
        m = n1 - n0
        xs, ys = x[n0:n1], y[n0:n1]
        rows = slice(n0 * plan.num_splits, n1 * plan.num_splits)
        pm, pm2 = p_mean[rows], p_m2[rows]
        ms, rs = mean[n0:n1], rstd[n0:n1]
        run(stats, xs, pm, pm2, c, hw, plan.split_size, plan.num_splits, plan.num_c_blocks)
        run(combine, pm, pm2, ms, rs, c, hw, g, group_size, plan.split_size, plan.num_splits,
            eps)
        run(apply, xs, ys, w, b, ms, rs, c, hw, g, group_size, plan.num_s_blocks,
            plan.num_c_blocks, plan.num_tiles(m))
    return y, mean, rstd


class _Specs(NamedTuple):
    """A group_norm_fwd / _bwd call's launches: `plan` None for the fused path (one launch,
    chunks[0][2]), else the split plan and per chunk of samples (n0, n1, (reduce, combine,
    elementwise) LaunchSpecs); backward: `pe_sq`, the per-example reduction of
    group_norm_bwd(per_example=True)."""
    plan: Optional[GroupNormPlan]
    chunks: tuple
    pe_sq: Optional[LaunchSpec] = None


def _fwd_specs(n: int, c: int, hw: int, g: int, dtype: torch.dtype, channels_last: bool,
               device: torch.device, has_weight: bool, has_bias: bool, activation: str,
               split_size: Optional[int]) -> _Specs:
    flags = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, ACTIVATION=activation,
                 ACC=tl_acc_dtype(dtype))
    fused = None if split_size is not None else fused_tile(
        n, c, hw, g, dtype, channels_last, device, MAX_FUSED_FWD)
    if fused is not None:
        block_s, block_c, num_warps = fused
        spec = launch_spec(_group_norm_fwd_fused_kernel, (n * g,), **flags, BLOCK_S=block_s,
                           BLOCK_C=block_c, num_warps=num_warps)
        return _Specs(None, ((0, n, spec),))
    plan = GroupNormPlan.make(n, c, hw, dtype, channels_last, device, split_size)
    block_k = min(COMBINE_BLOCK, next_power_of_2(plan.num_splits * (c // g)))
    tile = dict(BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, num_warps=plan.num_warps)
    chunks = []
    for n0, n1 in plan.chunks(n):
        m = n1 - n0
        chunks.append((n0, n1, (
            launch_spec(_group_norm_fwd_stats_kernel, plan.reduce_grid(m),
                        CHANNELS_LAST=channels_last, ACC=flags["ACC"], **tile),
            launch_spec(_group_norm_fwd_combine_kernel, (m * g,), ACC=flags["ACC"],
                        BLOCK_K=block_k, num_warps=4),
            launch_spec(_group_norm_fwd_apply_kernel, (plan.num_tiles(m),),
                        CHANNELS_LAST=channels_last, **flags, **tile))))
    return _Specs(plan, tuple(chunks))


_FWD_SPECS = SpecCache(_fwd_specs)


def _bwd_specs(n: int, c: int, hw: int, g: int, dtype: torch.dtype, channels_last: bool,
               device: torch.device, has_weight: bool, has_bias: bool, activation: str,
               split_size: Optional[int]) -> _Specs:
    flags = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, ACTIVATION=activation,
                 ACC=tl_acc_dtype(dtype))
    pe_sq = per_example_sq_spec(n, c, has_weight, has_bias, acc_dtype(dtype))
    fused = None if split_size is not None else fused_tile(
        n, c, hw, g, dtype, channels_last, device, MAX_FUSED_BWD)
    if fused is not None:
        block_s, block_c, num_warps = fused
        spec = launch_spec(_group_norm_bwd_fused_kernel, (n * g,), **flags, BLOCK_S=block_s,
                           BLOCK_C=block_c, num_warps=num_warps)
        return _Specs(None, ((0, n, spec),), pe_sq)
    plan = GroupNormPlan.make(n, c, hw, dtype, channels_last, device, split_size,
                              backward=True)
    block_k = min(COMBINE_BLOCK, next_power_of_2(plan.num_splits * (c // g)))
    tile = dict(BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, num_warps=plan.num_warps)
    chunks = []
    for n0, n1 in plan.chunks(n):
        m = n1 - n0
        chunks.append((n0, n1, (
            launch_spec(_group_norm_bwd_reduce_kernel, plan.reduce_grid(m),
                        CHANNELS_LAST=channels_last, **flags, **tile),
            launch_spec(_group_norm_bwd_combine_kernel, (m * g,), HAS_WEIGHT=has_weight,
                        ACC=flags["ACC"], BLOCK_K=block_k, num_warps=4),
            launch_spec(_group_norm_bwd_dx_kernel, (plan.num_tiles(m),),
                        CHANNELS_LAST=channels_last, **flags, **tile))))
    return _Specs(plan, tuple(chunks), pe_sq)


_BWD_SPECS = SpecCache(_bwd_specs)


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                   num_groups: int, activation: str = "none", split_size: int | None = None,
                   per_example: bool = False) -> tuple[torch.Tensor | None, ...]:
    """dx (in x's layout), dweight, dbias (None where there is no weight / bias) for x and dy of
    shape (N, C, HW). bias is read for the SiLU backward; dbias comes back in bias's dtype.
    `split_size` forces the split path, as in group_norm_fwd. per_example=True also returns
    dweight_sq, dbias_sq: [N] squared norms of each sample's dweight / dbias, in the stats
    dtype (empty where there is no weight / bias), reduced from the same partials (dx,
    dweight, dbias unchanged, bitwise)."""
    _check_activation(activation)
    x = canonical(x)
    n, c, hw = x.shape
    g = num_groups
    channels_last = is_channels_last(x)
    dy = _as_layout(dy, channels_last)
    dx = torch.empty_like(x)
    has_weight = weight is not None
    has_bias = bias is not None
    partial_dtype = acc_dtype(x.dtype)
    if n == 0 or c == 0 or hw == 0:
        dweight = torch.zeros_like(weight) if has_weight else None
        dbias = torch.zeros_like(bias) if has_bias else None
        if per_example:
            sq = [x.new_zeros(n if p else 0, dtype=partial_dtype) for p in (has_weight, has_bias)]
            return dx, dweight, dbias, *sq
        return dx, dweight, dbias
    w = weight if has_weight else mean
    b = bias if has_bias else mean
    group_size = c // g
    specs = _BWD_SPECS[n, c, hw, g, x.dtype, channels_last, x.device, has_weight, has_bias,
                       activation, split_size]
    if specs.plan is None:
        # One row of dweight/dbias partials per sample.
        p1 = torch.empty(n, c, dtype=partial_dtype, device=x.device)
        p2 = torch.empty_like(p1)
        run(specs.chunks[0][2], x, dy, dx, w, b, mean, rstd, p1, p2, c, hw, g, group_size)
    else:
        plan = specs.plan
        p1 = torch.empty(n * plan.num_splits, c, dtype=partial_dtype, device=x.device)
        p2 = torch.empty_like(p1)
        c1 = torch.empty(n, g, dtype=partial_dtype, device=x.device)
        c2 = torch.empty_like(c1)
        # Per chunk of samples, as in the forward; each chunk fills its own rows of P1/P2.
        for n0, n1, (reduce, combine, dx_spec) in specs.chunks:
            m = n1 - n0
            xs, dys, dxs = x[n0:n1], dy[n0:n1], dx[n0:n1]
            ms, rs, c1s, c2s = mean[n0:n1], rstd[n0:n1], c1[n0:n1], c2[n0:n1]
            rows = slice(n0 * plan.num_splits, n1 * plan.num_splits)
            p1s, p2s = p1[rows], p2[rows]
            run(reduce, xs, dys, w, b, ms, rs, p1s, p2s, c, hw, g, group_size,
                plan.split_size, plan.num_splits, plan.num_c_blocks)
            run(combine, p1s, p2s, w, c1s, c2s, c, hw, g, group_size, plan.num_splits)
            run(dx_spec, xs, dys, dxs, w, b, ms, rs, c1s, c2s, c, hw, g, group_size,
                plan.num_s_blocks, plan.num_c_blocks, plan.num_tiles(m))
    dweight, dbias = column_sums(p1 if has_weight else None,
                                 weight.dtype if has_weight else None,
                                 p2 if has_bias else None, bias.dtype if has_bias else None)
    if not per_example:
        return dx, dweight, dbias
    # Sample n's partial rows are rows [n * splits, (n + 1) * splits) of P1 / P2: the slot
    # layout of _per_example_sq_kernel with one row per program and splits rows per example.
    splits = 1 if specs.plan is None else specs.plan.num_splits
    dw_sq = torch.empty(n if has_weight else 0, dtype=partial_dtype, device=x.device)
    db_sq = torch.empty(n if has_bias else 0, dtype=partial_dtype, device=x.device)
    if has_weight or has_bias:
        run(specs.pe_sq, p1, p2, dw_sq if has_weight else p1, db_sq if has_bias else p1, n, c,
            1, splits, 1, splits)
    return dx, dweight, dbias, dw_sq, db_sq
