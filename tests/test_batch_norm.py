"""BatchNorm: Triton kernels (the interpreter on CPU) vs a float64 reference and torch.nn, the
custom ops, the modules and convert(), and bad inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
from fastnorm import distributed, sync_batch_norm
from helpers import ALL_DTYPES, assert_close_ref

# (shape, memory format): every input rank, both layouts.
LAYOUTS = [
    ((7, 5), None),
    ((3, 4, 9), None),
    ((3, 4, 9), "channels_last_1d"),
    ((2, 3, 5, 7), None),
    ((2, 3, 5, 7), torch.channels_last),
    ((2, 3, 2, 3, 4), None),
    ((2, 3, 2, 3, 4), torch.channels_last_3d),
]
LAYOUT_IDS = ["NC", "NCL", "NLC", "NCHW", "NHWC", "NCDHW", "NDHWC"]


def _make_input(shape, fmt, dtype, device, mean=0.5, std=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean).to(dtype)
    x = x.to(device)
    if fmt == "channels_last_1d":  # (N, C, L) stored as (N, L, C)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _params(c, device, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(device, dtype)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(device, dtype)
    running_mean = torch.randn(c, generator=gen, dtype=torch.float64).to(device, dtype)
    running_var = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(device, dtype)
    return weight, bias, running_mean, running_var


def _torch_bn(x, weight, bias, running_mean, running_var, training, momentum, eps, relu, dy):
    """torch's result (output, grads, updated running stats) with the given dtypes."""
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    running_mean, running_var = running_mean.clone(), running_var.clone()
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if relu:
        y = F.relu(y)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad, bias.grad, running_mean, running_var


def _fastnorm_bn(x, weight, bias, running_mean, running_var, training, momentum, eps, relu, dy):
    x = x.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    running_mean, running_var = running_mean.clone(), running_var.clone()
    y = fastnorm.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                            activation="relu" if relu else None)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad, bias.grad, running_mean, running_var


def _f64(*tensors):
    return [t.double() for t in tensors]


NAMES = ("output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var")


def _check_against_reference(x, params, training, relu, dy, eps=1e-5, momentum=0.1):
    ours = _fastnorm_bn(x, *params, training, momentum, eps, relu, dy)
    ref = _torch_bn(*_f64(x, *params), training, momentum, eps, relu, dy.double())
    # torch at the input dtype: its error sets the slack (bf16/fp16 inputs with fp32 params).
    theirs = _torch_bn(x, *params, training, momentum, eps, relu, dy)
    for name, a, r, t in zip(NAMES, ours, ref, theirs):
        assert_close_ref(a, r, t, name=name)
    return ours


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape,fmt", LAYOUTS, ids=LAYOUT_IDS)
def test_training_forward_backward(shape, fmt, dtype, device, triton_backend):
    x = _make_input(shape, fmt, dtype, device)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = _params(shape[1], device, dtype=param_dtype)
    dy = _make_input(shape, fmt, dtype, device, mean=0.0, std=1.0, seed=2)
    relu = len(shape) % 2 == 0  # the fused ReLU on half of the layouts
    y, dx = _check_against_reference(x, params, True, relu, dy)[:2]
    assert y.stride() == x.stride() and dx.stride() == x.stride(), "memory format not kept"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("shape,fmt", LAYOUTS[::2] + [LAYOUTS[4]], ids=LAYOUT_IDS[::2] + ["NHWC"])
def test_eval_forward_backward(shape, fmt, dtype, relu, device, triton_backend):
    x = _make_input(shape, fmt, dtype, device)
    params = _params(shape[1], device)
    dy = _make_input(shape, fmt, dtype, device, mean=0.0, std=1.0, seed=2)
    y = _check_against_reference(x, params, False, relu, dy)[0]
    assert y.stride() == x.stride()


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_mixed_layout_upstream_gradient(fmt, device, triton_backend):
    """dy in the other memory format than x is brought to x's layout."""
    x = _make_input((2, 3, 4, 5), fmt, torch.float32, device)
    other = torch.channels_last if fmt is None else torch.contiguous_format
    dy = _make_input((2, 3, 4, 5), None, torch.float32, device, seed=3).contiguous(
        memory_format=other)
    _check_against_reference(x, _params(3, device), True, False, dy)


@pytest.mark.parametrize("shape", [(4, 1, 3, 3), (3, 70), (130, 3), (2, 2, 13, 23),
                                   (1, 2, 64, 300), (140000, 1)], ids=str)
