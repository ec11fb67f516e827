"""The host path: what a fastnorm call costs the CPU thread that issues it.

Speed itself is measured by benchmarks/bench_overhead.py, never here. These tests are the
deterministic guard: kernel launches and torch ops per call (counted, not timed), the eager
route around the dispatcher and where it must not be taken (torch.compile, dispatch modes,
tensor subclasses, fake tensors), version counters of in-place updates, and the cached Triton
launch, whose key must separate every pair of calls Triton would compile differently.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastnorm
from fastnorm.ops import _common
from fastnorm.triton import _launch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(device, grad=True):
    x = torch.randn(8, 64, device=device, requires_grad=grad)
    w = torch.randn(64, device=device, requires_grad=grad)
    b = torch.randn(64, device=device, requires_grad=grad)
    xg = torch.randn(2, 32, 4, 4, device=device, requires_grad=grad)
    gw = torch.randn(32, device=device, requires_grad=grad)
    gb = torch.randn(32, device=device, requires_grad=grad)
    return x, w, b, xg, gw, gb


def _calls(device):
    """op name -> a call through the public API, on small inputs (the same ops the benchmark
    and the per-op guard count)."""
    x, w, b, xg, gw, gb = _inputs(device)
    rm, rv = torch.zeros(32, device=device), torch.ones(32, device=device)
    x3, r3 = (torch.randn(2, 4, 64, device=device, requires_grad=True) for _ in range(2))
    return {
        "layer_norm": lambda: fastnorm.layer_norm(x, (64,), w, b),
        "rms_norm": lambda: fastnorm.rms_norm(x, (64,), w),
        "rms_norm_residual_3d": lambda: fastnorm.rms_norm(x3, (64,), w, residual=r3),
        "group_norm": lambda: fastnorm.group_norm(xg, 8, gw, gb),
        "group_norm_silu": lambda: fastnorm.group_norm(xg, 8, gw, gb, activation="silu"),
        "batch_norm_train": lambda: fastnorm.batch_norm(xg, rm, rv, gw, gb, True),
        "batch_norm_eval": lambda: fastnorm.batch_norm(xg, rm, rv, gw, gb, False),
    }


# Triton launches per call, forward and forward + backward, at the small shapes above (whole-row
# LayerNorm, fused GroupNorm, BatchNorm's reduce/combine/elementwise): the backward's dW and dB
# column sums are one launch, BatchNorm's training statistics update the running ones in the
# combine launch, and nothing is zero-filled by a separate launch.
LAUNCHES = {
    "layer_norm": (1, 3), "rms_norm": (1, 3), "rms_norm_residual_3d": (1, 3),
    "group_norm": (1, 3), "group_norm_silu": (1, 3),
    "batch_norm_train": (3, 6), "batch_norm_eval": (1, 4),
}
# Torch ops per call (top-level aten ops seen by the profiler), upper bounds: the outputs and
# workspace the launchers allocate, the views inside the autograd node (an (N, C, *) input in:
# flatten; y out: view_as + detach, an alias an in-place op may modify; in the backward dy in
# and dx out), and in the backward the gradient accumulation autograd does for torch's own ops
# too. A new fill, copy or cast in the hot path shows up here.
ATEN_OPS = {
    "layer_norm": (3, 11), "rms_norm": (3, 9), "rms_norm_residual_3d": (8, 17),
    "group_norm": (6, 16),
    "group_norm_silu": (6, 16), "batch_norm_train": (8, 18), "batch_norm_eval": (4, 14),
}


def _aten_ops(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return [e.name for e in events
            if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]


def _fwd_bwd(fn):
    dy = torch.ones_like(fn())
    return lambda: fn().backward(dy)


@pytest.mark.parametrize("op", sorted(LAUNCHES))
def test_launches_and_torch_ops_per_call(device, op):
    """The guard: Triton launches per call exactly, torch ops per call at most the budget.
    Launches are counted, not run (dry_run), so the interpreter adds no ops of its own."""
    fn = _calls(device)[op]
    with fastnorm.use_backend("triton"), _launch.dry_run():
        for mode, call in (("fwd", fn), ("fwd+bwd", _fwd_bwd(fn))):
            call()  # warm the plan caches
            before = _launch.launches
            call()
            launches = _launch.launches - before
            ops = _aten_ops(call)
            i = 0 if mode == "fwd" else 1
            assert launches == LAUNCHES[op][i], (mode, launches)
            assert len(ops) <= ATEN_OPS[op][i], (mode, ops)


@pytest.mark.parametrize("op", sorted(LAUNCHES))
def test_eager_route_skips_the_dispatcher(device, op):
    """In eager mode no fastnorm:: op goes through the dispatcher (the functional layer calls the
    implementations inside one autograd.Function); the backward does not either."""
    fn = _calls(device)[op]
    with fastnorm.use_backend("triton"), _launch.dry_run():
        names = _aten_and_fastnorm_ops(_fwd_bwd(fn))
    assert not [n for n in names if n.startswith("fastnorm::")], names


def _aten_and_fastnorm_ops(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


class _Recorder(TorchDispatchMode):
    """A dispatch mode that records every op it sees (and changes nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.name()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("op", sorted(LAUNCHES))
def test_dispatch_mode_sees_the_registered_ops_and_results_match(device, op, backend_name):
    """Under a dispatch mode the call goes through torch.ops.fastnorm (the mode sees the fastnorm
    op, forward and backward), and gives bitwise what the eager route gives."""
    torch.manual_seed(0)
    calls = _calls(device)
    leaves = [t for t in _leaves_of(calls[op])]
    with fastnorm.use_backend(backend_name):
        y = calls[op]()
        dy = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, dy)
        with _Recorder() as mode:
            y2 = calls[op]()
            grads2 = torch.autograd.grad(y2, leaves, dy)
    seen = [n for n in mode.ops if n.startswith("fastnorm::")]
    assert any(n.endswith("_fwd") or "apply" in n or "stats" in n for n in seen), mode.ops
    assert any("bwd" in n for n in seen), mode.ops
    assert torch.equal(y, y2)
    for g, g2 in zip(grads, grads2):
        assert torch.equal(g, g2)


