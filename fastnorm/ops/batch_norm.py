"""Custom ops for BatchNorm on an (N, C, S) view that is contiguous or channels-last
(strides (S*C, 1, C)); outputs keep the input's strides. Statistics are fp32 (fp64 for fp64 x);
`var` is always the biased batch (or running) variance, and rstd = 1/sqrt(var + eps) is
recomputed by the kernels.

Single-device training, with autograd:
  fastnorm::batch_norm_fwd(x, weight?, bias?, eps, relu) -> (y, mean, var)
  fastnorm::batch_norm_bwd(dy, x, weight?, bias?, mean, var, eps, relu, training)
      -> (dx, dweight, dbias)
Eval mode (running statistics) is `batch_norm_apply`, also differentiable.

The building blocks SyncBatchNorm chains around its collectives (fastnorm.sync_batch_norm):
  fastnorm::batch_norm_stats(x) -> (mean, var)                      local statistics
  fastnorm::batch_norm_apply(x, mean, var, weight?, bias?, eps, relu) -> y
  fastnorm::batch_norm_backward_reduce(dy, x, mean, var, weight?, bias?, eps, relu)
      -> (sum_dy, sum_dy_xhat)                                      after the ReLU mask
  fastnorm::batch_norm_backward_elemt(dy, x, mean, var, weight?, bias?, sum_dy, sum_dy_xhat,
      count, eps, relu) -> dx                                       count: 1-element tensor

A gradient whose parameter is absent comes back as an empty tensor (a custom op cannot return
None).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._dtypes import stats_dtype
from .._layout import canonical, channel_view, channels_3d
from . import _checks
from ._common import (autograd_function, bump_versions, eager, needs_grad, torch_grads,
                      viewed_call)
from ._router import kernel


def _check(op: str, x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
           mean: Optional[Tensor] = None, var: Optional[Tensor] = None,
           dy: Optional[Tensor] = None) -> None:
    _checks.input_(op, x, 3)
    c = x.shape[1]
    _checks.param(op, "weight", weight, c, x)
    _checks.param(op, "bias", bias, c, x)
    _checks.like(op, "dy", dy, x)
    if mean is not None:
        _checks.stats(op, "mean", mean, (c,), x)
        _checks.stats(op, "var", var, (c,), x)


def _check_sums(op: str, x: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor, count: Tensor) -> None:
    _checks.stats(op, "sum_dy", sum_dy, (x.shape[1],), x)
    _checks.stats(op, "sum_dy_xhat", sum_dy_xhat, (x.shape[1],), x)
    _checks.check(count.numel() == 1 and count.device == x.device, op,
                  f"expected count as a 1-element tensor on {x.device}, got shape "
                  f"{list(count.shape)} on {count.device}")


def _check_update(x, running_mean, running_var, momentum_tensor) -> None:
    op = "batch_norm_stats_update"
    _check(op, x)
    _checks.param(op, "running_mean", running_mean, x.shape[1], x)
    _checks.param(op, "running_var", running_var, x.shape[1], x)
    if momentum_tensor is not None:
        _checks.check(momentum_tensor.numel() == 1 and momentum_tensor.device == x.device, op,
                      f"expected momentum_tensor as a 1-element tensor on {x.device}")


def _channel_stats_like(x: Tensor) -> tuple[Tensor, Tensor]:
    c = x.shape[1]
    return x.new_empty(c, dtype=stats_dtype(x.dtype)), x.new_empty(c, dtype=stats_dtype(x.dtype))


def _param_grad_like(param: Optional[Tensor], x: Tensor) -> Tensor:
    return x.new_empty(0) if param is None else torch.empty_like(param)


# Implementations (x in a canonical layout, arguments checked): the registered ops and the
# eager entries call them.

def _batch_norm_stats(x):
    return kernel("batch_norm_stats", x)(x)


def _batch_norm_apply(x, mean, var, weight, bias, eps, relu):
    return kernel("batch_norm_apply", x)(x, mean, var, weight, bias, eps, relu)


def _batch_norm_backward_reduce(dy, x, mean, var, weight, bias, eps, relu):
    return kernel("batch_norm_backward_reduce", x)(dy, x, mean, var, weight, bias, eps, relu)


def _batch_norm_backward_elemt(dy, x, mean, var, weight, bias, sum_dy, sum_dy_xhat, count, eps,
                               relu):
    return kernel("batch_norm_backward_elemt", x)(dy, x, mean, var, weight, bias, sum_dy,
                                                  sum_dy_xhat, count, eps, relu)


def _batch_norm_fwd(x, weight, bias, eps, relu):
    return kernel("batch_norm_fwd", x)(x, weight, bias, eps, relu)


def _batch_norm_bwd(dy, x, weight, bias, mean, var, eps, relu, training):
    return kernel("batch_norm_bwd", x)(dy, x, weight, bias, mean, var, eps, relu, training)


def _batch_norm_stats_update(x, running_mean, running_var, momentum, momentum_tensor):
    return kernel("batch_norm_stats_update", x)(x, running_mean, running_var, momentum,
                                                momentum_tensor)


def _batch_norm_train_apply(x, mean, var, weight, bias, eps, relu):
    return kernel("batch_norm_train_apply", x)(x, mean, var, weight, bias, eps, relu)


# --- building blocks ---------------------------------------------------------------------------

@torch.library.custom_op("fastnorm::batch_norm_stats", mutates_args=())
def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    _check("batch_norm_stats", x)
    return _batch_norm_stats(canonical(x))


@batch_norm_stats.register_fake
def _(x):
    _check("batch_norm_stats", x)
    return _channel_stats_like(x)


@torch.library.custom_op("fastnorm::batch_norm_apply", mutates_args=())
def batch_norm_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], eps: float, relu: bool) -> Tensor:
    _check("batch_norm_apply", x, weight, bias, mean, var)
    return _batch_norm_apply(canonical(x), mean, var, weight, bias, eps, relu)


@batch_norm_apply.register_fake
def _(x, mean, var, weight, bias, eps, relu):
    _check("batch_norm_apply", x, weight, bias, mean, var)
    return torch.empty_like(canonical(x))


@torch.library.custom_op("fastnorm::batch_norm_backward_reduce", mutates_args=())
def batch_norm_backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                               weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                               relu: bool) -> tuple[Tensor, Tensor]:
    _check("batch_norm_backward_reduce", x, weight, bias, mean, var, dy)
    return _batch_norm_backward_reduce(dy, canonical(x), mean, var, weight, bias, eps, relu)


@batch_norm_backward_reduce.register_fake
def _(dy, x, mean, var, weight, bias, eps, relu):
    _check("batch_norm_backward_reduce", x, weight, bias, mean, var, dy)
    return _channel_stats_like(x)


@torch.library.custom_op("fastnorm::batch_norm_backward_elemt", mutates_args=())
def batch_norm_backward_elemt(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                              weight: Optional[Tensor], bias: Optional[Tensor], sum_dy: Tensor,
                              sum_dy_xhat: Tensor, count: Tensor, eps: float,
                              relu: bool) -> Tensor:
    _check("batch_norm_backward_elemt", x, weight, bias, mean, var, dy)
    _check_sums("batch_norm_backward_elemt", x, sum_dy, sum_dy_xhat, count)
    return _batch_norm_backward_elemt(dy, canonical(x), mean, var, weight, bias, sum_dy,
                                      sum_dy_xhat, count, eps, relu)


@batch_norm_backward_elemt.register_fake
def _(dy, x, mean, var, weight, bias, sum_dy, sum_dy_xhat, count, eps, relu):
    _check("batch_norm_backward_elemt", x, weight, bias, mean, var, dy)
    _check_sums("batch_norm_backward_elemt", x, sum_dy, sum_dy_xhat, count)
    return torch.empty_like(canonical(x))


# --- single-device training forward / backward -------------------------------------------------

@torch.library.custom_op("fastnorm::batch_norm_fwd", mutates_args=())
def batch_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check("batch_norm_fwd", x, weight, bias)
    return _batch_norm_fwd(canonical(x), weight, bias, eps, relu)


@batch_norm_fwd.register_fake
def _(x, weight, bias, eps, relu):
    _check("batch_norm_fwd", x, weight, bias)
    return (torch.empty_like(canonical(x)), *_channel_stats_like(x))


@torch.library.custom_op("fastnorm::batch_norm_bwd", mutates_args=())
def batch_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, var: Tensor, eps: float, relu: bool,
                   training: bool) -> tuple[Tensor, Tensor, Tensor]:
    _check("batch_norm_bwd", x, weight, bias, mean, var, dy)
    return _batch_norm_bwd(dy, canonical(x), weight, bias, mean, var, eps, relu, training)


@batch_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, var, eps, relu, training):
    _check("batch_norm_bwd", x, weight, bias, mean, var, dy)
    return torch.empty_like(canonical(x)), _param_grad_like(weight, x), _param_grad_like(bias, x)


def _param_grads(ctx, dw: Tensor, db: Tensor, weight_index: int) -> tuple:
    return (dw if ctx.needs_input_grad[weight_index] else None,
            db if ctx.needs_input_grad[weight_index + 1] else None)


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, eps, relu = inputs
    _y, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.eps, ctx.relu = eps, relu


def _bwd(dy: Tensor, x: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    """fastnorm::batch_norm_bwd from a backward: the implementation when the call may skip the
    dispatcher, else the registered op."""
    if eager((dy, x)):
        return _batch_norm_bwd(dy, canonical(x), *args)
    return batch_norm_bwd(dy, x, *args)


def _training_grads(ctx, dy, x, weight, bias, mean, var, needs) -> tuple:
    """(dx, dweight, dbias) of training-mode BatchNorm (the batch statistics' dependence on x
    included), each None where `needs` (x, weight, bias) says no."""
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        def forward(x, w, b):
            y = F.batch_norm(x, None, None, w, b, True, 0.0, ctx.eps)
            return F.relu(y) if ctx.relu else y
        return torch_grads(forward, (x, weight, bias), needs, dy)
    dx, dw, db = _bwd(dy, x, weight, bias, mean, var, ctx.eps, ctx.relu, True)
    return (dx if needs[0] else None, dw if weight is not None and needs[1] else None,
            db if bias is not None and needs[2] else None)


def _fwd_backward(ctx, dy, _dmean, _dvar):
    if dy is None:  # only the statistics were used: nothing flows back
        return None, None, None, None, None
    x, weight, bias, mean, var = ctx.saved_tensors
    return (*_training_grads(ctx, dy, x, weight, bias, mean, var, ctx.needs_input_grad[:3]),
            None, None)


batch_norm_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
_batch_norm_fwd_apply = autograd_function("BatchNormFunction", _batch_norm_fwd,
                                          _fwd_setup_context, _fwd_backward, view=channel_view,
                                          grad_view=channels_3d)


def batch_norm_training(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        eps: float, relu: bool) -> Tensor:
    """fastnorm::batch_norm_fwd (training, no running statistics) with autograd, from the
    functional layer (arguments checked): y of an (N, C, *) input, in its shape, computed on
    the (N, C, S) view."""
    if not eager((input, weight, bias)):
        return viewed_call(batch_norm_fwd, channel_view, input, weight, bias, eps, relu)
    if needs_grad((input, weight, bias)):
        return _batch_norm_fwd_apply(input, weight, bias, eps, relu)
    return viewed_call(_batch_norm_fwd, channel_view, input, weight, bias, eps, relu)


def _apply_setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, eps, relu = inputs
    ctx.save_for_backward(x, mean, var, weight, bias)
    ctx.eps, ctx.relu = eps, relu


def _apply_backward(ctx, dy):
    """Eval mode: mean and var are constants (running statistics, not differentiated)."""
    if dy is None:  # an undefined output gradient: nothing flows back
        return None, None, None, None, None, None, None
    x, mean, var, weight, bias = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiable gradients (see torch_grads)
        def forward(x, w, b):
            y = F.batch_norm(x, mean, var, w, b, False, 0.0, ctx.eps)
            return F.relu(y) if ctx.relu else y
        dx, dw, db = torch_grads(forward, (x, weight, bias),
                                 (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:5]), dy)
        return dx, None, None, dw, db, None, None
    dx, dw, db = _bwd(dy, x, weight, bias, mean, var, ctx.eps, ctx.relu, False)
    return (dx if ctx.needs_input_grad[0] else None, None, None, *_param_grads(ctx, dw, db, 3),
            None, None)


batch_norm_apply.register_autograd(_apply_backward, setup_context=_apply_setup_context)
_batch_norm_eval_apply = autograd_function("BatchNormEvalFunction", _batch_norm_apply,
                                           _apply_setup_context, _apply_backward,
                                           view=channel_view, grad_view=channels_3d)


def batch_norm_eval(input: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float, relu: bool) -> Tensor:
    """fastnorm::batch_norm_apply (running statistics) with autograd, from the functional layer
    (arguments checked): y of an (N, C, *) input, in its shape."""
    if not eager((input, mean, var, weight, bias)):
        return viewed_call(batch_norm_apply, channel_view, input, mean, var, weight, bias, eps,
                           relu)
    if needs_grad((input, weight, bias)):
        return _batch_norm_eval_apply(input, mean, var, weight, bias, eps, relu)
    return viewed_call(_batch_norm_apply, channel_view, input, mean, var, weight, bias, eps,
                       relu)


# --- training forward with the running-statistic update inside the statistics launch ----------
# A custom op that mutates its inputs cannot carry an autograd formula, so the update lives in a
# non-differentiable op (on x.detach()) and the differentiable part in batch_norm_train_apply,
# whose backward is the full training backward (the statistics' dependence on x included).

@torch.library.custom_op("fastnorm::batch_norm_stats_update",
                         mutates_args=("running_mean", "running_var"))
def batch_norm_stats_update(x: Tensor, running_mean: Tensor, running_var: Tensor,
                            momentum: float, momentum_tensor: Optional[Tensor]
                            ) -> tuple[Tensor, Tensor]:
    """Batch (mean, biased var) of x; running_mean/running_var updated in place by the same
    launch (momentum_tensor, a 1-element device tensor, overrides momentum)."""
    _check_update(x, running_mean, running_var, momentum_tensor)
    return _batch_norm_stats_update(canonical(x), running_mean, running_var, momentum,
                                    momentum_tensor)


@batch_norm_stats_update.register_fake
def _(x, running_mean, running_var, momentum, momentum_tensor):
    _check_update(x, running_mean, running_var, momentum_tensor)
    return _channel_stats_like(x)


@torch.library.custom_op("fastnorm::batch_norm_train_apply", mutates_args=())
def batch_norm_train_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float, relu: bool) -> Tensor:
    """y from the batch statistics of x itself (from batch_norm_stats_update)."""
    _check("batch_norm_train_apply", x, weight, bias, mean, var)
    return _batch_norm_train_apply(canonical(x), mean, var, weight, bias, eps, relu)


@batch_norm_train_apply.register_fake
def _(x, mean, var, weight, bias, eps, relu):
    _check("batch_norm_train_apply", x, weight, bias, mean, var)
    return torch.empty_like(canonical(x))


def _train_apply_backward(ctx, dy):
    if dy is None:
        return None, None, None, None, None, None, None
    x, mean, var, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw, db = _training_grads(ctx, dy, x, weight, bias, mean, var, (need[0], *need[3:5]))
    return dx, None, None, dw, db, None, None


batch_norm_train_apply.register_autograd(_train_apply_backward,
                                         setup_context=_apply_setup_context)


# The eager node's arguments: (x, weight, bias, update), update = (running_mean, running_var,
# momentum, momentum_tensor, eps, relu) in one tuple (the node's apply costs per argument).

def _train_forward(x, weight, bias, update):
    running_mean, running_var, momentum, momentum_tensor, eps, relu = update
    mean, var = _batch_norm_stats_update(x, running_mean, running_var, momentum,
                                         momentum_tensor)
    bump_versions(running_mean, running_var)
    return _batch_norm_train_apply(x, mean, var, weight, bias, eps, relu), mean, var


def _train_setup_context(ctx, inputs, output):
    x, weight, bias, update = inputs
    _y, mean, var = output
    ctx.save_for_backward(x, mean, var, weight, bias)
    ctx.eps, ctx.relu = update[4], update[5]


def _train_backward(ctx, dy, _dmean, _dvar):
    if dy is None:
        return None, None, None, None
    x, mean, var, weight, bias = ctx.saved_tensors
    return (*_training_grads(ctx, dy, x, weight, bias, mean, var, ctx.needs_input_grad[:3]),
            None)


# One autograd node for the statistics (with the running-statistic update) and the apply: the
# eager form of batch_norm_stats_update + batch_norm_train_apply.
_batch_norm_train_apply_fn = autograd_function("BatchNormTrainFunction", _train_forward,
                                               _train_setup_context, _train_backward,
                                               view=channel_view, grad_view=channels_3d)


def batch_norm_training_update(input: Tensor, running_mean: Tensor, running_var: Tensor,
                               momentum: float, momentum_tensor: Optional[Tensor],
                               weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                               relu: bool) -> Tensor:
    """Training forward that also updates the running statistics in place (in the launch that
    finalizes the batch statistics), from the functional layer (arguments checked, input
    non-empty): y of an (N, C, *) input, in its shape. Eager: one autograd node; otherwise the
    two registered ops."""
    if not eager((input, running_mean, running_var, momentum_tensor, weight, bias)):
        x = channel_view(input)
        mean, var = batch_norm_stats_update(x.detach(), running_mean, running_var, momentum,
                                            momentum_tensor)
        return batch_norm_train_apply(x, mean, var, weight, bias, eps, relu).view_as(input)
    update = (running_mean, running_var, momentum, momentum_tensor, eps, relu)
    if needs_grad((input, weight, bias)):
        return _batch_norm_train_apply_fn(input, weight, bias, update)
    return viewed_call(_train_forward, channel_view, input, weight, bias, update)
