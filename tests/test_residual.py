"""Fused residual add + LayerNorm/RMSNorm (`residual=`, `prenorm=`, `residual_in_fp32=`, and the
in-place `fused_add_rms_norm_`) against the unfused torch form `h = x + r; y = norm(h)`."""
import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_DTYPES, assert_close_ref

import fastnorm

pytestmark = pytest.mark.usefixtures("triton_backend")


@pytest.fixture(autouse=True)
def _on_test_device(device):
    """Tensors made without a device land on the test device (CUDA on a GPU machine)."""
    with torch.device(device):
        yield


def _unfused(kind, x, r, w, b, residual_in_fp32=False):
    h_dtype = torch.float32 if residual_in_fp32 and x.dtype != torch.float64 else r.dtype
    h = x.to(h_dtype) + r.to(h_dtype)
    wc = None if w is None else w.to(h.dtype)
    if kind == "layer":
        y = F.layer_norm(h, h.shape[-1:], wc, None if b is None else b.to(h.dtype), 1e-5)
    else:
        y = F.rms_norm(h, h.shape[-1:], wc, 1e-5)
    return y.to(x.dtype), h


def _fused(kind, x, r, w, b, **kw):
    if kind == "layer":
        return fastnorm.layer_norm(x, x.shape[-1:], w, b, 1e-5, residual=r, prenorm=True, **kw)
    return fastnorm.rms_norm(x, x.shape[-1:], w, 1e-5, residual=r, prenorm=True, **kw)


def _run(fn, leaves, dy, dh):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y, h = fn(*leaves)
    torch.autograd.backward((y, h), (dy.to(y.dtype), dh.to(h.dtype)))
    return [y, h] + [t.grad for t in leaves]


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("M,N", [(13, 7), (3, 1000)])
def test_matches_unfused(kind, dtype, M, N):
    torch.manual_seed(0)
    x, r, dy, dh = (torch.randn(M, N, dtype=torch.float64).to(dtype) for _ in range(4))
    w, b = (torch.randn(N, dtype=torch.float64).to(dtype) for _ in range(2))
    leaves = (x, r, w, b)
    got = _run(lambda *a: _fused(kind, *a), leaves, dy, dh)
    want = _run(lambda *a: _unfused(kind, *a), [t.double() for t in leaves], dy, dh)
    base = _run(lambda *a: _unfused(kind, *a), leaves, dy, dh) if dtype != torch.float64 else None
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(got[1], x + r)  # the same IEEE add as torch
    names = ("y", "h", "dx", "dr", "dw", "db")
    for i, name in enumerate(names):
        if kind == "rms" and name == "db":
            assert got[i] is None
            continue
        assert got[i].dtype == dtype, name
        assert_close_ref(got[i], want[i], None if base is None else base[i], name=f"{kind} {name}")


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_in_fp32(kind, dtype):
    torch.manual_seed(1)
    x, dy = torch.randn(6, 300).to(dtype), torch.randn(6, 300).to(dtype)
    dh = torch.randn(6, 300)
    w, b = torch.randn(300).to(dtype), torch.randn(300).to(dtype)
    for r in (torch.randn(6, 300).to(dtype), torch.randn(6, 300)):  # low-precision and fp32 stream
        fused = lambda *a: _fused(kind, *a, residual_in_fp32=True)  # noqa: E731
        got = _run(fused, (x, r, w, b), dy, dh)
        want = _run(lambda *a: _unfused(kind, *a, residual_in_fp32=True),
                    [t.double() for t in (x, r, w, b)], dy, dh)
        base = _run(lambda *a: _unfused(kind, *a, residual_in_fp32=True), (x, r, w, b), dy, dh)
        assert got[1].dtype == torch.float32
        assert torch.equal(got[1], x.float() + r.float())
        assert got[3].dtype == r.dtype and got[2].dtype == dtype
        for i, name in enumerate(("y", "h", "dx", "dr", "dw")):
            assert_close_ref(got[i], want[i], base[i], name=f"{kind} {name}")


