"""Custom ops for GroupNorm (optionally fused with SiLU) on a 3-D view (N, C, HW).

fastnorm::group_norm_fwd(x, weight?, bias?, num_groups, eps, activation) -> (y, mean, rstd)
fastnorm::group_norm_bwd(dy, x, weight?, bias?, mean, rstd, num_groups, activation)
    -> (dx, dweight, dbias)
fastnorm::group_norm_bwd_pe(dy, x, weight?, bias?, mean, rstd, num_groups, activation)
    -> (dx, dweight, dbias, dweight_sq, dbias_sq)
fastnorm::group_norm_fwd_gns(x, weight?, bias?, sink, num_groups, eps, activation)
    -> (y, mean, rstd)

x is NCHW-contiguous or channels-last ((N, HW, C) in memory); y and dx keep that layout, any
other strides give contiguous results. group_norm_bwd_pe is group_norm_bwd (dx, dweight, dbias
bitwise the same) that also returns each example's (index n's) squared dweight / dbias norm:
[N] in the statistics dtype, empty where there is no weight / bias. group_norm_fwd_gns is
group_norm_fwd whose backward runs group_norm_bwd_pe and returns the noise-scale sums as the
gradient of `sink`, as fastnorm::layer_norm_fwd_gns does. activation is "none" or "silu". A
gradient output whose parameter is absent comes back as an empty tensor (a custom op cannot
return None). mean/rstd are (N, G) in fp32 (fp64 for fp64 x).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dtypes import stats_dtype
from .._layout import GROUP_NORM_ACTIVATIONS, canonical, channel_view, channels_3d
from . import _checks
from ._common import (autograd_function, cuda_autocast_fp32, eager, needs_grad,
                      register_fp32_autocast, to_fp32, torch_autocasts, torch_grads, viewed_call)
from ._router import kernel
from .gns import sink_grad

_GN_AUTOCAST = torch_autocasts("group_norm")  # torch's CUDA autocast runs it in float32


def _output_like(x: Tensor) -> Tensor:
    """What the kernels return for x: its own layout when it is one of the two they handle."""
    return torch.empty_like(canonical(x))


def _check(op: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           num_groups: int, activation: str) -> None:
    _checks.choice(op, "activation", activation, GROUP_NORM_ACTIVATIONS)
    _checks.input_(op, x, 3)
    c = x.shape[1]
    _checks.check(num_groups > 0, op, f"expected num_groups > 0, got {num_groups}")
    _checks.check(c % num_groups == 0, op, f"expected the {c} channels to be divisible by "
                                           f"num_groups={num_groups}")
    _checks.param(op, "weight", weight, c, x)
    _checks.param(op, "bias", bias, c, x)


def _check_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation,
               op: str = "group_norm_bwd") -> None:
    _check(op, x, weight, bias, num_groups, activation)
    _checks.like(op, "dy", dy, x)
    _checks.stats(op, "mean", mean, (x.shape[0], num_groups), x)
    _checks.stats(op, "rstd", rstd, (x.shape[0], num_groups), x)


@torch.library.custom_op("fastnorm::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                   eps: float, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    _check("group_norm_fwd", x, weight, bias, num_groups, activation)
    return _group_norm_fwd(canonical(x), weight, bias, num_groups, eps, activation)


# Implementations (x already in a canonical layout, arguments checked): the registered ops and
# the eager entries below call them.
def _group_norm_fwd(x, weight, bias, num_groups, eps, activation):
    return kernel("group_norm_fwd", x)(x, weight, bias, num_groups, eps, activation)


@group_norm_fwd.register_fake
def _(x, weight, bias, num_groups, eps, activation):
    _check("group_norm_fwd", x, weight, bias, num_groups, activation)
    stats = stats_dtype(x.dtype)
    n = x.shape[0]
    return (_output_like(x), x.new_empty((n, num_groups), dtype=stats),
            x.new_empty((n, num_groups), dtype=stats))


@torch.library.custom_op("fastnorm::group_norm_bwd", mutates_args=())
def group_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, num_groups: int,
                   activation: str) -> tuple[Tensor, Tensor, Tensor]:
    _check_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation)
    return _group_norm_bwd(dy, canonical(x), weight, bias, mean, rstd, num_groups, activation)


def _group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation):
    return kernel("group_norm_bwd", x)(dy, x, weight, bias, mean, rstd, num_groups, activation)


@group_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, activation):
    _check_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation)
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    db = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return _output_like(x), dw, db


def _group_norm_setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps = num_groups, eps
    ctx.activation = activation


def _group_norm_backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # only the statistics were used: nothing flows back
        return None, None, None, None, None, None
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        def forward(x, w, b):
            y = F.group_norm(x, ctx.num_groups, w, b, ctx.eps)
            return F.silu(y) if ctx.activation == "silu" else y
        return (*torch_grads(forward, (x, weight, bias), ctx.needs_input_grad[:3], dy),
                None, None, None)
    bwd = _group_norm_bwd if eager((dy, x)) else group_norm_bwd
    dx, dw, db = bwd(dy, canonical(x), weight, bias, mean, rstd, ctx.num_groups, ctx.activation)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None)


group_norm_fwd.register_autograd(_group_norm_backward, setup_context=_group_norm_setup_context)
register_fp32_autocast(group_norm_fwd, "group_norm")
_group_norm_apply = autograd_function("GroupNormFunction", _group_norm_fwd,
                                      _group_norm_setup_context, _group_norm_backward,
                                      view=channel_view, grad_view=channels_3d)


def group_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
               eps: float, activation: str) -> Tensor:
    """fastnorm::group_norm_fwd with autograd, from the functional layer (arguments checked):
    y of an (N, C, *) input, in its shape, computed on the (N, C, S) view."""
    if not eager((input, weight, bias)):
        return viewed_call(group_norm_fwd, channel_view, input, weight, bias, num_groups, eps,
                           activation)
    if cuda_autocast_fp32(input, _GN_AUTOCAST):
        input, weight, bias = to_fp32(input), to_fp32(weight), to_fp32(bias)
    if needs_grad((input, weight, bias)):
        return _group_norm_apply(input, weight, bias, num_groups, eps, activation)
    return viewed_call(_group_norm_fwd, channel_view, input, weight, bias, num_groups, eps,
                       activation)


# --- Per-example squared gradient norms (gradient noise scale) ---------------------------------

def _check_pe(dy, x, weight, bias, mean, rstd, num_groups, activation) -> None:
    _check_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation, op="group_norm_bwd_pe")


@torch.library.custom_op("fastnorm::group_norm_bwd_pe", mutates_args=())
def group_norm_bwd_pe(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      mean: Tensor, rstd: Tensor, num_groups: int, activation: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_pe(dy, x, weight, bias, mean, rstd, num_groups, activation)
    return _group_norm_bwd_pe(dy, canonical(x), weight, bias, mean, rstd, num_groups,
                              activation)


def _group_norm_bwd_pe(dy, x, weight, bias, mean, rstd, num_groups, activation):
    return kernel("group_norm_bwd_pe", x)(dy, x, weight, bias, mean, rstd, num_groups,
                                          activation)


@group_norm_bwd_pe.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, activation):
    _check_pe(dy, x, weight, bias, mean, rstd, num_groups, activation)
    stats = stats_dtype(x.dtype)
    n = x.shape[0]
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    db = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return (_output_like(x), dw, db, x.new_empty(0 if weight is None else n, dtype=stats),
            x.new_empty(0 if bias is None else n, dtype=stats))


def _check_gns_fwd(x, weight, bias, sink, num_groups, activation) -> None:
    op = "group_norm_fwd_gns"
    _check(op, x, weight, bias, num_groups, activation)
    _checks.check(sink.shape == (4,) and sink.dtype == torch.float32, op,
                  f"expected sink of shape (4,) and dtype float32, got {tuple(sink.shape)} "
                  f"{sink.dtype}")


@torch.library.custom_op("fastnorm::group_norm_fwd_gns", mutates_args=())
def group_norm_fwd_gns(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], sink: Tensor,
                       num_groups: int, eps: float, activation: str
                       ) -> tuple[Tensor, Tensor, Tensor]:
    _check_gns_fwd(x, weight, bias, sink, num_groups, activation)
    return _group_norm_fwd_gns(canonical(x), weight, bias, sink, num_groups, eps, activation)


def _group_norm_fwd_gns(x, weight, bias, sink, num_groups, eps, activation):
    return kernel("group_norm_fwd", x)(x, weight, bias, num_groups, eps, activation)


@group_norm_fwd_gns.register_fake
def _(x, weight, bias, sink, num_groups, eps, activation):
    _check_gns_fwd(x, weight, bias, sink, num_groups, activation)
    stats = stats_dtype(x.dtype)
    n = x.shape[0]
    return (_output_like(x), x.new_empty((n, num_groups), dtype=stats),
            x.new_empty((n, num_groups), dtype=stats))


def _gns_setup_context(ctx, inputs, output):
    x, weight, bias, _sink, num_groups, eps, activation = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation


def _gns_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None, None, None, None
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, no sums
        def forward(x, w, b):
            y = F.group_norm(x, ctx.num_groups, w, b, ctx.eps)
            return F.silu(y) if ctx.activation == "silu" else y
        return (*torch_grads(forward, (x, weight, bias), need[:3], dy), None, None, None, None)
    route = eager((dy, x))
    bwd = _group_norm_bwd_pe if route else group_norm_bwd_pe
    dx, dw, db, dw_sq, db_sq = bwd(dy, canonical(x), weight, bias, mean, rstd, ctx.num_groups,
                                   ctx.activation)
    dsink = sink_grad(route, dw_sq, db_sq, dw, db, x.shape[0]) if need[3] else None
    return (dx if need[0] else None,
            dw if weight is not None and need[1] else None,
            db if bias is not None and need[2] else None,
            dsink, None, None, None)


group_norm_fwd_gns.register_autograd(_gns_backward, setup_context=_gns_setup_context)
register_fp32_autocast(group_norm_fwd_gns, "group_norm")
_group_norm_gns_apply = autograd_function("GroupNormGNSFunction", _group_norm_fwd_gns,
                                          _gns_setup_context, _gns_backward, view=channel_view,
                                          grad_view=channels_3d)


def group_norm_gns(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   sink: Tensor, num_groups: int, eps: float, activation: str) -> Tensor:
    """fastnorm::group_norm_fwd_gns with autograd, from the functional layer: y of an
    (N, C, *) input, in its shape."""
    if not eager((input, weight, bias, sink)):
        return viewed_call(group_norm_fwd_gns, channel_view, input, weight, bias, sink,
                           num_groups, eps, activation)
    if cuda_autocast_fp32(input, _GN_AUTOCAST):
        input, weight, bias = to_fp32(input), to_fp32(weight), to_fp32(bias)
    if needs_grad((input, weight, bias, sink)):
        return _group_norm_gns_apply(input, weight, bias, sink, num_groups, eps, activation)
    return viewed_call(_group_norm_fwd_gns, channel_view, input, weight, bias, sink, num_groups,
                       eps, activation)
