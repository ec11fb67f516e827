"""Per-example squared norms of the norm layers' dweight/dbias (fastnorm::layer_norm_bwd_pe):
against torch.func per-sample gradients, bitwise-unchanged outputs, on every backward path."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import fastnorm  # noqa: F401  (registers the ops)
from fastnorm import reference as ref
from fastnorm.triton import layer_norm as _ln
from fastnorm.triton import _common

from helpers import DEVICE

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


def _assert_long_rows_pe(got, plain, x, dy, w, bias, is_rms, dtype):
    """Per-example norms as vmap(grad); dx/dW/dB bitwise the plain backward's."""
    want = _per_sample_sq_norms(x, dy, w, bias, is_rms)
    torch.testing.assert_close(got[3], want[0], **TOL[dtype])
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    if bias is not None:
        torch.testing.assert_close(got[4], want[1], **TOL[dtype])
        assert torch.equal(got[2], plain[2])
    else:
        assert got[4].numel() == 0


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
    with _common.assume_sm_count(4):  # the interpreter's program count, on a GPU too
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
    with _ln.force_backward_path(path), _common.assume_sm_count(4):
        plan = _ln.plan_layer_norm(b * t, n, dtype, "bwd", rows.device, is_rms=is_rms,
                                   has_bias=bias is not None)
        assert plan.path == path and plan.rows_per_program < t  # examples span programs
        got = _ln.layer_norm_bwd_per_example(drows, rows, w, bias, mean, rstd, is_rms, t)
        plain = _ln.layer_norm_bwd(drows, rows, w, bias, mean, rstd, is_rms)
    _assert_long_rows_pe(got, plain, x, dy, w, bias, is_rms, dtype)


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


@pytest.mark.parametrize("dtype,is_rms,has_bias", [
    (torch.float32, False, True), (torch.bfloat16, True, False)])
def test_long_rows_per_example_row_chunks(triton_backend, dtype, is_rms, has_bias):
    """The column-chunked backward in 3 row chunks (a tiny assumed L2): examples of 3 rows span
    row groups of 2 rows and row chunks of 4 (example 1: rows 3-5, chunks 0 and 1); norms as
    vmap(grad), dx/dW/dB bitwise the plain backward's under the same plan."""
    b, t, n = 4, 3, 8200
    x, dy, w, bias, mean, rstd = _inputs(b, t, n, dtype, is_rms, has_bias, seed=4)
    rows, drows = x.reshape(b * t, n), dy.reshape(b * t, n)
    # A window of 3 partial rows and 4.5 rows of x and dy (as tests/test_layer_norm.py).
    l2 = 2 * (3 * n * 4 * (1 + int(bias is not None)) + int(4.5 * n * 2 * x.element_size()))
    with _common.assume_sm_count(4), _common.assume_l2_bytes(l2), \
            _ln.force_backward_path("chunked"):
        plan = _ln.plan_layer_norm(b * t, n, dtype, "bwd", rows.device, is_rms=is_rms,
                                   has_bias=bias is not None)
        assert (plan.chunk_rows, plan.rows_per_program) == (4, 2)
        got = _ln.layer_norm_bwd_per_example(drows, rows, w, bias, mean, rstd, is_rms, t)
        plain = _ln.layer_norm_bwd(drows, rows, w, bias, mean, rstd, is_rms)
    _assert_long_rows_pe(got, plain, x, dy, w, bias, is_rms, dtype)


def test_bad_rows_per_example_raises(triton_backend):
    y = torch.randn(6, 4, device=DEVICE)
    s = torch.ones(6, device=DEVICE)
    with pytest.raises(RuntimeError, match="rows_per_example"):
        torch.ops.fastnorm.layer_norm_bwd_pe(y, y, None, None, s, s, False, 4)


# --- GroupNorm (fastnorm::group_norm_bwd_pe) ---------------------------------------------------

