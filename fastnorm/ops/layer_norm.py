"""Custom ops for LayerNorm and RMSNorm on a 2-D view (M rows, N features).

fastnorm::layer_norm_fwd(x, weight?, bias?, eps) -> (y, mean, rstd)
fastnorm::layer_norm_bwd(dy, x, weight?, bias?, mean, rstd) -> (dx, dweight, dbias)
fastnorm::rms_norm_fwd(x, weight?, eps) -> (y, rstd)
fastnorm::rms_norm_bwd(dy, x, weight?, rstd) -> (dx, dweight)

fastnorm::layer_norm_bwd_pe(dy, x, weight?, bias?, mean, rstd, is_rms, rows_per_example)
    -> (dx, dweight, dbias, dweight_sq, dbias_sq)

layer_norm_bwd_pe is the backward of layer_norm_fwd (is_rms=False) or rms_norm_fwd (is_rms=True,
`mean` empty, `bias` ignored) that also returns, per example (rows_per_example consecutive rows
of x; M must be a multiple of it), the squared norm of that example's dweight and dbias
contributions: dweight_sq, dbias_sq of shape [M // rows_per_example] in the statistics dtype
(empty where there is no weight / bias). dx, dweight and dbias are bitwise those of
layer_norm_bwd / rms_norm_bwd. Triton: every backward path (whole-row, persistent rows,
column-chunked), any N.

A gradient output whose parameter is absent comes back as an empty tensor (a custom op cannot
return None). mean/rstd are fp32 (fp64 for fp64 x).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dtypes import cast, residual_stream_dtype, stats_dtype
from .._layout import row_view, rows
from ..reference import norm_reference
from . import _checks
from ._common import (autograd_function, bump_versions, c_apply, cuda_autocast_fp32, eager,
                      needs_grad, register_fp32_autocast, to_fp32, torch_autocasts, torch_grads,
                      viewed_call)
from ._router import kernel
from .gns import sink_grad

# Whether torch's CUDA autocast runs each norm in float32 (the entries apply the same rule).
_LN_AUTOCAST = torch_autocasts("layer_norm")
_RMS_AUTOCAST = torch_autocasts("rms_norm")


def _check_rows(op: str, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    _checks.input_(op, x, 2)
    _checks.unit_column_stride(op, x)
    _checks.param(op, "weight", weight, x.shape[1], x)
    _checks.param(op, "bias", bias, x.shape[1], x)


def _check_rows_bwd(op: str, dy: Tensor, x: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor,
                    x_name: str = "x") -> None:
    _check_rows(op, x, weight, bias)
    _checks.like(op, "dy", dy, x, x_name)
    _checks.unit_column_stride(op, dy, "dy")
    if mean is not None:
        _checks.stats(op, "mean", mean, (x.shape[0],), x)
    _checks.stats(op, "rstd", rstd, (x.shape[0],), x)


# --- LayerNorm ---------------------------------------------------------------------------------

# Each op has an implementation (`_<op>`: the router's kernel, arguments already checked), the
# registered op (checks, then the implementation) and, for the forwards the functional layer
# calls, an eager entry (`<op>` without the suffix) that skips the dispatcher when it may (see
# fastnorm/ops/_common.py, `eager`).

def _layer_norm_fwd(x, weight, bias, eps):
    return kernel("layer_norm_fwd", x)(x, weight, bias, eps)


@torch.library.custom_op("fastnorm::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_rows("layer_norm_fwd", x, weight, bias)
    return _layer_norm_fwd(x, weight, bias, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    _check_rows("layer_norm_fwd", x, weight, bias)
    m = x.shape[0]
    stats = stats_dtype(x.dtype)
    return x.new_empty(x.shape), x.new_empty(m, dtype=stats), x.new_empty(m, dtype=stats)


def _layer_norm_bwd(dy, x, weight, bias, mean, rstd):
    return kernel("layer_norm_bwd", x)(dy, x, weight, bias, mean, rstd)


@torch.library.custom_op("fastnorm::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    _check_rows_bwd("layer_norm_bwd", dy, x, weight, bias, mean, rstd)
    return _layer_norm_bwd(dy, x, weight, bias, mean, rstd)


@layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd):
    _check_rows_bwd("layer_norm_bwd", dy, x, weight, bias, mean, rstd)
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    db = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return x.new_empty(x.shape), dw, db


def _layer_norm_setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps = eps


def _layer_norm_backward(ctx, dy, _dmean, _drstd):
    if dy is None:  # only the statistics were used: nothing flows back
        return None, None, None, None
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        return (*torch_grads(lambda x, w, b: F.layer_norm(x, x.shape[1:], w, b, ctx.eps),
                             (x, weight, bias), ctx.needs_input_grad[:3], dy), None)
    dy = dy.contiguous()
    bwd = _layer_norm_bwd if eager((dy, x)) else layer_norm_bwd
    dx, dw, db = bwd(dy, x, weight, bias, mean, rstd)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            None)


layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)
register_fp32_autocast(layer_norm_fwd, "layer_norm")
_layer_norm_apply = autograd_function("LayerNormFunction", _layer_norm_fwd,
                                      _layer_norm_setup_context, _layer_norm_backward,
                                      view=row_view, grad_view=rows)


def layer_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float) -> Tensor:
    """fastnorm::layer_norm_fwd with autograd, from the functional layer (arguments checked):
    y of a (*, n) input normalized over its last dim, in its shape, computed on the (M, n)
    rows."""
    if not eager((input, weight, bias)):
        return viewed_call(layer_norm_fwd, row_view, input, weight, bias, eps)
    if cuda_autocast_fp32(input, _LN_AUTOCAST):
        input, weight, bias = to_fp32(input), to_fp32(weight), to_fp32(bias)
    if needs_grad((input, weight, bias)):
        return _layer_norm_apply(input, weight, bias, eps)
    return viewed_call(_layer_norm_fwd, row_view, input, weight, bias, eps)


# --- Per-example squared gradient norms (gradient noise scale) ---------------------------------

def _check_pe(dy, x, weight, bias, mean, rstd, is_rms, rows_per_example) -> None:
    op = "layer_norm_bwd_pe"
    _check_rows_bwd(op, dy, x, weight, None if is_rms else bias, None if is_rms else mean, rstd)
    m = x.shape[0]
    _checks.check(rows_per_example >= 1 and m % rows_per_example == 0, op,
                  f"expected rows_per_example >= 1 dividing the {m} rows of x, "
                  f"got {rows_per_example}")


@torch.library.custom_op("fastnorm::layer_norm_bwd_pe", mutates_args=())
def layer_norm_bwd_pe(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      mean: Tensor, rstd: Tensor, is_rms: bool, rows_per_example: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_pe(dy, x, weight, bias, mean, rstd, is_rms, rows_per_example)
    return _layer_norm_bwd_pe(dy, x, weight, bias, mean, rstd, is_rms, rows_per_example)


def _layer_norm_bwd_pe(dy, x, weight, bias, mean, rstd, is_rms, rows_per_example):
    return kernel("layer_norm_bwd_pe", x)(dy, x, weight, bias, mean, rstd, is_rms,
                                          rows_per_example)


@layer_norm_bwd_pe.register_fake
def _(dy, x, weight, bias, mean, rstd, is_rms, rows_per_example):
    _check_pe(dy, x, weight, bias, mean, rstd, is_rms, rows_per_example)
    stats = stats_dtype(x.dtype)
    examples = x.shape[0] // rows_per_example
    has_bias = bias is not None and not is_rms
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    db = x.new_empty(0) if not has_bias else torch.empty_like(bias)
    return (x.new_empty(x.shape), dw, db,
            x.new_empty(0 if weight is None else examples, dtype=stats),
            x.new_empty(examples if has_bias else 0, dtype=stats))


# fastnorm::layer_norm_fwd_gns(x, weight?, bias?, sink, eps, is_rms, rows_per_example)
#     -> (y, mean, rstd)
# The forward of layer_norm_fwd / rms_norm_fwd (is_rms; bias ignored, mean empty) whose backward
# runs layer_norm_bwd_pe and returns, as the gradient of `sink` (fp32 [4], not read), the step's
# norm-layer noise-scale sums: [sum over examples of |dW_e|^2 + |dB_e|^2 (each example's
# contribution), |dW|^2 + |dB|^2 (the batch's), examples, 1] (fastnorm::gns_sums, one more
# small launch). autograd accumulates them into sink.grad over backward calls: in the graph, no
# side effects, so torch.compile keeps one graph (used by fastnorm.gns.track).

def _check_gns_fwd(x, weight, bias, sink, is_rms, rows_per_example) -> None:
    op = "layer_norm_fwd_gns"
    _check_rows(op, x, weight, None if is_rms else bias)
    _checks.check(sink.shape == (4,) and sink.dtype == torch.float32, op,
                  f"expected sink of shape (4,) and dtype float32, got {tuple(sink.shape)} "
                  f"{sink.dtype}")
    m = x.shape[0]
    _checks.check(rows_per_example >= 1 and m % rows_per_example == 0, op,
                  f"expected rows_per_example >= 1 dividing the {m} rows of x, "
                  f"got {rows_per_example}")


@torch.library.custom_op("fastnorm::layer_norm_fwd_gns", mutates_args=())
def layer_norm_fwd_gns(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       sink: Tensor, eps: float, is_rms: bool, rows_per_example: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    _check_gns_fwd(x, weight, bias, sink, is_rms, rows_per_example)
    return _layer_norm_fwd_gns(x, weight, bias, sink, eps, is_rms, rows_per_example)


def _layer_norm_fwd_gns(x, weight, bias, sink, eps, is_rms, rows_per_example):
    if is_rms:
        y, rstd = kernel("rms_norm_fwd", x)(x, weight, eps)
        return y, rstd.new_empty(0), rstd
    return kernel("layer_norm_fwd", x)(x, weight, bias, eps)


@layer_norm_fwd_gns.register_fake
def _(x, weight, bias, sink, eps, is_rms, rows_per_example):
    _check_gns_fwd(x, weight, bias, sink, is_rms, rows_per_example)
    m = x.shape[0]
    stats = stats_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty(0 if is_rms else m, dtype=stats),
            x.new_empty(m, dtype=stats))


def _gns_setup_context(ctx, inputs, output):
    x, weight, bias, _sink, eps, is_rms, rows_per_example = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, None if is_rms else bias, mean, rstd)
    ctx.eps, ctx.is_rms, ctx.rows_per_example = eps, is_rms, rows_per_example


def _gns_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None, None, None, None
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, no sums
        fn = ((lambda x, w, b: F.rms_norm(x, x.shape[1:], w, ctx.eps)) if ctx.is_rms else
              (lambda x, w, b: F.layer_norm(x, x.shape[1:], w, b, ctx.eps)))
        return (*torch_grads(fn, (x, weight, bias), need[:3], dy), None, None, None, None)
    dy = dy.contiguous()
    route = eager((dy, x))
    bwd = _layer_norm_bwd_pe if route else layer_norm_bwd_pe
    dx, dw, db, dw_sq, db_sq = bwd(dy, x, weight, bias, mean, rstd, ctx.is_rms,
                                   ctx.rows_per_example)
    dsink = sink_grad(route, dw_sq, db_sq, dw, db, x.shape[0] // ctx.rows_per_example) \
        if need[3] else None
    return (dx if need[0] else None,
            dw if weight is not None and need[1] else None,
            db if bias is not None and need[2] else None,
            dsink, None, None, None)


layer_norm_fwd_gns.register_autograd(_gns_backward, setup_context=_gns_setup_context)
# (One rule for both norms: the registered op's LayerNorm one; the eager entry applies RMSNorm's.)
register_fp32_autocast(layer_norm_fwd_gns, "layer_norm")
_layer_norm_gns_apply = autograd_function("LayerNormGNSFunction", _layer_norm_fwd_gns,
                                          _gns_setup_context, _gns_backward, view=row_view,
                                          grad_view=rows)


def layer_norm_gns(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   sink: Tensor, eps: float, is_rms: bool, rows_per_example: int) -> Tensor:
    """fastnorm::layer_norm_fwd_gns with autograd, from the functional layer: y of a (*, n)
    input (or of (M, n) rows of it), in its shape."""
    if not eager((input, weight, bias, sink)):
        return viewed_call(layer_norm_fwd_gns, row_view, input, weight, bias, sink, eps, is_rms,
                           rows_per_example)
    if cuda_autocast_fp32(input, _RMS_AUTOCAST if is_rms else _LN_AUTOCAST):
        input, weight, bias = to_fp32(input), to_fp32(weight), to_fp32(bias)
    if needs_grad((input, weight, bias, sink)):
        return _layer_norm_gns_apply(input, weight, bias, sink, eps, is_rms, rows_per_example)
    return viewed_call(_layer_norm_fwd_gns, row_view, input, weight, bias, sink, eps, is_rms,
                       rows_per_example)


# --- RMSNorm -----------------------------------------------------------------------------------

@torch.library.custom_op("fastnorm::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    _check_rows("rms_norm_fwd", x, weight, None)
    return _rms_norm_fwd(x, weight, eps)


def _rms_norm_fwd(x, weight, eps):
    return kernel("rms_norm_fwd", x)(x, weight, eps)


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    _check_rows("rms_norm_fwd", x, weight, None)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], dtype=stats_dtype(x.dtype))


@torch.library.custom_op("fastnorm::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                 rstd: Tensor) -> tuple[Tensor, Tensor]:
    _check_rows_bwd("rms_norm_bwd", dy, x, weight, None, None, rstd)
    return _rms_norm_bwd(dy, x, weight, rstd)


def _rms_norm_bwd(dy, x, weight, rstd):
    return kernel("rms_norm_bwd", x)(dy, x, weight, rstd)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    _check_rows_bwd("rms_norm_bwd", dy, x, weight, None, None, rstd)
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    return x.new_empty(x.shape), dw


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.eps = eps


def _rms_norm_backward(ctx, dy, _drstd):
    if dy is None:
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        return (*torch_grads(lambda x, w: F.rms_norm(x, x.shape[1:], w, ctx.eps),
                             (x, weight), ctx.needs_input_grad[:2], dy), None)
    dy = dy.contiguous()
    dx, dw = (_rms_norm_bwd if eager((dy, x)) else rms_norm_bwd)(dy, x, weight, rstd)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            None)


rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)
register_fp32_autocast(rms_norm_fwd, "rms_norm")
_rms_norm_apply = autograd_function("RMSNormFunction", _rms_norm_fwd, _rms_norm_setup_context,
                                    _rms_norm_backward, view=row_view, grad_view=rows)


def rms_norm(input: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """fastnorm::rms_norm_fwd with autograd, from the functional layer (arguments checked): y of
    a (*, n) input, in its shape, as `layer_norm`."""
    if not eager((input, weight)):
        return viewed_call(rms_norm_fwd, row_view, input, weight, eps)
    if cuda_autocast_fp32(input, _RMS_AUTOCAST):
        input, weight = to_fp32(input), to_fp32(weight)
    if needs_grad((input, weight)):
        return _rms_norm_apply(input, weight, eps)
    return viewed_call(_rms_norm_fwd, row_view, input, weight, eps)


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

ROUNDINGS = ("none", "llama", "t5")


def _check_add_fwd(op: str, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], rounding: str) -> None:
    _checks.choice(op, "rounding", rounding, ROUNDINGS)
    _check_rows(op, x, weight, bias)
    _checks.like(op, "residual", residual, x)
    if residual is not None:
        _checks.unit_column_stride(op, residual, "residual")


def _check_add_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms, rounding) -> None:
    op = "add_layer_norm_bwd"
    _checks.choice(op, "rounding", rounding, ROUNDINGS)
    _check_rows_bwd(op, dy, h, weight, bias, None if is_rms else mean, rstd, "h")
    _checks.like(op, "dh", dh, h, "h")
    if dh is not None:
        _checks.unit_column_stride(op, dh, "dh")


def _add_norm_h_dtype(x: Tensor, residual: Optional[Tensor], residual_in_fp32: bool):
    if residual is None:
        return None
    return residual_stream_dtype(x.dtype, residual.dtype, residual_in_fp32)


@torch.library.custom_op("fastnorm::add_layer_norm_fwd", mutates_args=())
def add_layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, is_rms: bool, residual_in_fp32: bool,
                       rounding: str, store_residual: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_add_fwd("add_layer_norm_fwd", x, residual, weight, bias, rounding)
    return _add_layer_norm_fwd(x, residual, weight, bias, eps, is_rms, residual_in_fp32,
                               rounding, store_residual)


def _add_layer_norm_fwd(x, residual, weight, bias, eps, is_rms, residual_in_fp32, rounding,
                        store_residual):
    return kernel("add_layer_norm_fwd", x)(x, residual, weight, bias, eps, is_rms,
                                           residual_in_fp32, rounding, store_residual)


@add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms, residual_in_fp32, rounding, store_residual):
    _check_add_fwd("add_layer_norm_fwd", x, residual, weight, bias, rounding)
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
    _check_add_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms, rounding)
    return _add_layer_norm_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms, rounding)


def _add_layer_norm_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms, rounding):
    return kernel("add_layer_norm_bwd", h)(dy, dh, h, weight, bias, mean, rstd, is_rms,
                                           rounding)


@add_layer_norm_bwd.register_fake
def _(dy, dh, h, weight, bias, mean, rstd, is_rms, rounding):
    _check_add_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms, rounding)
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
        dh_total, dw, db = torch_grads(
            lambda x, w, b: norm_reference(x, x.shape[1:], w, b, ctx.eps, ctx.is_rms,
                                           ctx.rounding, x_dtype),
            (h, weight, None if ctx.is_rms else bias), (need[0], need[2], need[3]), dy)
    else:
        dy = dy.contiguous()
        bwd = _add_layer_norm_bwd if eager((dy, dh, h)) else add_layer_norm_bwd
        dh_total, dw, db = bwd(dy, dh, h, weight, bias, mean, rstd, ctx.is_rms, ctx.rounding)
    # d(x + r)/dx = d(x + r)/dr = 1: both get the gradient of h, each in its own dtype (the
    # same tensor when both dtypes are h's).
    return (cast(dh_total, x_dtype) if need[0] else None,
            cast(dh_total, r_dtype) if ctx.has_residual and need[1] else None,
            dw if weight is not None and need[2] else None,
            db if bias is not None and not ctx.is_rms and need[3] else None,
            None, None, None, None, None)


add_layer_norm_fwd.register_autograd(_add_layer_norm_backward,
                                     setup_context=_add_layer_norm_setup_context)
_add_layer_norm_apply = autograd_function("AddLayerNormFunction", _add_layer_norm_fwd,
                                          _add_layer_norm_setup_context, _add_layer_norm_backward)
_add_layer_norm_rows_apply = autograd_function(
    "AddLayerNormRowsFunction", _add_layer_norm_fwd, _add_layer_norm_setup_context,
    _add_layer_norm_backward, view=row_view, grad_view=rows)


# The eager node of the fused add with a residual: it views input and residual as rows itself and
# returns y (and h, with prenorm) in the input's shape, so a call records one node with one or
# two outputs instead of three view nodes around a four-output node. (No double backward to
# support here: with a residual it raises, see _add_layer_norm_backward.)

def _residual_forward(ctx, input, residual, weight, bias, eps, is_rms, residual_in_fp32,
                      rounding, prenorm):
    x, r = row_view(input), row_view(residual)
    args = (x, r, weight, bias, eps, is_rms, residual_in_fp32, rounding, True)
    out = _add_layer_norm_fwd(*args)
    _add_layer_norm_setup_context(ctx, args, out)
    y, h = out[0], out[1]
    if x is input and r is residual:
        ctx.viewed = None
        return (y, h) if prenorm else y
    ctx.viewed = tuple(input.shape)
    # Detached aliases, not views (see autograd_function: in-place ops on the outputs work).
    y = y.view_as(input).detach()
    return (y, h.view_as(input).detach()) if prenorm else y


def _residual_backward(ctx, dy, dh=None):
    shape = ctx.viewed
    if shape is not None:
        dy = None if dy is None else rows(dy)
        dh = None if dh is None else rows(dh)
    dx, dr, dw, db = _add_layer_norm_backward(ctx, dy, dh, None, None)[:4]
    if shape is not None:
        same = dr is dx  # (one gradient for both when the dtypes agree: one reshape)
        dx = None if dx is None else dx.reshape(*shape)
        dr = dx if same else None if dr is None else dr.reshape(*shape)
    return dx, dr, dw, db, None, None, None, None, None


_add_residual_apply = c_apply(type("AddResidualNormFunction", (torch.autograd.Function,), {
    "forward": staticmethod(_residual_forward), "backward": staticmethod(_residual_backward)}))


def add_norm_residual(input: Tensor, residual: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float, is_rms: bool, residual_in_fp32: bool,
                      rounding: str, prenorm: bool) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """fastnorm::add_layer_norm_fwd with a residual, from the functional layer (checked there;
    1-D normalized shape, 1-D parameters): y of (*, n) inputs normalized over the last dim, in
    the input's shape, or (y, h) with prenorm. Eager with a gradient: one node that views the
    rows itself; otherwise the op on row views, which writes h only when it is returned or a
    backward needs it."""
    tensors = (input, residual, weight, bias)
    route = eager(tensors)
    grad = needs_grad(tensors)
    if route and grad:
        return _add_residual_apply(input, residual, weight, bias, eps, is_rms, residual_in_fp32,
                                   rounding, prenorm)
    x, r = row_view(input), row_view(residual)
    y, h, _mean, _rstd = (_add_layer_norm_fwd if route else add_layer_norm_fwd)(
        x, r, weight, bias, eps, is_rms, residual_in_fp32, rounding, prenorm or grad)
    if x is not input:
        y, h = y.view_as(input), h.view_as(input) if prenorm else h
    return (y, h) if prenorm else y


def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, is_rms: bool, residual_in_fp32: bool,
                   rounding: str, store_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fastnorm::add_layer_norm_fwd with autograd, from the functional layer (checked there;
    no autocast rule: the functional layer runs the unfused form under CUDA autocast)."""
    args = (x, residual, weight, bias, eps, is_rms, residual_in_fp32, rounding, store_residual)
    tensors = (x, residual, weight, bias)
    if not eager(tensors):
        return add_layer_norm_fwd(*args)
    if needs_grad(tensors):
        return _add_layer_norm_apply(*args)
    return _add_layer_norm_fwd(*args)


