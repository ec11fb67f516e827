"""Custom ops for LayerNorm and RMSNorm on a 2-D view (M rows, N features).

fastnorm::layer_norm_fwd(x, weight?, bias?, eps) -> (y, mean, rstd)
fastnorm::layer_norm_bwd(dy, x, weight?, bias?, mean, rstd) -> (dx, dweight, dbias)
fastnorm::rms_norm_fwd(x, weight?, eps) -> (y, rstd)
fastnorm::rms_norm_bwd(dy, x, weight?, rstd) -> (dx, dweight)

A gradient output whose parameter is absent comes back as an empty tensor (a custom op cannot
return None). mean/rstd are fp32 (fp64 for fp64 x).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dtypes import stats_dtype
from ..triton import layer_norm as kernels
from ._common import empty_if_none, register_fp32_autocast, torch_grads




# --- LayerNorm ---------------------------------------------------------------------------------

@torch.library.custom_op("fastnorm::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.layer_norm_fwd(x, weight, bias, eps, is_rms=False)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    m = x.shape[0]
    stats = stats_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty(m, dtype=stats), x.new_empty(m, dtype=stats)


@torch.library.custom_op("fastnorm::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = kernels.layer_norm_bwd(dy, x, weight, bias, mean, rstd, is_rms=False)
    return dx, empty_if_none(dw, x), empty_if_none(db, x)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd):
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    db = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return x.new_empty(x.shape), dw, db


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps = eps


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        return (*torch_grads(lambda x, w, b: F.layer_norm(x, x.shape[1:], w, b, ctx.eps),
                             (x, weight, bias), ctx.needs_input_grad[:3], dy), None)
    dx, dw, db = layer_norm_bwd(dy.contiguous(), x, weight, bias, mean, rstd)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            None)


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)
register_fp32_autocast(layer_norm_fwd)


# --- RMSNorm -----------------------------------------------------------------------------------

@torch.library.custom_op("fastnorm::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    y, _mean, rstd = kernels.layer_norm_fwd(x, weight, None, eps, is_rms=True)
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=stats_dtype(x.dtype))


@torch.library.custom_op("fastnorm::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                 rstd: Tensor) -> tuple[Tensor, Tensor]:
    dx, dw, _db = kernels.layer_norm_bwd(dy, x, weight, None, rstd.new_empty(0), rstd,
                                         is_rms=True)
    return dx, empty_if_none(dw, x)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    return x.new_empty(x.shape), dw


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.eps = eps


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        return (*torch_grads(lambda x, w: F.rms_norm(x, x.shape[1:], w, ctx.eps),
                             (x, weight), ctx.needs_input_grad[:2], dy), None)
    dx, dw = rms_norm_bwd(dy.contiguous(), x, weight, rstd)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            None)


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)
register_fp32_autocast(rms_norm_fwd)
