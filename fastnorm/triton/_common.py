"""Helpers shared by the Triton launchers: accumulation dtype, launch sizing (one rule for warps
and one notion of "programs per SM"), the per-launch byte accounting of launch plans, the
second-stage column reduction used by every deterministic weight-gradient path, and the
per-example backward's last stages (per-example squared norms from per-program slot rows, the
noise-scale sums)."""
from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._dtypes import stats_dtype
from ._launch import launch, launch_with


acc_dtype = stats_dtype  # statistics / accumulation dtype of an input dtype


# Plain integer helpers: triton.cdiv / triton.next_power_of_2 are ConstexprFunction objects
# costing ~2 us a call from Python, which the launchers cannot afford per call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0  # (0 -> 0, as Triton's)


def tl_acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_assumed_sm_count: int | None = None
_assumed_l2_bytes: int | None = None

# Launch plans are pure functions of their arguments and of the planning overrides below, so
# each is computed once per argument tuple (`cached_plan`) and every override clears the caches:
# a call then costs one dictionary lookup instead of the heuristics.
_PLAN_CACHES: list = []
_PLAN_CACHE_SIZE = 4096


def cached_plan(fn):
    """Memoize a plan function (LRU, _PLAN_CACHE_SIZE entries); `clear_plan_caches` resets it."""
    cached = functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)(fn)
    _PLAN_CACHES.append(cached)
    return cached


def clear_plan_caches() -> None:
    """Forget every cached launch plan: call after changing a planning constant (tests that
    monkeypatch tile sizes do; the assume_* / force_* context managers do it themselves)."""
    for cache in _PLAN_CACHES:
        cache.cache_clear()
    for specs in _SPEC_CACHES:
        specs.clear()


class LaunchSpec(NamedTuple):
    """What a launcher needs besides the call's tensors and sizes: the kernel, its grid, the
    constexprs and launch options (`meta`) and a hashable stand-in for them (`meta_key`, for
    the launch cache: see fastnorm/triton/_launch.py)."""
    kernel: Any
    grid: tuple
    meta: dict
    meta_key: tuple


def launch_spec(kernel: Any, grid: tuple, **meta: Any) -> LaunchSpec:
    return LaunchSpec(kernel, grid, meta, tuple(meta.items()))


def run(spec: LaunchSpec, *args: Any) -> None:
    """Launch `spec` with the runtime arguments `args`."""
    launch_with(spec.kernel, spec.grid, args, spec.meta, spec.meta_key)


_SPEC_CACHES: list = []


class SpecCache(dict):
    """A launcher's cache: key -> whatever `make(*key)` returns (its plan and LaunchSpecs),
    made on the first miss. A hit is one dict lookup; cleared with the plan caches and when it
    outgrows _PLAN_CACHE_SIZE entries (shapes that never repeat)."""

    def __init__(self, make: Any) -> None:
        super().__init__()
        self.make = make
        _SPEC_CACHES.append(self)

    def __missing__(self, key: tuple) -> Any:
        if len(self) >= _PLAN_CACHE_SIZE:
            self.clear()
        value = self[key] = self.make(*key)
        return value


@contextlib.contextmanager
def planning_override(module, name: str, value) -> Iterator[None]:
    """Set `module.name` to `value` for the block, with the plan caches cleared on entry and on
    exit (plans made under the override are not reused outside it)."""
    previous = getattr(module, name)
    setattr(module, name, value)
    clear_plan_caches()
    try:
        yield
    finally:
        setattr(module, name, previous)
        clear_plan_caches()


def assume_sm_count(sm_count: int):
    """Plan launches as if the device had `sm_count` SMs (the static cost report plans for an
    A100's 108 or an H100's 132 on a machine without a GPU)."""
    return planning_override(sys.modules[__name__], "_assumed_sm_count", sm_count)


def assume_l2_bytes(l2_bytes: int):
    """Plan launches as if the device had an L2 of `l2_bytes` (static cost report)."""
    return planning_override(sys.modules[__name__], "_assumed_l2_bytes", l2_bytes)


def elem_size(dtype: torch.dtype) -> int:
    """Bytes per element of `dtype` (no tensor is created)."""
    return dtype.itemsize


@functools.lru_cache(maxsize=None)
def _l2_bytes(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).L2_cache_size


# L2 assumed where there is no CUDA device to ask (the interpreter, meta tensors): an A100's.
DEFAULT_L2_BYTES = 40 * 2**20


def l2_cache_bytes(device: torch.device) -> int:
    """The device's L2 size in bytes (for plans that bound the bytes in flight so that a second
    walk over them finds them in L2)."""
    if _assumed_l2_bytes is not None:
        return _assumed_l2_bytes
    if device.type == "cuda" and not triton_interpreted():
        return _l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_L2_BYTES


