"""Semantics identical to torch, or a clear error: forward-mode AD, torch.func transforms (vmap,
jacrev, jacfwd, hessian), double backward, the dtype rules, autocast, TorchScript, and the edge
cases of issue 12 — each against torch itself, on both backends, in float64 on tiny shapes."""
import contextlib
import copy
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import fastnorm
from helpers import DEVICE

BACKENDS = ["torch", "triton"]
f64 = torch.float64


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fastnorm.use_backend(request.param):
        yield request.param


def _randn(*shape, dtype=f64, device=DEVICE):
    return torch.randn(*shape, dtype=dtype, device=device)


# Each case: (fastnorm f(x, w, b), torch f(x, w, b), x shape, parameter shape). BatchNorm's
# eval forms use fixed running statistics; training forms no running stats (a pure function).
_RM = torch.linspace(-0.5, 0.5, 3, dtype=f64, device=DEVICE)
_RV = torch.linspace(0.5, 2.0, 3, dtype=f64, device=DEVICE)
CASES = {
    "layer_norm": (lambda x, w, b: fastnorm.layer_norm(x, (5,), w, b),
                   lambda x, w, b: F.layer_norm(x, (5,), w, b), (3, 5), (5,)),
    "rms_norm": (lambda x, w, b: fastnorm.rms_norm(x, (5,), w) + b,
                 lambda x, w, b: F.rms_norm(x, (5,), w) + b, (3, 5), (5,)),
    "group_norm": (lambda x, w, b: fastnorm.group_norm(x, 3, w, b),
                   lambda x, w, b: F.group_norm(x, 3, w, b), (2, 6, 2), (6,)),
    "group_norm_silu": (lambda x, w, b: fastnorm.group_norm(x, 3, w, b, activation="silu"),
                        lambda x, w, b: F.silu(F.group_norm(x, 3, w, b)), (2, 6, 2), (6,)),
    "batch_norm": (lambda x, w, b: fastnorm.batch_norm(x, None, None, w, b, training=True),
                   lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                   (4, 3, 2), (3,)),
    "batch_norm_relu": (lambda x, w, b: fastnorm.batch_norm(x, None, None, w, b, True,
                                                            activation="relu"),
                        lambda x, w, b: F.relu(F.batch_norm(x, None, None, w, b, True)),
                        (4, 3, 2), (3,)),
    "batch_norm_eval": (lambda x, w, b: fastnorm.batch_norm(x, _RM, _RV, w, b, False),
                        lambda x, w, b: F.batch_norm(x, _RM, _RV, w, b, False), (4, 3, 2), (3,)),
    "batch_norm_eval_relu": (lambda x, w, b: fastnorm.batch_norm(x, _RM, _RV, w, b, False,
                                                                 activation="relu"),
                             lambda x, w, b: F.relu(F.batch_norm(x, _RM, _RV, w, b, False)),
                             (4, 3, 2), (3,)),
}


def _inputs(case, seed=0):
    torch.manual_seed(seed)
    _, _, xs, ps = CASES[case]
    return _randn(*xs) * 2 + 0.3, 1 + 0.5 * _randn(*ps), 0.3 * _randn(*ps)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_jvp_matches_torch(case, backend):
    ours, ref, _, _ = CASES[case]
    primals = _inputs(case)
    tangents = _inputs(case, seed=1)
    y, t = jvp(ours, primals, tangents)
    y_ref, t_ref = jvp(ref, primals, tangents)
    _close(y, y_ref)
    _close(t, t_ref)
    assert t.abs().max() > 0.1  # a real tangent, not the zeros of issue 12


@pytest.mark.parametrize("case", list(CASES))
def test_forward_ad_dual_tensors_match_torch(case, backend):
    ours, ref, _, _ = CASES[case]
    primals = _inputs(case)
    tangents = _inputs(case, seed=1)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        got = fwAD.unpack_dual(ours(*duals)).tangent
        want = fwAD.unpack_dual(ref(*duals)).tangent
    assert got is not None
    _close(got, want)
    # A tangent on the weight only still reaches the output.
    x, w, b = primals
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(x, fwAD.make_dual(w, tangents[1]), b)).tangent
        want = fwAD.unpack_dual(ref(x, fwAD.make_dual(w, tangents[1]), b)).tangent
    _close(got, want)


