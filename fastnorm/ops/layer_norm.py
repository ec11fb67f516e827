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

from .._dtypes import residual_stream_dtype, stats_dtype
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


# --- Fused residual add + LayerNorm/RMSNorm ------------------------------------------------------
# fastnorm::add_layer_norm_fwd(x, residual?, weight?, bias?, eps, is_rms, residual_in_fp32,
#                              rounding, store_residual) -> (y, h, mean, rstd)
# fastnorm::add_layer_norm_bwd(dy, dh?, h, weight?, bias?, mean, rstd, is_rms, rounding)
#                              -> (dh_total, dweight, dbias)
# fastnorm::add_layer_norm_inplace(x!, residual!, weight?, bias?, eps, is_rms) -> ()
# With a residual, the norm runs on h = x + residual, which comes back as the new residual
# stream (in fp32 with residual_in_fp32, else in residual's dtype); without one h is empty and
# the op is the plain norm. `rounding` reproduces a model's own roundings: "none"; "llama"
# (x_hat rounded to x's dtype before the weight multiply, and the backward's w*dy and dW terms,
# as torch's autograd does for transformers' Llama-style RMSNorm); "t5" (the same, plus dx's two
# terms rounded separately, as for T5LayerNorm). store_residual=False skips writing h
# (h comes back empty; for calls that need neither h nor a backward). The backward adds the
# gradient of h from its other uses (dh) into the norm's input gradient in the same kernel;
# dh_total has h's dtype.

def _check_rounding(rounding: str) -> str:
    if rounding not in ("none", "llama", "t5"):
        raise ValueError(f"fastnorm::add_layer_norm: rounding must be 'none', 'llama' or 't5', "
                         f"got {rounding!r}")
    return rounding


def _add_norm_h_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool):
    if residual is None:
        return None
    return residual_stream_dtype(x.dtype, residual.dtype, residual_in_fp32)


@torch.library.custom_op("fastnorm::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, is_rms: bool, residual_in_fp32: bool,
                       rounding: str, store_residual: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, rstd, h = kernels.add_layer_norm_fwd(
        x, residual, weight, bias, eps, is_rms,
        residual_dtype=_add_norm_h_dtype(x, residual, residual_in_fp32),
        round_xhat=_check_rounding(rounding) != "none",
        store_residual=store_residual)
    return y, h, mean, rstd


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms, residual_in_fp32, rounding, store_residual):
    _check_rounding(rounding)
    m = x.shape[0]
    stats = stats_dtype(x.dtype)
    h_dtype = _add_norm_h_dtype(x, residual, residual_in_fp32)
    h = x.new_empty(0) if h_dtype is None or not store_residual \
        else x.new_empty(x.shape, dtype=h_dtype)
    mean = x.new_empty(0 if is_rms else m, dtype=stats)
    return x.new_empty(x.shape), h, mean, x.new_empty(m, dtype=stats)


@torch.library.custom_op("fastnorm::add_layer_norm_bwd", mutates_args=())
def add_layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], mean: Tensor, rstd: Tensor, is_rms: bool,
                       rounding: str) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = kernels.layer_norm_bwd(dy, h, weight, None if is_rms else bias, mean, rstd,
                                        is_rms=is_rms, dresidual=dh,
                                        round_xhat=_check_rounding(rounding) != "none",
                                        round_dx_terms=is_rms and rounding == "t5")
    return dx, empty_if_none(dw, h), empty_if_none(db, h)


@add_layer_norm_bwd.register_fake
def _(dy, dh, h, weight, bias, mean, rstd, is_rms, rounding):
    dw = h.new_empty(0) if weight is None else torch.empty_like(weight)
    db = h.new_empty(0) if bias is None or is_rms else torch.empty_like(bias)
    return h.new_empty(h.shape), dw, db


def _add_layer_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, _fp32, rounding, store_residual = inputs
    _y, h, mean, rstd = output
    ctx.eps = eps
    ctx.has_residual = residual is not None
    ctx.stored = residual is None or store_residual
    ctx.is_rms = is_rms
    ctx.rounding = rounding
    ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
    ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)
    ctx.set_materialize_grads(False)  # an unused residual stream costs no zero tensor


def _add_layer_norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, bias, mean, rstd = ctx.saved_tensors
    if not ctx.stored:
        raise RuntimeError("fastnorm::add_layer_norm_fwd ran with store_residual=False, which "
                           "keeps no input for a backward; call it with store_residual=True "
                           "(fastnorm.layer_norm/rms_norm do when a gradient is required)")
    if dy is None:
        dy = torch.zeros(h.shape, dtype=ctx.dtypes[0], device=h.device)
    if not ctx.has_residual:
        dh = None
    elif dh is not None:
        dh = dh.contiguous()
    x_dtype, r_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    if torch.is_grad_enabled() and ctx.has_residual:
        # create_graph=True. Only h is saved (not x and the residual, which would keep two more
        # activations alive in every training step), and h is this op's own output, so its
        # gradient cannot be rebuilt as a differentiable function of x and the residual.
        raise RuntimeError(
            "fastnorm::add_layer_norm_fwd: double backward (create_graph=True) through the fused "
            "residual add + norm is not supported; compute h = x + residual and call "
            "fastnorm.layer_norm/rms_norm on h without residual= (differentiable twice)")
    if torch.is_grad_enabled():  # no residual: the plain norm of x, differentiable again
        from ..functional import norm_reference

        dh_total, dw, db = torch_grads(
            lambda x, w, b: norm_reference(x, x.shape[1:], w, b, ctx.eps, ctx.is_rms,
                                           ctx.rounding, x_dtype),
            (h, weight, None if ctx.is_rms else bias), (need[0], need[2], need[3]), dy)
    else:
        dh_total, dw, db = add_layer_norm_bwd(dy.contiguous(), dh, h, weight, bias, mean, rstd,
                                              ctx.is_rms, ctx.rounding)
    # d(x + r)/dx = d(x + r)/dr = 1: both get the gradient of h, each in its own dtype.
    return (dh_total.to(x_dtype) if need[0] else None,
            dh_total.to(r_dtype) if ctx.has_residual and need[1] else None,
            dw if weight is not None and need[2] else None,
            db if bias is not None and not ctx.is_rms and need[3] else None,
            None, None, None, None, None)


add_layer_norm_fwd.register_autograd(_add_layer_norm_backward,
                                     setup_context=_add_layer_norm_setup_context)


@torch.library.custom_op("fastnorm::add_layer_norm_inplace", mutates_args=("x", "residual"))
def add_layer_norm_inplace(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float, is_rms: bool) -> None:
    kernels.add_layer_norm_fwd(x, residual, weight, bias, eps, is_rms, inplace=True)


@add_layer_norm_inplace.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    return None
