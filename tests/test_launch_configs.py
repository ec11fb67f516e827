"""Every launch configuration the benchmark shapes use compiles for sm_90 without spilling
registers, but for the known spills listed here (issue 16 item 4).

The configurations come from the launchers themselves, not from a list kept by hand: the static
cost report (benchmarks/static_report.py --cases bench) runs the real launchers on meta tensors
at every shape of bench_layer_norm.py, bench_group_norm.py and bench_batch_norm.py, in fp32, fp16
and bf16, both layouts, with and without the fused activation / residual, in every mode (fwd,
bwd, the per-example backward bwd_pe, BatchNorm eval), records each launch (kernel, constexprs,
warps, argument types and the divisibility Triton would specialize on), deduplicates them and
compiles each once with ptxas -v. A new benchmark shape, plan or kernel variant is covered
without touching this file.

Cost: about 440 distinct configurations, ~110 CPU-seconds cold (about 60 s on 2 idle cores;
seconds when Triton's cache is warm). The report's edge shapes (scope "full") are left out to
stay within that: tests/test_static_report.py compiles its --quick subset, which includes one
edge shape per op, and tests/test_triton_compile.py the hand-written variants (fp64, no affine,
the transformers roundings) for sm_80 and sm_90. Not covered: the SyncBatchNorm kernel chain
(bench_batch_norm.py's fastnorm-syncbn-chain provider) has no plan for the report to trace; its
count-pointer elementwise variant is in test_triton_compile.py's SPECS.
"""
import json
import os
import subprocess
import sys

import pytest

from fastnorm.triton._launch import TRITON_RELEASE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Launch configurations allowed to spill, keyed (kernel, num_warps, data dtype (the kernel's X
# argument), constexprs), per Triton release (the register allocation is the compiler's); an
# entry that stops spilling (or is no longer launched) fails the test too, so the list cannot go
# stale. Triton 3.6 (the GPU machines' release): none. The per-example LayerNorm backward at
# BLOCK_N 8192 (16384x5120, 8192x8192), the last spilling launches on sm_90, sums through its
# slot rows (PE_IN_SLOT) and fits the 128 registers of a 512-thread block. Triton 3.3 (torch
# 2.7's): that launch with 16-bit data spills 8-12 bytes with both parameters.
_PE_8192 = ('{"ACC": "float32", "ACCUMULATE": false, "BLOCK_M": 1, "BLOCK_N": 8192, '
            '"HAS_BIAS": true, "HAS_DRESIDUAL": false, "HAS_WEIGHT": true, "IS_RMS": false, '
            '"PER_EXAMPLE": true, "PE_IN_SLOT": true, "ROUND_DX_TERMS": false, '
            '"ROUND_XHAT": false, "ROW_STATS_IN_TILE": true}')
_SPILLS_BY_RELEASE = {
    "3.3": {("_layer_norm_bwd_kernel", 16, "*fp16", _PE_8192),
            ("_layer_norm_bwd_kernel", 16, "*bf16", _PE_8192)},
}
KNOWN_SPILLS: set = _SPILLS_BY_RELEASE.get(TRITON_RELEASE, set())


def config_key(row: dict) -> tuple:
    """A launch row's configuration: kernel, warps, data dtype, constexprs (the runtime ints'
    divisibility, which the report also compiles separately, is left out)."""
    return (row["kernel"], row["num_warps"], json.loads(row["arg_dtypes"])["X"],
            row["constexprs"])


@pytest.fixture(scope="module")
def bench_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_configs")
    # Compiling needs Triton without the interpreter (the report would re-exec itself anyway).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "static_report.py"),
                           "--cases", "bench", "--targets", "sm_90", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "static_report.json") as f:
        return json.load(f)


@pytest.mark.slow
def test_bench_configurations_spill_only_where_listed(bench_report):
    launches = bench_report["launches"]
    # Every op, dtype and mode the benchmarks time was traced.
    assert {r["op"] for r in launches} == {"group_norm", "batch_norm", "layer_norm", "rms_norm"}
    assert {r["dtype"] for r in launches} == {"float32", "float16", "bfloat16"}
    assert {r["mode"] for r in launches} == {"fwd", "bwd", "bwd_pe", "eval"}
    spilling: dict[tuple, list] = {}
    for r in launches:
        if r["spill_bytes"]:
            spilling.setdefault(config_key(r), []).append(
                f"{r['op']} {r['case']} {r['dtype']} {r['layout']} {r['mode']}: "
                f"regs={r['regs']} spill={r['spill_bytes']} B")
    new = {k: v for k, v in spilling.items() if k not in KNOWN_SPILLS}
    assert not new, "new spilling launch configurations:\n" + "\n".join(
        f"{k}: {v}" for k, v in new.items())
    gone = KNOWN_SPILLS - set(spilling)
    assert not gone, f"listed as spilling but no longer spill (or launched): remove {gone}"


@pytest.mark.slow
def test_every_bench_configuration_fits_on_an_sm(bench_report):
    small = [(r["kernel"], r["num_warps"], r["regs"], r["shared"]) for r in
             bench_report["launches"] if r["blocks_per_sm"] < 1]
    assert not small, small
