"""Host cost per call: what one fastnorm call costs the CPU thread that issues it, next to
torch's own call, for forward and forward + backward, per backend.

    python benchmarks/bench_overhead.py                 # CPU tensors
    python benchmarks/bench_overhead.py --device cuda   # CUDA tensors (Triton / C++ kernels)

What is timed: `calls` back-to-back calls with time.perf_counter and no synchronization inside
the loop (the device is idle at the start: synchronized before), so on CUDA the number is the
host's issue time, not kernel time, as long as the device keeps up (small inputs; a full launch
queue would block the host and show up as a larger number). Every figure is the minimum over
`repeats` timing runs, providers interleaved, which filters out other load on a shared machine.
"fwd+bwd" is `y = f(x); y.backward(dy)` with x, weight and bias requiring grad.

On CPU, "fastnorm-reference" runs fastnorm's op layer (functional checks, the eager route or
the registered op, autograd, the router) with the torch reference kernels; subtracting the
reference kernels called directly ("reference-math") leaves the op layer's own cost, the
number the host path is judged by there ("op-layer"). The same reference kernels run slower
inside the call than in a loop of their own (colder caches after the op layer's code), and
"op-layer" counts that difference too; "math-in-call" times the kernels where they run, inside
fastnorm's calls (each call of a kernel the router hands out, timed with perf_counter_ns), and
"op-layer-in-call" subtracts that instead. "fastnorm-auto" on CPU is torch's op behind one
Python frame. "fastnorm-triton-dry" (CPU, where Triton's interpreter is on; the script turns it
on without CUDA) is backend "triton" with every launch counted but not run: the Triton path's
host work without the launches, what on a GPU costs launches x `launch_us` more. On CUDA,
"fastnorm-triton" / "fastnorm-cuda" are the kernel backends.

Next to each time: kernel launches per call issued through fastnorm's Triton launcher (a
deterministic count; the C++ kernels and torch's own ops are not counted). On CUDA also
`launch_us`: the host cost of one launch alone, through the same launcher, of a kernel that does
nothing (benchmarks/static_report.py --compare prices an eager call's launches with it).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional

import torch

# Without CUDA, Triton's interpreter lets backend "triton" take CPU tensors (set before any
# kernel is defined): the "fastnorm-triton-dry" provider runs that backend's host path there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastnorm  # noqa: E402
from fastnorm import reference as R  # noqa: E402
from fastnorm.ops import _router  # noqa: E402
from fastnorm.triton import _launch  # noqa: E402

MODES = ("fwd", "fwd+bwd")


class Case:
    """One op at one shape: torch's call, fastnorm's call and the reference math (forward and
    backward kernels of fastnorm/reference.py called directly, CPU only)."""

    def __init__(self, name: str, inputs: dict, torch_fn: Callable, fastnorm_fn: Callable,
                 ref_fwd: Optional[Callable] = None, ref_bwd: Optional[Callable] = None):
        self.name, self.inputs = name, inputs
        self.torch_fn, self.fastnorm_fn = torch_fn, fastnorm_fn
        self.ref_fwd, self.ref_bwd = ref_fwd, ref_bwd


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def cases(device: str) -> list[Case]:
    """The shapes: tiny on CPU (the call is all there is), and on CUDA the shapes of the H200
    measurement (`../shared/perf/h200-2026-12-04.md`), small enough for the device to keep up."""
    cuda = device == "cuda"
    dt = torch.bfloat16 if cuda else torch.float32
    m, n = (4096, 1024) if cuda else (4, 64)
    gshape, groups = ((8, 256, 32, 32), 32) if cuda else ((2, 32, 4, 4), 8)
    bshape = (32, 256, 14, 14) if cuda else (2, 32, 4, 4)
    mk = dict(device=device, dtype=dt)
    out = []

    x = torch.randn(m, n, **mk)
    w, b = torch.randn(n, **mk), torch.randn(n, **mk)
    y, mean, rstd = R.layer_norm_fwd(x, w, b, 1e-5)
    out.append(Case(f"layer_norm {m}x{n}", dict(x=x, w=w, b=b),
                    lambda x, w, b: F.layer_norm(x, (n,), w, b),
                    lambda x, w, b: fastnorm.layer_norm(x, (n,), w, b),
                    lambda: R.layer_norm_fwd(x, w, b, 1e-5),
                    lambda: R.layer_norm_bwd(y, x, w, b, mean, rstd)))
    y, rstd2 = R.rms_norm_fwd(x, w, 1e-5)
    out.append(Case(f"rms_norm {m}x{n}", dict(x=x, w=w),
                    lambda x, w: F.rms_norm(x, (n,), w, 1e-5),
                    lambda x, w: fastnorm.rms_norm(x, (n,), w, 1e-5),
                    lambda: R.rms_norm_fwd(x, w, 1e-5),
                    lambda: R.rms_norm_bwd(y, x, w, rstd2)))
    # The fused residual add (h = x + r, then the norm of h), against torch's unfused form.
    r = torch.randn(m, n, **mk)
    y, h, mean3, rstd3 = R.add_layer_norm_fwd(x, r, w, None, 1e-5, True, False, "none", True)
    out.append(Case(f"rms_norm+residual {m}x{n}", dict(x=x, r=r, w=w),
                    lambda x, r, w: F.rms_norm(x + r, (n,), w, 1e-5),
                    lambda x, r, w: fastnorm.rms_norm(x, (n,), w, 1e-5, residual=r),
                    lambda: R.add_layer_norm_fwd(x, r, w, None, 1e-5, True, False, "none", True),
                    lambda: R.add_layer_norm_bwd(y, None, h, w, None, mean3, rstd3, True,
                                                 "none")))

    xg = torch.randn(gshape, **mk)
    c = gshape[1]
    gw, gb = torch.randn(c, **mk), torch.randn(c, **mk)
    x3 = xg.reshape(gshape[0], c, -1)
    yg, gmean, grstd = R.group_norm_fwd(x3, gw, gb, groups, 1e-5, "none")
    out.append(Case(f"group_norm {'x'.join(map(str, gshape))} G={groups}",
                    dict(x=xg, w=gw, b=gb),
                    lambda x, w, b: F.group_norm(x, groups, w, b),
                    lambda x, w, b: fastnorm.group_norm(x, groups, w, b),
                    lambda: R.group_norm_fwd(x3, gw, gb, groups, 1e-5, "none"),
                    lambda: R.group_norm_bwd(yg, x3, gw, gb, gmean, grstd, groups, "none")))

    xb = torch.randn(bshape, **mk)
    if cuda:
        xb = xb.to(memory_format=torch.channels_last)
    cb = bshape[1]
    bw, bb = torch.randn(cb, **mk), torch.randn(cb, **mk)
    rm, rv = torch.zeros(cb, device=device), torch.ones(cb, device=device)
    rm2, rv2 = rm.clone(), rv.clone()  # updated by the reference math's calls
    if dt != torch.float32:  # running stats and affine in fp32, as a bf16 model keeps them
        bw, bb = bw.float(), bb.float()
    xb3 = xb.reshape(bshape[0], cb, -1)
    layout = " NHWC" if cuda else ""
    ybt, bmean, bvar = R.batch_norm_fwd(xb3, bw, bb, 1e-5, False)
    out.append(Case(f"batch_norm train {'x'.join(map(str, bshape))}{layout}",
                    dict(x=xb, w=bw, b=bb),
                    lambda x, w, b: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                    lambda x, w, b: fastnorm.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5),
                    lambda: R.batch_norm_train_apply(
                        xb3, *R.batch_norm_stats_update(xb3, rm2, rv2, 0.1, None), bw, bb, 1e-5,
                        False),
                    lambda: R.batch_norm_bwd(ybt, xb3, bw, bb, bmean, bvar, 1e-5, False,
                                             True)))
    out.append(Case(f"batch_norm eval {'x'.join(map(str, bshape))}{layout}",
                    dict(x=xb, w=bw, b=bb),
                    lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
                    lambda x, w, b: fastnorm.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5),
                    lambda: R.batch_norm_apply(xb3, rm, rv, bw, bb, 1e-5, False),
                    lambda: R.batch_norm_bwd(ybt, xb3, bw, bb, rm, rv, 1e-5, False, False)))
    return out


def _timer(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Microseconds per call of issuing `calls` calls (device synchronized before, not inside)."""
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    sync()
    return elapsed / calls * 1e6