def test_chunked_rows_and_return_conventions():
    torch.manual_seed(2)
    x, r = torch.randn(2, 20000), torch.randn(2, 20000)  # N past the fused limits
    w = torch.randn(20000)
    y_only = fastnorm.rms_norm(x, (20000,), w, 1e-6, residual=r)  # prenorm=False: y only
    y, h = fastnorm.rms_norm(x, (20000,), w, 1e-6, residual=r, prenorm=True)
    assert torch.equal(h, x + r) and torch.equal(y, y_only)
    torch.testing.assert_close(y, F.rms_norm(x + r, (20000,), w, 1e-6))
    # no residual + prenorm: the stream starts as x itself (in fp32 with residual_in_fp32)
    xb = torch.randn(3, 4, 16, dtype=torch.bfloat16)
    y, h = fastnorm.layer_norm(xb, (16,), prenorm=True)
    assert h is xb
    y, h = fastnorm.layer_norm(xb, (16,), prenorm=True, residual_in_fp32=True)
    assert h.dtype == torch.float32 and torch.equal(h, xb.float())
    torch.testing.assert_close(y, F.layer_norm(xb, (16,)))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_chunked_backward_with_residual_gradient(kind):
    torch.manual_seed(3)
    leaves = [torch.randn(2, 9000, dtype=torch.float64) for _ in range(2)] + \
             [torch.randn(9000, dtype=torch.float64) for _ in range(2)]
    dy, dh = torch.randn(2, 9000, dtype=torch.float64), torch.randn(2, 9000, dtype=torch.float64)
    got = _run(lambda *a: _fused(kind, *a), leaves, dy, dh)
    want = _run(lambda *a: _unfused(kind, *a), leaves, dy, dh)
    for g, w_ in zip(got, want):
        if w_ is not None:
            torch.testing.assert_close(g, w_, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gradcheck_float64(kind):
    torch.manual_seed(4)
    x, r = (torch.randn(4, 9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(9, dtype=torch.float64, requires_grad=True) for _ in range(2))
    both = lambda *a: _fused(kind, *a)  # noqa: E731
    assert torch.autograd.gradcheck(both, (x, r, w, b))
    # y only: the residual stream's gradient is absent (no zero tensor is made for it)
    assert torch.autograd.gradcheck(lambda *a: both(*a)[0], (x, r, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda *a: both(*a)[1].sin().sum(), (x, r, w, b),
                                    fast_mode=True)


def test_opcheck():
    x, r = torch.randn(6, 33), torch.randn(6, 33)
    w, b = torch.randn(33, requires_grad=True), torch.randn(33, requires_grad=True)
    xg = x.clone().requires_grad_()
    op = torch.ops.fastnorm
    fwd = op.add_layer_norm_fwd.default
    # (x, residual, weight, bias, eps, is_rms, residual_in_fp32, rounding, store_residual)
    torch.library.opcheck(fwd, (xg, r, w, b, 1e-5, False, False, "none", True))
    torch.library.opcheck(fwd, (x, r, None, None, 1e-5, True, False, "none", True))
    torch.library.opcheck(fwd, (x.bfloat16(), r, w.detach().bfloat16(), None, 1e-5, True, True,
                                "llama", True))
    torch.library.opcheck(fwd, (xg.half(), None, w.half(), None, 1e-5, True, False, "t5", True))
    torch.library.opcheck(fwd, (x, r, w.detach(), b.detach(), 1e-5, False, False, "none", False))
    y, h, mean, rstd = op.add_layer_norm_fwd(x, r, w.detach(), b.detach(), 1e-5, False, False,
                                             "none", True)
    dy = torch.randn_like(y)
    torch.library.opcheck(op.add_layer_norm_bwd.default,
                          (dy, torch.randn_like(h), h, w.detach(), b.detach(), mean, rstd, False,
                           "none"))
    torch.library.opcheck(op.add_layer_norm_bwd.default,
                          (dy, None, h, None, None, mean, rstd, False, "none"))
    torch.library.opcheck(op.add_layer_norm_inplace.default,
                          (x.clone(), r.clone(), w.detach(), None, 1e-5, True))


def test_torch_compile_fullgraph():
    torch.manual_seed(5)

    def block(x, r, w, b):
        y, h = fastnorm.rms_norm(x, (32,), w, 1e-6, residual=r, prenorm=True)
        z = fastnorm.layer_norm(y * 2, (32,), w, b, residual=h)
        return z.square().sum() + h.sin().sum()

    leaves = [torch.randn(5, 32, requires_grad=True) for _ in range(2)] + \
             [torch.randn(32, requires_grad=True) for _ in range(2)]
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(out, leaves)
    ref = block(*leaves)
    torch.testing.assert_close(out, ref)
    for g, gr in zip(grads, torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("N", [48, 20000])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_add_rms_norm_inplace(N, backend):
    torch.manual_seed(6)
    x, r, w = torch.randn(3, 2, N), torch.randn(3, 2, N), torch.randn(N)
    x_in, r_in = x.clone(), r.clone()
    with fastnorm.use_backend(backend):
        assert fastnorm.fused_add_rms_norm_(x_in, r_in, w, 1e-6) is None
    assert torch.equal(r_in, x + r)
    torch.testing.assert_close(x_in, F.rms_norm(x + r, (N,), w, 1e-6))


def test_torch_backend_matches():
    torch.manual_seed(7)
    x, r = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 64)
    w, b = torch.randn(64), torch.randn(64)
    y, h = fastnorm.layer_norm(x, (64,), w, b, residual=r, prenorm=True)
    with fastnorm.use_backend("torch"):
        yt, ht = fastnorm.layer_norm(x, (64,), w, b, residual=r, prenorm=True)
    assert torch.equal(h, ht) and h.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, yt, atol=2e-2, rtol=1e-2)


def test_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        fastnorm.rms_norm(x, (8,), residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="residual must have the input's dtype"):
        fastnorm.layer_norm(x, (8,), residual=torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="residual must have the input's dtype"):
        fastnorm.fused_add_rms_norm_(x.bfloat16(), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="no backward"):
        fastnorm.fused_add_rms_norm_(x.requires_grad_(), torch.randn(4, 8), None)


@pytest.mark.parametrize("N", [40, 20000])  # fused and chunked forward
def test_residual_stream_not_written_when_unused(N):
    torch.manual_seed(8)
    x, r, w = torch.randn(3, N, dtype=torch.bfloat16), torch.randn(3, N), torch.randn(N)
    y, h, _mean, _rstd = torch.ops.fastnorm.add_layer_norm_fwd(x, r, w, None, 1e-6, True, True,
                                                               "none", False)
    y_stored, h_stored, _m, _r = torch.ops.fastnorm.add_layer_norm_fwd(x, r, w, None, 1e-6, True,
                                                                       True, "none", True)
    assert h.numel() == 0 and torch.equal(y, y_stored) and torch.equal(h_stored, x.float() + r)
    with torch.no_grad():  # the functional skips the write when neither h nor a backward is needed
        assert torch.equal(fastnorm.rms_norm(x, (N,), w, 1e-6, residual=r, residual_in_fp32=True),
                           y)
    xg = x.clone().requires_grad_()
    y_grad = fastnorm.rms_norm(xg, (N,), w, 1e-6, residual=r, residual_in_fp32=True)
    y_grad.float().sum().backward()  # stored for the backward
    assert xg.grad is not None
    yo = torch.ops.fastnorm.add_layer_norm_fwd(x.clone().requires_grad_(), r, w, None, 1e-6,
                                               True, True, "none", False)[0]
    with pytest.raises(RuntimeError, match="store_residual=False"):
        yo.float().sum().backward()


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_forward_ad_and_vmap_as_unfused(kind):
    """Tangents and torch.func transforms run torch's ops, as for the plain norms."""
    torch.manual_seed(0)
    x, r, vx, vr = (torch.randn(4, 6, dtype=torch.float64) for _ in range(4))
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    got = torch.func.jvp(lambda x, r: _fused(kind, x, r, w, b), (x, r), (vx, vr))
    want = torch.func.jvp(lambda x, r: _unfused(kind, x, r, w, b), (x, r), (vx, vr))
    for g, t in zip(got[1], want[1]):
        torch.testing.assert_close(g, t)
        assert g.abs().max() > 0
    per_row = torch.func.vmap(lambda x, r: _fused(kind, x, r, w, b)[0])(x, r)
    torch.testing.assert_close(per_row, _unfused(kind, x, r, w, b)[0])


def test_double_backward():
    """Without a residual, prenorm is the plain norm and differentiable twice; with one, a
    double backward raises an error that says what to do."""
    torch.manual_seed(0)
    x, r = (torch.randn(3, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w: fastnorm.rms_norm(x, (8,), w, prenorm=True)[0].sin().sum(), (x, w))
    y, h = fastnorm.layer_norm(x, (8,), w, residual=r, prenorm=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported; compute h"):
        torch.autograd.grad((y.sin() * h).sum(), (x,), create_graph=True)