def test_odd_shapes(shape, device, triton_backend):
    """One channel; more channels than a tile row; rows of 299 positions over several blocks;
    several chunks (NCHW) or row tiles (NC) per reduction program."""
    x = _make_input(shape, None, torch.float32, device)
    dy = _make_input(shape, None, torch.float32, device, seed=2)
    _check_against_reference(x, _params(shape[1], device), True, True, dy)


def test_non_contiguous_input(device, triton_backend):
    """Neither layout (a strided slice): computed on a contiguous copy, same values."""
    base = _make_input((3, 4, 6, 10), None, torch.float32, device)
    x = base[:, :, 1:, ::3]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    dy = _make_input(tuple(x.shape), None, torch.float32, device, seed=2)
    _check_against_reference(x, _params(4, device), True, False, dy)


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_stable_at_large_mean(fmt, device, triton_backend):
    """mean 1e4, std 1 in fp32: sums of x^2 would lose the variance entirely."""
    x = _make_input((4, 3, 6, 6), fmt, torch.float32, device, mean=1e4, std=1.0)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = fastnorm.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    ref = F.batch_norm(x.double(), None, None, training=True)
    torch.testing.assert_close(y.double(), ref, atol=2e-3, rtol=0)
    var64 = x.double().transpose(0, 1).reshape(3, -1).var(dim=1)
    torch.testing.assert_close(running_var.double(), var64, rtol=1e-4, atol=0)
    torch.testing.assert_close(running_mean.double(), x.double().mean((0, 2, 3)), atol=1e-3,
                               rtol=0)


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_backward_bitwise_repeatable(fmt, device, triton_backend):
    x = _make_input((8, 3, 5, 5), fmt, torch.float32, device)
    dy = _make_input((8, 3, 5, 5), fmt, torch.float32, device, seed=2)
    params = _params(3, device)
    first = _fastnorm_bn(x, *params, True, 0.1, 1e-5, True, dy)
    second = _fastnorm_bn(x, *params, True, 0.1, 1e-5, True, dy)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_empty_batch(device, triton_backend):
    """Like torch: an empty training batch gives an empty output and leaves running stats."""
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = fastnorm.batch_norm(x, running_mean, running_var, training=True)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(running_mean, torch.zeros(3, device=device))
    assert torch.equal(running_var, torch.ones(3, device=device))


def test_reference_backend_matches_torch(device):
    """fastnorm's ops on the reference kernels (the op layer: views, saved statistics, autograd,
    running-stat update) against torch's BatchNorm, training with running stats and ReLU."""
    x = _make_input((2, 3, 4, 5), None, torch.float32, device)
    params = _params(3, device)
    dy = _make_input((2, 3, 4, 5), None, torch.float32, device, seed=2)
    with fastnorm.use_backend("reference"):
        ours = _fastnorm_bn(x, *params, True, 0.1, 1e-5, True, dy)
    theirs = _torch_bn(x, *params, True, 0.1, 1e-5, True, dy)
    for name, a, b in zip(NAMES, ours, theirs):
        torch.testing.assert_close(a, b, msg=name)


# --- modules -------------------------------------------------------------------------------------

def _module_pair(cls, fast_cls, *args, device, **kwargs):
    """(torch's module, fastnorm's) with the same state. Built as fastnorm's class, which takes
    `bias=` on every torch (torch < 2.12's classes do not); the copy becomes torch's class."""
    torch.manual_seed(0)
    ours = fast_cls(*args, **kwargs).to(device)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.uniform_(0.5, 1.5)
        if ours.bias is not None:
            ours.bias.normal_()
    ref = copy.deepcopy(ours)
    ref.__class__ = cls
    return ref, ours