def _leaves_of(fn):
    """The tensors requiring grad that `fn` closes over."""
    return [c.cell_contents for c in fn.__closure__ or ()
            if isinstance(c.cell_contents, torch.Tensor) and c.cell_contents.requires_grad]


class _Logged(torch.Tensor):
    """A tensor subclass that logs the torch functions called on it."""
    log = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.log.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_goes_through_the_registered_op(device):
    x = torch.randn(4, 16, device=device).as_subclass(_Logged)
    w = torch.randn(16, device=device)
    _Logged.log.clear()
    with fastnorm.use_backend("reference"):
        y = fastnorm.layer_norm(x, (16,), w)
    assert any("layer_norm_fwd" in name for name in _Logged.log), _Logged.log
    torch.testing.assert_close(y.as_subclass(torch.Tensor),
                               F.layer_norm(x.as_subclass(torch.Tensor), (16,), w))


def test_fake_tensors_get_the_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with fastnorm.use_backend("reference"), FakeTensorMode():
        x = torch.empty(6, 32, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(32, requires_grad=True)
        y = fastnorm.layer_norm(x, (32,), w)
        y.sum().backward()
        g = fastnorm.group_norm(torch.empty(2, 8, 3, 3), 4)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and x.grad.shape == x.shape
    assert g.shape == (2, 8, 3, 3)


def test_in_place_updates_bump_version_counters(device):
    """What the dispatcher does for a mutating op, the eager route does too: autograd then
    notices a saved tensor that was changed in place."""
    x = torch.randn(4, 16, device=device)
    r = torch.randn(4, 16, device=device)
    v_x, v_r = x._version, r._version
    with fastnorm.use_backend("reference"):
        fastnorm.fused_add_rms_norm_(x, r, None)
    assert x._version > v_x and r._version > v_r
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    v_m = rm._version
    with fastnorm.use_backend("reference"):
        fastnorm.batch_norm(torch.randn(4, 3, 5, device=device), rm, rv, training=True)
    assert rm._version > v_m and not torch.equal(rm, torch.zeros_like(rm))


def test_eager_guard_conditions():
    plain = torch.randn(2)
    param = torch.nn.Parameter(torch.randn(2))
    assert _common.eager((plain, param, None))
    assert not _common.eager((torch.randn(2).as_subclass(_Logged),))
    with _Recorder():
        assert not _common.eager((plain,))
    with torch.device("cpu"):  # a torch-function mode
        assert not _common.eager((plain,))


def test_compiled_graph_holds_the_registered_op():
    """torch.compile traces the registered op (opaque, with its fake), not the eager route."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    backend = EagerAndRecordGraphs()
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    with fastnorm.use_backend("reference"):
        fn = torch.compile(lambda x, w: fastnorm.layer_norm(x, (16,), w), backend=backend,
                           fullgraph=True)
        y = fn(x, w)
    torch.testing.assert_close(y, F.layer_norm(x, (16,), w))
    code = "\n".join(g.code for g in backend.graphs)
    assert "fastnorm.layer_norm_fwd" in code, code


# --- the cached Triton launch --------------------------------------------------------------------

def _triton_spec(arg):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, arg, False, True, True)


@pytest.mark.skipif(
    _launch.TRITON_RELEASE not in _launch._DIRECT_RELEASES,
    reason="the cached launch (and its key) exists for the Triton releases in "
           "_launch._DIRECT_RELEASES only; other releases launch through Triton's JIT")
def test_launch_key_separates_what_triton_specializes():
    """Equal keys must mean equal Triton specializations (else a cached launch would run the
    binary of another specialization). Checked pairwise with Triton's own specialization
    function, over the values that matter: ints around 1, multiples of 16 and the 32-bit
    limit, bools, floats, None, tensors of several dtypes at aligned and unaligned addresses."""
    base = torch.zeros(64)
    values = [0, 1, 2, 15, 16, 17, 32, 2**31 - 1, 2**31, 2**32 + 16, -1, -16,
              True, False, 1.0, 0.5, None, base, base[1:], base[4:], base[8:],
              base.double(), base.bfloat16(), base.bfloat16()[8:], base.half()[1:]]
    for a in values:
        for b in values:
            if _launch._arg_key((a,)) == _launch._arg_key((b,)):
                assert _triton_spec(a) == _triton_spec(b), (a, b)


class _FakeCompiled:
    def __init__(self):
        self.calls = []
        self.function, self.packed_metadata = 11, (4, 1, 0)

    def run(self, *args):
        self.calls.append(args)


class _FakeParam:
    def __init__(self, name, default):
        self.name, self.default = name, default


class _FakeKernel:
    """Stands in for a JITFunction: `kernel[grid](*args, **meta)` records the JIT call and
    returns its compiled kernel."""

    def __init__(self):
        self.params = [_FakeParam(n, None) for n in ("X", "M", "eps", "FLAG", "BLOCK")]
        self.params[-1].default = 64
        self.jit_calls = []
        self.compiled = _FakeCompiled()

    def __getitem__(self, grid):
        def call(*args, **meta):
            self.jit_calls.append((grid, args, meta))
            return self.compiled
        return call


def test_cached_launch_passes_what_the_jit_would(monkeypatch):
    """First call of a key: the JIT path; later ones: the compiled kernel's launcher with the
    grid, the current stream, no hooks, and every parameter in signature order (constexprs from
    the call, defaults for the rest). A new alignment, int or constexpr takes the JIT again."""
    monkeypatch.setattr(_launch, "_DIRECT", True)
    monkeypatch.setattr(_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(_launch, "_current_stream", lambda device: 1234)
    monkeypatch.setattr(_launch, "_hooks_installed", lambda: False)
    monkeypatch.setattr(_launch, "_cache", {})
    kernel = _FakeKernel()
    x = torch.zeros(32)
    _launch.launch(kernel, (3, 2), x, 100, 1e-5, FLAG=True, num_warps=4)
    assert len(kernel.jit_calls) == 1 and not kernel.compiled.calls
    _launch.launch(kernel, (3, 2), x, 100, 2e-5, FLAG=True, num_warps=4)
    assert len(kernel.jit_calls) == 1
    assert kernel.compiled.calls == [(3, 2, 1, 1234, 11, (4, 1, 0), None, None, None,
                                      x, 100, 2e-5, True, 64)]
    _launch.launch(kernel, (3,), x[1:], 100, 2e-5, FLAG=True, num_warps=4)   # unaligned
    _launch.launch(kernel, (3,), x, 101, 2e-5, FLAG=True, num_warps=4)       # other int
    _launch.launch(kernel, (3,), x, 100, 2e-5, FLAG=False, num_warps=4)      # constexpr
    _launch.launch(kernel, (3,), x, 100, 2e-5, FLAG=True, num_warps=8)       # option
    assert len(kernel.jit_calls) == 5 and len(kernel.compiled.calls) == 1


def test_bench_overhead_runs():
    """benchmarks/bench_overhead.py on a minimal budget: every case, both modes, torch and the
    fastnorm providers, and the op-layer rows."""
    sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
    try:
        import bench_overhead
    finally:
        sys.path.pop(0)
    rows = bench_overhead.measure("cpu", calls=2, repeats=1, dry=False)
    cases = {r["case"].split()[0] for r in rows}
    assert cases == {"layer_norm", "rms_norm", "rms_norm+residual", "group_norm", "batch_norm"}
    providers = {r["provider"] for r in rows}
    assert {"torch", "fastnorm-reference", "fastnorm-auto", "reference-math",
            "op-layer", "math-in-call", "op-layer-in-call"} <= providers
    assert all(r["us"] > 0 for r in rows if not r["provider"].startswith("op-layer"))
    # every case's kernels were timed inside its calls (the router's kernels were wrapped)
    assert len([r for r in rows if r["provider"] == "math-in-call"]) == 12
    assert "| layer_norm 4x64 | fwd |" in bench_overhead.table(rows)


@pytest.mark.interpreter
def test_bench_overhead_triton_dry_run():
    """bench_overhead.py's "fastnorm-triton-dry" provider (CPU tensors under the interpreter):
    backend "triton" with launches counted and not run, for every case and mode; the counts are
    the host-path guard's (test_launches_and_torch_ops_per_call)."""
    sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
    try:
        import bench_overhead
    finally:
        sys.path.pop(0)
    rows = bench_overhead.measure("cpu", calls=2, repeats=1, backends=[])
    dry = {(r["case"], r["mode"]): r for r in rows if r["provider"] == "fastnorm-triton-dry"}
    assert len(dry) == 12 and all(r["us"] > 0 for r in dry.values())
    launches = {key: r["launches"] for key, r in dry.items()}
    assert launches[("layer_norm 4x64", "fwd")] == 1
    assert launches[("layer_norm 4x64", "fwd+bwd")] == 3
    assert launches[("batch_norm eval 2x32x4x4", "fwd+bwd")] == 4
    assert "fastnorm-triton-dry us" in bench_overhead.table(rows)


def test_bench_overhead_registration_routes():
    sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
    try:
        import bench_overhead
    finally:
        sys.path.pop(0)
    rows = bench_overhead.registration_routes(calls=2, repeats=1)
    assert len(rows) == 12 and all(r["us"] > 0 for r in rows)
    assert {(r["requires_grad"], r["mode"]) for r in rows} == {
        (False, "fwd"), (True, "fwd"), (True, "fwd+bwd")}


@pytest.mark.skipif(not (torch.cuda.is_available() and _launch._DIRECT),
                    reason="the cached launch path runs on a CUDA device with Triton 3.6")
@pytest.mark.parametrize("op", sorted(LAUNCHES))
def test_cached_launches_match_the_jit_on_gpu(op, monkeypatch):
    """On the GPU: results through the cached compiled kernels are bitwise those of Triton's JIT
    path, forward and backward, and the cache is what ran (its entries hold these kernels)."""
    fn = _calls(torch.device("cuda"))[op]
    leaves = _leaves_of(fn)

    def step():
        y = fn()
        return [y, *torch.autograd.grad(y, leaves, torch.ones_like(y))]

    with fastnorm.use_backend("triton"):
        with monkeypatch.context() as m:
            m.setattr(_launch, "_DIRECT", False)
            want = step()
        step()  # the first call of each key takes the JIT and fills the cache
        before = dict(_launch._cache)
        got = step()
    assert before and before.keys() == _launch._cache.keys()
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# --- the eager node views its input itself --------------------------------------------------------
# The eager route views an (N, C, *) or (*, n) input as the kernels' (N, C, S) / (M, n) inside its
# one autograd node (y comes back in the input's shape as an alias, not a view), instead of two
# view nodes around it. Each case against torch in float64: the output, every gradient with a
# non-contiguous dy, an in-place op on the output (nn.ReLU(inplace=True) after a norm), and
# create_graph (double backward through the node's saved view).

def _node_cases(device):
    f64 = dict(dtype=torch.float64, device=device)
    rm, rv = torch.linspace(-0.5, 0.5, 6, **f64), torch.linspace(0.5, 2.0, 6, **f64)
    cl = torch.channels_last
    return {
        # name: (fastnorm f(x, w, b), torch f(x, w, b), x, parameter size)
        "layer_norm_3d": (lambda x, w, b: fastnorm.layer_norm(x, (6,), w, b),
                          lambda x, w, b: F.layer_norm(x, (6,), w, b), torch.randn(2, 3, 6, **f64)),
        "layer_norm_1d": (lambda x, w, b: fastnorm.layer_norm(x, (6,), w, b),
                          lambda x, w, b: F.layer_norm(x, (6,), w, b), torch.randn(6, **f64)),
        # the transformers adapters' entry (fused-add op without a residual, Llama rounding)
        "rms_norm_llama_3d": (lambda x, w, b: fastnorm.functional._add_norm(
                                  "rms_norm", x, None, (6,), w, None, 1e-6, True, False, False,
                                  "llama") * b,
                              lambda x, w, b: F.rms_norm(x, (6,), w, 1e-6) * b,
                              torch.randn(2, 3, 6, **f64)),
        "rms_norm_4d": (lambda x, w, b: fastnorm.rms_norm(x, (6,), w) * b,
                        lambda x, w, b: F.rms_norm(x, (6,), w) * b, torch.randn(2, 2, 3, 6, **f64)),
        "group_norm_4d_cl": (lambda x, w, b: fastnorm.group_norm(x, 3, w, b),
                             lambda x, w, b: F.group_norm(x, 3, w, b),
                             torch.randn(2, 6, 3, 2, **f64).to(memory_format=cl)),
        "group_norm_2d": (lambda x, w, b: fastnorm.group_norm(x, 2, w, b),
                          lambda x, w, b: F.group_norm(x, 2, w, b), torch.randn(3, 6, **f64)),
        "batch_norm_train_4d": (lambda x, w, b: fastnorm.batch_norm(x, None, None, w, b, True),
                                lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                                torch.randn(3, 6, 2, 2, **f64)),
        "batch_norm_update_5d": (
            lambda x, w, b: fastnorm.batch_norm(x, rm.clone(), rv.clone(), w, b, True),
            lambda x, w, b: F.batch_norm(x, rm.clone(), rv.clone(), w, b, True),
            torch.randn(2, 6, 2, 2, 2, **f64)),
        "batch_norm_eval_2d": (lambda x, w, b: fastnorm.batch_norm(x, rm, rv, w, b, False),
                               lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False),
                               torch.randn(4, 6, **f64)),
        "layer_norm_2d_cl": (lambda x, w, b: fastnorm.layer_norm_2d(x, w, b),
                             lambda x, w, b: F.layer_norm(x.movedim(1, -1), (6,), w, b,
                                                          1e-6).movedim(-1, 1),
                             torch.randn(2, 6, 3, 2, **f64).to(memory_format=cl)),
    }


