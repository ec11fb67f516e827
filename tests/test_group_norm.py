"""GroupNorm (optionally fused with SiLU): Triton kernels through fastnorm.group_norm and
fastnorm.nn.GroupNorm, against a float64 reference and torch.nn, in NCHW and channels-last.

Shapes stay small: on CPU the kernels run through Triton's interpreter, one program at a time.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
from fastnorm.triton import group_norm as gn_kernels
from fastnorm.triton._common import num_parallel_programs
from helpers import ALL_DTYPES, assert_close_ref

# The interpreter converts 1-element arrays to Python ints (loop bounds) the deprecated way.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x in NCHW ("nchw") or channels-last ("cl": channels innermost in memory, any rank)."""
    if layout == "nchw":
        return x.contiguous()
    perm = [0] + list(range(2, x.dim())) + [1]
    inverse = [0, x.dim() - 1] + list(range(1, x.dim() - 1))
    return x.permute(perm).contiguous().permute(inverse)


def _is_channels_last(t: torch.Tensor) -> bool:
    perm = [0] + list(range(2, t.dim())) + [1]
    return t.permute(perm).is_contiguous()


def _params(c, dtype, device, affine=True, seed=1):
    if not affine:
        return None, None
    gen = torch.Generator().manual_seed(seed)
    w = (1 + 0.5 * torch.randn(c, generator=gen)).to(device=device, dtype=dtype)
    b = (0.5 * torch.randn(c, generator=gen)).to(device=device, dtype=dtype)
    return w, b


