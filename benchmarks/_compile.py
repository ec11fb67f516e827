"""Ahead-of-time compilation of fastnorm's Triton kernels for NVIDIA GPUs on a machine without
one, shared by tests/test_triton_compile.py (does every kernel build?) and
benchmarks/static_report.py (what does each launch cost?).

A spec is (module, kernel, signature, constexprs, num_warps[, divisible]): `signature` maps each
runtime argument to a Triton type ("*bf16", "i32", "fp32", ...), `constexprs` maps constexpr
arguments to values (ACC names a triton dtype, e.g. "float32"), `divisible` lists the arguments
Triton's launcher would specialize as divisible by 16 (16-byte aligned pointers, sizes that are
multiples of 16: what a real launch compiles, so vector widths and registers match).

Compiling needs Triton without TRITON_INTERPRET, so the work runs in a subprocess of this file
(`run_specs`). Per spec it returns the error (or None) and, with `stats`, what ptxas -v (the copy
inside the triton wheel) reports: registers per thread, spill bytes, plus the kernel's static
shared memory from Triton's metadata and counts of max/min instructions in the PTX by NaN
behaviour (`max.NaN.f32` propagates NaN; plain `max.f32` returns the other operand).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_stats(ptx: str, cc: int) -> dict[str, int]:
    """Registers and spill bytes of the (single) kernel in `ptx`, from `ptxas -v`."""
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log[-1000:]}")
    return _parse_ptxas_log(log)


def _parse_ptxas_log(log: str) -> dict[str, int]:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"regs": int(regs.group(1)) if regs else 0,
            "spill_stores": int(spill.group(1)) if spill else 0,
            "spill_loads": int(spill.group(2)) if spill else 0,
            "stack": int(stack.group(1)) if stack else 0}


_MINMAX = re.compile(r"\b(max|min)(\.NaN)?\.(f16x2|bf16x2|f16|bf16|f32|f64)\b")


def ptx_minmax_counts(ptx: str) -> dict[str, int]:
    """{"max.NaN.f32": k, "max.f32": k, ...}: floating max/min instructions in the PTX."""
    counts: dict[str, int] = {}
    for op, nan, ty in _MINMAX.findall(ptx):
        key = f"{op}{nan}.{ty}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def compile_one(spec: list, cc: int, stats: bool) -> dict[str, Any]:
    """Compile one spec for sm_<cc>; returns {"error": str | None, ...stats}."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, kernel, signature, constexprs, num_warps = spec[:5]
    divisible = spec[5] if len(spec) > 5 else []
    fn = getattr(importlib.import_module("fastnorm.triton." + module), kernel)
    consts = {k: getattr(tl, v) if k == "ACC" else v for k, v in constexprs.items()}
    # In the kernel's parameter order: Triton 3.3 types the parameters by the signature's
    # order, not its names.
    sig = {name: "constexpr" if name in consts else signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    out: dict[str, Any] = {"error": None}
    try:
        # With TRITON_DUMP_PTXAS_LOG (set by run_specs) Triton prints the log of its own
        # `ptxas -v` run: the statistics without a second ptxas run, unless the compile came
        # from Triton's cache.
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts,
                                                attrs=attrs),
                                      target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": num_warps})
        assert compiled.asm.get("cubin"), "no cubin produced"
        if stats:
            ptx = compiled.asm["ptx"]
            logged = "Used " in log.getvalue() and "registers" in log.getvalue()
            out.update(_parse_ptxas_log(log.getvalue()) if logged else _ptxas_stats(ptx, cc))
            out["shared"] = int(compiled.metadata.shared)
            out["minmax"] = ptx_minmax_counts(ptx)
            out["f64_params"] = len(re.findall(r"\.param \.f64", ptx))
    except Exception as exc:  # noqa: BLE001 - reported per spec
        out["error"] = f"{kernel} {constexprs} sm_{cc}: {type(exc).__name__}: {exc}"[:2000]
    return out


def run_specs(specs: list, cc: int, stats: bool = False, timeout: float = 1200,
              jobs: int | None = None) -> list[dict]:
    """Compile `specs` for sm_<cc> in `jobs` subprocesses (default: one per CPU, at most 4)
    without TRITON_INTERPRET; one result per spec, in order."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if stats:
        env["TRITON_DUMP_PTXAS_LOG"] = "1"
    jobs = max(1, min(jobs or min(os.cpu_count() or 1, 4), len(specs)))
    chunks = [specs[i::jobs] for i in range(jobs)]
    paths, procs = [], []
    try:
        for chunk in chunks:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump({"specs": chunk, "cc": cc, "stats": stats}, f)
            paths.append(f.name)
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), f.name],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env))
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"compile subprocess failed:\n{err[-4000:]}")
            outputs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for path in paths:
            os.unlink(path)
    results: list = [None] * len(specs)
    for j, chunk_results in enumerate(outputs):
        results[j::jobs] = chunk_results
    return results


def main(path: str) -> None:
    with open(path) as f:
        job = json.load(f)
    print(json.dumps([compile_one(spec, job["cc"], job["stats"]) for spec in job["specs"]]))


if __name__ == "__main__":
    main(sys.argv[1])