@pytest.mark.parametrize("case", list(CASES))
def test_vmap_grad_per_sample(case, backend):
    """Per-sample gradients (Opacus-style): vmap over a leading batch of independent inputs."""
    ours, ref, _, _ = CASES[case]
    xs = torch.stack([_inputs(case, seed=s)[0] for s in range(3)])
    _, w, b = _inputs(case)

    def loss(fn):
        return lambda x, w, b: (fn(x, w, b) ** 2 * torch.arange(x.numel(), dtype=f64)
                                .view(x.shape)).sum()

    got = vmap(grad(loss(ours), argnums=(0, 1, 2)), in_dims=(0, None, None))(xs, w, b)
    want = vmap(grad(loss(ref), argnums=(0, 1, 2)), in_dims=(0, None, None))(xs, w, b)
    for g, r in zip(got, want):
        _close(g, r)
    _close(vmap(ours, in_dims=(0, None, None))(xs, w, b),
           vmap(ref, in_dims=(0, None, None))(xs, w, b))


@pytest.mark.parametrize("case", list(CASES))
def test_jacobians_and_hessian(case, backend):
    ours, ref, _, _ = CASES[case]
    x, w, b = _inputs(case)
    _close(jacrev(ours, argnums=(0, 1))(x, w, b), jacrev(ref, argnums=(0, 1))(x, w, b))
    _close(jacfwd(ours, argnums=(0, 2))(x, w, b), jacfwd(ref, argnums=(0, 2))(x, w, b))

    def cube(fn):
        return lambda x: (fn(x, w, b) ** 3).sum()

    _close(hessian(cube(ours))(x), hessian(cube(ref))(x))


@pytest.mark.parametrize("case", list(CASES))
def test_double_backward(case, backend):
    """create_graph=True through the ops: the gradients are differentiable again."""
    ours, ref, _, _ = CASES[case]

    def second(fn):
        x, w, b = (t.clone().requires_grad_() for t in _inputs(case))
        gx, gw = torch.autograd.grad((fn(x, w, b) ** 3).sum(), (x, w), create_graph=True)
        return torch.autograd.grad((gx ** 2).sum() + gw.sum(), (x, w, b))

    for g, r in zip(second(ours), second(ref)):
        _close(g, r)


def test_gradgradcheck(backend):
    """Numerical second derivatives (one op: test_double_backward covers every op vs torch, and
    gradgradcheck runs the interpreted kernels hundreds of times)."""
    ours = CASES["layer_norm"][0]
    inputs = tuple(t.requires_grad_() for t in _inputs("layer_norm"))
    assert torch.autograd.gradgradcheck(ours, inputs)


def test_compiled_backward_still_runs_the_kernel(triton_backend):
    """The checks above are skipped under torch.compile: no graph break, and the compiled
    backward calls fastnorm's backward op (not torch's double-backward fallback)."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = AotEagerAndRecordGraphs()
    x, w, b = (t.requires_grad_() for t in _inputs("layer_norm"))
    fn = torch.compile(CASES["layer_norm"][0], fullgraph=True, backend=recorder)
    fn(x, w, b).sum().backward()
    _close(x.grad, torch.autograd.grad(F.layer_norm(x, (5,), w, b).sum(), x)[0])
    assert any("fastnorm.layer_norm_fwd" in g.code for g in recorder.fw_graphs)
    assert any("fastnorm.layer_norm_bwd" in g.code for g in recorder.bw_graphs)


# --- dtypes: fastnorm raises exactly when torch (CPU) raises ------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _outcome(fn):
    try:
        return fn().dtype
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        return type(exc)


def _t(device, dtype, *shape):
    return None if dtype is None else (torch.rand(*shape) + 0.5).to(device, dtype)


def _dtype_cases():
    opt = DTYPES + [None]
    for xd, wd, bd in itertools.product(DTYPES, opt, opt):
        yield "layer_norm", (xd, wd, bd)
        yield "group_norm", (xd, wd, bd)
        if bd is None:
            yield "rms_norm", (xd, wd, bd)
    for xd, pd, sd in itertools.product(DTYPES, opt, opt):
        yield "batch_norm_train", (xd, pd, sd)
        if sd is not None:
            yield "batch_norm_eval", (xd, pd, sd)
    for xd in DTYPES:  # weight and bias of different dtypes
        yield "batch_norm_train", (xd, (torch.float32, xd), None)


def _call(lib, op, dtypes, device=DEVICE):
    xd, pd, sd = dtypes
    wd, bd = pd if isinstance(pd, tuple) else (pd, pd)
    t = lambda dtype, *shape: _t(device, dtype, *shape)  # noqa: E731
    if op == "layer_norm":
        return lambda: lib.layer_norm(t(xd, 2, 4), (4,), t(wd, 4), t(bd, 4))
    if op == "rms_norm":
        return lambda: lib.rms_norm(t(xd, 2, 4), (4,), t(wd, 4))
    if op == "group_norm":
        return lambda: lib.group_norm(t(xd, 2, 4, 2), 2, t(wd, 4), t(bd, 4))
    training = op == "batch_norm_train"
    return lambda: lib.batch_norm(t(xd, 2, 4, 2), t(sd, 4), t(sd, 4), t(wd, 4), t(bd, 4),
                                  training)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_dtype_matrix_matches_torch(backend_name):
    """Every mix of input / weight / bias / running-stat dtypes: fastnorm accepts exactly what
    torch accepts (with the same output dtype) and raises where torch raises. On a GPU torch's
    rules on either device count: CUDA's F.layer_norm rejects some mixes its CPU kernel takes
    (16-bit input, fp32 weight), which fastnorm's kernels take on every device."""
    def raised(outcome):
        return isinstance(outcome, type) and issubclass(outcome, Exception)

    def same(got, want):
        return raised(got) == raised(want) and (raised(want) or got == want)

    differences = []
    with fastnorm.use_backend(backend_name):
        for op, dtypes in _dtype_cases():
            wants = {_outcome(_call(F, op, dtypes, device)) for device in {DEVICE.type, "cpu"}}
            got = _outcome(_call(fastnorm, op, dtypes))
            if not any(same(got, want) for want in wants):
                differences.append((op, dtypes, wants, got))
    assert not differences, differences[:10]


