"""Static cost report: what every launch the kernels would make at the benchmark shapes costs on an
A100 (sm_80) and an H100 (sm_90), without a GPU.

For each case (the bench scripts' shapes plus a few edge shapes; fp32, fp16, bf16) the real
launchers run on `meta` tensors with the SM count of the target assumed, and every kernel launch
they make is recorded (kernel, grid, runtime argument types, constexprs, warps), so the report
sees exactly the launchers' choices. Each distinct launch is compiled for the target
(benchmarks/_compile.py: Triton + the ptxas in the triton wheel) and reported with:
  registers/thread, spill bytes, static shared memory, blocks per SM (from registers, shared
  memory and warps against the SM's limits), grid size in waves of the SM count;
and per case: the HBM bytes the launch plans model (GroupNorm: `plan_group_norm`, BatchNorm:
`plan_batch_norm`, LayerNorm/RMSNorm: `plan_layer_norm`, all in fastnorm/triton) against the op's ideal bytes, and so the predicted ceiling
= ideal / modeled bytes as % of copy bandwidth (a memory-bound op at copy speed moving the
modeled bytes). Mode bwd_pe (GroupNorm, LayerNorm/RMSNorm) is the per-example gradient-norm
backward: its modeled bytes minus the plain backward's, against one pass over x (PE_EXTRA_LIMIT,
else a reason from PE_EXCEPTIONS). Nothing here is measured.

`--compare DIR` puts measured benchmark results (benchmarks/bench_*.py JSON, e.g. from
benchmarks/gpu_check.sh) next to the predictions, twice. Kernel-only: the benchmarks' CUDA-graph
replay of the call (graph_pct_copy; else the profiled kernels' sum) against the predicted
ceiling, which is what the byte model predicts. Eager: the benchmarks' do_bench time against
max(device, host): device = modeled bytes at the run's copy bandwidth, host = a per-call op
overhead + the plan's launches x a host cost per launch (from bench_overhead.py's GPU JSON in DIR
when there is one, else DEFAULT_CALL_US / DEFAULT_LAUNCH_US; --call-us, --launch-us override);
the row says which bound applies.

    python benchmarks/static_report.py [--out DIR] [--ops group_norm,batch_norm,layer_norm]
        [--targets sm_80,sm_90] [--quick | --cases quick|bench|full]
        [--modes fwd,bwd,eval,bwd_pe] [--compare RESULTS_DIR [--launch-us US] [--call-us FWD,BWD]]

Writes DIR/static_report.{csv,json,md} (default DIR: static_report/), and with --compare
DIR/measured_vs_predicted.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import _compile  # noqa: E402


@dataclass(frozen=True)
class Target:
    name: str
    cc: int
    sms: int
    l2_bytes: int
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


TARGETS = {
    "sm_80": Target("A100", 80, 108, 40 * 2**20, smem_per_sm=164 * 1024),
    "sm_90": Target("H100", 90, 132, 50 * 2**20),
}
DTYPES = ("float32", "float16", "bfloat16")

# Exceptions to "modeled HBM traffic within 10 % of ideal", with the reason (see NOTES.md).
DESIGN_EXCEPTIONS = {
    ("batch_norm", "fwd"): "statistics need a full pass over x before any output: 3 passes "
                           "(x, x, y) unless the apply's reversed walk finds x in L2",
    ("batch_norm", "bwd"): "the dx pass needs the per-channel sums of the whole batch: x and dy "
                           "are read twice (5 passes) unless the reversed walk hits L2",
    ("group_norm", "fwd", "split"): "a group split over programs needs its statistics first: x "
                                    "read twice, per chunk of samples sized to the L2 window; "
                                    "for small tensors (16x256x16x16, 4x96x7x7) the per-split "
                                    "partials and statistics are not small next to x",
    ("group_norm", "bwd", "split"): "as the forward, with x and dy; one sample's x and dy over "
                                    "the L2 window (8x320x128^2 fp32: 42 MB > 25 MB) is re-read "
                                    "partly from HBM; channels-last dweight/dbias partials of "
                                    "many splits (8x1280x32^2: ~12 % of x, dy and dx)",
    ("layer_norm", "bwd", "chunked"): "row chunks (x and dy of a chunk within the L2 window "
                                      "next to the dW/dB partial rows) reach ~3 passes where "
                                      "MAX_ROW_CHUNKS = 16 chunks suffice; fp32 rows of 64K "
                                      "(1024x65536: 512 MB of x and dy) and 16-bit LayerNorm "
                                      "on sm_80's 20 MB window need more, so part of the "
                                      "dx kernel's re-read comes from HBM; with a handful "
                                      "of rows (7x65537) the dW/dB partials and the weights "
                                      "are not small next to x",
    ("rms_norm", "bwd", "chunked"): "as layer_norm",
    ("layer_norm", "bwd", "rows"): "few rows per program (2048x16385: 16): each program's N "
                                   "fp32 dW and dB partial rows, written and summed once, are "
                                   "> 10 % of x, dy and dx",
    ("rms_norm", "bwd", "rows"): "as layer_norm",
    ("layer_norm", "fwd", "chunked"): "fp32 rows of 64K+: one row per SM (132 x 256 KB) is more "
                                      "than the usable L2, so part of the second walk comes "
                                      "from HBM; with a handful of rows (7x65537) the weight "
                                      "and bias reads are not small next to x",
    ("rms_norm", "fwd", "chunked"): "as layer_norm",
}

# The per-example backward (bwd_pe) may add, over the plain backward's modeled bytes, at most this
# fraction of one pass over x (the slot rows and the small reductions: no extra pass over x or
# dy), except where the slot rows are not small (with the reason).
PE_EXTRA_LIMIT = 0.10
PE_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("layer_norm", "fused"): "the slot rows scale with E + programs, not with M: per parameter "
                             "(E + programs) rows of N fp32, written once by the main kernel "
                             "and read once by _per_example_sq_kernel; with both parameters "
                             "and 16-bit x more than 10 % of x below M ~ 80 x (E + programs) "
                             "(264 programs, 32 examples: 16384x4096 12.5 %, 8192x8192 16 %); "
                             "not a pass over x or dy",
    ("rms_norm", "fused"): "as layer_norm (one parameter: half the bytes)",
    ("layer_norm", "chunked"): "OPEN: with row chunks the chunked backward's programs take a "
                               "few rows each (1024x65536: 4), so an example of 32 rows meets "
                               "8 of them: 288 slot rows of N fp32 per parameter, written and "
                               "read once (fp32: 1.0 x of x, 16-bit 2.0 x). Not a pass over x "
                               "or dy, but as costly; row groups sized to examples would "
                               "change the plain backward's dW/dB summation (bitwise "
                               "contract). 7x65537: one example of 7 rows, the slot rows are "
                               "not small next to x",
    ("rms_norm", "chunked"): "as layer_norm",
    ("layer_norm", "rows"): "as fused, with few rows per program (4096x8193: 31); and OPEN "
                            "(plan, not design) where the persistent rows kernel's L2 window, "
                            "sized without the slot row each program keeps in flight next to "
                            "its partial row, then overflows the usable L2 (4096x16384: 25 + "
                            "17 MB): the modeled partial and slot row updates miss it (1.5-7.3 "
                            "x of x). Fix: count the slot rows in _rows_plan's per-program "
                            "bytes for the per-example backward (then the plain backward's "
                            "program count, which the bitwise contract shares, changes too)",
    ("rms_norm", "rows"): "as layer_norm",
}


# --- cases -------------------------------------------------------------------------------------

def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Case scopes: "quick" (CI's representative subset: the first bench shape and one edge shape
# per op, the variants with the most live values), "bench" (every benchmark shape, every
# variant: what tests/test_launch_configs.py compiles), "full" (bench shapes and edge shapes).
SCOPES = ("quick", "bench", "full")


def group_norm_cases(scope: str) -> list[dict]:
    shapes = list(_bench_module("bench_group_norm").SHAPES)
    edges = [((16, 256, 16, 16), 32), ((4, 96, 7, 7), 32), ((1, 64, 96, 96), 1)]
    quick = scope == "quick"
    out = []
    for shape, groups in {"quick": shapes[:1] + edges[:1], "bench": shapes,
                          "full": shapes + edges}[scope]:
        for dtype in DTYPES:
            for layout in ("NCHW", "NHWC"):
                # --quick: SiLU only, the variant with the most live values per element.
                for activation in (("silu",) if quick else ("none", "silu")):
                    case = "x".join(map(str, shape)) + f" G={groups}" + (
                        " +silu" if activation == "silu" else "")
                    out.append(dict(op="group_norm", case=case, shape=shape, groups=groups,
                                    dtype=dtype, layout=layout, activation=activation))
    return out


def batch_norm_cases(scope: str) -> list[dict]:
    shapes = list(_bench_module("bench_batch_norm").GPU_SHAPES)
    edges = [(32, 3, 224, 224), (8, 2048, 7, 7), (1024, 512)]
    quick = scope == "quick"
    out = []
    for shape in {"quick": shapes[:1] + edges[-1:], "bench": shapes,
                  "full": shapes + edges}[scope]:
        for dtype in DTYPES:
            for layout in (("NCHW", "NHWC") if len(shape) == 4 else ("NC",)):
                for relu in ((True,) if quick else (False, True)):
                    case = "x".join(map(str, shape)) + (" +relu" if relu else "")
                    out.append(dict(op="batch_norm", case=case, shape=shape, dtype=dtype,
                                    layout=layout, relu=relu))
    return out


# Edge shapes: just past each path limit, and a ragged long row.
LAYER_NORM_EDGES = [("layer_norm", 4096, 8193), ("rms_norm", 4096, 8193),
                    ("layer_norm", 2048, 16385), ("rms_norm", 1024, 70000),
                    ("layer_norm", 7, 65537)]


def layer_norm_cases(scope: str) -> list[dict]:
    """Bench shapes (and, scope "full", edges) in every dtype; the fused residual (add + norm)
    cases of the benchmark with the residual stream in x's dtype, and for bf16 in fp32 too."""
    bench = _bench_module("bench_layer_norm")
    shapes = [(k, m, n) for k, m, n, _ in bench.GPU_CASES]
    quick = scope == "quick"
    if quick:
        # One fused shape, the long-row shape (chunked forward, chunked backward), one edge.
        shapes = [shapes[0], ("rms_norm", 1024, 65536), ("layer_norm", 4096, 8193)]
    elif scope == "full":
        shapes += LAYER_NORM_EDGES
    out = []
    seen = set()
    for kind, m, n in shapes:
        for dtype in DTYPES:
            if (kind, m, n, dtype) in seen:
                continue
            seen.add((kind, m, n, dtype))
            out.append(dict(op=kind, case=f"{m}x{n}", shape=(m, n), dtype=dtype, layout="rows"))
    residual = [(k, m, n) for k, m, n, _ in bench.RESIDUAL_CASES]
    for kind, m, n in (residual[:1] if quick else residual):
        for dtype in DTYPES:
            for res in ((dtype, "float32") if dtype == "bfloat16" else (dtype,)):
                out.append(dict(op=kind, case=f"{m}x{n} +res" + ("32" if res != dtype else ""),
                                shape=(m, n), dtype=dtype, layout="rows", residual=res))
    return out