def add_norm_rows(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  is_rms: bool, residual_in_fp32: bool, rounding: str) -> Tensor:
    """fastnorm::add_layer_norm_fwd without a residual (a norm with a rounding mode: the
    transformers adapters' entry), from the functional layer: y of a (*, n) input normalized
    over its last dim, in its shape; the eager node views the rows itself. (Without a
    residual there is no h to store: store_residual is False.)"""
    if not eager((input, weight, bias)):
        return viewed_call(add_layer_norm_fwd, row_view, input, None, weight, bias, eps, is_rms,
                           residual_in_fp32, rounding, False)
    if needs_grad((input, weight, bias)):
        return _add_layer_norm_rows_apply(input, None, weight, bias, eps, is_rms,
                                          residual_in_fp32, rounding, False)
    return viewed_call(_add_layer_norm_fwd, row_view, input, None, weight, bias, eps, is_rms,
                       residual_in_fp32, rounding, False)


@torch.library.custom_op("fastnorm::add_layer_norm_inplace", mutates_args=("x", "residual"))
def add_layer_norm_inplace(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float, is_rms: bool) -> None:
    _check_inplace(x, residual, weight, bias)
    _add_layer_norm_inplace(x, residual, weight, bias, eps, is_rms)


def _add_layer_norm_inplace(x, residual, weight, bias, eps, is_rms):
    kernel("add_layer_norm_inplace", x)(x, residual, weight, bias, eps, is_rms)


def add_layer_norm_inplace_(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], eps: float, is_rms: bool) -> None:
    """fastnorm::add_layer_norm_inplace from the functional layer (arguments checked there)."""
    if not eager((x, residual, weight, bias)):
        return add_layer_norm_inplace(x, residual, weight, bias, eps, is_rms)
    _add_layer_norm_inplace(x, residual, weight, bias, eps, is_rms)
    bump_versions(x, residual)


@add_layer_norm_inplace.register_fake
def _(x, residual, weight, bias, eps, is_rms):
    _check_inplace(x, residual, weight, bias)
    return None


def _check_inplace(x, residual, weight, bias) -> None:
    op = "add_layer_norm_inplace"
    _check_rows(op, x, weight, bias)
    _checks.like(op, "residual", residual, x)
    _checks.unit_column_stride(op, residual, "residual")
    _checks.check(residual.dtype == x.dtype, op, f"expected residual in x's dtype {x.dtype} "
                                                 f"(updated in place), got {residual.dtype}")
