"""The op layer on every kernel set (the `backend` fixture: CPU reference + interpreted Triton,
GPU Triton + CUDA C++): opcheck and results vs the reference on shared sample inputs, a forward
by one kernel set followed by the backward of another, bad arguments rejected by the op itself
(eagerly and in the fake), the router's decision table, and registration without Triton.
Heavy shape sweeps stay in the per-family files, on Triton only."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastnorm
from fastnorm import reference as ref
from fastnorm.ops import _router
from helpers import DEVICE
from sample_inputs import sample_inputs

OPS = _router.OPS
# The C++ kernels have no fp64 (the router sends fp64 to Triton), so they are tested in fp32.
TEST_DTYPE = {"cuda": torch.float32}
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _dtype(backend: str) -> torch.dtype:
    return TEST_DTYPE.get(backend, torch.float64)


# Differentiable ops: the argument positions opcheck gives requires_grad (x and parameters).
GRAD_POSITIONS = {"layer_norm_fwd": (0, 1, 2), "rms_norm_fwd": (0, 1),
                  "add_layer_norm_fwd": (0, 1, 2, 3), "group_norm_fwd": (0, 1, 2),
                  "batch_norm_fwd": (0, 1, 2), "batch_norm_apply": (0, 3, 4),
                  "batch_norm_train_apply": (0, 3, 4), "layer_norm_2d_fwd": (0, 1, 2),
                  "rms_norm_2d_fwd": (0, 1)}


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_outputs_close(got, want, op):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (op, i, a.dtype, b.dtype, a.shape)
        assert a.stride() == b.stride() or a.numel() <= 1 or a.dim() < 2, (op, i, a.stride(),
                                                                            b.stride())
        torch.testing.assert_close(a, b, **TOL[a.dtype if a.dtype in TOL else torch.float32],
                                   equal_nan=True, msg=lambda m: f"{op} output {i}: {m}")


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, backend):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) per sample;
    differentiable ops get inputs that require grad, so their backward runs too."""
    positions = GRAD_POSITIONS.get(op, ())
    samples = list(sample_inputs(op, DEVICE, _dtype(backend)))
    if DEVICE.type == "cpu":
        # The fake and the autograd registration are the same for every kernel set: on CPU the
        # two sets split the samples (the interpreter is slow), and together cover them all;
        # test_matches_reference runs every sample on both.
        samples = samples[0::2] if backend == "reference" else samples[1::2]
    for args in samples:
        args = tuple(a.detach().clone().requires_grad_() if j in positions and a is not None
                     else a for j, a in enumerate(args))
        torch.library.opcheck(getattr(torch.ops.fastnorm, op).default, args)


@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, backend):
    """Every kernel set returns what reference.py returns (in float64: to rounding), with the
    same dtypes, shapes and output strides, and the same in-place updates."""
    for args in sample_inputs(op, DEVICE, _dtype(backend)):
        ours_args, ref_args = _clone(args), _clone(args)
        got = getattr(torch.ops.fastnorm, op)(*ours_args)
        want = getattr(ref, op)(*ref_args)
        if got is None:  # in place: compare the mutated arguments
            got, want = ours_args[:2], ref_args[:2]
        _assert_outputs_close(got, want, op)
        if op == "batch_norm_stats_update":
            _assert_outputs_close(ours_args[1:3], ref_args[1:3], op)


@pytest.mark.parametrize("fwd_set,bwd_set", [("reference", "triton"), ("triton", "reference")]
                         if DEVICE.type == "cpu" else [("triton", "cuda"), ("cuda", "triton")])
@pytest.mark.parametrize("family", ["layer_norm", "rms_norm", "group_norm", "batch_norm",
                                    "layer_norm_2d"])