CASES: dict[str, Callable[[str], list[dict]]] = {
    "group_norm": group_norm_cases, "batch_norm": batch_norm_cases,
    "layer_norm": layer_norm_cases}


# --- tracing the launchers ---------------------------------------------------------------------

_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                    "int32": "i32", "int64": "i64"}


def _launch_spec(fn, args: tuple, kwargs: dict) -> list:
    """The compile spec of one launch `fn[grid](*args, **kwargs)`, typed and
    specialized the way Triton's launcher would (ints equal to 1 become constants; 16-aligned
    pointers and multiples of 16 are marked divisible)."""
    import torch

    kwargs = dict(kwargs)
    num_warps = kwargs.pop("num_warps", 4)
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    signature, constexprs, divisible = {}, {}, []
    for param in fn.params:
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            # ACC is a triton dtype; specs name it ("float32"), as _compile expects.
            constexprs[name] = ({"fp32": "float32", "fp64": "float64"}[str(value)]
                                if name == "ACC" else value)
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(value.dtype).replace("torch.", "")]
            divisible.append(name)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
                if value % 16 == 0:
                    divisible.append(name)
        elif isinstance(value, float):
            signature[name] = param.annotation_type or "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    module = fn.fn.__module__.rsplit(".", 1)[-1]
    return [module, fn.__name__, signature, constexprs, num_warps, divisible]


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Within the block, Triton kernel launches are recorded instead of run:
    yields a list that fills with (spec, grid) pairs."""
    from triton.runtime.jit import JITFunction

    launches: list = []
    original = JITFunction.__getitem__

    def getitem(self, grid):
        def launch(*args, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            launches.append((_launch_spec(self, args, kwargs), tuple(int(v) for v in g)))
        return launch

    JITFunction.__getitem__ = getitem
    try:
        yield launches
    finally:
        JITFunction.__getitem__ = original


def _run_case(case: dict, mode: str, target: Target) -> tuple[list, tuple, str, int | None]:
    """Run the launcher of `case` in `mode` on meta tensors; returns (recorded launches, plan
    launches (LaunchCost), path, per-example slot bytes (bwd_pe: the per-example partial rows
    the backward writes, all parameters; else None))."""
    import torch

    from fastnorm.triton import _common
    from fastnorm.triton import batch_norm as bn
    from fastnorm.triton import group_norm as gn
    from fastnorm.triton import layer_norm as ln

    meta = torch.device("meta")
    slot_bytes = None
    dtype = getattr(torch, case["dtype"])
    shape = case["shape"]
    with _common.assume_sm_count(target.sms), _common.assume_l2_bytes(target.l2_bytes), \
            recording() as rec:
        if case["op"] == "group_norm":
            n, c = shape[:2]
            hw = math.prod(shape[2:])
            x = torch.empty((n, c, hw), dtype=dtype, device=meta)
            if case["layout"] == "NHWC":
                x = torch.empty((n, hw, c), dtype=dtype, device=meta).transpose(1, 2)
            w = torch.empty(c, dtype=dtype, device=meta)
            g = case["groups"]
            if mode == "fwd":
                gn.group_norm_fwd(x, w, w, g, 1e-5, case["activation"])
            else:
                stats = torch.empty((n, g), dtype=_common.acc_dtype(dtype), device=meta)
                gn.group_norm_bwd(x.clone(), x, w, w, stats, stats, g, case["activation"],
                                  per_example=mode == "bwd_pe")
            path, plan = gn.plan_group_norm(n, c, hw, g, dtype, case["layout"] == "NHWC",
                                            "fwd" if mode == "fwd" else "bwd", meta,
                                            per_example=mode == "bwd_pe")
            if mode == "bwd_pe":
                slot_bytes = sum(p.reads for p in plan if p.kernel == "_per_example_sq_kernel")
        elif case["op"] == "batch_norm":
            n, c = shape[:2]
            s = math.prod(shape[2:])
            cl = case["layout"] in ("NHWC", "NC")
            x = (torch.empty((n, s, c), dtype=dtype, device=meta).transpose(1, 2) if cl
                 else torch.empty((n, c, s), dtype=dtype, device=meta))
            w = torch.empty(c, dtype=torch.float32, device=meta)
            stats = torch.empty(c, dtype=_common.acc_dtype(dtype), device=meta)
            if mode == "fwd":
                bn.batch_norm_fwd(x, w, w, 1e-5, case["relu"], w.clone(), w.clone(), 0.1)
            elif mode == "bwd":
                bn.batch_norm_bwd(x.clone(), x, stats, stats, w, w, 1e-5, case["relu"], True)
            else:
                bn.batch_norm_apply(x, stats, stats, w, w, 1e-5, case["relu"])
            plan = bn.plan_batch_norm(n, c, s, dtype, cl, mode, meta,
                                      torch.float32 if mode == "fwd" else None)
            path = "cl" if cl else "cf"
        else:
            m, nf = shape
            is_rms = case["op"] == "rms_norm"
            res_dtype = getattr(torch, case["residual"]) if case.get("residual") else None
            x = torch.empty((m, nf), dtype=dtype, device=meta)
            w = torch.empty(nf, dtype=dtype, device=meta)
            b = None if is_rms else w
            if mode == "fwd":
                r = (torch.empty((m, nf), dtype=res_dtype, device=meta)
                     if res_dtype is not None else None)
                ln.add_layer_norm_fwd(x, r, w, b, 1e-5, is_rms)
                plan = ln.plan_layer_norm(m, nf, dtype, mode, meta, is_rms=is_rms,
                                          has_bias=b is not None, residual_dtype=res_dtype,
                                          store_residual=res_dtype is not None)
            elif mode == "bwd_pe":
                st = torch.empty(m, dtype=_common.acc_dtype(dtype), device=meta)
                rpe = m // pe_examples(case)
                ln.layer_norm_bwd_per_example(x.clone(), x, w, b, st, st, is_rms, rpe)
                plan = ln.plan_layer_norm_per_example(m, nf, dtype, meta, rows_per_example=rpe,
                                                      is_rms=is_rms, has_bias=b is not None,
                                                      weight_dtype=dtype)
                acc = torch.empty((), dtype=_common.acc_dtype(dtype)).element_size()
                slot_bytes = ((m // rpe + plan.partial_rows) * nf * acc
                              * (1 if b is None else 2))
            else:
                # With a residual: the norm's input is h (residual's dtype), dh is added into
                # dx, and dx comes back in h's dtype.
                h_dtype = res_dtype or dtype
                h = torch.empty((m, nf), dtype=h_dtype, device=meta)
                st = torch.empty(m, dtype=_common.acc_dtype(h_dtype), device=meta)
                dres = h.clone() if res_dtype is not None else None
                ln.layer_norm_bwd(x.clone(), h, w, b, st, st, is_rms, dresidual=dres)
                plan = ln.plan_layer_norm(m, nf, h_dtype, mode, meta, is_rms=is_rms,
                                          has_bias=b is not None, weight_dtype=dtype,
                                          has_dresidual=dres is not None, dy_dtype=dtype)
            path, plan = plan.path, plan.launches
    return rec, plan, path, slot_bytes


def _ideal_bytes(case: dict, mode: str) -> int:
    """x in and y out (forward), x and dy in and dx out (backward); with a fused residual also
    r in and h out (forward), dh in (backward), in the residual's dtype."""
    import torch

    def size(name: str) -> int:
        return math.prod(case["shape"]) * torch.empty((), dtype=getattr(torch, name)).element_size()

    data = size(case["dtype"])
    if case.get("residual"):
        res = size(case["residual"])
        return 2 * data + 2 * res if mode == "fwd" else data + 3 * res
    return {"fwd": 2, "eval": 2, "bwd": 3, "bwd_pe": 3}[mode] * data