def _grads(fn, x, w, b, dy):
    """fn(x, w, b) and the gradients wrt the tensors among (x, w, b) (None where absent)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = fn(*leaves)
    inputs = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, inputs, dy))
    return y.detach(), [next(grads) if t is not None else None for t in leaves]


def _torch_gn(groups, eps=1e-5, activation=None):
    def fn(x, w, b):
        y = F.group_norm(x, groups, w, b, eps)
        return F.silu(y) if activation == "silu" else y
    return fn


def _fast_gn(groups, eps=1e-5, activation=None):
    def fn(x, w, b):
        return fastnorm.group_norm(x, groups, w, b, eps, activation=activation)
    return fn


def _check_against_reference(x, groups, w, b, activation=None, eps=1e-5, dy=None):
    """Forward and backward of fastnorm vs a float64 reference, with torch at x's dtype as the
    yardstick for the allowed error; also checks the output/grad memory format."""
    gen = torch.Generator().manual_seed(2)
    if dy is None:
        dy = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    y, grads = _grads(_fast_gn(groups, eps, activation), x, w, b, dy)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y_ref, grads_ref = _grads(_torch_gn(groups, eps, activation), d(x), d(w), d(b), d(dy))
    y_torch, grads_torch = _grads(_torch_gn(groups, eps, activation), x, w, b, dy)
    assert y.dtype == x.dtype
    assert_close_ref(y, y_ref, y_torch, "y")
    for name, g, g_ref, g_torch, src in zip(("dx", "dweight", "dbias"), grads, grads_ref,
                                            grads_torch, (x, w, b)):
        if src is None:
            continue
        assert g.dtype == src.dtype, name
        assert_close_ref(g, g_ref, g_torch, name)
    # Channels-last stays channels-last; everything else comes back contiguous.
    if x.dim() > 2 and x.numel() > 0:
        if _is_channels_last(x) and not x.is_contiguous():
            assert _is_channels_last(y) and _is_channels_last(grads[0])
        else:
            assert y.is_contiguous() and grads[0].is_contiguous()
    return y, grads


# (shape, groups): 1-D, 2-D and 3-D spatial, no spatial dims, C/G not a power of two.
SHAPES = [((3, 12, 10), 4), ((2, 6, 5, 7), 2), ((2, 6, 3, 4, 5), 3), ((4, 10), 5)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
def test_forward_backward_vs_reference(triton_backend, device, dtype, layout, shape, groups):
    gen = torch.Generator().manual_seed(0)
    x = _to_layout(torch.randn(shape, generator=gen).to(device=device, dtype=dtype), layout)
    w, b = _params(shape[1], dtype, device)
    _check_against_reference(x, groups, w, b)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("groups", [1, 12], ids=["G=1", "G=C"])
def test_one_group_and_one_channel_per_group(triton_backend, device, layout, groups):
    x = _to_layout(torch.randn(2, 12, 3, 5, device=device), layout)
    w, b = _params(12, torch.float32, device)
    _check_against_reference(x, groups, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_silu_matches_silu_of_group_norm(triton_backend, device, dtype, layout):
    x = _to_layout(torch.randn(2, 6, 4, 5, device=device, dtype=dtype), layout)
    w, b = _params(6, dtype, device)
    _check_against_reference(x, 3, w, b, activation="silu")
    _check_against_reference(x, 3, None, None, activation="silu")


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_large_mean_is_stable(triton_backend, device, layout):
    gen = torch.Generator().manual_seed(3)
    x = _to_layout((1e4 + torch.randn(2, 8, 6, 6, generator=gen)).to(device), layout)
    w, b = _params(8, torch.float32, device)
    y, _ = _check_against_reference(x, 2, w, b)
    # The normalized output of an N(1e4, 1) input is still ~N(0, 1): no variance lost.
    y0 = fastnorm.group_norm(x, 2)
    assert 0.9 < y0.double().std().item() < 1.1


def test_large_mean_stats_on_split_path(device):
    """mean/rstd from the multi-program combine stay exact for a large, offset group."""
    x = (1e4 + torch.randn(1, 64, 200, dtype=torch.float32)).to(device)
    x = _to_layout(x, "cl")
    _y, mean, rstd = gn_kernels.group_norm_fwd(x, None, None, 2, 1e-5, split_size=64)
    x64 = x.double().reshape(1, 2, -1)
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-6, atol=0)
    ref_rstd = 1 / torch.sqrt(x64.var(-1, unbiased=False) + 1e-5)
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=1e-4, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_split_path_spikes_at_split_starts(device, layout):
    """Spikes of 1e5 at the start of every split (where the stats shift is taken) and a large
    offset: the split statistics still match float64."""
    c, groups, hw, split = (64, 4, 200, 64) if layout == "cl" else (2, 1, 5184, 1)
    gen = torch.Generator().manual_seed(6)
    x = 1e3 + torch.randn(2, c, hw, generator=gen)
    x[:, :, ::64] = 1e5
    x = _to_layout(x.to(device), layout)
    y, mean, rstd = gn_kernels.group_norm_fwd(x, None, None, groups, 1e-5, "none", split)
    x64 = x.double().reshape(2, groups, -1)
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-6, atol=0)
    ref_rstd = 1 / torch.sqrt(x64.var(-1, unbiased=False) + 1e-5)
    torch.testing.assert_close(rstd.double(), ref_rstd, rtol=1e-6, atol=0)
    assert_close_ref(y, F.group_norm(x.double(), groups), F.group_norm(x, groups))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_batch_of_one(triton_backend, device, layout):
    x = _to_layout(torch.randn(1, 6, 4, 4, device=device), layout)
    w, b = _params(6, torch.float32, device)
    _check_against_reference(x, 3, w, b)


def test_empty_batch(triton_backend, device):
    x = torch.randn(0, 6, 4, 4, device=device, requires_grad=True)
    w, b = _params(6, torch.float32, device)
    w.requires_grad_()
    b.requires_grad_()
    y = fastnorm.group_norm(x, 3, w, b)
    assert y.shape == x.shape
    y.sum().backward()
    # torch gives zero weight/bias gradients for an empty batch; so do we.
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("make", [lambda x: x[:, :, ::2], lambda x: x.transpose(2, 3),
                                  lambda x: x[:, 1:5]], ids=["strided", "transposed", "sliced-c"])
def test_non_contiguous_input(triton_backend, device, make):
    base = torch.randn(2, 6, 6, 8, device=device)
    x = make(base)
    assert not x.is_contiguous()
    c = x.shape[1]
    w, b = _params(c, torch.float32, device)
    y, grads = _check_against_reference(x, 2, w, b)
    assert y.shape == x.shape and grads[0].shape == x.shape


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_strided_weight_and_expanded_grad(triton_backend, device, layout):
    """A weight that is a strided view, and y.sum().backward()'s zero-stride upstream grad."""
    x = _to_layout(torch.randn(2, 6, 3, 5, device=device), layout).requires_grad_()
    w = torch.randn(12, device=device)[::2].requires_grad_()
    y = fastnorm.group_norm(x, 3, w, None, activation="silu")
    dx, dw = torch.autograd.grad(y.sum(), (x, w))
    y_ref = F.silu(F.group_norm(x, 3, w))
    dx_ref, dw_ref = torch.autograd.grad(y_ref.sum(), (x, w))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dw, dw_ref)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_no_affine_and_weight_only(triton_backend, device, layout):
    x = _to_layout(torch.randn(2, 6, 3, 5, device=device), layout)
    w, _b = _params(6, torch.float32, device)
    _check_against_reference(x, 3, None, None)
    _check_against_reference(x, 3, w, None)


