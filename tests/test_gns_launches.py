"""The per-example (noise-scale) backward's host path and its two ways of summing examples.

Launches and torch ops per call are counted, not timed, under dry_run (nothing executes), as in
tests/test_host_path.py: the per-example backward is the plain backward's launches plus one
(_per_example_sq_kernel, both parameters in one launch), the noise-scale backward (the sink's
gradient) plus two (fastnorm::gns_sums, one program), on every LayerNorm backward path and
both GroupNorm paths, and the torch ops it adds are allocations only: no fill, copy, gather,
reduction or host-to-device copy. Then, through the interpreter, the tile kernel's two ways of
keeping an example's sums (in registers, or added into its slot rows at 16 warps) against the
torch reference, with dx/dW/dB bitwise the plain backward's, and empty batches.
"""
from collections import Counter

import pytest
import torch

import fastnorm
from fastnorm import reference as ref
from fastnorm.functional import _group_norm_with_gns, _norm_with_gns
from fastnorm.triton import _common
from fastnorm.triton import _launch
from fastnorm.triton import group_norm as _gn
from fastnorm.triton import layer_norm as _ln
from helpers import DEVICE

# What the per-example work may add to a backward's torch ops: its workspace and outputs, and
# the sink's gradient accumulation. Anything that launches a device kernel of torch's own
# (a fill, copy, cast, gather, reduction, torch.tensor(...) upload) is a regression.
ALLOWED_EXTRA = {"aten::empty", "aten::new_empty", "aten::add_"}
FORBIDDEN = {"aten::zeros", "aten::fill_", "aten::zero_", "aten::copy_", "aten::_to_copy",
             "aten::to", "aten::lift_fresh", "aten::index", "aten::cat", "aten::stack",
             "aten::sum", "aten::square", "aten::arange", "aten::where", "aten::mul"}