def _node_inputs(x, device):
    g = torch.Generator().manual_seed(1)  # the same parameters for fastnorm and torch
    w = (torch.rand(6, generator=g, dtype=torch.float64) + 0.5).to(device)
    b = torch.randn(6, generator=g, dtype=torch.float64).to(device)
    return [t.clone().requires_grad_() for t in (x, w, b)]


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("case", sorted(_node_cases("cpu")))
def test_node_views_match_torch(device, case, backend_name):
    torch.manual_seed(0)
    ours, ref, x = _node_cases(device)[case]
    dy = torch.randn(*x.shape, 2, dtype=x.dtype, device=device)[..., 1]  # non-contiguous
    results = []
    for fn in (ours, ref):
        leaves = _node_inputs(x, device)
        with fastnorm.use_backend(backend_name):
            y = fn(*leaves)
            results.append((y, torch.autograd.grad(y, leaves, dy)))
    (y, grads), (y_ref, grads_ref) = results
    assert y.shape == y_ref.shape and not y._is_view()
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("case", sorted(_node_cases("cpu")))
def test_node_output_takes_in_place_ops_and_double_backward(device, case):
    ours, ref, x = _node_cases(device)[case]
    results = []
    for fn in (ours, ref):
        leaves = _node_inputs(x, device)
        with fastnorm.use_backend("reference"):
            y = fn(*leaves).relu_()  # in place on the output, as nn.ReLU(inplace=True)
            first = torch.autograd.grad((y ** 3).sum(), leaves[:2], create_graph=True)
            second = torch.autograd.grad(sum((g ** 2).sum() for g in first), leaves)
        results.append((y, first, second))
    for got, want in zip(results[0], results[1]):
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w)


