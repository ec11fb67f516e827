"""The Triton kernel set behind the `fastnorm::` ops: adapters with the op signatures (the same
as fastnorm/reference.py's) around the launchers in fastnorm/triton. Imported by the router the
first time a call takes Triton, never at op registration, so the ops register where torch alone
is installed."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .._dtypes import residual_stream_dtype
from .._layout import dy_like, empty_if_none, param_grad
from ..triton import _common
from ..triton import batch_norm as _bn
from ..triton import group_norm as _gn
from ..triton import layer_norm as _ln
from ..triton import layer_norm_2d as _ln2d


# --- LayerNorm / RMSNorm -----------------------------------------------------------------------

def layer_norm_fwd(x, weight, bias, eps):
    return _ln.layer_norm_fwd(x, weight, bias, eps, is_rms=False)


def layer_norm_bwd(dy, x, weight, bias, mean, rstd):
    dx, dw, db = _ln.layer_norm_bwd(dy, x, weight, bias, mean, rstd, is_rms=False)
    return dx, empty_if_none(dw, x), empty_if_none(db, x)


def layer_norm_bwd_pe(dy, x, weight, bias, mean, rstd, is_rms, rows_per_example):
    dx, dw, db, dw_sq, db_sq = _ln.layer_norm_bwd_per_example(
        dy, x, weight, None if is_rms else bias, mean, rstd, is_rms, rows_per_example)
    return dx, empty_if_none(dw, x), empty_if_none(db, x), dw_sq, db_sq


def rms_norm_fwd(x, weight, eps):
    y, _mean, rstd = _ln.layer_norm_fwd(x, weight, None, eps, is_rms=True)
    return y, rstd


def rms_norm_bwd(dy, x, weight, rstd):
    # (rstd stands in for the mean RMSNorm does not have: never read)
    dx, dw, _db = _ln.layer_norm_bwd(dy, x, weight, None, rstd, rstd, is_rms=True)
    return dx, empty_if_none(dw, x)


def add_layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight, bias, eps, is_rms,
                       residual_in_fp32, rounding, store_residual):
    h_dtype = None if residual is None else residual_stream_dtype(x.dtype, residual.dtype,
                                                                  residual_in_fp32)
    y, mean, rstd, h = _ln.add_layer_norm_fwd(x, residual, weight, None if is_rms else bias,
                                              eps, is_rms,
                                              residual_dtype=h_dtype,
                                              round_xhat=rounding != "none",
                                              store_residual=store_residual)
    return y, empty_if_none(h, x), mean, rstd


def add_layer_norm_bwd(dy, dh, h, weight, bias, mean, rstd, is_rms, rounding):
    dx, dw, db = _ln.layer_norm_bwd(dy, h, weight, None if is_rms else bias, mean, rstd,
                                    is_rms=is_rms, dresidual=dh, round_xhat=rounding != "none",
                                    round_dx_terms=is_rms and rounding == "t5")
    return dx, empty_if_none(dw, h), empty_if_none(db, h)


def add_layer_norm_inplace(x, residual, weight, bias, eps, is_rms):
    _ln.add_layer_norm_fwd(x, residual, weight, None if is_rms else bias, eps, is_rms,
                           inplace=True)


# --- Channels-first LayerNorm / RMSNorm (N, C, S) ------------------------------------------------

def layer_norm_2d_fwd(x, weight, bias, eps):
    return _ln2d.layer_norm_2d_fwd(x, weight, bias, eps, is_rms=False)


def layer_norm_2d_bwd(dy, x, weight, bias, mean, rstd):
    dx, dw, db = _ln2d.layer_norm_2d_bwd(dy, x, weight, bias, mean, rstd, is_rms=False)
    return dx, empty_if_none(dw, x), empty_if_none(db, x)


def rms_norm_2d_fwd(x, weight, eps):
    y, _mean, rstd = _ln2d.layer_norm_2d_fwd(x, weight, None, eps, is_rms=True)
    return y, rstd


def rms_norm_2d_bwd(dy, x, weight, rstd):
    # (rstd stands in for the mean RMSNorm does not have: never read)
    dx, dw, _db = _ln2d.layer_norm_2d_bwd(dy, x, weight, None, rstd, rstd, is_rms=True)
    return dx, empty_if_none(dw, x)


# --- GroupNorm ---------------------------------------------------------------------------------

def group_norm_fwd(x, weight, bias, num_groups, eps, activation):
    return _gn.group_norm_fwd(x, weight, bias, num_groups, eps, activation)


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation):
    dx, dw, db = _gn.group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation)
    return dx, empty_if_none(dw, x), empty_if_none(db, x)


def group_norm_bwd_pe(dy, x, weight, bias, mean, rstd, num_groups, activation):
    dx, dw, db, dw_sq, db_sq = _gn.group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups,
                                                  activation, per_example=True)
    return dx, empty_if_none(dw, x), empty_if_none(db, x), dw_sq, db_sq


# --- Gradient noise scale ----------------------------------------------------------------------

def gns_sums(dweight_sq, dbias_sq, dweight, dbias, examples):
    return _common.gns_sums(dweight_sq.contiguous(), dbias_sq.contiguous(), dweight.contiguous(),
                            dbias.contiguous(), examples)


# --- BatchNorm ---------------------------------------------------------------------------------

def batch_norm_stats(x):
    return _bn.batch_norm_stats(x)


def batch_norm_apply(x, mean, var, weight, bias, eps, relu):
    return _bn.batch_norm_apply(x, mean, var, weight, bias, eps, relu)


batch_norm_train_apply = batch_norm_apply


def batch_norm_backward_reduce(dy, x, mean, var, weight, bias, eps, relu):
    return _bn.batch_norm_backward_reduce(dy_like(dy, x), x, mean, var, weight, bias, eps, relu)


def batch_norm_backward_elemt(dy, x, mean, var, weight, bias, sum_dy, sum_dy_xhat, count, eps,
                              relu):
    return _bn.batch_norm_backward_elemt(dy_like(dy, x), x, mean, var, weight, bias, sum_dy,
                                         sum_dy_xhat, count, eps, relu)


def batch_norm_fwd(x, weight, bias, eps, relu):
    return _bn.batch_norm_fwd(x, weight, bias, eps, relu)


def batch_norm_bwd(dy, x, weight, bias, mean, var, eps, relu, training):
    dx, sum_dy, sum_dy_xhat = _bn.batch_norm_bwd(dy_like(dy, x), x, mean, var, weight, bias,
                                                 eps, relu, training)
    return dx, param_grad(sum_dy_xhat, weight, x), param_grad(sum_dy, bias, x)


def batch_norm_stats_update(x, running_mean, running_var, momentum, momentum_tensor):
    return _bn.batch_norm_stats(x, running_mean, running_var,
                                momentum if momentum_tensor is None else momentum_tensor)
