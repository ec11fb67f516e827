"""Custom ops for channels-first LayerNorm and RMSNorm: normalize over C at every (n, s) of a
3-D view (N, C, S), S = product of the spatial dims (timm/torchvision `LayerNorm2d`, HF
`ConvNextLayerNorm(data_format="channels_first")`).

fastnorm::layer_norm_2d_fwd(x, weight?, bias?, eps) -> (y, mean, rstd)
fastnorm::layer_norm_2d_bwd(dy, x, weight?, bias?, mean, rstd) -> (dx, dweight, dbias)
fastnorm::rms_norm_2d_fwd(x, weight?, eps) -> (y, rstd)
fastnorm::rms_norm_2d_bwd(dy, x, weight?, rstd) -> (dx, dweight)

x is NCHW-contiguous or channels-last ((N, S, C) in memory); y and dx keep that layout, any
other strides give contiguous results (as the GroupNorm and BatchNorm ops). dy may have any
strides. mean/rstd are (N, S) in fp32 (fp64 for fp64 x). A gradient output whose parameter is
absent comes back as an empty tensor (a custom op cannot return None).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dtypes import stats_dtype
from .._layout import canonical, channel_view, channels_3d
from . import _checks
from ._common import (autograd_function, cuda_autocast_fp32, eager, needs_grad,
                      register_fp32_autocast, to_fp32, torch_autocasts, torch_grads, viewed_call)
from ._router import kernel

# Whether torch's CUDA autocast runs each norm in float32 (the permute formulation runs
# F.layer_norm / F.rms_norm, so their rules are the ones to follow).
_LN_AUTOCAST = torch_autocasts("layer_norm")
_RMS_AUTOCAST = torch_autocasts("rms_norm")


def _check(op: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    _checks.input_(op, x, 3)
    _checks.param(op, "weight", weight, x.shape[1], x)
    _checks.param(op, "bias", bias, x.shape[1], x)


def _check_bwd(op: str, dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               mean: Optional[Tensor], rstd: Tensor) -> None:
    _check(op, x, weight, bias)
    _checks.like(op, "dy", dy, x)
    n, _c, s = x.shape
    if mean is not None:
        _checks.stats(op, "mean", mean, (n, s), x)
    _checks.stats(op, "rstd", rstd, (n, s), x)


def _output_like(x: Tensor) -> Tensor:
    """What the kernels return for x: its own layout when it is one of the two they handle."""
    return torch.empty_like(canonical(x))


def _param_grad_like(t: Optional[Tensor], x: Tensor) -> Tensor:
    return x.new_empty(0) if t is None else torch.empty_like(t)


def _channels_first(fn, x: Tensor, *args) -> Tensor:
    """`fn` (F.layer_norm / F.rms_norm over the last dim) applied over dim 1 of x: the permute
    formulation, differentiable (the double backward's ops)."""
    return fn(x.transpose(1, 2), *args).transpose(1, 2)


# --- LayerNorm ---------------------------------------------------------------------------------
# As in fastnorm/ops/layer_norm.py: each op has an implementation (`_<op>`, arguments checked,
# x canonical), the registered op (checks, then the implementation) and, for the forwards, an
# eager entry that skips the dispatcher when it may (fastnorm/ops/_common.py, `eager`).

def _layer_norm_2d_fwd(x, weight, bias, eps):
    return kernel("layer_norm_2d_fwd", x)(x, weight, bias, eps)


@torch.library.custom_op("fastnorm::layer_norm_2d_fwd", mutates_args=())
def layer_norm_2d_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check("layer_norm_2d_fwd", x, weight, bias)
    return _layer_norm_2d_fwd(canonical(x), weight, bias, eps)


@layer_norm_2d_fwd.register_fake
def _(x, weight, bias, eps):
    _check("layer_norm_2d_fwd", x, weight, bias)
    n, _c, s = x.shape
    stats = stats_dtype(x.dtype)
    return _output_like(x), x.new_empty((n, s), dtype=stats), x.new_empty((n, s), dtype=stats)


def _layer_norm_2d_bwd(dy, x, weight, bias, mean, rstd):
    return kernel("layer_norm_2d_bwd", x)(dy, x, weight, bias, mean, rstd)


@torch.library.custom_op("fastnorm::layer_norm_2d_bwd", mutates_args=())
def layer_norm_2d_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check_bwd("layer_norm_2d_bwd", dy, x, weight, bias, mean, rstd)
    return _layer_norm_2d_bwd(dy, canonical(x), weight, bias, mean, rstd)


@layer_norm_2d_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd):
    _check_bwd("layer_norm_2d_bwd", dy, x, weight, bias, mean, rstd)
    return _output_like(x), _param_grad_like(weight, x), _param_grad_like(bias, x)


def _layer_norm_2d_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps = eps