def _aten_ops(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return [e.name for e in events
            if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]


def _count(fn):
    """(Triton launches, top-level torch ops) of one call of fn, after a warm-up call."""
    fn()
    before = _launch.launches
    fn()
    launches = _launch.launches - before
    return launches, _aten_ops(fn)


def _check_extra_ops(ops, plain_ops, most):
    extra = Counter(ops) - Counter(plain_ops)
    assert set(extra) <= ALLOWED_EXTRA and sum(extra.values()) <= most, extra
    assert not FORBIDDEN & set(ops), ops


def _rows(m, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    dy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    return x, dy, w, b


# (M, N, rows per example, forced long-row path, assumed L2 bytes): the whole-row tile with
# BLOCK_M > 1, BLOCK_M = 1 in registers (N 3000) and in slot rows (N 6000: 16 warps), the
# persistent rows kernel, the column-chunked pair and its row chunks (a tiny assumed L2).
LN_CASES = {"fused": (96, 64, 8, None, None), "fused-4096": (24, 3000, 6, None, None),
            "fused-8192": (24, 6000, 6, None, None), "rows": (24, 8200, 6, "rows", None),
            "chunked": (24, 8200, 6, "chunked", None),
            "row-chunks": (24, 8200, 6, "chunked", 2 * 8 * 8200 * 12)}


def _ln_context(path, l2):
    import contextlib

    stack = contextlib.ExitStack()
    if path is not None:
        stack.enter_context(_ln.force_backward_path(path))
    if l2 is not None:
        stack.enter_context(_common.assume_l2_bytes(l2))
    return stack


@pytest.mark.parametrize("case", sorted(LN_CASES))
@pytest.mark.parametrize("is_rms", [False, True])
def test_layer_norm_per_example_backward_is_the_plain_one_plus_one_launch(case, is_rms):
    m, n, rpe, path, l2 = LN_CASES[case]
    x, dy, w, b = _rows(m, n)
    b = None if is_rms else b
    stats = torch.empty(m, device=DEVICE)
    with fastnorm.use_backend("triton"), _launch.dry_run(), _ln_context(path, l2):
        plan = _ln.plan_layer_norm_per_example(m, n, x.dtype, x.device, rows_per_example=rpe,
                                               is_rms=is_rms, has_bias=b is not None)
        if case == "row-chunks":
            assert len(_ln.LayerNormPlan.row_chunks(m, plan.chunk_rows)) > 1
        plain, plain_ops = _count(lambda: _ln.layer_norm_bwd(dy, x, w, b, stats, stats, is_rms))
        pe, pe_ops = _count(lambda: _ln.layer_norm_bwd_per_example(dy, x, w, b, stats, stats,
                                                                   is_rms, rpe))
    assert pe == plain + 1
    # ... which is what the plan the static report models says (the "." entries are bytes).
    assert pe == len([l for l in plan.launches if "." not in l.kernel])
    assert plan.launches[-1].kernel == "_per_example_sq_kernel"
    # Slot rows (one per parameter) and the per-example outputs.
    _check_extra_ops(pe_ops, plain_ops, 4)


def _ln_gns_calls(m, n, rpe, is_rms):
    x, dy, w, b = _rows(m, n)
    x.requires_grad_()
    w.requires_grad_()
    b = None if is_rms else b.requires_grad_()
    sink = torch.zeros(4, device=DEVICE, requires_grad=True)
    examples = x.view(m // rpe, rpe, n)
    dy_examples = dy.view(m // rpe, rpe, n)

    def plain():
        y = (fastnorm.rms_norm(examples, (n,), w, 1e-6) if is_rms
             else fastnorm.layer_norm(examples, (n,), w, b))
        y.backward(dy_examples)

    def gns():
        _norm_with_gns(examples, (n,), w, b, 1e-6, is_rms, sink).backward(dy_examples)

    def forward():
        _norm_with_gns(examples, (n,), w, b, 1e-6, is_rms, sink)

    return plain, gns, forward


@pytest.mark.parametrize("case", ["fused", "fused-8192", "rows", "chunked"])
@pytest.mark.parametrize("is_rms", [False, True])
def test_layer_norm_noise_scale_backward_is_the_plain_one_plus_two_launches(case, is_rms):
    """Forward + backward of the tracked norm against the plain norm's: the same forward, and
    a backward of the plain launches + the per-example reduction + the noise-scale sums."""
    m, n, rpe, path, l2 = LN_CASES[case]
    plain, gns, forward = _ln_gns_calls(m, n, rpe, is_rms)
    with fastnorm.use_backend("triton"), _launch.dry_run(), _ln_context(path, l2):
        plain_launches, plain_ops = _count(plain)
        gns_launches, gns_ops = _count(gns)
        fwd_launches, _ = _count(forward)
    assert fwd_launches == 1
    assert gns_launches == plain_launches + 2
    # Slot rows, per-example outputs, the sums, the sink's gradient accumulation; RMSNorm: one
    # slot buffer and norm less, but zero-size stand-ins for the absent bias's outputs and the
    # forward's mean.
    _check_extra_ops(gns_ops, plain_ops, 7)


@pytest.mark.parametrize("shape", [(2, 32, 4, 4), (4, 32, 64, 64)])  # fused, split path
def test_group_norm_per_example_and_noise_scale_launches(shape):
    g = torch.Generator().manual_seed(0)
    x, dy = (torch.randn(*shape, generator=g).to(DEVICE) for _ in range(2))
    w, b = (torch.randn(shape[1], generator=g).to(DEVICE) for _ in range(2))
    view = x.view(shape[0], shape[1], -1)
    dview = dy.view(shape[0], shape[1], -1)
    stats = torch.empty(shape[0], 8, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    sink = torch.zeros(4, device=DEVICE, requires_grad=True)
    with fastnorm.use_backend("triton"), _launch.dry_run(), _common.assume_sm_count(4):
        split = _gn.plan_group_norm(shape[0], shape[1], view.shape[2], 8, x.dtype, False, "bwd",
                                    x.device)[0] == "split"
        assert split == (shape[2] == 64)
        plain, plain_ops = _count(lambda: _gn.group_norm_bwd(dview, view, w, b, stats, stats, 8))
        pe, pe_ops = _count(lambda: _gn.group_norm_bwd(dview, view, w, b, stats, stats, 8,
                                                       per_example=True))
        fb, fb_ops = _count(lambda: fastnorm.group_norm(leaves[0], 8, leaves[1],
                                                        leaves[2]).backward(dy))
        gns, gns_ops = _count(lambda: _group_norm_with_gns(leaves[0], 8, leaves[1], leaves[2],
                                                           1e-5, None, sink).backward(dy))
    assert pe == plain + 1  # one launch for both parameters' per-sample norms
    _check_extra_ops(pe_ops, plain_ops, 2)
    assert gns == fb + 2
    _check_extra_ops(gns_ops, fb_ops, 4)


# --- the sums themselves (interpreter) ------------------------------------------------------------

@pytest.mark.parametrize("n,has_bias,in_slot", [(3000, True, False), (6000, True, True),
                                                (6000, False, False)])
@pytest.mark.parametrize("rpe", [2, 12])
def test_whole_row_tile_sums_in_registers_and_in_slot_rows(triton_backend, n, has_bias,
                                                            in_slot, rpe):
    """One row a tile (BLOCK_M 1): N 3000 keeps an example's sums in registers (8 warps), N 6000
    with both parameters adds them into the slot rows (16 warps: pe_in_slot), with one
    parameter in registers again. 12 rows over programs of 3: examples of 2 rows span programs
    and share them; one example of 12 spans all. Norms as the torch reference, dx/dW/dB
    bitwise the plain backward's, and deterministic."""
    m = 12
    x, dy, w, b = _rows(m, n, seed=5)
    b = b if has_bias else None
    _y, mean, rstd = ref.layer_norm_fwd(x, w, b, 1e-5)
    with _common.assume_sm_count(4):  # the interpreter's program count, on a GPU too
        plan = _ln.plan_layer_norm(m, n, x.dtype, "bwd", x.device, is_rms=False,
                                   has_bias=has_bias)
        assert (plan.path, plan.block_m, plan.rows_per_program) == ("fused", 1, 3)
        assert _ln.pe_in_slot(plan, True, has_bias) == in_slot
        got = _ln.layer_norm_bwd_per_example(dy, x, w, b, mean, rstd, False, rpe)
        again = _ln.layer_norm_bwd_per_example(dy, x, w, b, mean, rstd, False, rpe)
        plain = _ln.layer_norm_bwd(dy, x, w, b, mean, rstd, False)
    want = ref.layer_norm_bwd_pe(dy, x, w, b, mean, rstd, False, rpe)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-6)
    if has_bias:
        assert torch.equal(got[2], plain[2])
        torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-6)
    else:
        assert got[4].numel() == 0
    for a, c in zip(got, again):
        assert a is c is None or torch.equal(a, c)


def test_noise_scale_sums_match_the_torch_chain(triton_backend):
    """The sink's gradient from the one-program kernel: what the torch ops it replaces give
    from the same per-example backward's outputs."""
    m, n, rpe = 15, 24, 5
    x, dy, w, b = _rows(m, n, seed=6)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    sink = torch.zeros(4, device=DEVICE, requires_grad=True)
    _norm_with_gns(x.view(3, rpe, n), (n,), w, b, 1e-5, False, sink).backward(dy.view(3, rpe, n))
    _y, mean, rstd = torch.ops.fastnorm.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    _dx, dw, db, dw_sq, db_sq = torch.ops.fastnorm.layer_norm_bwd_pe(
        dy, x.detach(), w.detach(), b.detach(), mean, rstd, False, rpe)
    want = torch.stack([dw_sq.sum() + db_sq.sum(), dw.square().sum() + db.square().sum(),
                        torch.tensor(3.0, device=DEVICE), torch.tensor(1.0, device=DEVICE)])
    torch.testing.assert_close(sink.grad, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.grad, dw) and torch.equal(b.grad, db)


@pytest.mark.parametrize("family", ["layer_norm", "group_norm"])
def test_noise_scale_sums_of_an_empty_batch(backend, family):
    """No examples: no per-example sums, the batch's gradient 0, a count of 0."""
    w = torch.ones(6, device=DEVICE, requires_grad=True)
    b = torch.zeros(6, device=DEVICE, requires_grad=True)
    sink = torch.zeros(4, device=DEVICE, requires_grad=True)
    if family == "layer_norm":
        x = torch.randn(0, 3, 6, device=DEVICE, requires_grad=True)
        y = _norm_with_gns(x, (6,), w, b, 1e-5, False, sink)
    else:
        x = torch.randn(0, 6, 2, 2, device=DEVICE, requires_grad=True)
        y = _group_norm_with_gns(x, 3, w, b, 1e-5, None, sink)
    y.backward(torch.ones_like(y))
    assert sink.grad.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert not w.grad.any() and not b.grad.any()
