"""Per-example squared norms of the norm layers' dweight/dbias (fastnorm::layer_norm_bwd_pe):
against torch.func per-sample gradients, bitwise-unchanged outputs, on every backward path."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import fastnorm  # noqa: F401  (registers the ops)
from fastnorm import reference as ref
from fastnorm.triton import layer_norm as _ln

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Per-example sums are fp32 (fp64 for fp64) over rows_per_example terms.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=1e-4, atol=1e-5),
       torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _inputs(b, t, n, dtype, is_rms, has_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, n, generator=g).to(DEVICE, dtype)
    dy = torch.randn(b, t, n, generator=g).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    bias = torch.randn(n, generator=g).to(DEVICE, dtype) if has_bias and not is_rms else None
    rows = x.reshape(b * t, n)
    if is_rms:
        _y, rstd = ref.rms_norm_fwd(rows, w, 1e-6)
        mean = rstd.new_empty(0)
    else:
        _y, mean, rstd = ref.layer_norm_fwd(rows, w, bias, 1e-5)
    return x, dy, w, bias, mean, rstd


def _per_sample_sq_norms(x, dy, w, bias, is_rms):
    """|d<y_i, dy_i>/dw|^2 and /db per example i, by vmap(grad) in the statistics dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa, dya, wa = x.to(acc), dy.to(acc), w.to(acc)
    ba = None if bias is None else bias.to(acc)

    def loss(w_, b_, x_i, dy_i):
        y = (F.rms_norm(x_i, (x.shape[-1],), w_, 1e-6) if is_rms
             else F.layer_norm(x_i, (x.shape[-1],), w_, b_, 1e-5))
        return (y * dy_i).sum()

    argnums = (0,) if ba is None else (0, 1)
    grads = vmap(grad(loss, argnums=argnums), in_dims=(None, None, 0, 0))(wa, ba, xa, dya)
    return [g.square().sum(1) for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("is_rms,has_bias", [(False, True), (False, False), (True, False)])
def test_per_example_sq_norms_match_vmap_grad(backend, dtype, is_rms, has_bias):
    b, t, n = 3, 5, 24
    x, dy, w, bias, mean, rstd = _inputs(b, t, n, dtype, is_rms, has_bias)
    rows, drows = x.reshape(b * t, n), dy.reshape(b * t, n)
    dx, dw, db, dw_sq, db_sq = torch.ops.fastnorm.layer_norm_bwd_pe(
        drows, rows, w, bias, mean, rstd, is_rms, t)
    want = _per_sample_sq_norms(x, dy, w, bias, is_rms)
    # vmap recomputes the statistics; the kernels use the saved ones (fp32 either way).
    torch.testing.assert_close(dw_sq, want[0], **TOL[dtype])
    if bias is not None:
        torch.testing.assert_close(db_sq, want[1], **TOL[dtype])
    else:
        assert db_sq.numel() == 0
    # Outputs bitwise those of the plain backward.
    if is_rms:
        plain = torch.ops.fastnorm.rms_norm_bwd(drows, rows, w, rstd)
        got = (dx, dw)
    else:
        plain = torch.ops.fastnorm.layer_norm_bwd(drows, rows, w, bias, mean, rstd)
        got = (dx, dw, db)
    for a, p in zip(got, plain):
        assert torch.equal(a, p)


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("b,t", [(5, 300), (300, 5), (1500, 1), (1, 1500), (7, 211)])
def test_examples_spanning_tiles_and_programs(triton_backend, is_rms, b, t):
    """Examples larger than a program's rows, many examples a tile, one row an example: the
    slot sums over programs give the same as summing the rows of each example in torch."""
    n = 16
    x, dy, w, bias, mean, rstd = _inputs(b, t, n, torch.float32, is_rms, True, seed=1)
    rows, drows = x.reshape(b * t, n), dy.reshape(b * t, n)
    plan = _ln.plan_layer_norm(b * t, n, torch.float32, "bwd", rows.device, is_rms=is_rms,
                               has_bias=bias is not None)
    assert plan.path == "fused" and plan.partial_rows > 1  # several programs own the rows
    got = _ln.layer_norm_bwd_per_example(drows, rows, w, bias, mean, rstd, is_rms, t)
    want = ref.layer_norm_bwd_pe(drows, rows, w, bias, mean, rstd, is_rms, t)
    plain = _ln.layer_norm_bwd(drows, rows, w, bias, mean, rstd, is_rms)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    if not is_rms:
        assert torch.equal(got[2], plain[2])
        torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["rows", "chunked"])