def _run_steps(ref, ours, shape, fmt, device, steps=3):
    for step in range(steps):
        x = _make_input(shape, fmt, torch.float32, device, seed=10 + step)
        dy = _make_input(shape, fmt, torch.float32, device, seed=20 + step)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        yr.backward(dy)
        yo.backward(dy)
        torch.testing.assert_close(yo, yr, atol=1e-5, rtol=1e-5, msg=f"output, step {step}")
        torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-5)
        for name in ("weight", "bias"):
            if getattr(ref, name) is not None:
                torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad,
                                           atol=1e-4, rtol=1e-5, msg=name)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,fast_cls,shape,fmt", [
    (nn.BatchNorm1d, fastnorm.nn.BatchNorm1d, (6, 4), None),
    (nn.BatchNorm2d, fastnorm.nn.BatchNorm2d, (3, 4, 3, 5), torch.channels_last),
    (nn.BatchNorm3d, fastnorm.nn.BatchNorm3d, (2, 4, 2, 3, 3), None),
], ids=["1d", "2d-NHWC", "3d"])
def test_modules_running_stats_over_steps(cls, fast_cls, shape, fmt, momentum, device,
                                          triton_backend):
    ref, ours = _module_pair(cls, fast_cls, 4, momentum=momentum, device=device)
    _run_steps(ref, ours, shape, fmt, device)
    ref.eval()
    ours.eval()
    _run_steps(ref, ours, shape, fmt, device, steps=1)


@pytest.mark.parametrize("affine,track,bias", [(False, True, True), (True, False, True),
                                               (False, False, True), (True, True, False)])
def test_modules_affine_and_tracking_options(affine, track, bias, device, triton_backend):
    ref, ours = _module_pair(nn.BatchNorm2d, fastnorm.nn.BatchNorm2d, 3, affine=affine,
                             track_running_stats=track, bias=bias, device=device)
    _run_steps(ref, ours, (3, 3, 2, 4), None, device, steps=2)
    ref.eval()
    ours.eval()  # without running stats, eval normalizes with the batch statistics as torch
    _run_steps(ref, ours, (3, 3, 2, 4), None, device, steps=1)


def test_sync_module_without_process_group_is_plain_batch_norm(device, triton_backend):
    """Not initialized / world size 1: no communication, same result as BatchNorm."""
    ref, ours = _module_pair(nn.SyncBatchNorm, fastnorm.nn.SyncBatchNorm, 3, device=device)
    _run_steps(ref, ours, (3, 3, 2, 4), torch.channels_last, device, steps=2)


def test_state_dict_round_trip(device):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, momentum=None).to(device)
    ref.train()(torch.randn(4, 5, 3, 3, device=device))
    ours = fastnorm.nn.BatchNorm2d(5, momentum=None).to(device)
    ours.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(5).to(device)
    back.load_state_dict(ours.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    sync = fastnorm.nn.SyncBatchNorm(5).to(device)
    sync.load_state_dict(ref.state_dict())
    assert list(sync.state_dict()) == list(ref.state_dict())


def test_convert_swaps_batch_norm_in_place():
    bn1, bn2, sync = nn.BatchNorm1d(4), nn.BatchNorm2d(3), nn.SyncBatchNorm(3)
    model = nn.Sequential(bn2, nn.Sequential(bn1, nn.LayerNorm(4)), sync)
    weight = bn2.weight
    assert fastnorm.convert(model) is model
    assert type(model[0]) is fastnorm.nn.BatchNorm2d and model[0] is bn2
    assert type(model[1][0]) is fastnorm.nn.BatchNorm1d
    assert type(model[1][1]) is fastnorm.nn.LayerNorm
    assert type(model[2]) is fastnorm.nn.SyncBatchNorm
    assert model[0].weight is weight
    keys = list(model.state_dict())
    fastnorm.convert(model)  # idempotent
    assert type(model[0]) is fastnorm.nn.BatchNorm2d and list(model.state_dict()) == keys


def test_convert_to_sync_batch_norm_shares_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None),
                          nn.Sequential(nn.BatchNorm1d(4, affine=False)))
    model.eval()
    bn = model[1]
    params = (bn.weight, bn.bias)
    buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    keys = list(model.state_dict())
    out = fastnorm.convert(model, sync_batchnorm=True, process_group=None)
    assert out is model
    new = model[1]
    assert type(new) is fastnorm.nn.SyncBatchNorm and new is not bn
    assert (new.weight, new.bias) == params and new.weight is params[0]
    assert all(a is b for a, b in zip((new.running_mean, new.running_var,
                                       new.num_batches_tracked), buffers))
    assert new.momentum is None and not new.training
    assert type(model[2][0]) is fastnorm.nn.SyncBatchNorm and model[2][0].weight is None
    assert list(model.state_dict()) == keys
    again = fastnorm.convert(model, sync_batchnorm=True)
    assert again[1] is new  # idempotent
    root = fastnorm.convert(nn.BatchNorm3d(2), sync_batchnorm=True)
    assert type(root) is fastnorm.nn.SyncBatchNorm