def test_low_precision_input_with_fp32_params(triton_backend, device):
    x = torch.randn(2, 8, 4, 4, device=device, dtype=torch.bfloat16)
    w, b = _params(8, torch.float32, device)
    dy = torch.randn(x.shape, device=device, dtype=torch.bfloat16)
    y, (dx, dw, db) = _grads(_fast_gn(4), x, w, b, dy)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    y_ref, (dx_ref, dw_ref, db_ref) = _grads(_torch_gn(4), x.double(), w.double(), b.double(),
                                             dy.double())
    assert_close_ref(y, y_ref, name="y")
    assert_close_ref(dx, dx_ref, name="dx")
    torch.testing.assert_close(dw.double(), dw_ref, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(db.double(), db_ref, rtol=2e-2, atol=5e-2)


def _gradcheck(device, shape, layout, activation, fast_mode):
    x = _to_layout(torch.randn(shape, device=device, dtype=torch.float64), layout)
    x.requires_grad_()
    w, b = _params(shape[1], torch.float64, device)
    w.requires_grad_()
    b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: fastnorm.group_norm(x, 2, w, b, activation=activation), (x, w, b),
        fast_mode=fast_mode)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradcheck_float64(triton_backend, device, layout, activation):
    _gradcheck(device, (2, 4, 2, 3), layout, activation, fast_mode=True)


@pytest.mark.slow
def test_gradcheck_float64_full_jacobian(triton_backend, device):
    _gradcheck(device, (2, 4, 3), "cl", "silu", fast_mode=False)