def test_float_num_groups_rejected(backend):
    x = _randn(2, 4, 3)
    with pytest.raises(TypeError, match="num_groups"):
        F.group_norm(x, 2.0)
    with pytest.raises(TypeError, match="'num_groups'.*must be int, not float"):
        fastnorm.group_norm(x, 2.0)


# --- autocast ------------------------------------------------------------------------------------

def _autocast_outputs(lib, device, xd):
    x = torch.randn(2, 4, 3, device=device, dtype=xd)
    w = torch.rand(4, device=device, dtype=torch.float32) + 0.5
    w3 = torch.rand(3, device=device, dtype=torch.float32) + 0.5
    return [lib.layer_norm(x, (3,)).dtype, lib.layer_norm(x, (3,), w3.to(xd), w3.to(xd)).dtype,
            lib.rms_norm(x, (3,)).dtype, lib.group_norm(x, 2, w.to(xd), w.to(xd)).dtype,
            lib.batch_norm(x, None, None, w.to(xd), w.to(xd), True).dtype]


@pytest.mark.parametrize("xd", DTYPES)
@pytest.mark.parametrize("fast", [torch.bfloat16, torch.float16])
def test_cpu_autocast_dtypes_match_torch(backend, xd, fast):
    if backend == "triton" and DEVICE.type == "cuda":
        pytest.skip("CPU autocast acts on CPU tensors, which the compiled Triton kernels do not "
                    "take (test_cuda_autocast_dtypes_match_torch covers the GPU)")
    with torch.autocast("cpu", dtype=fast):
        assert _autocast_outputs(fastnorm, "cpu", xd) == _autocast_outputs(F, "cpu", xd)


def test_cuda_autocast_rule_registered():
    """CUDA autocast runs torch's layer_norm / rms_norm / group_norm in float32; the fastnorm
    ops carry the same rule (checked numerically by the CUDA test below on a GPU)."""
    for op, aten in (("layer_norm_fwd", "layer_norm"), ("rms_norm_fwd", "rms_norm"),
                     ("group_norm_fwd", "group_norm")):
        # torch's rule, whatever the release (rms_norm joined the float32 list later)
        torch_casts = torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{aten}",
                                                                     "AutocastCUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{op}",
                                                              "AutocastCUDA") == torch_casts
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fastnorm::batch_norm_fwd",
                                                              "AutocastCUDA")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a CUDA device")
@pytest.mark.parametrize("xd", DTYPES)
def test_cuda_autocast_dtypes_match_torch(xd):
    with fastnorm.use_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        assert _autocast_outputs(fastnorm, "cuda", xd) == _autocast_outputs(F, "cuda", xd)
        x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(8, device="cuda", dtype=torch.float16)  # a mix autocast makes legal
        torch.testing.assert_close(fastnorm.layer_norm(x, (8,), w), F.layer_norm(x, (8,), w))


