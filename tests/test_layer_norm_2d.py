"""Channels-first LayerNorm / RMSNorm (fastnorm.layer_norm_2d, rms_norm_2d, nn.LayerNorm2d,
nn.RMSNorm2d): against a float64 reference and the permute formulation (timm's LayerNorm2d),
both layouts and both NCHW paths (whole-C tile, chunked C), gradcheck, opcheck,
torch.compile, edge shapes, bad inputs, modules' state_dict, launches per call (convert() of
timm / torchvision / transformers LayerNorm2d: tests/test_convert_channels_first.py)."""
import pytest
import torch
import torch.nn.functional as F
from helpers import ALL_DTYPES, assert_close_ref
from torch import nn

import fastnorm
from fastnorm.triton import _launch
from fastnorm.triton import layer_norm_2d as kernels
from fastnorm.triton._common import assume_sm_count, planning_override

LAYOUTS = ("nchw", "channels_last")


def _layout(x, layout):
    if layout == "nchw":
        return x.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.contiguous(memory_format=fmt)


def _permuted(kind, x, w, b, eps):
    """The permute formulation at x's dtype (F.layer_norm / F.rms_norm over the last dim)."""
    c = x.shape[1]
    if kind == "layer":
        return F.layer_norm(x.movedim(1, -1), (c,), w, b, eps).movedim(-1, 1)
    return F.rms_norm(x.movedim(1, -1), (c,), w, eps).movedim(-1, 1)


def _ours(kind, x, w, b, eps):
    if kind == "layer":
        return fastnorm.layer_norm_2d(x, w, b, eps)
    return fastnorm.rms_norm_2d(x, w, eps)


def _check(kind, shape, dtype, device, layout="nchw", affine=True, bias=True, x_fn=None,
           param_dtype=None):
    """Forward and backward vs the float64 permute formulation, within 2x torch's own error at
    this dtype + the dtype's tolerance; the output keeps the input's memory format."""
    torch.manual_seed(0)
    param_dtype = param_dtype or dtype
    c = shape[1]
    x = torch.randn(shape, device=device, dtype=torch.float64)
    x = (x_fn(x) if x_fn else x * 2 + 0.5)
    w = torch.randn(c, device=device, dtype=torch.float64) if affine else None
    b = torch.randn(c, device=device, dtype=torch.float64) if affine and bias and \
        kind == "layer" else None
    dy = torch.randn(shape, device=device, dtype=torch.float64)
    eps = 1e-6

    def run(fn, cast, pcast):
        # (clone: a leaf of its own even where .to() returns x itself; strides preserved)
        xs = _layout(x.to(cast), layout).clone().requires_grad_()
        ps = [None if t is None else t.to(pcast).clone().requires_grad_() for t in (w, b)]
        y = fn(kind, xs, *ps, eps)
        y.backward(dy.to(cast))
        return [y, xs.grad] + [None if t is None else t.grad for t in ps]

    got = run(_ours, dtype, param_dtype)
    want = run(_permuted, torch.float64, torch.float64)
    base = run(_permuted, dtype, param_dtype) if dtype != torch.float64 else [None] * 4
    expected_format = (torch.contiguous_format if layout == "nchw" else
                       torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    assert got[0].is_contiguous(memory_format=expected_format)
    for name, g, r, t in zip(("y", "dx", "dw", "db"), got, want, base):
        if r is None:
            assert g is None
            continue
        assert g.dtype == (dtype if name in ("y", "dx") else param_dtype)
        assert_close_ref(g, r, t, name=f"{kind} {layout} {name}")
    return got


@pytest.fixture
def small_tiles():
    """Tile limits small enough that a few dozen channels take the chunked-C NCHW path with
    several chunks, and the backward's programs walk several tiles each."""
    # (and the interpreter's 4 programs on a GPU too, so that programs walk several tiles)
    with planning_override(kernels, "MAX_TILE_FWD", 16), \
            planning_override(kernels, "MAX_TILE_BWD", 16), \
            planning_override(kernels, "TILE_FWD", 32), planning_override(kernels, "TILE_BWD", 32), \
            assume_sm_count(4):
        yield


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (3, 96, 7, 7)])
def test_matches_reference(backend, kind, layout, dtype, shape, device):
    _check(kind, shape, dtype, device, layout)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_channels_take_the_chunked_path(triton_backend, kind, dtype, device):
    # bf16: C = 1100 pads to 2048 channels, beyond the whole-C tiles of both directions (16384
    # elements forward, 8192 backward, at 16 positions); fp32: 2100 pads to 4096.
    c = 1100 if dtype == torch.bfloat16 else 2100
    for mode in ("fwd", "bwd"):
        plan = kernels.plan_layer_norm_2d(2, c, 9, dtype, mode, torch.device(device),
                                          channels_last=False, is_rms=kind == "rms")
        assert plan.path == "chunked" and plan.block_c < c, plan
    _check(kind, (2, c, 3, 3), dtype, device)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_path_with_many_chunks_and_tiles(triton_backend, small_tiles, kind, dtype,
                                                 device):
    plan = kernels.plan_layer_norm_2d(3, 37, 41, dtype, "bwd", torch.device(device),
                                      channels_last=False, is_rms=kind == "rms")
    assert plan.path == "chunked" and plan.block_c * 4 < 37 and plan.tiles_per_program > 1, plan
    _check(kind, (3, 37, 41), dtype, device)
    _check(kind, (2, 37, 5, 7), dtype, device, affine=False)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_large_mean_is_stable(triton_backend, kind, device):
    # mean 1e4, std 1: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance.
    shift = lambda x: x + 1e4  # noqa: E731
    _check(kind, (2, 300, 4, 5), torch.float32, device, x_fn=shift)
    with planning_override(kernels, "MAX_TILE_FWD", 16), \
            planning_override(kernels, "TILE_FWD", 64):
        _check(kind, (2, 300, 4, 5), torch.float32, device, x_fn=shift)