def test_forward_and_backward_on_different_kernel_sets(family, fwd_set, bwd_set):
    """The saved-tensor contract is one for all kernel sets: a forward by one and the backward
    by the other give the gradients of a forward and backward on one."""
    if not {fwd_set, bwd_set} <= set(fastnorm.available_backends()):
        pytest.skip(f"{fwd_set} or {bwd_set} is not available here")  # (cuda without fastnorm._C)
    torch.manual_seed(0)
    dtype = torch.float32 if "cuda" in (fwd_set, bwd_set) else torch.float64
    x = torch.randn(4, 6, 5, dtype=dtype, device=DEVICE)
    w, b = torch.randn(6, dtype=x.dtype, device=DEVICE), torch.randn(6, dtype=x.dtype,
                                                                      device=DEVICE)
    calls = {"layer_norm": lambda x, w, b: fastnorm.layer_norm(x.transpose(1, 2), (6,), w, b),
             "rms_norm": lambda x, w, b: fastnorm.rms_norm(x.transpose(1, 2), (6,), w, 1e-6),
             "group_norm": lambda x, w, b: fastnorm.group_norm(x, 3, w, b, activation="silu"),
             "batch_norm": lambda x, w, b: fastnorm.batch_norm(x, None, None, w, b, True,
                                                               activation="relu"),
             "layer_norm_2d": lambda x, w, b: fastnorm.layer_norm_2d(x, w, b)}
    fn = calls[family]

    def grads(first, second):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with fastnorm.use_backend(first):
            y = fn(*leaves)
        with fastnorm.use_backend(second):
            y.backward(torch.ones_like(y))
        return [y.detach()] + [t.grad for t in leaves]

    mixed, single = grads(fwd_set, bwd_set), grads(bwd_set, bwd_set)
    for name, a, b_ in zip(("y", "dx", "dw", "db"), mixed, single):
        torch.testing.assert_close(a, b_, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_reference_matches_torch():
    """The oracle against torch itself: forward and autograd gradients in float64."""
    F = torch.nn.functional
    torch.manual_seed(0)
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 12, dtype=torch.float64)
    y, mean, rstd = ref.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    want = F.layer_norm(x, (12,), w, b, 1e-5)
    torch.testing.assert_close(y, want.detach())
    got = ref.layer_norm_bwd(dy, x.detach(), w.detach(), b.detach(), mean, rstd)
    for a, b_ in zip(got, torch.autograd.grad(want, (x, w, b), dy)):
        torch.testing.assert_close(a, b_)
    y, rstd = ref.rms_norm_fwd(x.detach(), w.detach(), 1e-6)
    want = F.rms_norm(x, (12,), w, 1e-6)
    torch.testing.assert_close(y, want.detach())
    for a, b_ in zip(ref.rms_norm_bwd(dy, x.detach(), w.detach(), rstd),
                     torch.autograd.grad(want, (x, w), dy)):
        torch.testing.assert_close(a, b_)
    x3 = x.detach().reshape(7, 12, 1).expand(7, 12, 3).contiguous().requires_grad_()
    dy3 = torch.randn(7, 12, 3, dtype=torch.float64)
    y, mean, rstd = ref.group_norm_fwd(x3.detach(), w.detach(), b.detach(), 4, 1e-5, "silu")
    want = F.silu(F.group_norm(x3, 4, w, b, 1e-5))
    torch.testing.assert_close(y, want.detach())
    got = ref.group_norm_bwd(dy3, x3.detach(), w.detach(), b.detach(), mean, rstd, 4, "silu")
    for a, b_ in zip(got, torch.autograd.grad(want, (x3, w, b), dy3)):
        torch.testing.assert_close(a, b_)
    y, mean, var = ref.batch_norm_fwd(x3.detach(), w.detach(), b.detach(), 1e-5, True)
    want = F.relu(F.batch_norm(x3, None, None, w, b, True, 0.1, 1e-5))
    torch.testing.assert_close(y, want.detach())
    got = ref.batch_norm_bwd(dy3, x3.detach(), w.detach(), b.detach(), mean, var, 1e-5, True,
                             True)
    for a, b_ in zip(got, torch.autograd.grad(want, (x3, w, b), dy3)):
        torch.testing.assert_close(a, b_)