# --- the fused residual add's node views input and residual itself -------------------------------
# fastnorm.layer_norm / rms_norm with residual=: one node that takes the (*, n) input and residual,
# views both as rows, and returns y (and h with prenorm) in the input's shape, as aliases.

def _residual_call(kind, prenorm):
    def ours(x, r, w, b):
        if kind == "layer":
            return fastnorm.layer_norm(x, (6,), w, b, residual=r, prenorm=prenorm)
        return fastnorm.rms_norm(x, (6,), w, residual=r, prenorm=prenorm)

    def ref(x, r, w, b):
        h = x + r
        y = F.layer_norm(h, (6,), w, b) if kind == "layer" else F.rms_norm(h, (6,), w)
        return (y, h) if prenorm else y
    return ours, ref


def _residual_leaves(device, strided):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    # strided: the residual's last dim has stride 2 (the node copies it to unit-stride rows)
    r = torch.randn(2, 3, 12 if strided else 6, generator=g, dtype=torch.float64)
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(6, generator=g, dtype=torch.float64)
    leaves = [t.to(device).requires_grad_() for t in (x, r, w, b)]
    return leaves, (leaves[1][..., ::2] if strided else leaves[1])


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_residual_node_matches_torch(device, backend_name, kind, prenorm, strided):
    ours, ref = _residual_call(kind, prenorm)
    grads = torch.randn(2, 2, 3, 6, 2, dtype=torch.float64, device=device)[..., 1]  # dy, dh
    results = []
    for fn in (ours, ref):
        leaves, r = _residual_leaves(device, strided)
        with fastnorm.use_backend(backend_name):
            out = fn(leaves[0], r, *leaves[2:])
            outs = out if prenorm else (out,)
            results.append((outs, torch.autograd.grad(outs, leaves, tuple(grads[:len(outs)]),
                                                      allow_unused=True)))
    (outs, got), (outs_ref, want) = results
    for o, o_ref in zip(outs, outs_ref):
        assert o.shape == o_ref.shape and not o._is_view()
        torch.testing.assert_close(o, o_ref)
    for name, g, w in zip(("dx", "dr", "dw", "db"), got, want):
        if kind == "rms" and name == "db":
            assert g is None and w is None
            continue
        torch.testing.assert_close(g, w, msg=name)


@pytest.mark.parametrize("prenorm", [False, True])
def test_residual_node_outputs_in_place(device, prenorm):
    """An in-place op on y works (nn.ReLU(inplace=True)); one on h, which the backward needs,
    raises at the backward, as it does for torch's unfused form (which saves h too)."""
    ours, ref = _residual_call("layer", prenorm)
    results = []
    for fn in (ours, ref):
        leaves, r = _residual_leaves(device, False)
        out = fn(leaves[0], r, *leaves[2:])
        y = (out[0] if prenorm else out).relu_()
        results.append(torch.autograd.grad((y ** 3).sum(), leaves))
    for g, w in zip(*results):
        torch.testing.assert_close(g, w)
    if prenorm:
        for fn in (ours, ref):
            leaves, r = _residual_leaves(device, False)
            y, h = fn(leaves[0], r, *leaves[2:])
            h.mul_(2)
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.sum().backward()