def _step(fn: Callable, inputs: dict, mode: str) -> Callable[[], object]:
    """One call of fn in `mode` on fresh leaves (grads left to accumulate: equal for all)."""
    leaves = {k: _leaf(v, mode == "fwd+bwd") for k, v in inputs.items()}
    if mode == "fwd":
        return lambda: fn(**leaves)
    y0 = fn(**leaves)
    dy = torch.randn_like(y0)

    def run():
        fn(**leaves).backward(dy)
    return run


class InCallMath:
    """Times the reference kernels where fastnorm's calls run them: while active, the router's
    reference kernels (fastnorm.ops._router hands out `_reference.<op>`) are wrapped in a
    perf_counter_ns timer; the kernels' own calls to each other are not (they use the module's
    globals), so each kernel call is timed once."""

    def __init__(self):
        self.ns = 0
        self._names = [op for op in _router.OPS if hasattr(R, op)]

    def __enter__(self) -> "InCallMath":
        def timed(fn):
            def call(*args):
                start = time.perf_counter_ns()
                try:
                    return fn(*args)
                finally:
                    self.ns += time.perf_counter_ns() - start
            return call
        self._saved = _router._reference
        _router._reference = types.SimpleNamespace(
            **{op: timed(getattr(R, op)) for op in self._names})
        return self

    def __exit__(self, *exc) -> None:
        _router._reference = self._saved