def _modes(case: dict) -> tuple[str, ...]:
    """BatchNorm: fwd, bwd, eval. GroupNorm, LayerNorm/RMSNorm: fwd, bwd and the per-example
    gradient-norm backward (bwd_pe; not with the fused residual, which it does not take)."""
    if case["op"] == "batch_norm":
        return ("fwd", "bwd", "eval")
    return ("fwd", "bwd") if case.get("residual") else ("fwd", "bwd", "bwd_pe")


def pe_examples(case: dict) -> int:
    """Examples of the bwd_pe case: GroupNorm, the samples; LayerNorm/RMSNorm, the rows viewed
    as (batch, seq, hidden) with gcd(M, 32) sequences, as the benchmark's fastnorm-triton-gns
    provider (bench_layer_norm.GNS_EXAMPLES; 7x65537: one example of 7 rows)."""
    if case["op"] == "group_norm":
        return case["shape"][0]
    return math.gcd(case["shape"][0], _bench_module("bench_layer_norm").GNS_EXAMPLES)


def _triton_launches(plan) -> list:
    """The plan's Triton launches (entries with a "." in the name, torch ops and a launch's
    separately modeled traffic, are bytes only)."""
    return [p for p in plan if "." not in p.kernel]


# --- occupancy ---------------------------------------------------------------------------------