def num_parallel_programs(device: torch.device) -> int:
    """How many programs fill the device for a persistent / partial-sum grid: the SM count.

    Under the interpreter programs run one after another, so a handful is enough to exercise the
    multi-program partial sums without making the tests slow.
    """
    if _assumed_sm_count is not None:
        return _assumed_sm_count
    if device.type == "cuda" and not triton_interpreted():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


# Programs per SM a reduction grid aims for (partial-sum rows, GroupNorm splits): enough loads in
# flight to cover HBM latency; more only adds partials to combine.
REDUCE_PROGRAMS_PER_SM = 8
# Below this many programs per SM a one-program-per-group kernel leaves SMs idle.
MIN_PROGRAMS_PER_SM = 2
# Tile elements per warp: 8 per thread (16-byte loads for 16-bit dtypes). The static cost report
# found 16 per thread (4096-element tiles at 8 warps) spilling at sm_90's 80-register choice in
# the GroupNorm apply / SiLU reduce and BatchNorm channels-last dx kernels; 8 per thread does not.
ELEMS_PER_WARP = 256
MAX_WARPS = 16


def reduce_programs(device: torch.device) -> int:
    """Target number of programs for a reduction grid on `device`."""
    return REDUCE_PROGRAMS_PER_SM * num_parallel_programs(device)


def min_fill_programs(device: torch.device) -> int:
    """Fewest programs a grid of whole-group programs needs to keep every SM busy."""
    return MIN_PROGRAMS_PER_SM * num_parallel_programs(device)