_SHAPES = [
    (3, 7, 10),            # 3-D input (N, C, L), odd C
    (2, 6, 3, 4, 5),       # 5-D input (channels_last_3d)
    (4, 9, 1, 1),          # spatial 1x1 (ConvNeXt's head after pooling)
    (3, 1, 4, 4),          # C = 1: y is the bias
    (5, 13),               # no spatial dims: (N, C)
]


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("layout,shape", [
    (layout, shape) for layout in LAYOUTS for shape in _SHAPES
    if layout == "nchw" or len(shape) >= 4])  # channels-last memory formats are 4-D and 5-D
def test_shapes(backend, kind, layout, shape, device):
    _check(kind, shape, torch.float32, device, layout)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("affine,bias", [(False, False), (True, False)])
def test_without_weight_or_bias(backend, kind, affine, bias, device):
    for layout in LAYOUTS:
        _check(kind, (2, 12, 3, 5), torch.float32, device, layout, affine=affine, bias=bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_with_fp32_weight(backend, dtype, device):
    _check("layer", (2, 24, 3, 3), dtype, device, param_dtype=torch.float32)
    _check("rms", (2, 24, 3, 3), dtype, device, "channels_last", param_dtype=torch.float32)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_takes_an_in_place_op_under_autograd(backend, kind, layout, device):
    # (timm's LayerNormAct2d runs ReLU(inplace=True) on it)
    torch.manual_seed(0)
    x = _layout(torch.randn(2, 12, 3, 5, device=device), layout)
    w, b = torch.randn(12, device=device), torch.randn(12, device=device)
    grads = []
    for fn, inplace in ((_ours, True), (_permuted, False)):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(kind, xs, ws, bs if kind == "layer" else None, 1e-6)
        y = y.relu_() if inplace else y.relu()
        (y * torch.linspace(-1, 1, y.numel(), device=device).view(y.shape)).sum().backward()
        grads.append((y, xs.grad, ws.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


def test_non_contiguous_input_and_gradient_layouts(backend, device):
    torch.manual_seed(0)
    base = torch.randn(2, 10, 6, 8, device=device)
    w, b = torch.randn(10, device=device), torch.randn(10, device=device)
    x = base[:, ::2, :, 1:7]   # neither NCHW nor channels-last: made contiguous first
    y = fastnorm.layer_norm_2d(x, w[::2], b[::2])
    assert y.is_contiguous()
    torch.testing.assert_close(y, _permuted("layer", x, w[::2], b[::2], 1e-6))
    # dy in the other layout than x: brought into x's inside the backward.
    for layout, dy_layout in (("nchw", "channels_last"), ("channels_last", "nchw")):
        xs = _layout(base, layout).clone().requires_grad_()
        xr = base.clone().requires_grad_()
        dy = _layout(torch.randn_like(base), dy_layout)
        fastnorm.layer_norm_2d(xs, w, b).backward(dy)
        _permuted("layer", xr, w, b, 1e-6).backward(dy)
        torch.testing.assert_close(xs.grad, xr.grad)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_and_empty_spatial(backend, kind, layout, device):
    for shape in ((0, 8, 3, 3), (2, 8, 0, 3)):
        x = _layout(torch.randn(shape, device=device), layout).requires_grad_()
        w = torch.randn(8, device=device, requires_grad=True)
        b = torch.randn(8, device=device, requires_grad=True)
        y = _ours(kind, x, w, b, 1e-6)
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape
        torch.testing.assert_close(w.grad, torch.zeros_like(w))
        if kind == "layer":
            torch.testing.assert_close(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_and_inf_stay_in_their_position(backend, kind, layout, device):
    x = torch.randn(2, 16, 5, 6, device=device)
    x[0, 3, 1, 2] = float("nan")
    x[1, 7, 4, 0] = float("inf")
    x = _layout(x, layout)
    y = _ours(kind, x, None, None, 1e-6)
    bad = torch.zeros(2, 5, 6, dtype=torch.bool, device=device)
    bad[0, 1, 2] = bad[1, 4, 0] = True
    columns = y.permute(0, 2, 3, 1)  # (N, H, W, C): one normalized column per position
    assert torch.isnan(columns[0, 1, 2]).all()
    # Inf: LayerNorm's mean is Inf, so the whole column is NaN; RMSNorm gives 0 beside it and
    # inf / inf = NaN at it (as torch).
    assert torch.isnan(columns[1, 4, 0, 7]) and not torch.isfinite(columns[1, 4, 0]).all()
    assert torch.isfinite(columns[~bad]).all()
    torch.testing.assert_close(y, _permuted(kind, x, None, None, 1e-6), equal_nan=True)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(backend, kind, layout, device):
    x = _layout(torch.randn(2, 5, 2, 3, device=device, dtype=torch.float64), layout)
    w = torch.randn(5, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _ours(kind, x, w, b, 1e-6),
                                    (x.requires_grad_(), w, b), fast_mode=True)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gradcheck_chunked_path(triton_backend, small_tiles, kind, device):
    x = torch.randn(2, 19, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(19, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(19, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _ours(kind, x, w, b, 1e-6), (x, w, b),
                                    nondet_tol=0.0, fast_mode=True)


def test_double_backward(device):
    x = torch.randn(2, 4, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, device=device, dtype=torch.float64, requires_grad=True)
    with fastnorm.use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda x, w: fastnorm.layer_norm_2d(x, w), (x, w))
        assert torch.autograd.gradgradcheck(lambda x, w: fastnorm.rms_norm_2d(x, w), (x, w))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(backend, layout, device):
    ops = torch.ops.fastnorm
    x = _layout(torch.randn(2, 6, 3, 5, device=device), layout).view(2, 6, 15)
    w = torch.randn(6, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    xg = x.clone().requires_grad_()
    torch.library.opcheck(ops.layer_norm_2d_fwd.default, (xg, w, b, 1e-6))
    torch.library.opcheck(ops.layer_norm_2d_fwd.default, (x, None, None, 1e-6))
    torch.library.opcheck(ops.rms_norm_2d_fwd.default, (xg, w, 1e-6))
    y, mean, rstd = ops.layer_norm_2d_fwd(x, w.detach(), b.detach(), 1e-6)
    dy = torch.randn(2, 6, 15, device=device)
    torch.library.opcheck(ops.layer_norm_2d_bwd.default,
                          (dy, x, w.detach(), b.detach(), mean, rstd))
    torch.library.opcheck(ops.layer_norm_2d_bwd.default, (dy, x, None, None, mean, rstd))
    y, rstd = ops.rms_norm_2d_fwd(x, w.detach(), 1e-6)
    torch.library.opcheck(ops.rms_norm_2d_bwd.default, (dy, x, w.detach(), rstd))


def test_op_checks_reject_bad_statistics(device):
    x = torch.randn(2, 6, 15, device=device)
    rstd = torch.ones(2, 14, device=device)
    with pytest.raises(RuntimeError, match=r"expected rstd of shape \[2, 15\]"):
        torch.ops.fastnorm.rms_norm_2d_bwd(x, x, None, rstd)
    with pytest.raises(RuntimeError, match=r"expected x to be 3-D"):
        torch.ops.fastnorm.layer_norm_2d_fwd(x[0], None, None, 1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_fullgraph(triton_backend, layout, device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fastnorm.nn.LayerNorm2d(8),
                          nn.Conv2d(8, 8, 1), fastnorm.nn.RMSNorm2d(8)).to(device)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    x = _layout(torch.randn(2, 3, 5, 6, device=device), layout)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(y, expected)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_is_bitwise_repeatable(triton_backend, layout, device):
    x = _layout(torch.randn(5, 24, 7, 9, device=device), layout)
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    dy = torch.randn(5, 24, 7, 9, device=device)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        fastnorm.layer_norm_2d(*leaves).backward(dy)
        grads.append([t.grad for t in leaves])
    for a, b_ in zip(*grads):
        assert torch.equal(a, b_)


def test_torch_backend_is_the_permute_formulation(device):
    x = torch.randn(2, 8, 4, 4, device=device)
    w, b = torch.randn(8, device=device), torch.randn(8, device=device)
    with fastnorm.use_backend("torch"):
        y = fastnorm.layer_norm_2d(x, w, b)
        z = fastnorm.rms_norm_2d(x, w)
    assert torch.equal(y, _permuted("layer", x, w, b, 1e-6))
    assert torch.equal(z, _permuted("rms", x, w, None, None))
    # rms eps=None: torch's rule, as F.rms_norm's
    with fastnorm.use_backend("reference"):
        torch.testing.assert_close(fastnorm.rms_norm_2d(x, w), z)


# --- bad inputs --------------------------------------------------------------------------------

def test_wrong_weight_shape(device):
    x = torch.randn(2, 10, 3, 3, device=device)
    with fastnorm.use_backend("reference"):
        with pytest.raises(RuntimeError, match=r"Expected weight to be of same shape as "
                                               r"normalized_shape, but got weight of shape \[9\] "
                                               r"and normalized_shape = \[10\]"):
            fastnorm.layer_norm_2d(x, torch.ones(9, device=device))
        with pytest.raises(RuntimeError, match=r"Expected bias to be of same shape"):
            fastnorm.layer_norm_2d(x, None, torch.ones(2, 5, device=device))
        with pytest.raises(RuntimeError, match=r"Expected weight to be of same shape"):
            fastnorm.rms_norm_2d(x, torch.ones(11, device=device))
    # the permute formulation (backend "torch") raises the same message
    with fastnorm.use_backend("torch"), pytest.raises(RuntimeError,
                                                      match="Expected weight to be of same shape"):
        fastnorm.layer_norm_2d(x, torch.ones(9, device=device))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_input_rejected(dtype, device):
    x = torch.ones(2, 4, 3, 3, dtype=dtype, device=device)
    with fastnorm.use_backend("reference"):
        with pytest.raises(TypeError, match="floating-point input"):
            fastnorm.layer_norm_2d(x)
        with pytest.raises(TypeError, match="floating-point input"):
            fastnorm.rms_norm_2d(x)


def test_bad_rank_and_dtype_mix(device):
    with fastnorm.use_backend("reference"):
        with pytest.raises(RuntimeError, match=r"at least 2 dimensions, but got 1-D"):
            fastnorm.layer_norm_2d(torch.randn(5, device=device))
        x = torch.randn(2, 4, 3, 3, device=device)
        with pytest.raises(RuntimeError, match=r"expected weight, bias to have one dtype"):
            fastnorm.layer_norm_2d(x, torch.ones(4, device=device, dtype=torch.bfloat16),
                                   torch.zeros(4, device=device))


# --- modules -----------------------------------------------------------------------------------

class _TimmStyleLayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d as it computes with fast norm off: a subclass of nn.LayerNorm whose
    forward is permute, F.layer_norm, permute."""

    def __init__(self, num_channels, eps=1e-6, affine=True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)
        self._fast_norm = False

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def test_modules_state_dict_compatible_with_timm_style_layer_norm_2d(device):
    torch.manual_seed(0)
    timm_style = _TimmStyleLayerNorm2d(12).to(device)
    with torch.no_grad():
        timm_style.weight.normal_()
        timm_style.bias.normal_()
    ours = fastnorm.nn.LayerNorm2d(12, device=device)
    assert list(ours.state_dict()) == list(timm_style.state_dict()) == ["weight", "bias"]
    ours.load_state_dict(timm_style.state_dict())
    timm_style.load_state_dict(ours.state_dict())
    assert ours.eps == timm_style.eps == 1e-6
    assert isinstance(ours, nn.LayerNorm)
    assert repr(ours).startswith("fastnorm.LayerNorm2d((12,), eps=1e-06")
    x = torch.randn(2, 12, 5, 5, device=device)
    for backend_name in ("reference", "triton"):
        with fastnorm.use_backend(backend_name):
            torch.testing.assert_close(ours(x), timm_style(x))
    no_bias = fastnorm.nn.LayerNorm2d(12, elementwise_affine=True, bias=False)
    assert list(no_bias.state_dict()) == ["weight"]
    rms = fastnorm.nn.RMSNorm2d(12, device=device)
    assert list(rms.state_dict()) == ["weight"] and rms.eps is None
    with fastnorm.use_backend("reference"):
        torch.testing.assert_close(rms(x), _permuted("rms", x, rms.weight, None, None))


def test_modules_script():
    scripted = torch.jit.script(nn.Sequential(fastnorm.nn.LayerNorm2d(6),
                                              fastnorm.nn.RMSNorm2d(6, eps=1e-5)))
    x = torch.randn(2, 6, 3, 4)
    y = _permuted("rms", _permuted("layer", x, torch.ones(6), torch.zeros(6), 1e-6),
                  torch.ones(6), None, 1e-5)
    torch.testing.assert_close(scripted(x), y)


# --- launches per call (the host path's guard, as tests/test_host_path.py) ----------------------

# Triton launches per call, forward and forward + backward: the NCHW kernel or the row kernel
# (channels-last), then in the backward one kernel and the one column-sum launch of dW and dB.
LAUNCHES = {"layer_norm_2d": (1, 3), "rms_norm_2d": (1, 3)}
# Torch ops per call (top-level aten ops), upper bounds: the views inside the autograd node (x
# in: flatten; y out: view_as + detach, an alias an in-place op may modify) and the
# channels-last row view, the outputs and partial rows the launchers allocate, autograd's
# gradient accumulation in the backward. A new copy, fill or cast in the hot path shows here.
ATEN_OPS = {("layer_norm_2d", "nchw"): (6, 16), ("layer_norm_2d", "channels_last"): (10, 25),
            ("rms_norm_2d", "nchw"): (6, 14), ("rms_norm_2d", "channels_last"): (9, 21)}


def _aten_ops(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name.startswith(("aten::", "fastnorm::"))]
    return [e.name for e in events
            if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", sorted(LAUNCHES))
def test_launches_and_torch_ops_per_call(op, layout, device):
    x = _layout(torch.randn(2, 32, 4, 4, device=device), layout).requires_grad_()
    w = torch.randn(32, device=device, requires_grad=True)
    b = torch.randn(32, device=device, requires_grad=True)
    fn = ((lambda: fastnorm.layer_norm_2d(x, w, b)) if op == "layer_norm_2d"
          else (lambda: fastnorm.rms_norm_2d(x, w)))
    dy = _layout(torch.ones(2, 32, 4, 4, device=device), layout)
    with fastnorm.use_backend("triton"), _launch.dry_run():
        for i, call in enumerate((fn, lambda: fn().backward(dy))):
            call()  # warm the plan caches
            before = _launch.launches
            call()
            assert _launch.launches - before == LAUNCHES[op][i], (i, _launch.launches - before)
            ops = _aten_ops(call)
            # the eager route: no fastnorm:: op through the dispatcher, forward or backward
            assert not [n for n in ops if n.startswith("fastnorm::")], ops
            assert len(ops) <= ATEN_OPS[op, layout][i], (i, ops)