# --- custom ops, autograd, compile ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_float64(training, relu, device, triton_backend):
    x = _make_input((3, 2, 2, 2), None, torch.float64, device).requires_grad_()
    weight, bias, running_mean, running_var = _params(2, device, dtype=torch.float64)
    weight.requires_grad_()
    bias.requires_grad_()

    def fn(x, weight, bias):
        # Fresh running stats per call: the update must not feed back into later calls.
        return fastnorm.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias,
                                   training, 0.1, 1e-5, activation="relu" if relu else None)

    assert torch.autograd.gradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_compile_training(momentum, device, triton_backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=momentum),
                          nn.ReLU()).to(device)
    ref = copy.deepcopy(model)
    fastnorm.convert(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = _make_input((2, 2, 3, 3), torch.channels_last, torch.float32, device, seed=step)
        y, y_ref = compiled(x), ref(x)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    assert int(model[1].num_batches_tracked) == 2


# --- bad inputs ----------------------------------------------------------------------------------

def test_bad_inputs(device, triton_backend):
    x = torch.randn(4, 3, 5, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for one_value in (torch.randn(1, 3, device=device), torch.randn(1, 3, 1, 1, device=device)):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when "
                                             "training, got input size"):
            fastnorm.batch_norm(one_value, None, None, training=True)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 4"):
        fastnorm.batch_norm(x, rm, rv, torch.ones(4, device=device), training=True)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 2"):
        fastnorm.batch_norm(x, rm[:2], rv, training=True)
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements not 6"):
        fastnorm.batch_norm(x, rm, torch.ones(6, device=device))
    with pytest.raises(ValueError, match="both be None or neither"):
        fastnorm.batch_norm(x, rm, None, training=True)
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        fastnorm.batch_norm(x, None, None, training=False)
    with pytest.raises(TypeError, match="floating-point input"):
        fastnorm.batch_norm(torch.ones(4, 3, dtype=torch.int64, device=device), rm, rv)
    # A 1-D input gets torch's own behaviour (an empty (0,) input returns empty, others raise
    # torch's error; see test_semantics.test_one_dim_batch_norm_inputs_like_torch).
    with pytest.raises(IndexError, match="Dimension out of range"):
        fastnorm.batch_norm(torch.randn(5, device=device), None, None, training=True)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        fastnorm.batch_norm(x, rm, rv, activation="gelu")
    with pytest.raises(ValueError, match="expected 4D input"):
        fastnorm.nn.BatchNorm2d(3).to(device)(x)


def test_sync_batch_norm_rejects_cpu_tensor_on_nccl():
    with pytest.raises(ValueError, match="NCCL backend, which needs CUDA tensors"):
        sync_batch_norm.check_backend_device(torch.randn(2, 3), "nccl")
    sync_batch_norm.check_backend_device(torch.randn(2, 3), "gloo")
    if torch.cuda.is_available():
        sync_batch_norm.check_backend_device(torch.randn(2, 3, device="cuda"), "nccl")


def test_sync_group_without_init_process_group():
    assert sync_batch_norm.sync_group(None) is None


def test_distributed_is_an_alias_of_sync_batch_norm():
    for name in distributed.__all__:
        assert getattr(distributed, name) is getattr(sync_batch_norm, name)


# --- kernel-level: fused running statistics, partials over several programs, NaN/Inf ----------

from fastnorm.triton import batch_norm as bn_kernels  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum_kind", ["float", "tensor"])
def test_running_stats_updated_by_the_combine_kernel(device, dtype, momentum_kind):
    """batch_norm_fwd with running stats updates them in place, as torch's batch_norm does,
    without a torch op of its own (the combine kernel writes them)."""
    x = _make_input((4, 3, 30), "channels_last_1d", dtype, device, mean=3.0)
    rm = torch.linspace(-1, 1, 3, dtype=dtype, device=device)
    rv = torch.linspace(0.5, 2, 3, dtype=dtype, device=device)
    ref_m, ref_v = rm.clone(), rv.clone()
    momentum = 0.25 if momentum_kind == "float" else torch.full((1,), 0.25, dtype=dtype,
                                                                device=device)
    y, mean, var = bn_kernels.batch_norm_fwd(x, None, None, 1e-5, False, rm, rv, momentum)
    F.batch_norm(x, ref_m, ref_v, None, None, True, 0.25, 1e-5)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, ref_m, **tol)
    torch.testing.assert_close(rv, ref_v, **tol)