def _gn_per_sample_sq_norms(x, dy, w, bias, groups, activation):
    """|d<y_n, dy_n>/dw|^2 and /db per example n (vmap(grad)) in the statistics dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa, dya = x.to(acc), dy.to(acc)
    # An absent weight / bias as ones / zeros, not differentiated (vmap of torch's
    # group_norm without a weight fails in its backward).
    wa = torch.ones(x.shape[1], dtype=acc, device=x.device) if w is None else w.to(acc)
    ba = torch.zeros(x.shape[1], dtype=acc, device=x.device) if bias is None else bias.to(acc)

    def loss(w_, b_, x_n, dy_n):
        y = F.group_norm(x_n[None], groups, w_, b_, 1e-5)
        return ((F.silu(y) if activation == "silu" else y) * dy_n[None]).sum()

    argnums = tuple(i for i, p in ((0, w), (1, bias)) if p is not None)
    grads = vmap(grad(loss, argnums=argnums), in_dims=(None, None, 0, 0))(wa, ba, xa, dya)
    return iter(g.square().sum(1) for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation,affine", [("none", (True, True)), ("silu", (True, True)),
                                               ("silu", (True, False)), ("none", (False, True))])
def test_group_norm_per_example_sq_norms(backend, dtype, channels_last, activation, affine):
    """Against vmap(grad), NCHW and channels-last (Triton: the fused path for NCHW);
    dx/dweight/dbias bitwise those of group_norm_bwd."""
    _check_group_norm_pe(dtype, channels_last, activation, affine, (3, 6, 10, 3), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation,affine", [("silu", (True, True)), ("none", (False, True))])
def test_group_norm_per_example_split_path(triton_backend, dtype, channels_last, activation,
                                           affine):
    """The Triton split path with several splits per sample (spatial extent past one tile:
    NCHW 2 splits of 4096, channels-last 5 of 1024)."""
    from fastnorm.triton import group_norm as _gn

    plan = _gn.GroupNormPlan.make(2, 4, 4100, dtype, channels_last, DEVICE, 1)
    assert plan.num_splits > 1
    _check_group_norm_pe(dtype, channels_last, activation, affine, (2, 4, 4100, 2), 1)


def _check_group_norm_pe(dtype, channels_last, activation, affine, shape, split_size):
    from fastnorm.triton import group_norm as _gn

    n, c, s, groups = shape
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, s, generator=gen).to(DEVICE, dtype)
    dy = torch.randn(n, c, s, generator=gen).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(c, generator=gen)).to(DEVICE, dtype) if affine[0] else None
    b = torch.randn(c, generator=gen).to(DEVICE, dtype) if affine[1] else None
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    _y, mean, rstd = ref.group_norm_fwd(x, w, b, groups, 1e-5, activation)
    if split_size is None:
        got = torch.ops.fastnorm.group_norm_bwd_pe(dy, x, w, b, mean, rstd, groups, activation)
        plain = torch.ops.fastnorm.group_norm_bwd(dy, x, w, b, mean, rstd, groups, activation)
    else:
        got = _gn.group_norm_bwd(dy, x, w, b, mean, rstd, groups, activation, split_size,
                                 per_example=True)
        plain = _gn.group_norm_bwd(dy, x, w, b, mean, rstd, groups, activation, split_size)
    want = _gn_per_sample_sq_norms(x, dy, w, b, groups, activation)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    for present, sq in ((w is not None, got[3]), (b is not None, got[4])):
        assert sq.dtype == stats
        if present:
            torch.testing.assert_close(sq, next(want), **TOL[dtype])
        else:
            assert sq.numel() == 0
    for a, p in zip(got[:3], plain):
        assert (a is None and (p is None or p.numel() == 0)) or torch.equal(a, p)


def test_group_norm_per_example_empty_and_errors(backend):
    x = torch.randn(0, 4, 3, device=DEVICE)
    stats = torch.empty(0, 2, device=DEVICE)
    w = torch.ones(4, device=DEVICE)
    out = torch.ops.fastnorm.group_norm_bwd_pe(x, x, w, None, stats, stats, 2, "none")
    assert out[3].shape == (0,) and out[4].numel() == 0
    y = torch.randn(2, 4, 3, device=DEVICE)
    s = torch.ones(2, 2, device=DEVICE)
    with pytest.raises(RuntimeError, match="divisible"):
        torch.ops.fastnorm.group_norm_bwd_pe(y, y, None, None, s, s, 3, "none")