@pytest.mark.parametrize("dtype,is_rms,has_bias", [
    (torch.float32, False, True), (torch.bfloat16, False, False), (torch.float32, True, False),
    (torch.bfloat16, True, False), (torch.float64, False, True)])
def test_long_rows_per_example(triton_backend, path, dtype, is_rms, has_bias):
    """Rows longer than the whole-row tile, on the persistent-rows and the column-chunked path:
    norms as vmap(grad), dx/dW/dB bitwise the plain backward's. 2 examples of 3 rows over
    programs of 2 rows each (3 on chunked, 3 or 4 on rows), so examples span programs and a
    program holds rows of 2 examples; fp64 at N > 4096."""
    b, t = 2, 3
    n = 5000 if dtype == torch.float64 else 8200
    x, dy, w, bias, mean, rstd = _inputs(b, t, n, dtype, is_rms, has_bias, seed=2)
    rows, drows = x.reshape(b * t, n), dy.reshape(b * t, n)
    with _ln.force_backward_path(path):
        plan = _ln.plan_layer_norm(b * t, n, dtype, "bwd", rows.device, is_rms=is_rms,
                                   has_bias=bias is not None)
        assert plan.path == path and plan.rows_per_program < t  # examples span programs
        got = _ln.layer_norm_bwd_per_example(drows, rows, w, bias, mean, rstd, is_rms, t)
        plain = _ln.layer_norm_bwd(drows, rows, w, bias, mean, rstd, is_rms)
    want = _per_sample_sq_norms(x, dy, w, bias, is_rms)
    torch.testing.assert_close(got[3], want[0], **TOL[dtype])
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    if bias is not None:
        torch.testing.assert_close(got[4], want[1], **TOL[dtype])
        assert torch.equal(got[2], plain[2])
    else:
        assert got[4].numel() == 0


@pytest.mark.parametrize("path", ["rows", "chunked"])
@pytest.mark.parametrize("t", [1, 3])
def test_long_rows_examples_in_one_program(triton_backend, path, t):
    """One row an example, and an example of 3 rows: slot rows per (program, example) with
    several rows of a program in one example (rows) and a column-chunked grid of 3 column blocks
    (chunked, N = 8200 > 2 * 4096), against the torch reference."""
    n = 8200
    x, dy, w, bias, mean, rstd = _inputs(2, t, n, torch.float32, False, True, seed=3)
    rows, drows = x.reshape(2 * t, n), dy.reshape(2 * t, n)
    with _ln.force_backward_path(path):
        got = _ln.layer_norm_bwd_per_example(drows, rows, w, bias, mean, rstd, False, t)
        again = _ln.layer_norm_bwd_per_example(drows, rows, w, bias, mean, rstd, False, t)
    want = ref.layer_norm_bwd_pe(drows, rows, w, bias, mean, rstd, False, t)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-6)
    for a, c in zip(got, again):  # deterministic
        assert torch.equal(a, c)


def test_bad_rows_per_example_raises(triton_backend):
    y = torch.randn(6, 4, device=DEVICE)
    s = torch.ones(6, device=DEVICE)
    with pytest.raises(RuntimeError, match="rows_per_example"):
        torch.ops.fastnorm.layer_norm_bwd_pe(y, y, None, None, s, s, False, 4)