def _layer_norm_2d_backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # only the statistics were used: nothing flows back
        return None, None, None, None
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        return (*torch_grads(
            lambda x, w, b: _channels_first(F.layer_norm, x, (x.shape[1],), w, b, ctx.eps),
            (x, weight, bias), ctx.needs_input_grad[:3], dy), None)
    bwd = _layer_norm_2d_bwd if eager((dy, x)) else layer_norm_2d_bwd
    dx, dw, db = bwd(dy, canonical(x), weight, bias, mean, rstd)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            None)


layer_norm_2d_fwd.register_autograd(_layer_norm_2d_backward,
                                    setup_context=_layer_norm_2d_setup_context)
register_fp32_autocast(layer_norm_2d_fwd, "layer_norm")
_layer_norm_2d_apply = autograd_function("LayerNorm2dFunction", _layer_norm_2d_fwd,
                                         _layer_norm_2d_setup_context, _layer_norm_2d_backward,
                                         view=channel_view, grad_view=channels_3d)


def layer_norm_2d(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  eps: float) -> Tensor:
    """fastnorm::layer_norm_2d_fwd with autograd, from the functional layer (arguments checked):
    y of an (N, C, *) input, in its shape, computed on the (N, C, S) view."""
    if not eager((input, weight, bias)):
        return viewed_call(layer_norm_2d_fwd, channel_view, input, weight, bias, eps)
    if cuda_autocast_fp32(input, _LN_AUTOCAST):
        input, weight, bias = to_fp32(input), to_fp32(weight), to_fp32(bias)
    if needs_grad((input, weight, bias)):
        return _layer_norm_2d_apply(input, weight, bias, eps)
    return viewed_call(_layer_norm_2d_fwd, channel_view, input, weight, bias, eps)


# --- RMSNorm -----------------------------------------------------------------------------------

def _rms_norm_2d_fwd(x, weight, eps):
    return kernel("rms_norm_2d_fwd", x)(x, weight, eps)


@torch.library.custom_op("fastnorm::rms_norm_2d_fwd", mutates_args=())
def rms_norm_2d_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    _check("rms_norm_2d_fwd", x, weight, None)
    return _rms_norm_2d_fwd(canonical(x), weight, eps)


@rms_norm_2d_fwd.register_fake
def _(x, weight, eps):
    _check("rms_norm_2d_fwd", x, weight, None)
    n, _c, s = x.shape
    return _output_like(x), x.new_empty((n, s), dtype=stats_dtype(x.dtype))


def _rms_norm_2d_bwd(dy, x, weight, rstd):
    return kernel("rms_norm_2d_bwd", x)(dy, x, weight, rstd)


@torch.library.custom_op("fastnorm::rms_norm_2d_bwd", mutates_args=())
def rms_norm_2d_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                    rstd: Tensor) -> tuple[Tensor, Tensor]:
    _check_bwd("rms_norm_2d_bwd", dy, x, weight, None, None, rstd)
    return _rms_norm_2d_bwd(dy, canonical(x), weight, rstd)


@rms_norm_2d_bwd.register_fake
def _(dy, x, weight, rstd):
    _check_bwd("rms_norm_2d_bwd", dy, x, weight, None, None, rstd)
    return _output_like(x), _param_grad_like(weight, x)


def _rms_norm_2d_setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.eps = eps


def _rms_norm_2d_backward(ctx, dy, _drstd):
    if dy is None:
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        return (*torch_grads(
            lambda x, w: _channels_first(F.rms_norm, x, (x.shape[1],), w, ctx.eps),
            (x, weight), ctx.needs_input_grad[:2], dy), None)
    bwd = _rms_norm_2d_bwd if eager((dy, x)) else rms_norm_2d_bwd
    dx, dw = bwd(dy, canonical(x), weight, rstd)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            None)


rms_norm_2d_fwd.register_autograd(_rms_norm_2d_backward,
                                  setup_context=_rms_norm_2d_setup_context)
register_fp32_autocast(rms_norm_2d_fwd, "rms_norm")
_rms_norm_2d_apply = autograd_function("RMSNorm2dFunction", _rms_norm_2d_fwd,
                                       _rms_norm_2d_setup_context, _rms_norm_2d_backward,
                                       view=channel_view, grad_view=channels_3d)


def rms_norm_2d(input: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """fastnorm::rms_norm_2d_fwd with autograd, from the functional layer (arguments checked):
    y of an (N, C, *) input, in its shape."""
    if not eager((input, weight)):
        return viewed_call(rms_norm_2d_fwd, channel_view, input, weight, eps)
    if cuda_autocast_fp32(input, _RMS_AUTOCAST):
        input, weight = to_fp32(input), to_fp32(weight)
    if needs_grad((input, weight)):
        return _rms_norm_2d_apply(input, weight, eps)
    return viewed_call(_rms_norm_2d_fwd, channel_view, input, weight, eps)