def rows_per_tile(row_elems: int, tile_elems: int, max_rows: int) -> int:
    """Rows of `row_elems` (padded) elements per tile so that short rows still give a program
    about `tile_elems` elements: between 1 and `max_rows`."""
    return max(1, min(max_rows, tile_elems // max(1, row_elems)))


def num_warps_for(tile_elems: int, max_warps: int = MAX_WARPS,
                  elems_per_warp: int = ELEMS_PER_WARP) -> int:
    """Warps for a program working on a tile of `tile_elems` elements: one per `elems_per_warp`,
    between 1 and `max_warps`."""
    return max(1, min(max_warps, tile_elems // elems_per_warp))


@dataclass(frozen=True)
class LaunchCost:
    """One kernel launch of a plan: its name, grid, warps and the HBM bytes it reads and writes
    (reads of data a previous launch just read count in full; `l2_reread` says how many of
    them may come from L2 instead: the cost model, `modeled_hbm_bytes`, decides)."""
    kernel: str
    grid: tuple[int, ...]
    num_warps: int
    reads: int
    writes: int
    l2_reread: int = 0
    # Bytes that pass through the L2 between a read and its re-read (a persistent walk's rows in
    # flight); 0: the re-read follows a whole pass over the data (see modeled_hbm_bytes).
    l2_window: int = 0


# Fraction of the L2 a second pass can expect to find still holding the first pass's last bytes
# (half: the other half is the writes and the data the first pass read earlier). Unmeasured.
L2_REUSE_FRACTION = 0.5


def modeled_hbm_bytes(launches: tuple[LaunchCost, ...], l2_bytes: int) -> int:
    """HBM traffic of a plan: every read and write, less the re-read bytes that come from L2.
    A re-read after a whole pass (`l2_window` 0) hits for at most the usable part of the L2 (see
    L2_REUSE_FRACTION: the tail of the pass); a re-read within a window of `l2_window` bytes hits
    in full when the window fits in the usable L2, else for the fraction usable / window."""
    usable = int(L2_REUSE_FRACTION * l2_bytes)

    def hits(l: LaunchCost) -> int:
        if l.l2_window:
            return int(l.l2_reread * min(1.0, usable / l.l2_window))
        return min(l.l2_reread, usable)

    return sum(l.reads + l.writes - hits(l) for l in launches)


@triton.jit
def as_acc(value, ACC: tl.constexpr):
    """A scalar float argument declared `tl.float64` (eps, momentum) in ACC: exact for fp64
    kernels, rounded once to fp32 for fp32 ones. (An undeclared Python float reaches a compiled
    kernel as fp32; the interpreter passes the Python float itself.)"""
    # tl.full, not tl.cast: the interpreter would round a Python float to fp32 in tl.cast.
    return tl.full([], value, ACC)


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
def _column_sum_kernel(P, Out, P2, Out2, num_rows, N, stride_p, stride_p2, TWO: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[n] = sum_p P[p, n] (and, with TWO, Out2[n] = sum_p P2[p, n]), in a fixed order: the
    second stage of a deterministic reduction. TWO sums dW's and dB's partials in one launch."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_N], dtype=P.dtype.element_ty)
    acc2 = tl.zeros([BLOCK_N], dtype=P.dtype.element_ty)
    for start in range(0, num_rows, BLOCK_P):
        rows = (start + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask = (rows < num_rows)[:, None] & col_mask[None, :]
        acc += tl.sum(tl.load(P + rows[:, None] * stride_p + cols[None, :], mask=mask,
                              other=0.0), axis=0)
        if TWO:
            acc2 += tl.sum(tl.load(P2 + rows[:, None] * stride_p2 + cols[None, :], mask=mask,
                                   other=0.0), axis=0)
    # Cast on store: the result's dtype costs no separate torch launch.
    tl.store(Out + cols, acc.to(Out.dtype.element_ty), mask=col_mask)
    if TWO:
        tl.store(Out2 + cols, acc2.to(Out2.dtype.element_ty), mask=col_mask)


COLUMN_SUM_BLOCK_N = 128
COLUMN_SUM_BLOCK_P = 32


def column_sums(partial: Optional[torch.Tensor], out_dtype: Optional[torch.dtype],
                partial2: Optional[torch.Tensor] = None,
                out_dtype2: Optional[torch.dtype] = None
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The column sums of one or two [P, N] tensors of per-program partial sums (in their
    dtype; same P and N), each rounded once to its out dtype: one launch for both (dW and dB).
    A None partial gives None."""
    if partial is None:
        return None, column_sum(partial2, out_dtype2) if partial2 is not None else None
    if partial2 is None:
        return column_sum(partial, out_dtype), None
    num_rows, n = partial.shape
    out = torch.empty(n, dtype=out_dtype, device=partial.device)
    out2 = torch.empty(n, dtype=out_dtype2, device=partial.device)
    if n:
        launch(_column_sum_kernel, (cdiv(n, COLUMN_SUM_BLOCK_N),), partial, out, partial2,
               out2, num_rows, n, partial.stride(0), partial2.stride(0), TWO=True,
               BLOCK_P=COLUMN_SUM_BLOCK_P, BLOCK_N=COLUMN_SUM_BLOCK_N)
    return out, out2


def column_sum(partial: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Sum a [P, N] tensor of per-program partial sums over P (in P's dtype); the result is
    rounded once to out_dtype, in the same launch."""
    num_rows, n = partial.shape
    out = torch.empty(n, dtype=out_dtype, device=partial.device)
    if n == 0:
        return out
    launch(_column_sum_kernel, (cdiv(n, COLUMN_SUM_BLOCK_N),), partial, out, partial,
           out, num_rows, n, partial.stride(0), 0, TWO=False, BLOCK_P=COLUMN_SUM_BLOCK_P,
           BLOCK_N=COLUMN_SUM_BLOCK_N)
    return out


# --- per-example squared gradient norms and the noise-scale sums --------------------------------

@triton.jit
def _per_example_sq_kernel(P, P2, Out, Out2, num_examples, N, rows_per_program,
                           rows_per_example, slots_per_program, max_span,
                           HAS_P: tl.constexpr, HAS_P2: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """Examples e of this program's BLOCK_E: Out[e] = sum_n (sum_p P[p * slots_per_program +
    e - e_first(p), n])^2 (Out2 from P2 likewise, in the same launch), over the programs p of
    the backward whose rows [p * rows_per_program, (p + 1) * rows_per_program) meet e's rows
    [e * rows_per_example, (e + 1) * rows_per_example), in program order (at most max_span of
    them); e_first(p) is the example of p's first row, so P[p * slots_per_program + k] is p's
    k-th example's slot row. The program range comes from the row ranges: no index tensor.
    GroupNorm's partial rows (num_splits per sample) are the case rows_per_program =
    slots_per_program = 1, rows_per_example = num_splits. Fixed order, no atomics."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < num_examples
    p_lo = e * rows_per_example // rows_per_program
    p_hi = ((e + 1) * rows_per_example - 1) // rows_per_program
    sq = tl.zeros([BLOCK_E, BLOCK_N], dtype=ACC)
    sq2 = tl.zeros([BLOCK_E, BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        g = tl.zeros([BLOCK_E, BLOCK_N], dtype=ACC)
        g2 = tl.zeros([BLOCK_E, BLOCK_N], dtype=ACC)
        for k in range(0, max_span):
            p = p_lo + k
            row = p * slots_per_program + e - p * rows_per_program // rows_per_example
            offs = row.to(tl.int64)[:, None] * N + cols[None, :]
            mask = (e_mask & (p <= p_hi))[:, None] & (cols < N)[None, :]
            if HAS_P:
                g += tl.load(P + offs, mask=mask, other=0.0)
            if HAS_P2:
                g2 += tl.load(P2 + offs, mask=mask, other=0.0)
        sq += g * g
        sq2 += g2 * g2
    if HAS_P:
        tl.store(Out + e, tl.sum(sq, axis=1), mask=e_mask)
    if HAS_P2:
        tl.store(Out2 + e, tl.sum(sq2, axis=1), mask=e_mask)


# Elements of a _per_example_sq_kernel tile (examples x columns): wide rows one example a
# program, narrow rows many.
PER_EXAMPLE_SQ_TILE = 2048


def per_example_sq_spec(examples: int, n: int, has_p: bool, has_p2: bool,
                        dtype: torch.dtype) -> LaunchSpec:
    """The launch of _per_example_sq_kernel for `examples` examples of n columns, both
    parameters' slot rows (`dtype`: theirs, the accumulation dtype) in one launch."""
    block_n = min(PER_EXAMPLE_SQ_TILE, next_power_of_2(max(n, 1)))
    block_e = min(next_power_of_2(max(examples, 1)), PER_EXAMPLE_SQ_TILE // block_n)
    return launch_spec(_per_example_sq_kernel, (cdiv(examples, block_e),), HAS_P=has_p,
                       HAS_P2=has_p2, ACC=tl_acc_dtype(dtype), BLOCK_E=block_e,
                       BLOCK_N=block_n, num_warps=num_warps_for(block_e * block_n))


def per_example_max_span(rows_per_program: int, rows_per_example: int) -> int:
    """The most programs of rows_per_program consecutive rows an example of rows_per_example
    consecutive rows can meet."""
    return cdiv(rows_per_example - 1, rows_per_program) + 1


@triton.jit
def _gns_sums_kernel(SqW, SqB, DW, DB, Sums, num_sq_w, num_sq_b, num_w, num_b, examples,
                     ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One program: Sums = [sum(SqW) + sum(SqB), |DW|^2 + |DB|^2, examples, 1] in fp32, every
    sum in ACC in a fixed order (the noise-scale sink's gradient, see fastnorm.ops.gns)."""
    offs = tl.arange(0, BLOCK)
    per_example = tl.zeros([BLOCK], dtype=ACC)
    batch = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, num_sq_w, BLOCK):
        per_example += tl.load(SqW + start + offs, mask=start + offs < num_sq_w,
                               other=0.0).to(ACC)
    for start in range(0, num_sq_b, BLOCK):
        per_example += tl.load(SqB + start + offs, mask=start + offs < num_sq_b,
                               other=0.0).to(ACC)
    for start in range(0, num_w, BLOCK):
        g = tl.load(DW + start + offs, mask=start + offs < num_w, other=0.0).to(ACC)
        batch += g * g
    for start in range(0, num_b, BLOCK):
        g = tl.load(DB + start + offs, mask=start + offs < num_b, other=0.0).to(ACC)
        batch += g * g
    tl.store(Sums, tl.sum(per_example, axis=0).to(tl.float32))
    tl.store(Sums + 1, tl.sum(batch, axis=0).to(tl.float32))
    # (+ 0.0: `examples` arrives as a constant when it is 1)
    tl.store(Sums + 2, tl.zeros([], dtype=tl.float32) + examples)
    tl.store(Sums + 3, tl.full([], 1.0, tl.float32))


GNS_SUMS_BLOCK = 1024


def gns_sums(dweight_sq: torch.Tensor, dbias_sq: torch.Tensor, dweight: torch.Tensor,
             dbias: torch.Tensor, examples: int) -> torch.Tensor:
    """fp32 [sum(dweight_sq) + sum(dbias_sq), |dweight|^2 + |dbias|^2, examples, 1] in one
    launch of one program (any of the tensors may be empty)."""
    sums = torch.empty(4, dtype=torch.float32, device=dweight_sq.device)
    acc = tl.float64 if torch.float64 in (dweight_sq.dtype, dbias_sq.dtype) else tl.float32
    # Empty tensors are never read: the output stands in for them.
    sq_w = dweight_sq if dweight_sq.numel() else sums
    sq_b = dbias_sq if dbias_sq.numel() else sums
    dw = dweight if dweight.numel() else sums
    db = dbias if dbias.numel() else sums
    launch(_gns_sums_kernel, (1,), sq_w, sq_b, dw, db, sums, dweight_sq.numel(),
           dbias_sq.numel(), dweight.numel(), dbias.numel(), int(examples), ACC=acc,
           BLOCK=GNS_SUMS_BLOCK, num_warps=4)
    return sums