# --- TorchScript ---------------------------------------------------------------------------------

def test_torchscript_modules(backend):
    """torch.jit.script works on the modules and on a model holding them (a scripted module
    computes with torch's ops); outputs and running statistics equal eager ones."""
    torch.manual_seed(0)
    mods = [fastnorm.nn.LayerNorm(4), fastnorm.nn.RMSNorm(4), fastnorm.nn.GroupNorm(2, 4),
            fastnorm.nn.GroupNorm(2, 4, activation="silu"), fastnorm.nn.BatchNorm1d(4),
            fastnorm.nn.BatchNorm1d(4, momentum=None), fastnorm.nn.BatchNorm1d(4, affine=False),
            fastnorm.nn.BatchNorm1d(4, track_running_stats=False)]
    converted = nn.GroupNorm(2, 4)
    converted.__class__ = fastnorm.nn.GroupNorm  # what convert() does: no __init__ run
    mods.append(converted)
    for mod in mods:
        eager = mod.to(DEVICE, f64)
        scripted = torch.jit.script(copy.deepcopy(eager))
        for step in range(2):
            x = _randn(3, 4) * (step + 1)
            _close(scripted(x), eager(x))
        for (name, a), (_, b) in zip(scripted.state_dict().items(), eager.state_dict().items()):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)
    model = torch.jit.script(nn.Sequential(nn.Linear(4, 4), fastnorm.nn.LayerNorm(4),
                                           fastnorm.nn.RMSNorm(4)).to(DEVICE, f64))
    assert model(_randn(2, 4)).shape == (2, 4)


# --- edge semantics (issue 12 item 6) ------------------------------------------------------------

def test_float64_batch_norm_momentum_none_keeps_float64_running_stats(backend):
    """momentum=None: the cumulative average 1/num_batches_tracked in float64, as torch."""
    torch.manual_seed(0)
    ours = fastnorm.nn.BatchNorm1d(3, momentum=None).to(DEVICE, f64)
    ref = nn.BatchNorm1d(3, momentum=None).to(DEVICE, f64)
    for step in range(6):
        x = _randn(5, 3) * 3 + 1
        _close(ours(x), ref(x))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), atol=0, rtol=1e-15)


def test_batch_norm_momentum_none_raises_like_torch(backend):
    x, rm, rv = _randn(4, 3), _randn(3).zero_(), _randn(3).fill_(1)
    with pytest.raises(TypeError, match="'momentum'.*must be float, not NoneType"):
        F.batch_norm(x, rm, rv, training=True, momentum=None)
    with pytest.raises(TypeError, match="'momentum'.*must be float, not NoneType"):
        fastnorm.batch_norm(x, rm, rv, training=True, momentum=None)
    assert rm.eq(0).all() and rv.eq(1).all()  # raised before anything ran


@pytest.mark.parametrize("shape,groups", [((1, 4), 4), ((1, 4, 1), 4), ((1, 6, 1, 1), 6),
                                          ((2, 4), 4), ((1, 4, 1), 2)])
def test_group_norm_one_value_per_group_like_torch(backend, shape, groups):
    x = _randn(*shape)
    want = _outcome(lambda: F.group_norm(x, groups))
    got = _outcome(lambda: fastnorm.group_norm(x, groups))
    assert got == want
    if want is ValueError:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            fastnorm.group_norm(x, groups)
    else:
        _close(fastnorm.group_norm(x, groups), F.group_norm(x, groups))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_default_eps_is_torchs(backend, dtype):
    """eps=None: the computation type's eps (float32's for fp16/bf16/fp32), as torch >= 2.7."""
    torch.manual_seed(0)
    x = (_randn(4, 64) * 0.1).to(dtype)  # RMS 0.1, where the eps matters
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(fastnorm.rms_norm(x, (64,)), F.rms_norm(x, (64,)), atol=tol,
                               rtol=tol)
    module = fastnorm.nn.RMSNorm(64).to(DEVICE, dtype)
    torch.testing.assert_close(module(x), nn.RMSNorm(64).to(DEVICE, dtype)(x), atol=tol,
                               rtol=tol)
    opmath = torch.float64 if dtype == f64 else torch.float32
    assert torch.equal(fastnorm.rms_norm(x, (64,)),
                       fastnorm.rms_norm(x, (64,), eps=torch.finfo(opmath).eps))