def test_gradcheck_float64_fused_path(triton_backend, device):
    n = -(-2 * num_parallel_programs(device) // 2)
    _gradcheck(device, (n, 4, 2, 3), "nchw", "silu", fast_mode=True)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_opcheck(device, layout):
    x = _to_layout(torch.randn(2, 6, 3, 4, device=device), layout).reshape(2, 6, 12)
    w, b = _params(6, torch.float32, device)
    torch.library.opcheck(torch.ops.fastnorm.group_norm_fwd.default,
                          (x, w.requires_grad_(), b.requires_grad_(), 3, 1e-5, "silu"))
    w, b = w.detach(), b.detach()
    _y, mean, rstd = torch.ops.fastnorm.group_norm_fwd(x, w, b, 3, 1e-5, "silu")
    torch.library.opcheck(torch.ops.fastnorm.group_norm_bwd.default,
                          (torch.randn_like(x), x, w, b, mean, rstd, 3, "silu"))
    torch.library.opcheck(torch.ops.fastnorm.group_norm_fwd.default,
                          (x.requires_grad_(), None, None, 2, 1e-5, "none"))


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_torch_compile_fullgraph(triton_backend, device, layout):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(4, 8, 1), fastnorm.nn.GroupNorm(2, 8, activation="silu"),
                          nn.Conv2d(8, 4, 1)).to(device)
    x = _to_layout(torch.randn(2, 4, 3, 5, device=device), layout)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager = model(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_backward_is_bitwise_repeatable(triton_backend, device, layout):
    x = _to_layout(torch.randn(2, 64, 10, 20, device=device), layout)
    w, b = _params(64, torch.float32, device)
    dy = torch.randn_like(x)
    first = _grads(_fast_gn(4, activation="silu"), x, w, b, dy)[1]
    second = _grads(_fast_gn(4, activation="silu"), x, w, b, dy)[1]
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_state_dict_round_trip(device):
    ours = fastnorm.nn.GroupNorm(2, 6, activation="silu").to(device)
    theirs = nn.GroupNorm(2, 6).to(device)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    back = nn.GroupNorm(2, 6).to(device)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert "activation='silu'" in repr(ours)
    assert fastnorm.nn.GroupNorm(2, 6, affine=False).weight is None
    assert fastnorm.nn.GroupNorm(2, 6, bias=False).bias is None


def _unet_block(channels_last: bool, device):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU(),
                          nn.Conv2d(8, 3, 3, padding=1)).to(device)
    with torch.no_grad():
        block[1].weight.normal_()
        block[1].bias.normal_()
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
    return block


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_convert_unet_block(triton_backend, device, channels_last):
    block = _unet_block(channels_last, device)
    reference = copy.deepcopy(block)
    assert fastnorm.convert(block) is block
    assert type(block[1]) is fastnorm.nn.GroupNorm
    x = torch.randn(2, 3, 6, 5, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = block(x)
    y_ref = reference(x)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for p, p_ref in zip(block.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["mean0", "mean1e4"])
def test_fused_path_matches_reference(triton_backend, device, dtype, activation, offset):
    """NCHW groups that fit in one tile, enough of them to fill the device: one program per
    group does the whole forward, and the whole backward."""
    groups, c, h, w_ = 8, 24, 3, 5
    n = -(-2 * num_parallel_programs(device) // groups)
    for limit in (gn_kernels.MAX_FUSED_FWD, gn_kernels.MAX_FUSED_BWD):
        assert gn_kernels.fused_tile(n, c, h * w_, groups, dtype, False, device, limit)
    gen = torch.Generator().manual_seed(5)
    x = (offset + torch.randn(n, c, h, w_, generator=gen)).to(device=device, dtype=dtype)
    w, b = _params(c, dtype, device)
    _check_against_reference(x, groups, w, b, activation=activation)
    if activation is None:
        _check_against_reference(x, groups, None, None)


def test_split_path_plan(device):
    """Small N * channel blocks: the heuristic cuts the spatial extent into several splits."""
    x = _to_layout(torch.randn(1, 64, 32, 32, device=device), "cl").reshape(1, 64, 1024)
    plan = gn_kernels.GroupNormPlan.make(1, 64, 1024, x.dtype, True, x.device)
    assert plan.channels_last and plan.num_splits > 1
    plan = gn_kernels.GroupNormPlan.make(1, 2, 96 * 96, torch.float32, False, x.device)
    assert not plan.channels_last and plan.num_splits > 1
    # Neither takes the fused path: channels-last never does, and one group of 2 x 96^2 is big.
    assert gn_kernels.fused_tile(1, 64, 1024, 1, torch.float32, True, x.device, 1 << 30) is None
    assert gn_kernels.fused_tile(1, 2, 96 * 96, 1, torch.float32, False, x.device,
                                 gn_kernels.MAX_FUSED_FWD) is None


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_split_path_matches_reference(device, layout, activation):
    """Several programs per group, the last split partial: stats, dx, dweight, dbias."""
    gen = torch.Generator().manual_seed(4)
    # split_size is rounded up to whole tiles: 64 positions of 64 channels in channels-last,
    # 4096 positions of one channel in NCHW.
    c, groups, hw, split = (64, 4, 200, 64) if layout == "cl" else (2, 1, 5184, 1)
    x = _to_layout(torch.randn(2, c, hw, generator=gen).to(device), layout)
    w, b = _params(c, torch.float32, device)
    dy = torch.randn(x.shape, generator=gen).to(device)
    plan = gn_kernels.GroupNormPlan.make(2, c, hw, x.dtype, layout == "cl", x.device, split)
    assert plan.num_splits > 1 and plan.num_splits * plan.split_size > hw
    y, mean, rstd = gn_kernels.group_norm_fwd(x, w, b, groups, 1e-5, activation, split)
    dx, dw, db = gn_kernels.group_norm_bwd(dy, x, w, b, mean, rstd, groups, activation, split)
    act = "silu" if activation == "silu" else None
    y_ref, (dx_ref, dw_ref, db_ref) = _grads(_torch_gn(groups, activation=act), x.double(),
                                             w.double(), b.double(), dy.double())
    assert_close_ref(y, y_ref, name="y")
    assert_close_ref(dx, dx_ref, name="dx")
    assert_close_ref(dw, dw_ref, name="dweight")
    assert_close_ref(db, db_ref, name="dbias")
    assert dx.stride() == x.stride() and y.stride() == x.stride()


@pytest.mark.parametrize("call,exc,fragment", [
    (lambda x: fastnorm.group_norm(x, 4), RuntimeError,
     "Expected number of channels in input to be divisible by num_groups, but got input of "
     "shape [2, 6, 5] and num_groups=4"),
    (lambda x: fastnorm.group_norm(x[0, 0], 1), RuntimeError,
     "Expected at least 2 dimensions for input tensor"),
    (lambda x: fastnorm.group_norm(x, 3, torch.ones(5, device=x.device)), RuntimeError,
     "Expected weight to be a vector of size equal to the number of channels"),
    (lambda x: fastnorm.group_norm(x, 3, None, torch.ones(7, device=x.device)), RuntimeError,
     "Expected bias to be a vector of size equal to the number of channels"),
    (lambda x: fastnorm.group_norm(x, 3, activation="relu"), ValueError, "unknown activation"),
    (lambda x: fastnorm.group_norm(x.long(), 3), TypeError, "floating-point input"),
    (lambda x: fastnorm.nn.GroupNorm(3, 6, activation="gelu"), ValueError, "unknown activation"),
], ids=["groups", "dims", "weight", "bias", "activation", "integer", "module-activation"])
def test_bad_inputs(triton_backend, device, call, exc, fragment):
    x = torch.randn(2, 6, 5, device=device)
    with pytest.raises(exc) as info:
        call(x)
    assert fragment in str(info.value)


def test_reference_backend_matches_torch(device):
    """fastnorm's op layer on the reference kernels (fused SiLU, saved statistics, autograd)
    against torch's GroupNorm + SiLU, forward and gradients."""
    x = torch.randn(2, 6, 5, device=device, requires_grad=True)
    w, b = (p.requires_grad_() for p in _params(6, torch.float32, device))
    with fastnorm.use_backend("reference"):
        y = fastnorm.group_norm(x, 3, w, b, activation="silu")
    want = F.silu(F.group_norm(x, 3, w, b))
    torch.testing.assert_close(y, want)
    dy = torch.randn_like(y)
    for a, b_ in zip(torch.autograd.grad(y, (x, w, b), dy),
                     torch.autograd.grad(want, (x, w, b), dy)):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("split", [None, 4], ids=["auto", "split"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_group_propagates(device, bad, split):
    """A NaN/Inf in a group makes that group's statistics and outputs NaN (torch's result), on
    the fused and the split path; other groups are untouched."""
    x = torch.randn(2, 8, 16, device=device)
    x[1, 2, 3] = bad
    w, b = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    y, mean, rstd = gn_kernels.group_norm_fwd(x, w, b, 4, 1e-5, split_size=split)
    ref = F.group_norm(x, 4, w, b, 1e-5)
    torch.testing.assert_close(y, ref, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert y[1, 2:4].isnan().all() and not y[0].isnan().any()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_sample_chunks_are_bitwise_the_unchunked_result(device, layout):
    """A tensor bigger than the L2 window runs the split path's launch sequence once per chunk
    of samples (here forced by a tiny assumed L2: 3 chunks forward, 5 backward); groups lie
    within a sample, so y, mean, rstd, dx, dweight and dbias are bitwise the one-chunk result."""
    from fastnorm.triton import _common

    gen = torch.Generator().manual_seed(7)
    n, act = 5, "silu"
    c, groups, hw, split = (64, 4, 200, 64) if layout == "cl" else (2, 1, 5184, 1)
    x = _to_layout(torch.randn(n, c, hw, generator=gen).to(device), layout)
    w, b = _params(c, torch.float32, device)
    dy = _to_layout(torch.randn(n, c, hw, generator=gen).to(device), layout)
    sample = c * hw * 4
    tiny_l2 = int(2 * 2.5 * sample)  # a window of 2.5 samples: 2 per chunk fwd, 1 bwd
    with _common.assume_l2_bytes(tiny_l2):
        fwd = gn_kernels.GroupNormPlan.make(n, c, hw, x.dtype, layout == "cl", x.device, split)
        bwd = gn_kernels.GroupNormPlan.make(n, c, hw, x.dtype, layout == "cl", x.device, split,
                                            backward=True)
        assert fwd.chunks(n) == [(0, 2), (2, 4), (4, 5)]
        assert len(bwd.chunks(n)) == 5 and fwd.num_splits == bwd.num_splits > 1
        chunked = gn_kernels.group_norm_fwd(x, w, b, groups, 1e-5, act, split)
        chunked += gn_kernels.group_norm_bwd(dy, x, w, b, chunked[1], chunked[2], groups, act,
                                             split)
    whole = gn_kernels.GroupNormPlan.make(n, c, hw, x.dtype, layout == "cl", x.device, split,
                                          backward=True)
    assert whole.chunks(n) == [(0, n)]
    ref = gn_kernels.group_norm_fwd(x, w, b, groups, 1e-5, act, split)
    ref += gn_kernels.group_norm_bwd(dy, x, w, b, ref[1], ref[2], groups, act, split)
    for name, got, want in zip(("y", "mean", "rstd", "dx", "dweight", "dbias"), chunked, ref):
        assert torch.equal(got, want), name
    assert chunked[0].stride() == x.stride() and chunked[3].stride() == x.stride()


def test_sample_chunk_rule(device):
    """As many samples per chunk as fit the window, at most MAX_CHUNKS chunks, balanced."""
    from fastnorm.triton import _common

    with _common.assume_l2_bytes(2 * 100):  # a 100-byte window
        assert gn_kernels.samples_per_chunk(4, 25, device) == 4  # fits: one chunk
        assert gn_kernels.samples_per_chunk(10, 30, device) == 3  # 3 per chunk, 4 chunks
        assert gn_kernels.samples_per_chunk(5, 500, device) == 1  # a sample alone overflows
        assert gn_kernels.samples_per_chunk(64, 40, device) == 8  # 32 chunks capped at 8