def _bad_calls(device):
    x = torch.randn(4, 8, device=device)
    x3 = torch.randn(2, 6, 5, device=device)
    stats = torch.zeros(4, device=device)
    ops = torch.ops.fastnorm
    return [
        (lambda: ops.layer_norm_fwd(x, torch.ones(7, device=device), None, 1e-5),
         "expected weight of shape [8]"),
        (lambda: ops.layer_norm_fwd(x[None], None, None, 1e-5), "expected x to be 2-D"),
        (lambda: ops.layer_norm_fwd(x.t(), None, None, 1e-5), "unit column stride"),
        (lambda: ops.layer_norm_bwd(x[:3], x, None, None, stats, stats), "expected dy of x's"),
        (lambda: ops.layer_norm_bwd(x, x, None, None, stats.double(), stats),
         "expected mean in torch.float32"),
        (lambda: ops.rms_norm_bwd(x, x, None, stats[:3]), "expected rstd of shape [4]"),
        (lambda: ops.add_layer_norm_fwd(x, x[:2], None, None, 1e-5, True, False, "none", True),
         "expected residual of x's shape"),
        (lambda: ops.group_norm_fwd(x3, None, None, 4, 1e-5, "none"), "divisible by"),
        (lambda: ops.group_norm_bwd(x3, x3, None, None, stats, stats, 3, "none"),
         "expected mean of shape [2, 3]"),
        (lambda: ops.batch_norm_apply(x3, stats, stats, None, None, 1e-5, False),
         "expected mean of shape [6]"),
        (lambda: ops.batch_norm_fwd(x, None, None, 1e-5, False), "expected x to be 3-D"),
        (lambda: ops.layer_norm_2d_bwd(x3, x3, None, None, stats, stats),
         "expected mean of shape [2, 5]"),
        (lambda: ops.batch_norm_backward_elemt(x3, x3, *[torch.zeros(6, device=device)] * 6,
                                               torch.ones(2, device=device), 1e-5, False),
         "1-element"),
    ]


@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_bad_arguments_fail_in_the_op(mode, backend):
    """A direct torch.ops.fastnorm call with bad shapes/dtypes fails with a message naming the
    argument, before any kernel runs (eagerly) and in the fake (what torch.compile traces)."""
    for call, fragment in _bad_calls(DEVICE):
        if mode == "fake":
            with FakeTensorMode(allow_non_fake_inputs=True):
                with pytest.raises(RuntimeError, match=re.escape(fragment)):
                    call()
        else:
            with pytest.raises(RuntimeError, match=re.escape(fragment)):
                call()


@pytest.mark.parametrize("family", ["layer_norm", "group_norm", "batch_norm"])
def test_gradcheck_float64(family, backend):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fns = {"layer_norm": lambda x, w, b: fastnorm.layer_norm(x.transpose(1, 2), (4,), w, b),
           "group_norm": lambda x, w, b: fastnorm.group_norm(x, 2, w, b, activation="silu"),
           "batch_norm": lambda x, w, b: fastnorm.batch_norm(x, None, None, w, b, True)}
    # (fast_mode: one random projection of the Jacobian, so interpreted kernels stay quick; the
    # per-family files run full-Jacobian gradchecks on Triton.)
    assert torch.autograd.gradcheck(fns[family], (x, w, b), fast_mode=backend != "reference")


# --- the router --------------------------------------------------------------------------------

class _Probe:
    """Just what the router reads from a tensor, so its CUDA rows can be checked on any
    machine."""

    def __init__(self, dtype=torch.float32, shape=(8, 4096), is_cuda=True):
        self.dtype, self.shape, self.is_cuda = dtype, shape, is_cuda
        self.device = torch.device("cuda" if is_cuda else "cpu")

    def is_contiguous(self):
        return True

    def transpose(self, *_):
        return self


@pytest.fixture
def router_with_cuda(monkeypatch):
    """The router as it is with fastnorm._C loaded (implementing the LayerNorm ops) and Triton
    available; `entries` is the auto table's measured entries."""
    entries = {}
    monkeypatch.setattr(_router, "cuda_ops", lambda: frozenset({"layer_norm_fwd"}))
    monkeypatch.setattr(_router, "_triton_ok", lambda: True)
    monkeypatch.setattr(_router, "auto_table", lambda: {"entries": entries})
    monkeypatch.setattr(_router, "_auto_ops",
                        lambda: frozenset(key.split(":", 1)[0] for key in entries))
    return entries