def test_running_stats_need_two_values_per_channel(device):
    x = torch.randn(1, 3, 1, device=device)
    with pytest.raises(ValueError, match="more than 1 value"):
        bn_kernels.batch_norm_stats(x, torch.zeros(3), torch.ones(3), 0.1)


@pytest.mark.parametrize("layout", ["cl", "cf"])
def test_partials_over_many_programs(device, layout):
    """Small inputs fill one reduce program; forcing one tile per program exercises the
    multi-row partials and their fixed-order combine (same result up to rounding, repeatable)."""
    from fastnorm.triton._common import planning_override

    with planning_override(bn_kernels, "MIN_TILES_PER_PROGRAM", 1), \
            planning_override(bn_kernels, "TILE_ELEMS", 64):
        _check_partials_over_many_programs(device, layout)


def _check_partials_over_many_programs(device, layout):
    fmt = "channels_last_1d" if layout == "cl" else None
    x = _make_input((16, 4, 40), fmt, torch.float32, device, mean=100.0)
    plan = bn_kernels.BatchNormReducePlan.make(16, 4, 40, x.dtype, layout == "cl", False, device)
    assert plan.groups > 1
    mean, var = bn_kernels.batch_norm_stats(x)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2)), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(var.double(), x64.var((0, 2), unbiased=False), atol=1e-4,
                               rtol=1e-5)
    again = bn_kernels.batch_norm_stats(x)
    assert torch.equal(mean, again[0]) and torch.equal(var, again[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("shape,fmt", [((4, 3, 5), None), ((4, 3, 5), "channels_last_1d")],
                         ids=["NCL", "NLC"])
def test_relu_nan_inf_channel_matches_torch(device, triton_backend, bad, shape, fmt):
    """A channel holding a NaN/Inf: the output (NaN, through the ReLU too) and every gradient
    as torch's batch_norm + relu, whose ReLU backward masks with `output <= 0` (False for NaN),
    so the bias gradient of that channel is sum(dy)."""
    x = _make_input(shape, fmt, torch.float32, device)
    x[1, 1, 2] = bad
    weight, bias = _params(shape[1], device)[:2]
    dy = _make_input(shape, fmt, torch.float32, device, seed=5)
    outs = []
    for fn in (lambda *a: fastnorm.batch_norm(*a, activation="relu"),
               lambda *a: F.relu(F.batch_norm(*a))):
        xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        y = fn(xl, None, None, wl, bl, True, 0.1, 1e-5)
        y.backward(dy)
        outs.append((y, xl.grad, wl.grad, bl.grad))
    for ours, ref, name in zip(outs[0], outs[1], ("y", "dx", "dweight", "dbias")):
        torch.testing.assert_close(ours, ref, equal_nan=True, atol=1e-5, rtol=1e-5, msg=name)
    assert outs[0][0][:, 1].isnan().all()
    assert torch.isfinite(outs[0][3][1]), "dbias of the NaN channel is sum(dy), finite"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_eval_relu_keeps_nan(device, triton_backend, bad):
    x = torch.randn(4, 3, 5, device=device)
    x[0, 0, 0] = bad
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = fastnorm.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-5, activation="relu")
    ref = F.relu(F.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-5))
    torch.testing.assert_close(y, ref, equal_nan=True)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_update_strided_buffers_in_place(device, backend, momentum):
    """Non-contiguous running buffers (e.g. a view of a larger buffer) are updated in place, as
    torch updates them; the fused update writes a contiguous copy, written back."""
    x = torch.randn(5, 5, 5, device=device)
    ours = (torch.zeros(10, device=device)[::2], torch.ones(10, device=device)[::2])
    ref = (torch.zeros(10, device=device)[::2], torch.ones(10, device=device)[::2])
    if momentum is None:  # the modules' cumulative average: a tensor factor
        factor = torch.tensor(0.5, dtype=torch.float64, device=device)
        fastnorm.batch_norm(x, *ours, training=True, momentum=factor)
        F.batch_norm(x, *ref, training=True, momentum=0.5)
    else:
        fastnorm.batch_norm(x, *ours, training=True, momentum=momentum)
        F.batch_norm(x, *ref, training=True, momentum=momentum)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.equal(ours[0], torch.zeros_like(ours[0]))