def test_empty_normalized_shape_message_like_torch(backend):
    x = _randn(2, 3)
    for ours, ref in ((fastnorm.layer_norm, F.layer_norm), (fastnorm.rms_norm, F.rms_norm)):
        with pytest.raises(RuntimeError) as want:
            ref(x, ())
        with pytest.raises(RuntimeError) as got:
            ours(x, ())
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("shape", [(0,), (5,), (1,)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stats", [True, False])
def test_one_dim_batch_norm_inputs_like_torch(backend, shape, training, stats):
    """1-D inputs: torch returns an empty result for (0,) and raises otherwise; so does fastnorm."""
    def call(lib):
        rm, rv = ((torch.zeros(5, device=DEVICE), torch.ones(5, device=DEVICE)) if stats
                  else (None, None))
        return lib.batch_norm(torch.randn(*shape, device=DEVICE), rm, rv, training=training)

    want = _outcome(lambda: call(F))
    assert _outcome(lambda: call(fastnorm)) == want
    if not isinstance(want, type):
        assert call(fastnorm).shape == call(F).shape


# --- backend selection and packaging (issue 12 item 5) -------------------------------------------

def _run(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in env and k != "TRITON_INTERPRET"}
    full_env.update({k: v for k, v in env.items() if v is not None})
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                         text=True, timeout=120)
    return out.returncode, out.stdout.strip(), out.stderr


@pytest.mark.parametrize("value", ["true", "1", "0"])
def test_triton_interpret_read_like_triton(value):
    """fastnorm reads TRITON_INTERPRET as the installed Triton does: its knobs (Triton >= 3.4,
    "true" counts), or exactly "1" (Triton 3.3, whose JIT compiles with "true")."""
    code = ("import os, triton, fastnorm; from fastnorm import _backend\n"
            "try:\n    from triton import knobs; triton_says = bool(knobs.runtime.interpret)\n"
            "except ImportError:\n    triton_says = os.environ['TRITON_INTERPRET'] == '1'\n"
            "print(_backend.triton_interpreted(), triton_says, "
            "'triton' in fastnorm.available_backends())")
    import triton

    rc, out, err = _run(code, TRITON_INTERPRET=value)
    want = value == "1" or (value == "true" and hasattr(triton, "knobs"))
    assert rc == 0, err
    interpreted, triton_says, available = out.split()
    assert interpreted == triton_says == str(want), out
    if want:  # the kernels run on the CPU through the interpreter
        assert available == "True", out


def test_triton_interpret_set_after_import_is_a_clear_error():
    code = ("import os, torch, fastnorm; os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n    fastnorm.set_backend('triton')\nexcept RuntimeError as e:\n    print(e)\n")
    rc, out, err = _run(code, TRITON_INTERPRET=None)
    assert rc == 0 and "TRITON_INTERPRET changed after fastnorm was imported" in out, (out, err)


@pytest.mark.interpreter
def test_triton_interpret_unset_after_import_is_a_clear_error(monkeypatch, triton_backend):
    monkeypatch.setenv("TRITON_INTERPRET", "off")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET changed after fastnorm was imported"):
        fastnorm.layer_norm(torch.randn(2, 4), (4,))


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("FASTNORM_DEVICE_GUARD") == "0", reason="guard switched off")
def test_device_guard_rejects_a_test_that_ignores_the_suite_device(monkeypatch, triton_backend):
    """tests/conftest.py's guard: a test that neither takes the `device` fixture nor is marked
    `interpreter` may not hand the interpreted kernels CPU tensors (a GPU machine would not run
    them), also under a dry run; tensors of the suite's device pass."""
    import conftest
    from fastnorm.triton import _launch

    monkeypatch.setattr(conftest, "_device_aware", False)
    for context in (_launch.dry_run, contextlib.nullcontext):
        with context(), pytest.raises(AssertionError, match="without running on the suite"):
            fastnorm.layer_norm(torch.randn(2, 4), (4,))
    monkeypatch.setattr(conftest, "_device_aware", True)
    fastnorm.layer_norm(torch.randn(2, 4), (4,))


def test_version_single_source_and_typed_package():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rc, out, err = _run("import runpy, sys; sys.argv = ['setup.py', '--version']; "
                        "runpy.run_path('setup.py', run_name='__main__')")
    assert rc == 0 and out.splitlines()[-1] == fastnorm.__version__, err
    assert os.path.exists(os.path.join(root, "fastnorm", "py.typed"))
    assert os.path.exists(os.path.join(root, "LICENSE"))
