"""Shared benchmark harness: timing, copy bandwidth, effective bandwidth, result files.

Effective bandwidth = ideal bytes / median time, reported in GB/s and as % of the device copy
bandwidth measured in the same run (a copy of 1 GiB, counting read + write). Each bench_<op>.py
builds its cases with an explicit ideal-bytes formula and calls `run_case` per provider.

What is timed is the call alone: a provider's backend selection (`backend=`) is entered once
around the timing loop, not per call, and the "bwd" mode times only the backward of a forward
run beforehand (`backward_only`). Next to the time each result records the kernel launches of
one call, counted by the torch profiler on CUDA (None on a CPU, where the interpreted Triton
kernels are no device launches).

Two times per case on CUDA. `ms` is the eager call (do_bench): host work and kernels together,
so a call whose host path issues launches slower than the device runs them is timed at the
host's pace. `graph_ms` is the kernels alone: the same call (forward, or forward + backward)
captured once in a CUDA graph and replayed, timed with CUDA events (`graph_time_ms`) - what
the static cost report's byte model predicts. Where capture fails (an op that synchronizes or
copies from the host) `graph_ms` is None and `graph_error` says why; `kernel_ms`, the sum of the
kernel durations of one profiled call, is the kernel-only figure then (it leaves out the gaps
between kernels, so it reads a little faster than a replay). On a CPU all three are None.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass
class Result:
    op: str
    case: str
    mode: str          # "fwd", "fwdbwd", "eval", ...
    provider: str
    dtype: str
    layout: str
    ms: Optional[float]
    gbs: Optional[float]
    pct_copy: Optional[float]
    ideal_bytes: int
    launches: Optional[int] = None
    error: str = ""
    # Kernel-only (CUDA): CUDA-graph replay of the call, and the profiled kernels' durations.
    graph_ms: Optional[float] = None
    graph_gbs: Optional[float] = None
    graph_pct_copy: Optional[float] = None
    graph_error: str = ""
    kernel_ms: Optional[float] = None


@dataclass
class Run:
    device: torch.device
    copy_gbs: float
    results: list[Result] = field(default_factory=list)
    quick: bool = False
    deadline: float = float("inf")   # time.monotonic() after which cases are skipped, not timed
    graph: bool = True               # also time each case by CUDA-graph replay (CUDA only)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def time_ms(fn: Callable[[], Any], device: torch.device, grad_to_none=None,
            quick: bool = False) -> float:
    """Median milliseconds per call: triton.testing.do_bench on CUDA (warmup 25 ms, rep 100 ms, as
    the anchor table), a wall-clock median on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(3 if quick else 10):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, quick: bool = False) -> float:
    """Device copy bandwidth in GB/s, counting read + write, from a copy of 1 GiB of bf16 (64 MiB
    on CPU)."""
    numel = (64 if device.type == "cpu" else 1024) * 2**20 // 2
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, quick=quick)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def forward_backward(fn: Callable[[], torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    """A closure running forward then backward with a fixed upstream gradient."""
    def run():
        fn().backward(dy)
    return run


def backward_only(fn: Callable[[], torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    """A closure running only the backward of one forward (run lazily, on the first call, so
    it happens inside the provider's backend selection; the graph is kept for the repeats).
    `run.reset()` drops that forward: the next call runs it again (graph_time_ms does, so the
    backward's kernels run on the stream it captures)."""
    state: dict = {}

    def run():
        if "y" not in state:
            state["y"] = fn()
            return
        state["y"].backward(dy, retain_graph=True)
    run.reset = state.clear
    return run


def forward_backward_multi(fn: Callable[[], tuple], grads: tuple) -> Callable[[], None]:
    """forward_backward for a function with several outputs (e.g. (y, h)), each given its
    upstream gradient."""
    def run():
        torch.autograd.backward(fn(), grads)
    return run


def backward_only_multi(fn: Callable[[], tuple], grads: tuple) -> Callable[[], None]:
    """backward_only for a function with several outputs (see forward_backward_multi)."""
    state: dict = {}

    def run():
        if "out" not in state:
            state["out"] = fn()
            return
        torch.autograd.backward(state["out"], grads, retain_graph=True)
    run.reset = state.clear
    return run


def profile_call(fn: Callable[[], Any], device: torch.device
                 ) -> tuple[Optional[int], Optional[float]]:
    """(device kernel launches, sum of their durations in ms) of one call of fn, from the torch
    profiler; (None, None) on a CPU. Memsets and copies count as launches."""
    if device.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.time_range.elapsed_us() for e in kernels) / 1e3


def _clear_grads(tensors) -> None:
    for t in tensors or ():
        t.grad = None


def graph_time_ms(fn: Callable[[], Any], device: torch.device, grad_to_none=None,
                  rep_ms: float = 20.0) -> float:
    """Median milliseconds per call of fn's kernels alone: fn captured once in a CUDA graph
    (after warm-up calls on the capturing side stream, as torch's CUDA-graph docs prescribe)
    and replayed back to back, timed with CUDA events in 5 batches of about `rep_ms` each.
    Gradients in `grad_to_none` are cleared before the capture, so the backward writes fresh
    ones as in the eager timing (no accumulation kernel). Raises if fn cannot be captured."""
    reset = getattr(fn, "reset", None)
    if reset is not None:
        reset()  # a backward-only closure: re-run its forward on the side stream below
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            _clear_grads(grad_to_none)
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    _clear_grads(grad_to_none)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            fn()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replays = max(1, min(1000, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
        times = []
        for _ in range(5):
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / replays)
        return statistics.median(times)
    finally:
        del graph  # its memory pool goes with it and the gradients allocated in it
        _clear_grads(grad_to_none)


def run_case(run: Run, *, op: str, case: str, mode: str, provider: str, dtype: torch.dtype,
             layout: str, ideal_bytes: int, fn: Callable[[], Any],
             grad_to_none=None, backend: Optional[str] = None) -> Result:
    """Times one provider on one case and records the result (errors are recorded, not raised:
    one provider failing must not hide the others). Past the run's deadline the case is
    recorded as skipped, so a time-boxed run still writes every row it has. `backend`: a
    fastnorm backend entered once around the timing, outside the timed calls."""
    if time.monotonic() > run.deadline:
        result = Result(op, case, mode, provider, str(dtype).replace("torch.", ""), layout, None,
                        None, None, ideal_bytes, error="skipped: --max-seconds budget spent")
        run.results.append(result)
        return result
    try:
        with (_use_backend(backend) if backend else contextlib.nullcontext()):
            ms = time_ms(fn, run.device, grad_to_none=grad_to_none, quick=run.quick)
            launches, kernel_ms = profile_call(fn, run.device)
            graph_ms, graph_error = None, ""
            if run.device.type == "cuda" and run.graph:
                try:
                    graph_ms = graph_time_ms(fn, run.device, grad_to_none)
                except Exception as exc:  # noqa: BLE001 - e.g. an op that syncs: recorded
                    # The capture's end raises too when an op inside failed: name the first.
                    while exc.__context__ is not None:
                        exc = exc.__context__
                    graph_error = _message(exc)
        gbs = ideal_bytes / (ms * 1e-3) / 1e9
        graph_gbs = ideal_bytes / (graph_ms * 1e-3) / 1e9 if graph_ms else None
        result = Result(op, case, mode, provider, str(dtype).replace("torch.", ""), layout, ms,
                        gbs, 100 * gbs / run.copy_gbs, ideal_bytes, launches,
                        graph_ms=graph_ms, graph_gbs=graph_gbs,
                        graph_pct_copy=100 * graph_gbs / run.copy_gbs if graph_gbs else None,
                        graph_error=graph_error, kernel_ms=kernel_ms)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        result = Result(op, case, mode, provider, str(dtype).replace("torch.", ""), layout, None,
                        None, None, ideal_bytes, error=_message(exc))
    run.results.append(result)
    return result


def _message(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def _use_backend(name: str):
    import fastnorm

    return fastnorm.use_backend(name)


def metadata(run: Run) -> dict:
    import triton

    return {
        "device": device_name(run.device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "copy_gbs": run.copy_gbs,
        "timer": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)"
                 if run.device.type == "cuda" else "wall-clock median",
        "graph_timer": "CUDA-graph replay, median of 5 batches of ~20 ms (CUDA events)"
                       if run.device.type == "cuda" and run.graph else None,
    }


def write_results(run: Run, out_dir: str, name: str) -> tuple[str, str]:
    """Writes <out_dir>/<name>.csv and <name>.json (metadata + rows)."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [asdict(r) for r in run.results]
    csv_path = os.path.join(out_dir, f"{name}.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Result.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(rows)
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, "w") as f:
        json.dump({"meta": metadata(run), "results": rows}, f, indent=1)
    return csv_path, json_path


def format_table(run: Run) -> str:
    """One line per (case, mode): GB/s and % of copy per provider, eager and (CUDA) kernel-only
    by CUDA-graph replay, and fastnorm's speedup over the best other provider, eager (graph)."""
    providers: list[str] = []
    for r in run.results:
        if r.provider not in providers:
            providers.append(r.provider)
    keys: list[tuple] = []
    for r in run.results:
        key = (r.op, r.case, r.dtype, r.layout, r.mode)
        if key not in keys:
            keys.append(key)
    header = ["op", "case", "dtype", "layout", "mode"] + providers + ["fastnorm/best-other"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for key in keys:
        cells = list(key)
        by_provider = {r.provider: r for r in run.results
                       if (r.op, r.case, r.dtype, r.layout, r.mode) == key}
        for p in providers:
            r = by_provider.get(p)
            if r is None:
                cells.append("")
            elif r.gbs is None:
                cells.append("skipped" if r.error.startswith("skipped") else "error")
            else:
                launches = f", {r.launches} launches" if r.launches is not None else ""
                graph = (f"; graph {r.graph_gbs:.4g} ({r.graph_pct_copy:.3g}%)" if r.graph_gbs
                         else "; graph: capture failed" if r.graph_error else "")
                cells.append(f"{r.gbs:.4g} ({r.pct_copy:.3g}%{launches}){graph}")
        cells.append(_speedup(by_provider, "gbs") + (
            f" (graph {_speedup(by_provider, 'graph_gbs')})"
            if _speedup(by_provider, "graph_gbs") else ""))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _speedup(by_provider: dict, field: str) -> str:
    """The best fastnorm provider's `field` (GB/s) over the best other provider's, or ""."""
    ours = [getattr(r, field) for p, r in by_provider.items()
            if p.startswith("fastnorm") and getattr(r, field)]
    others = [getattr(r, field) for p, r in by_provider.items()
              if not p.startswith("fastnorm") and getattr(r, field)]
    return f"{max(ours) / max(others):.2f}x" if ours and others else ""


def errors(run: Run) -> list[str]:
    return [f"{r.provider} {r.op} {r.case} {r.mode}: {r.error}" for r in run.results if r.error]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=os.environ.get("OUT", "bench_results"),
                   help="folder for the CSV/JSON results (default $OUT or bench_results)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats (the default on a CPU)")
    p.add_argument("--providers", default="",
                   help="comma-separated subset of providers to run (default: all available)")
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="time budget: cases not started by then are recorded as skipped")
    p.add_argument("--no-graph", action="store_true",
                   help="skip the kernel-only timing by CUDA-graph replay (graph_ms)")
    return p


def start(args: argparse.Namespace) -> Run:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    deadline = time.monotonic() + args.max_seconds
    return Run(device=device, copy_gbs=copy_bandwidth_gbs(device, quick), quick=quick,
               deadline=deadline, graph=not args.no_graph)


def wanted(args: argparse.Namespace, provider: str) -> bool:
    return not args.providers or provider in args.providers.split(",")


def finish(run: Run, args: argparse.Namespace, name: str) -> None:
    csv_path, json_path = write_results(run, args.out, name)
    meta = metadata(run)
    graph = f"; kernel-only: {meta['graph_timer']}" if meta["graph_timer"] else ""
    print(f"# {name} on {meta['device']}, {meta['date']}; torch {meta['torch']}, triton "
          f"{meta['triton']}; copy bandwidth {run.copy_gbs:.0f} GB/s; {meta['timer']}{graph}")
    print(format_table(run))
    for line in errors(run):
        print("error:", line)
    for r in run.results:
        if r.graph_error:
            print(f"graph capture failed: {r.provider} {r.op} {r.case} {r.mode}: {r.graph_error}")
    print(f"wrote {csv_path} and {json_path}")