def math_in_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Microseconds per call that `fn` (a fastnorm call under backend "reference") spends in
    the reference kernels, the minimum over `repeats` runs of `calls` calls."""
    best = float("inf")
    with InCallMath() as timer:
        for _ in range(3):
            fn()
        for _ in range(repeats):
            timer.ns = 0
            for _ in range(calls):
                fn()
            best = min(best, timer.ns / calls / 1e3)
    return best


def _launches(fn: Callable[[], object]) -> int:
    before = _launch.launches
    fn()
    return _launch.launches - before


def _selected(backend: Optional[str], dry: bool) -> contextlib.ExitStack:
    """The provider's backend selected (None: the current one), and for the dry provider the
    launcher's dry run (launches counted, not run)."""
    stack = contextlib.ExitStack()
    stack.enter_context(fastnorm.use_backend(backend or fastnorm.get_backend()))
    if dry:
        stack.enter_context(_launch.dry_run())
    return stack


def measure(device: str, calls: int, repeats: int, backends: Optional[list[str]] = None,
            dry: Optional[bool] = None) -> list[dict]:
    """Rows of {case, mode, provider, us, launches}, plus on CPU the op-layer cost and, where
    Triton's interpreter is on, "fastnorm-triton-dry": backend "triton" on the CPU tensors with
    every launch counted but not run (`_launch.dry_run`), i.e. that backend's host path (checks,
    route, router, plans, outputs and workspace, launcher bookkeeping) without the launches; on
    a GPU add launches x `launch_us` for an estimate. No interpreted kernel runs. `dry`: that
    provider or not (default: where it can run)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if backends is None:
        backends = ["triton", "auto"] + (["cuda"] if "cuda" in fastnorm.available_backends()
                                         else []) if device == "cuda" else ["reference", "auto"]
    if dry is None:
        dry = device == "cpu" and fastnorm._backend.triton_interpreted()
    rows = []
    for case in cases(device):
        for mode in MODES:
            fns = {"torch": (None, False, _step(case.torch_fn, case.inputs, mode))}
            for name in backends:
                with _selected(name, False):  # (selected again around each timing below)
                    fns[f"fastnorm-{name}"] = (name, False,
                                               _step(case.fastnorm_fn, case.inputs, mode))
            if dry:
                with _selected("triton", True):
                    fns["fastnorm-triton-dry"] = ("triton", True,
                                                  _step(case.fastnorm_fn, case.inputs, mode))
            if device == "cpu" and case.ref_fwd is not None:
                ref = case.ref_fwd if mode == "fwd" else \
                    (lambda f=case.ref_fwd, b=case.ref_bwd: (f(), b()))
                fns["reference-math"] = (None, False, ref)
            best = {p: float("inf") for p in fns}
            launches = {}
            for provider, (backend, is_dry, fn) in fns.items():
                with _selected(backend, is_dry):
                    for _ in range(3):  # warm-up: compile kernels, fill the plan caches
                        fn()
                    launches[provider] = _launches(fn) if backend else None
            for _ in range(repeats):
                for provider, (backend, is_dry, fn) in fns.items():
                    with _selected(backend, is_dry):
                        best[provider] = min(best[provider], _timer(fn, calls, sync))
            for provider, us in best.items():
                rows.append({"case": case.name, "mode": mode, "provider": provider,
                             "us": us, "launches": launches.get(provider)})
            if "reference-math" in best and "fastnorm-reference" in best:
                rows.append({"case": case.name, "mode": mode, "provider": "op-layer",
                             "us": best["fastnorm-reference"] - best["reference-math"],
                             "launches": None})
                with fastnorm.use_backend("reference"):
                    in_call = math_in_call(fns["fastnorm-reference"][2], calls, repeats)
                rows.append({"case": case.name, "mode": mode, "provider": "math-in-call",
                             "us": in_call, "launches": None})
                rows.append({"case": case.name, "mode": mode, "provider": "op-layer-in-call",
                             "us": best["fastnorm-reference"] - in_call, "launches": None})
    return rows


@triton.jit
def _noop_kernel(P0, P1, P2, P3, P4, P5, P6, P7, n0, n1, n2, n3, n4, n5, n6, n7,
                 BLOCK: tl.constexpr):
    """Does nothing: 8 pointers, 8 ints and a constexpr, about the argument count of fastnorm's
    kernels (the launcher packs every argument, so the count matters to the host cost)."""
    pass


def launch_cost(calls: int, repeats: int) -> float:
    """Host microseconds of one launch of _noop_kernel through fastnorm's launcher (its cached
    compiled handle, fastnorm/triton/_launch.py), back to back, no sync inside the loop."""
    x = torch.empty(64, device="cuda")
    args = (x,) * 8 + (64,) * 8

    def call():
        _launch.launch(_noop_kernel, (1,), *args, BLOCK=64)
    for _ in range(3):  # the first call compiles and caches the handle
        call()
    return min(_timer(call, calls, torch.cuda.synchronize) for _ in range(repeats))


@functools.lru_cache(maxsize=None)
def _routes() -> dict[str, Callable]:
    """The op registered each way (once per process: a registration cannot be repeated)."""
    lib = torch.library.Library("fastnorm_bench", "FRAGMENT")
    _routes.lib = lib  # keep the registrations alive
    lib.define("clone_defined(Tensor x) -> Tensor")
    lib.impl("clone_defined", lambda x: x.clone(), "CompositeExplicitAutograd")
    defined = torch.ops.fastnorm_bench.clone_defined

    @torch.library.custom_op("fastnorm_bench::clone_custom", mutates_args=())
    def custom(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    custom.register_autograd(lambda ctx, g: g)

    class Outside(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return defined(x)

        @staticmethod
        def backward(ctx, g):
            return g

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    eager_apply = vars(torch._C._FunctionBase)["apply"].__get__(None, Eager)
    return {"direct (the body)": lambda x: x.clone(),
            "custom_op + register_autograd": custom,
            "define + impl, Function outside": lambda x: Outside.apply(x),
            "eager route (Function, no dispatcher)": eager_apply}


def registration_routes(calls: int, repeats: int) -> list[dict]:
    """What each way of exposing an op costs per call, for an op whose body is one clone of a
    4x64 CPU tensor, with and without autograd: torch.library.custom_op with register_autograd
    (what fastnorm's registered ops are), torch.library.define + impl with autograd in an
    autograd.Function outside the op, and the eager route (an autograd.Function calling the
    implementation directly; no dispatcher). The body itself is timed as "direct". "fwd+bwd"
    adds `.backward(dy)`: for "direct" that is the engine running clone's C++ backward node,
    for the others a Python backward, the floor under any op whose autograd lives in Python."""
    rows = []
    routes = _routes()
    for grad, mode in ((False, "fwd"), (True, "fwd"), (True, "fwd+bwd")):
        x = torch.randn(4, 64, requires_grad=grad)
        dy = torch.randn(4, 64)
        for name, fn in routes.items():
            call = ((lambda fn=fn: fn(x).backward(dy)) if mode == "fwd+bwd"
                    else (lambda fn=fn: fn(x)))
            for _ in range(10):
                call()
            best = min(_timer(call, calls, lambda: None) for _ in range(repeats))
            rows.append({"route": name, "requires_grad": grad, "mode": mode, "us": best})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (case, mode), a column per provider (us per call), and fastnorm's
    ratio to torch for each fastnorm provider."""
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    keys = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    at = {(r["case"], r["mode"], r["provider"]): r for r in rows}
    ours = [p for p in providers if p.startswith("fastnorm-")]
    head = ["case", "mode", *[f"{p} us" for p in providers], *[f"{p} / torch" for p in ours]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, mode in keys:
        cells = [case, mode]
        for p in providers:
            r = at.get((case, mode, p))
            if r is None:
                cells.append("")
                continue
            launches = f" ({r['launches']} launches)" if r["launches"] else ""
            cells.append(f"{r['us']:.1f}{launches}")
        torch_us = at[(case, mode, "torch")]["us"]
        cells += [f"{at[(case, mode, p)]['us'] / torch_us:.2f}x" for p in ours
                  if (case, mode, p) in at]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metadata(device: str, calls: int, repeats: int) -> dict:
    import platform

    import triton

    name = (torch.cuda.get_device_name() if device == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {"device": name, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__,
            "threads": torch.get_num_threads(),
            "timer": f"min over {repeats} runs of {calls} back-to-back calls, perf_counter, "
                     "no sync inside the loop"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--backends", help="comma-separated fastnorm backends (default: the "
                                           "kernel backends available on the device)")
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the call's cost, not a thread pool's scheduling, is measured
    backends = args.backends.split(",") if args.backends else None
    rows = measure(args.device, args.calls, args.repeats, backends)
    meta = metadata(args.device, args.calls, args.repeats)
    md = f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}; " \
         f"{meta['timer']}\n\n" + table(rows)
    print(md)
    launch_us = launch_cost(args.calls, args.repeats) if args.device == "cuda" else None
    if launch_us is not None:
        md += f"\n\nOne launch alone (a kernel that does nothing, fastnorm's launcher): " \
              f"{launch_us:.1f} us"
        print(md[md.index("One launch alone"):])
    routes = registration_routes(args.calls, args.repeats) if args.device == "cpu" else []
    if routes:
        md += "\n\nRegistration routes (one clone of a 4x64 CPU tensor; us per call):\n\n" \
              "| route | fwd, no grad | fwd, requires grad | fwd+bwd |\n|---|---|---|---|\n"
        for name in dict.fromkeys(r["route"] for r in routes):
            us = {(r["requires_grad"], r["mode"]): r["us"] for r in routes if r["route"] == name}
            md += f"| {name} | {us[False, 'fwd']:.1f} | {us[True, 'fwd']:.1f} | " \
                  f"{us[True, 'fwd+bwd']:.1f} |\n"
        print(md[md.index("Registration routes"):])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "rows": rows, "launch_us": launch_us,
             "registration_routes": routes}, indent=1))
        args.out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