def blocks_per_sm(regs: int, num_warps: int, shared: int, target: Target) -> int:
    """Resident blocks per SM: registers are allocated per warp in units of 256 (regs rounded up
    to a multiple of 8 per thread), plus the thread, block and shared-memory limits."""
    threads = 32 * num_warps
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = (target.regs_per_sm // regs_per_warp) // num_warps
    by_threads = target.max_threads_per_sm // threads
    by_smem = target.smem_per_sm // shared if shared else target.max_blocks_per_sm
    return max(0, min(by_regs, by_threads, by_smem, target.max_blocks_per_sm))


# --- the report --------------------------------------------------------------------------------

def build(ops: list[str], targets: list[str], scope: str = "full",
          compile_kernels: bool = True, modes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Trace, compile and model every case of `scope` (SCOPES); returns {"launches": rows,
    "cases": rows}. Each distinct launch configuration is compiled once per target. Without
    `compile_kernels` only the byte model runs (register columns are None). `modes`: only these
    (bwd_pe brings bwd, which it is judged against); empty: all."""
    if "bwd_pe" in modes:
        modes = (*modes, "bwd")
    from fastnorm.triton._common import L2_REUSE_FRACTION, modeled_hbm_bytes

    traced = []  # (target, case, mode, path, [(spec, grid, cost)])
    for tname in targets:
        target = TARGETS[tname]
        for op in ops:
            for case in CASES[op](scope):
                for mode in _modes(case):
                    if modes and mode not in modes:
                        continue
                    rec, plan, path, slot_bytes = _run_case(case, mode, target)
                    names = [s[1] for s, _ in rec]
                    plan_names = [p.kernel for p in _triton_launches(plan)]
                    if names != plan_names:
                        raise AssertionError(f"{case['op']} {case['case']} {mode}: launcher made "
                                             f"{names}, plan says {plan_names}")
                    for (spec, grid), cost in zip(rec, _triton_launches(plan)):
                        if tuple(grid) != tuple(cost.grid) or spec[4] != cost.num_warps:
                            raise AssertionError(f"{case['op']} {case['case']} {mode} "
                                                 f"{spec[1]}: launcher grid {grid} warps "
                                                 f"{spec[4]}, plan {cost.grid} {cost.num_warps}")
                    traced.append((target, case, mode, path, rec, plan, slot_bytes))
    stats: dict[tuple, dict] = {}
    for tname in targets:
        target = TARGETS[tname]
        unique: dict[str, list] = {}
        for t, _c, _m, _p, rec, _plan, _s in traced:
            if t is target:
                for spec, _grid in rec:
                    unique.setdefault(json.dumps(spec, sort_keys=True), spec)
        keys = list(unique)
        if not compile_kernels:
            for k in keys:
                stats[(target.name, k)] = {"error": None, "regs": None, "spill_stores": 0,
                                           "spill_loads": 0, "shared": 0, "minmax": {}}
            continue
        results = _compile.run_specs([unique[k] for k in keys], target.cc, stats=True)
        for k, r in zip(keys, results):
            stats[(target.name, k)] = r
    launch_rows, case_rows = [], []
    for target, case, mode, path, rec, plan, slot_bytes in traced:
        worst_blocks, spills, max_regs = None, 0, 0
        for (spec, grid), cost in zip(rec, _triton_launches(plan)):
            st = stats[(target.name, json.dumps(spec, sort_keys=True))]
            if st["error"]:
                raise RuntimeError(st["error"])
            bps = (blocks_per_sm(st["regs"], spec[4], st["shared"], target)
                   if st["regs"] is not None else None)
            programs = math.prod(grid)
            row = dict(gpu=target.name, op=case["op"], case=case["case"], dtype=case["dtype"],
                       layout=case["layout"], mode=mode, path=path, kernel=spec[1],
                       constexprs=json.dumps({k: v for k, v in spec[3].items()
                                              if k.isupper()}, sort_keys=True),
                       arg_dtypes=json.dumps({k: v for k, v in spec[2].items()
                                              if v.startswith("*")}),
                       grid=programs, num_warps=spec[4], regs=st["regs"],
                       spill_bytes=st["spill_stores"] + st["spill_loads"], shared=st["shared"],
                       blocks_per_sm=bps,
                       waves=(round(programs / max(1, bps * target.sms), 3)
                              if bps is not None else None),
                       reads=cost.reads, writes=cost.writes, l2_reread=cost.l2_reread,
                       max_plain=sum(v for k, v in st["minmax"].items() if ".NaN." not in k),
                       max_nan=sum(v for k, v in st["minmax"].items() if ".NaN." in k))
            launch_rows.append(row)
            spills += row["spill_bytes"]
            max_regs = max(max_regs, row["regs"] or 0)
            if bps is not None:
                worst_blocks = bps if worst_blocks is None else min(worst_blocks, bps)
        modeled = modeled_hbm_bytes(plan, target.l2_bytes)
        ideal = _ideal_bytes(case, mode)
        case_rows.append(dict(
            gpu=target.name, op=case["op"], case=case["case"], dtype=case["dtype"],
            layout=case["layout"], mode=mode, path=path, launches=len(rec),
            torch_ops=sum(1 for p in plan if p.kernel.startswith("torch.")),
            max_regs=max_regs, spill_bytes=spills, min_blocks_per_sm=worst_blocks,
            ideal_bytes=ideal, modeled_bytes=modeled,
            traffic_vs_ideal=round(modeled / ideal, 4),
            predicted_ceiling_pct=round(100 * ideal / modeled, 1),
            exception=exception_for(case["op"], mode, path, modeled / ideal),
            examples=pe_examples(case) if mode == "bwd_pe" else None,
            x_bytes=ideal // 3 if mode == "bwd_pe" else None, pe_slot_bytes=slot_bytes,
            pe_extra_bytes=None, pe_extra_vs_x=None, pe_exception=None))
    _per_example_extra(case_rows)
    return {"meta": {"l2_reuse_fraction": L2_REUSE_FRACTION,
                     "targets": {t: vars(TARGETS[t]) for t in targets}},
            "launches": launch_rows, "cases": case_rows}


def _per_example_extra(case_rows: list[dict]) -> None:
    """bwd_pe rows: modeled bytes beyond the plain backward's at the same case, and that as a
    fraction of one pass over x (the per-example norms must add no pass over x or dy)."""
    bwd = {(r["gpu"], r["op"], r["case"], r["dtype"], r["layout"]): r for r in case_rows
           if r["mode"] == "bwd"}
    for r in case_rows:
        if r["mode"] == "bwd_pe":
            plain = bwd[(r["gpu"], r["op"], r["case"], r["dtype"], r["layout"])]
            extra = r["modeled_bytes"] - plain["modeled_bytes"]
            r["pe_extra_bytes"] = extra
            r["pe_extra_vs_x"] = round(extra / r["x_bytes"], 4)
            r["pe_exception"] = pe_exception_for(r["op"], r["path"], extra / r["x_bytes"])
            # Over 10 % of ideal: the plain backward's reason and / or the per-example one.
            if r["traffic_vs_ideal"] > 1.10:
                why = [plain["exception"]] if plain["exception"] else []
                why.append(r["pe_exception"] or f"per-example slot rows: {extra / r['x_bytes']:.0%}"
                           f" of x (within the {PE_EXTRA_LIMIT:.0%} limit)")
                r["exception"] = "; ".join(why)
            else:
                r["exception"] = ""


def pe_exception_for(op: str, path: str, extra_vs_x: float) -> str:
    """Why a bwd_pe case may add more than PE_EXTRA_LIMIT of one pass over x ("" if it does not)."""
    if extra_vs_x <= PE_EXTRA_LIMIT:
        return ""
    return PE_EXCEPTIONS.get((op, path), "UNEXPLAINED")


def exception_for(op: str, mode: str, path: str | None, ratio: float) -> str:
    """Why a case may exceed ideal traffic by more than 10 % ("" when it does not). bwd_pe:
    the plain backward's reason (its extra over bwd is checked separately, pe_exception_for)."""
    if ratio <= 1.10:
        return ""
    base = "batch_norm" if op == "batch_norm" else op
    if mode == "bwd_pe":
        mode = "bwd"
    for key in ((base, mode, path), (base, mode)):
        if key in DESIGN_EXCEPTIONS:
            return DESIGN_EXCEPTIONS[key]
    return "UNEXPLAINED"


def fwdbwd_rows(cases: list[dict]) -> list[dict]:
    """Per (gpu, op, case, dtype, layout) and mode: the prediction a benchmark mode measures,
    with "fwdbwd" (forward then backward, ideal 5 passes) added as the sum of fwd and bwd:
    predicted ceiling, modeled and ideal bytes, and host launches (Triton launches plus the
    torch ops the plan lists)."""
    out = []
    by_key: dict[tuple, dict] = {}
    for r in cases:
        by_key.setdefault((r["gpu"], r["op"], r["case"], r["dtype"], r["layout"]), {})[
            r["mode"]] = r

    def row(key, mode, ideal, modeled, launches):
        return dict(zip(("gpu", "op", "case", "dtype", "layout"), key), mode=mode,
                    ideal_bytes=ideal, modeled_bytes=modeled, host_launches=launches,
                    predicted_ceiling_pct=round(100 * ideal / modeled, 1))

    def launches(r):
        return r["launches"] + r.get("torch_ops", 0)

    for key, modes in by_key.items():
        if "fwd" in modes and "bwd" in modes:
            fwd, bwd = modes["fwd"], modes["bwd"]
            out.append(row(key, "fwdbwd", fwd["ideal_bytes"] + bwd["ideal_bytes"],
                           fwd["modeled_bytes"] + bwd["modeled_bytes"],
                           launches(fwd) + launches(bwd)))
        for mode in ("fwd", "bwd", "eval", "bwd_pe"):
            if mode in modes:
                r = modes[mode]
                out.append(row(key, mode, r["ideal_bytes"], r["modeled_bytes"], launches(r)))
    return out


def markdown(report: dict) -> str:
    lines = ["# Static cost report (compiled here, nothing measured)", "",
             f"L2 reuse assumed: {report['meta']['l2_reuse_fraction']:.0%} of L2 for a "
             "reversed second walk. Ceiling = ideal / modeled HBM bytes, as % of copy bandwidth.",
             "", "## Cases", "",
             "| gpu | op | case | dtype | layout | mode | path | launches | max regs | spill B "
             "| min blocks/SM | modeled/ideal | ceiling % | exception |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["cases"]:
        lines.append(f"| {r['gpu']} | {r['op']} | {r['case']} | {r['dtype']} | {r['layout']} | "
                     f"{r['mode']} | {r['path']} | {r['launches']} | {r['max_regs']} | "
                     f"{r['spill_bytes']} | {r['min_blocks_per_sm']} | "
                     f"{r['traffic_vs_ideal']:.3f} | {r['predicted_ceiling_pct']} | "
                     f"{r['exception']} |")
    pe = [r for r in report["cases"] if r["mode"] == "bwd_pe"]
    if pe:
        lines += ["", "## Per-example gradient norms (bwd_pe) vs the plain backward", "",
                  "extra = modeled bwd_pe bytes - modeled bwd bytes (the slot rows and the "
                  "per-example reduction launch); x = one pass over x.", "",
                  "| gpu | op | case | dtype | layout | path | examples | launches | "
                  "bwd/ideal | bwd_pe/ideal | extra MB | extra / x | exception |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        bwd = {(r["gpu"], r["op"], r["case"], r["dtype"], r["layout"]): r
               for r in report["cases"] if r["mode"] == "bwd"}
        for r in pe:
            b = bwd[(r["gpu"], r["op"], r["case"], r["dtype"], r["layout"])]
            lines.append(f"| {r['gpu']} | {r['op']} | {r['case']} | {r['dtype']} | "
                         f"{r['layout']} | {r['path']} | {r['examples']} | "
                         f"{b['launches']} -> {r['launches']} | {b['traffic_vs_ideal']:.3f} | "
                         f"{r['traffic_vs_ideal']:.3f} | {r['pe_extra_bytes'] / 1e6:.2f} | "
                         f"{r['pe_extra_vs_x']:.3f} | {r['pe_exception']} |")
    spilling = [r for r in report["launches"] if r["spill_bytes"]]
    lines += ["", f"## Launches that spill: {len(spilling)}", ""]
    for r in spilling:
        lines.append(f"- {r['gpu']} {r['op']} {r['case']} {r['dtype']} {r['layout']} "
                     f"{r['mode']}: {r['kernel']} {r['constexprs']} warps={r['num_warps']} "
                     f"regs={r['regs']} spill={r['spill_bytes']} B")
    plain = sorted({(r["kernel"], r["dtype"]) for r in report["launches"] if r["max_plain"]})
    lines += ["", "## Kernels with non-NaN-propagating float max/min in the PTX", ""]
    lines += [f"- {k} ({d})" for k, d in plain] or ["- none"]
    return "\n".join(lines) + "\n"


# --- measured vs predicted ----------------------------------------------------------------------

# The eager term's parameters where the results carry no measurement (bench_overhead.py
# --device cuda --out, which gpu_check.sh writes next to the bench results). Assumptions, not
# measurements: a launch through a cached compiled kernel costs the host ~5 us (issue 16 item 3:
# published ~5 us for CompiledKernel.run; the H200 machine's host was not measured alone), and
# the op layer around the launches (checks, plan lookup, allocation, autograd) costs what issue
# 16 sets as its target, 20 us per forward and 40 more per backward.
DEFAULT_LAUNCH_US = 5.0
DEFAULT_CALL_US = {"fwd": 20.0, "bwd": 40.0}


@dataclass
class HostModel:
    """Host microseconds of one eager call: per-call op overhead + launches x launch_us.
    `call_us` maps (op, "fwd" | "bwd") to a measured per-call overhead (launches excluded);
    ops it lacks take `default_call_us`."""
    launch_us: float
    launch_source: str
    call_us: dict
    call_source: str
    default_call_us: dict

    def call(self, op: str, mode: str) -> float:
        """Per-call overhead of `op` in a benchmark mode (fwdbwd: forward + backward; eval: a
        forward; bwd_pe: the backward's)."""
        def part(which: str) -> float:
            key = ("batch_norm eval" if op == "batch_norm" and mode == "eval" else op, which)
            return self.call_us.get(key, self.default_call_us[which])
        if mode == "fwdbwd":
            return part("fwd") + part("bwd")
        return part("bwd" if mode in ("bwd", "bwd_pe") else "fwd")

    def host_us(self, op: str, mode: str, launches: int) -> float:
        return self.call(op, mode) + launches * self.launch_us


def _overhead_op(case: str) -> str:
    """bench_overhead.py's case name -> the bench op ("batch_norm train 32x.." -> batch_norm,
    "batch_norm eval .." -> "batch_norm eval", "layer_norm 4096x1024" -> layer_norm)."""
    words = case.split()
    return "batch_norm eval" if words[:2] == ["batch_norm", "eval"] else words[0]


def host_model(results_dir: str, launch_us: float | None = None,
               call_us: dict | None = None) -> HostModel:
    """The eager term's parameters: given ones first, then a GPU run of bench_overhead.py found
    in results_dir (JSON with "rows"; its "launch_us", and per op the fastnorm-triton host time
    per call less its launches), else DEFAULT_LAUNCH_US / DEFAULT_CALL_US."""
    measured_launch, rows, source = None, [], ""
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(results_dir, name)) as f:
            data = json.load(f)
        device = data.get("meta", {}).get("device", "")
        # A CPU run's host costs are not the GPU host's.
        if "rows" in data and not device.startswith("CPU"):
            rows = [r for r in data["rows"] if r.get("provider") == "fastnorm-triton"]
            measured_launch = data.get("launch_us")
            source = f"{name} ({device}, {data['meta'].get('date', '')})"
    if launch_us is not None:
        launch = (launch_us, "given (--launch-us)")
    elif measured_launch is not None:
        launch = (measured_launch, f"measured, {source}")
    else:
        launch = (DEFAULT_LAUNCH_US, "assumed (DEFAULT_LAUNCH_US)")
    per_call: dict = {}
    if call_us is None and rows:
        at = {(_overhead_op(r["case"]), r["mode"]): r for r in rows}
        for (op, mode), r in at.items():
            own = max(0.0, r["us"] - (r.get("launches") or 0) * launch[0])
            if mode == "fwd":
                per_call[(op, "fwd")] = own
            elif (op, "fwd") in at:  # "fwd+bwd": the backward is the difference
                fwd = at[(op, "fwd")]
                per_call[(op, "bwd")] = max(0.0, own - max(
                    0.0, fwd["us"] - (fwd.get("launches") or 0) * launch[0]))
        call_source = f"measured, {source}, less {launch[0]:g} us per launch"
    else:
        call_source = "given (--call-us)" if call_us else "assumed (DEFAULT_CALL_US)"
    return HostModel(launch[0], launch[1], per_call, call_source,
                     dict(call_us or DEFAULT_CALL_US))


def compare(report: dict, results_dir: str, host: HostModel | None = None) -> list[dict]:
    """Measured (bench JSON files in results_dir, providers fastnorm-triton and -gns) vs
    predicted, per case; the GPU is matched by name (A100/H100; H200 is compared with the H100
    model). Two checks per row:
    - kernel-only: the CUDA-graph replay (graph_pct_copy; else the profiled kernels' sum,
      kernel_ms) against the predicted ceiling, ideal / modeled bytes: what the byte model
      predicts;
    - eager: the do_bench time against max(device time, host time), device = modeled bytes at
      the run's copy bandwidth, host = `host`'s per-call overhead + plan launches x launch cost;
      `bound` says which term is larger."""
    host = host or host_model(results_dir)
    rows = []
    preds = fwdbwd_rows(report["cases"])
    for name in sorted(os.listdir(results_dir)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(results_dir, name)) as f:
            data = json.load(f)
        # Only the bandwidth harness's files (bench_<op>.py: they record the copy bandwidth);
        # bench_models.py's and bench_overhead.py's land in the same folder.
        if "results" not in data or "copy_gbs" not in data.get("meta", {}):
            continue
        device = data["meta"].get("device", "")
        copy_gbs = data["meta"]["copy_gbs"]
        gpu = "A100" if "A100" in device else "H100"
        for r in data["results"]:
            if r["provider"] not in ("fastnorm-triton", "fastnorm-triton-gns") or \
                    r.get("pct_copy") is None:
                continue
            # The -gns provider's bwd is the per-example backward.
            mode = "bwd_pe" if r["provider"] == "fastnorm-triton-gns" else r["mode"]
            for p in preds:
                if (p["gpu"], p["op"], p["case"], p["dtype"], p["mode"]) != (
                        gpu, r["op"], r["case"], r["dtype"], mode) or not (
                        p["layout"] == r["layout"] or p["layout"] in ("rows", "NC")):
                    continue
                kernel_pct, source = r.get("graph_pct_copy"), "graph"
                if kernel_pct is None and r.get("kernel_ms"):
                    kernel_pct = 100 * r["ideal_bytes"] / (r["kernel_ms"] * 1e-3) / 1e9 / copy_gbs
                    source = "profiler"
                device_us = p["modeled_bytes"] / (copy_gbs * 1e3)
                host_us = host.host_us(r["op"], mode, p["host_launches"])
                eager_us = max(device_us, host_us)
                rows.append(dict(
                    device=device, op=r["op"], case=r["case"], dtype=r["dtype"],
                    layout=r["layout"], mode=mode,
                    predicted_ceiling_pct=p["predicted_ceiling_pct"],
                    kernel_source=source if kernel_pct is not None else "",
                    measured_kernel_pct_copy=(round(kernel_pct, 1) if kernel_pct is not None
                                              else None),
                    kernel_over_predicted=(round(kernel_pct / p["predicted_ceiling_pct"], 3)
                                           if kernel_pct is not None else None),
                    launches_plan=p["host_launches"], launches_measured=r.get("launches"),
                    device_us=round(device_us, 1), host_us=round(host_us, 1),
                    bound="host" if host_us > device_us else "device",
                    predicted_eager_us=round(eager_us, 1),
                    measured_eager_us=round(r["ms"] * 1e3, 1),
                    measured_pct_copy=round(r["pct_copy"], 1),
                    eager_over_predicted=round(r["ms"] * 1e3 / eager_us, 3)))
    return rows


def compare_markdown(rows: list[dict], host: HostModel) -> str:
    """The two comparisons as markdown tables, with the host model's parameters."""
    def cell(v):
        return "" if v is None else str(v)

    lines = ["## Measured vs predicted: kernel-only (CUDA-graph replay) vs the byte model", "",
             "ratio = measured % of copy / predicted ceiling % (1.0: the kernels move the "
             "modeled bytes at copy speed; source: graph = CUDA-graph replay, profiler = sum "
             "of profiled kernel times).", "",
             "| device | op | case | dtype | layout | mode | kernel-only % copy | source | "
             "predicted % | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['op']} | {r['case']} | {r['dtype']} | "
                     f"{r['layout']} | {r['mode']} | {cell(r['measured_kernel_pct_copy'])} | "
                     f"{r['kernel_source']} | {r['predicted_ceiling_pct']} | "
                     f"{cell(r['kernel_over_predicted'])} |")
    lines += ["", "## Measured vs predicted: eager = max(device, host)", "",
              f"device = modeled bytes at the run's copy bandwidth; host = per-call op overhead "
              f"+ launches x {host.launch_us:g} us (launch cost: {host.launch_source}; per-call "
              f"overhead: {host.call_source}; defaults fwd {host.default_call_us['fwd']:g} us, "
              f"bwd {host.default_call_us['bwd']:g} us). launches: the plan's (Triton launches "
              "and torch ops) / the profiler's count of the measured call.", "",
              "| device | op | case | dtype | layout | mode | launches plan / measured | "
              "device us | host us | bound | predicted us | eager us | eager % copy | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['op']} | {r['case']} | {r['dtype']} | "
                     f"{r['layout']} | {r['mode']} | {r['launches_plan']} / "
                     f"{cell(r['launches_measured'])} | {r['device_us']} | {r['host_us']} | "
                     f"{r['bound']} | {r['predicted_eager_us']} | {r['measured_eager_us']} | "
                     f"{r['measured_pct_copy']} | {r['eager_over_predicted']} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="static_report")
    p.add_argument("--ops", default="group_norm,batch_norm,layer_norm")
    p.add_argument("--targets", default="sm_80,sm_90")
    p.add_argument("--quick", action="store_true", help="a representative subset of cases "
                   "(= --cases quick)")
    p.add_argument("--cases", choices=SCOPES, default="full",
                   help="quick: a representative subset; bench: every benchmark shape; full "
                        "(default): the benchmark shapes and edge shapes")
    p.add_argument("--compare", default="", help="folder of bench_*.py JSON results (and "
                   "bench_overhead.py --out JSON for the host term)")
    p.add_argument("--launch-us", type=float, default=None,
                   help="--compare: host us per launch (default: bench_overhead's measured "
                        f"launch_us in the folder, else {DEFAULT_LAUNCH_US})")
    p.add_argument("--call-us", default="",
                   help="--compare: per-call op overhead in us, FWD,BWD (default: measured by "
                        "bench_overhead in the folder, else "
                        f"{DEFAULT_CALL_US['fwd']:g},{DEFAULT_CALL_US['bwd']:g})")
    p.add_argument("--no-compile", action="store_true",
                   help="byte model only (seconds): no registers, spills or occupancy")
    p.add_argument("--modes", default="",
                   help="only these modes, e.g. bwd_pe (which brings bwd); default: all")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels defined under the interpreter cannot be compiled: run without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *(argv or
                                   sys.argv[1:])], env)
    report = build(args.ops.split(","), args.targets.split(","),
                   "quick" if args.quick else args.cases,
                   compile_kernels=not args.no_compile,
                   modes=tuple(m for m in args.modes.split(",") if m))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "static_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    _write_csv(os.path.join(args.out, "static_report.csv"), report["launches"])
    _write_csv(os.path.join(args.out, "static_report_cases.csv"), report["cases"])
    md = markdown(report)
    with open(os.path.join(args.out, "static_report.md"), "w") as f:
        f.write(md)
    print(md)
    if args.compare:
        call_us = (dict(zip(("fwd", "bwd"), map(float, args.call_us.split(","))))
                   if args.call_us else None)
        host = host_model(args.compare, args.launch_us, call_us)
        rows = compare(report, args.compare, host)
        _write_csv(os.path.join(args.out, "measured_vs_predicted.csv"), rows)
        print(compare_markdown(rows, host))
    print(f"wrote {args.out}/static_report.{{json,csv,md}}")
    return report


if __name__ == "__main__":
    main()