@pytest.mark.parametrize("selected,probe,want", [
    ("auto", _Probe(), "triton"),                            # no measured entry: Triton
    ("cuda", _Probe(), "cuda"),
    ("cuda", _Probe(torch.float64), "triton"),               # fp64: the C++ side lacks it
    ("triton", _Probe(), "triton"),
    ("reference", _Probe(), "reference"),
    ("torch", _Probe(), "reference"),
    ("auto", _Probe(is_cuda=False), "reference"),
    ("cuda", _Probe(is_cuda=False), "reference"),
])
def test_router_table(router_with_cuda, monkeypatch, selected, probe, want):
    monkeypatch.setattr(fastnorm._backend, "_current", selected)
    assert _router.choose("layer_norm_fwd", probe) == want
    # An op fastnorm._C does not implement never goes to it.
    assert _router.choose("add_layer_norm_fwd", probe) == ("triton" if want == "cuda" else want)


def test_router_auto_follows_measured_entries(router_with_cuda, monkeypatch):
    monkeypatch.setattr(fastnorm._backend, "_current", "auto")
    probe = _Probe(torch.bfloat16, (16, 65536))
    key = _router.case_key("layer_norm_fwd", probe)
    assert key == "layer_norm_fwd:bfloat16:rows:65536"
    router_with_cuda[key] = "cuda"
    assert _router.choose("layer_norm_fwd", probe) == "cuda"
    assert _router.choose("layer_norm_fwd", _Probe(torch.bfloat16, (16, 4096))) == "triton"
    monkeypatch.setattr(_router, "_triton_ok", lambda: False)  # no Triton: C++ where it can
    assert _router.choose("layer_norm_fwd", _Probe()) == "cuda"
    assert _router.choose("add_layer_norm_fwd", _Probe()) == "reference"


def test_committed_auto_table_is_well_formed():
    _router.auto_table.cache_clear()
    table = _router.auto_table()
    assert {"card", "date", "versions", "entries"} <= set(table)
    assert all(v in ("triton", "cuda") for v in table["entries"].values())
    # Entries come only from measurements, which carry the card and date they were taken on.
    assert not table["entries"] or (table["card"] and table["date"])


def test_ops_register_without_triton():
    """Registration imports no Triton: with triton unimportable the ops still run (reference)."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, fastnorm\n"
            "x = torch.randn(3, 5)\n"
            "y, mean, rstd = torch.ops.fastnorm.layer_norm_fwd(x, None, None, 1e-5)\n"
            "torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (5,)))\n"
            "with fastnorm.use_backend('reference'):\n"
            "    y = fastnorm.group_norm(torch.randn(2, 4, 3), 2)\n"
            "print('triton' in sys.modules and sys.modules['triton'] is not None,"
            " fastnorm.available_backends())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False") and "'triton'" not in out.stdout, out.stdout


def test_compile_fullgraph(backend):
    """The ops under torch.compile(fullgraph=True) on each kernel set: LayerNorm, GroupNorm+SiLU
    and training BatchNorm+ReLU (running stats updated), forward and backward, as eager."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, device=DEVICE)
    w, b = torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE)

    def fn(x, w, b, running_mean, running_var):
        y = fastnorm.layer_norm(x.transpose(1, 2), (6,), w, b).transpose(1, 2)
        y = fastnorm.group_norm(y, 3, w, b, activation="silu")
        return fastnorm.batch_norm(y, running_mean, running_var, w, b, True, activation="relu")

    compiled = torch.compile(fn, fullgraph=True,
                             backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    results = []
    for f in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        stats = [torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)]
        y = f(*leaves, *stats)
        y.square().sum().backward()
        results.append([y.detach(), *stats, *(t.grad for t in leaves)])
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
