"""The op contract in plain torch: one function per `fastnorm::` op, same arguments, same
outputs (shapes, dtypes, layouts, saved statistics), on any device.

These are the CPU implementations of the ops (fastnorm/ops routes CPU tensors here unless the
Triton interpreter is selected), the "reference" backend on every device, and the oracle the
tests compare the Triton and CUDA C++ kernels with. Written for clarity, not speed: statistics
and sums in fp32 (fp64 for fp64 input), as the kernels; the backward formulas use the saved
mean/rstd (LayerNorm, GroupNorm) or the saved biased variance (BatchNorm), so a forward by one
backend and a backward by another compose (the saved-tensor contract):

  LayerNorm/RMSNorm  mean, rstd: [M]       (RMSNorm: rstd only; mean empty in the fused op)
  GroupNorm          mean, rstd: [N, G]
  BatchNorm          mean, var:  [C]       var is the biased batch (or running) variance
  LayerNorm2d/RMS2d  mean, rstd: [N, S]    (over C at each (n, s); RMSNorm: mean empty)

Layout, dtype and empty-input rules: fastnorm/_layout.py.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dtypes import cast, residual_stream_dtype, stats_dtype
from ._layout import canonical, empty_if_none, param_grad

__all__ = [
    "layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "add_layer_norm_fwd",
    "add_layer_norm_bwd", "add_layer_norm_inplace", "group_norm_fwd", "group_norm_bwd",
    "batch_norm_stats", "batch_norm_apply", "batch_norm_backward_reduce",
    "batch_norm_backward_elemt", "batch_norm_fwd", "batch_norm_bwd", "batch_norm_stats_update",
    "batch_norm_train_apply", "norm_reference", "gns_sums", "layer_norm_2d_fwd",
    "layer_norm_2d_bwd", "rms_norm_2d_fwd", "rms_norm_2d_bwd",
]


# --- LayerNorm / RMSNorm on (M, N) rows --------------------------------------------------------

def _row_stats(x: Tensor, eps: float, is_rms: bool) -> tuple[Tensor, Tensor]:
    """(mean, rstd) per row in the stats dtype; mean is empty for RMSNorm; NaN for N = 0."""
    acc = stats_dtype(x.dtype)
    m, n = x.shape
    mean = x.new_empty(0 if is_rms else m, dtype=acc)
    if n == 0:
        return mean.fill_(float("nan")), x.new_full((m,), float("nan"), dtype=acc)
    if m == 0:
        return mean, x.new_empty(0, dtype=acc)
    xa = x.to(acc)
    if is_rms:
        return mean, torch.rsqrt(xa.square().mean(1) + eps)
    var, mean = torch.var_mean(xa, dim=1, correction=0)
    return mean, torch.rsqrt(var + eps)


def _row_norm(src: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
              is_rms: bool, round_to: Optional[torch.dtype], out_dtype: torch.dtype
              ) -> tuple[Tensor, Tensor, Tensor]:
    mean, rstd = _row_stats(src, eps, is_rms)
    acc = rstd.dtype
    xa = src.to(acc)
    x_hat = (xa if is_rms else xa - mean[:, None]) * rstd[:, None]
    if round_to is not None:  # transformers' Llama: weight * hidden.to(input_dtype)
        x_hat = x_hat.to(round_to).to(acc)
    y = x_hat if weight is None else x_hat * weight.to(acc)
    if bias is not None and not is_rms:
        y = y + bias.to(acc)
    return y.to(out_dtype), mean, rstd


def _row_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  mean: Tensor, rstd: Tensor, is_rms: bool, dresidual: Optional[Tensor] = None,
                  round_xhat: bool = False, round_dx_terms: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """dx = rstd * (g - x_hat * mean(x_hat * g) - mean(g)), g = w * dy (no mean(g) term for
    RMSNorm); dW = sum dy * x_hat, dB = sum dy; `dresidual` is added into dx.
    round_xhat (the "llama"/"t5" roundings): g, x_hat and each dW term rounded to dy's dtype, as
    torch's autograd does through `weight * x_hat.to(dtype)`; round_dx_terms (RMSNorm, "t5"):
    dx's two terms rounded to x's dtype separately."""
    acc = rstd.dtype
    n = x.shape[1]
    low = dy.dtype
    xa, dya = x.to(acc), dy.to(acc)
    x_hat = (xa if is_rms else xa - mean[:, None]) * rstd[:, None]
    g = dya if weight is None else dya * weight.to(acc)
    if round_xhat and weight is not None:
        g = g.to(low).to(acc)
    c1 = (x_hat * g).sum(1, keepdim=True) / max(n, 1)
    if is_rms and round_dx_terms:
        dx = ((g * rstd[:, None]).to(x.dtype).to(acc)
              + (-(x_hat * c1) * rstd[:, None]).to(x.dtype).to(acc))
    elif is_rms:
        dx = (g - x_hat * c1) * rstd[:, None]
    else:
        dx = (g - (x_hat * c1 + g.sum(1, keepdim=True) / max(n, 1))) * rstd[:, None]
    if dresidual is not None:
        dx = dx + dresidual.to(acc)
    dw = None
    if weight is not None:
        dw = ((dya * x_hat.to(low).to(acc)).to(low).to(acc) if round_xhat
              else dya * x_hat).sum(0)
    db = None if bias is None or is_rms else dya.sum(0)
    return dx.to(x.dtype), param_grad(dw, weight, x), param_grad(db, bias, x)


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _row_norm(x, weight, bias, eps, False, None, x.dtype)


def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _row_norm_bwd(dy, x, weight, bias, mean, rstd, False)


def layer_norm_bwd_pe(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      mean: Tensor, rstd: Tensor, is_rms: bool, rows_per_example: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The plain backward plus each example's squared dW / dB norms (rows_per_example rows an
    example), from the per-example sums of dy * x_hat and dy in the statistics dtype."""
    bias = None if is_rms else bias
    dx, dw, db = _row_norm_bwd(dy, x, weight, bias, mean, rstd, is_rms)
    acc = rstd.dtype
    m, n = x.shape
    e = m // rows_per_example
    dya = dy.to(acc)
    dw_sq, db_sq = x.new_empty(0, dtype=acc), x.new_empty(0, dtype=acc)
    if weight is not None:
        x_hat = (x.to(acc) if is_rms else x.to(acc) - mean[:, None]) * rstd[:, None]
        dw_sq = (dya * x_hat).reshape(e, rows_per_example, n).sum(1).square().sum(1)
    if bias is not None:
        db_sq = dya.reshape(e, rows_per_example, n).sum(1).square().sum(1)
    return dx, dw, db, dw_sq, db_sq


def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    y, _mean, rstd = _row_norm(x, weight, None, eps, True, None, x.dtype)
    return y, rstd


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                 rstd: Tensor) -> tuple[Tensor, Tensor]:
    dx, dw, _db = _row_norm_bwd(dy, x, weight, None, rstd.new_empty(0), rstd, True)
    return dx, dw


def norm_reference(src: Tensor, shape: Sequence[int], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, is_rms: bool, rounding: str,
                   out_dtype: torch.dtype) -> Tensor:
    """The norm of the fused residual op (on h = x + r) in torch's own differentiable ops, with
    the model's roundings: the fused op's "torch" backend, its double backward, and the
    reference backward of the "llama"/"t5" roundings (which are defined by torch's autograd)."""
    if is_rms and rounding != "none":
        x_hat = F.rms_norm(src.to(torch.float32 if src.dtype != torch.float64 else src.dtype),
                           shape, None, eps).to(out_dtype)
        return x_hat if weight is None else (weight * x_hat).to(out_dtype)
    w, b = cast(weight, src.dtype), cast(None if is_rms else bias, src.dtype)
    y = F.rms_norm(src, shape, w, eps) if is_rms else F.layer_norm(src, shape, w, b, eps)
    return cast(y, out_dtype)


def add_layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                       bias: Optional[Tensor], eps: float, is_rms: bool, residual_in_fp32: bool,
                       rounding: str, store_residual: bool
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if residual is None:
        src, h = x, x.new_empty(0)
    else:
        acc = stats_dtype(x.dtype)
        h_dtype = residual_stream_dtype(x.dtype, residual.dtype, residual_in_fp32)
        src = (x.to(acc) + residual.to(acc)).to(h_dtype)  # the stream exactly as stored
        h = src if store_residual else x.new_empty(0)
    y, mean, rstd = _row_norm(src, weight, bias, eps, is_rms,
                              x.dtype if rounding != "none" else None, x.dtype)
    return y, h, mean, rstd


def add_layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], mean: Tensor, rstd: Tensor, is_rms: bool,
                       rounding: str) -> tuple[Tensor, Tensor, Tensor]:
    return _row_norm_bwd(dy, h, weight, None if is_rms else bias, mean, rstd, is_rms, dh,
                         round_xhat=rounding != "none", round_dx_terms=is_rms and rounding == "t5")


def add_layer_norm_inplace(x: Tensor, residual: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float, is_rms: bool) -> None:
    y, h, _mean, _rstd = add_layer_norm_fwd(x, residual, weight, bias, eps, is_rms, False,
                                            "none", True)
    residual.copy_(h)
    x.copy_(y)


# --- Channels-first LayerNorm / RMSNorm on (N, C, S): over C at each (n, s) ----------------------
# The row formulas above applied to the (N*S, C) rows of x; outputs come back in x's layout.

def _channel_rows(t: Tensor) -> Tensor:
    n, c, s = t.shape
    return t.transpose(1, 2).reshape(n * s, c)


def _from_channel_rows(rows: Tensor, like: Tensor) -> Tensor:
    n, c, s = like.shape
    return torch.empty_like(like).copy_(rows.view(n, s, c).transpose(1, 2))


def layer_norm_2d_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    x = canonical(x)
    n, _c, s = x.shape
    y, mean, rstd = _row_norm(_channel_rows(x), weight, bias, eps, False, None, x.dtype)
    return _from_channel_rows(y, x), mean.view(n, s), rstd.view(n, s)


def layer_norm_2d_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x = canonical(x)
    dx, dw, db = _row_norm_bwd(_channel_rows(dy), _channel_rows(x), weight, bias,
                               mean.reshape(-1), rstd.reshape(-1), False)
    return _from_channel_rows(dx, x), dw, db


def rms_norm_2d_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    x = canonical(x)
    n, _c, s = x.shape
    y, _mean, rstd = _row_norm(_channel_rows(x), weight, None, eps, True, None, x.dtype)
    return _from_channel_rows(y, x), rstd.view(n, s)


def rms_norm_2d_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor],
                    rstd: Tensor) -> tuple[Tensor, Tensor]:
    x = canonical(x)
    dx, dw, _db = _row_norm_bwd(_channel_rows(dy), _channel_rows(x), weight, None,
                                rstd.new_empty(0), rstd.reshape(-1), True)
    return _from_channel_rows(dx, x), dw


# --- GroupNorm on (N, C, HW) -------------------------------------------------------------------

def _group_x_hat(x: Tensor, mean: Tensor, rstd: Tensor, num_groups: int) -> Tensor:
    n, c, hw = x.shape
    xg = x.to(mean.dtype).reshape(n, num_groups, -1)
    return ((xg - mean[..., None]) * rstd[..., None]).reshape(n, c, hw)


def _silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s + z * s * (1 - s)


def _affine(x_hat: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    z = x_hat if weight is None else x_hat * weight.to(x_hat.dtype)[:, None]
    return z if bias is None else z + bias.to(x_hat.dtype)[:, None]


def group_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int,
                   eps: float, activation: str) -> tuple[Tensor, Tensor, Tensor]:
    x = canonical(x)
    n, c, hw = x.shape
    acc = stats_dtype(x.dtype)
    y = torch.empty_like(x)
    if n == 0:
        empty = x.new_empty((0, num_groups), dtype=acc)
        return y, empty, empty.clone()
    if c == 0 or hw == 0:  # torch's native_group_norm: zero mean, NaN rstd
        return (y, x.new_zeros((n, num_groups), dtype=acc),
                x.new_full((n, num_groups), float("nan"), dtype=acc))
    var, mean = torch.var_mean(x.to(acc).reshape(n, num_groups, -1), dim=2, correction=0)
    rstd = torch.rsqrt(var + eps)
    z = _affine(_group_x_hat(x, mean, rstd, num_groups), weight, bias)
    y.copy_(F.silu(z) if activation == "silu" else z)
    return y, mean, rstd


def group_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, num_groups: int,
                   activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """dx = rstd * (w*dz - x_hat * c1 - c2), c1 = mean over the group of w*dz*x_hat, c2 = mean
    of w*dz; dz = dy, or dy * silu'(z) for the recomputed pre-activation z."""
    x = canonical(x)
    n, c, hw = x.shape
    dx = torch.empty_like(x)
    if n == 0 or c == 0 or hw == 0:
        return (dx, empty_if_none(None if weight is None else torch.zeros_like(weight), x),
                empty_if_none(None if bias is None else torch.zeros_like(bias), x))
    x_hat = _group_x_hat(x, mean, rstd, num_groups)
    dz = dy.to(mean.dtype)
    if activation == "silu":
        dz = dz * _silu_grad(_affine(x_hat, weight, bias))
    wdz = dz if weight is None else dz * weight.to(mean.dtype)[:, None]
    count = (c // num_groups) * hw
    wg, xg = wdz.reshape(n, num_groups, -1), x_hat.reshape(n, num_groups, -1)
    c1 = (wg * xg).sum(-1, keepdim=True) / count
    c2 = wg.sum(-1, keepdim=True) / count
    dx.copy_((rstd[..., None] * (wg - xg * c1 - c2)).reshape(n, c, hw))
    dw = None if weight is None else (dz * x_hat).sum((0, 2))
    db = None if bias is None else dz.sum((0, 2))
    return dx, param_grad(dw, weight, x), param_grad(db, bias, x)


def group_norm_bwd_pe(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      mean: Tensor, rstd: Tensor, num_groups: int, activation: str
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The plain backward plus each example's (index n's) squared dW / dB norms, from the
    per-example sums of dz * x_hat and dz in the statistics dtype."""
    dx, dw, db = group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, activation)
    x = canonical(x)
    n = x.shape[0]
    dw_sq, db_sq = x.new_empty(0, dtype=mean.dtype), x.new_empty(0, dtype=mean.dtype)
    if x.numel() == 0:
        zeros = x.new_zeros(n, dtype=mean.dtype)
        return (dx, dw, db, zeros if weight is not None else dw_sq,
                zeros.clone() if bias is not None else db_sq)
    x_hat = _group_x_hat(x, mean, rstd, num_groups)
    dz = dy.to(mean.dtype)
    if activation == "silu":
        dz = dz * _silu_grad(_affine(x_hat, weight, bias))
    if weight is not None:
        dw_sq = (dz * x_hat).sum(2).square().sum(1)
    if bias is not None:
        db_sq = dz.sum(2).square().sum(1)
    return dx, dw, db, dw_sq, db_sq


# --- Gradient noise scale --------------------------------------------------------------------

def gns_sums(dweight_sq: Tensor, dbias_sq: Tensor, dweight: Tensor, dbias: Tensor,
             examples: int) -> Tensor:
    """The noise-scale sink's gradient, fp32 [sum(dweight_sq) + sum(dbias_sq),
    |dweight|^2 + |dbias|^2, examples, 1]: the sums in fp32 (fp64 when the per-example norms
    are fp64), rounded once. Any of the tensors may be empty (an absent parameter)."""
    acc = torch.float64 if torch.float64 in (dweight_sq.dtype, dbias_sq.dtype) else torch.float32
    per_example = dweight_sq.to(acc).sum() + dbias_sq.to(acc).sum()
    batch = dweight.to(acc).square().sum() + dbias.to(acc).square().sum()
    return torch.stack([per_example, batch, per_example.new_full((), examples),
                        per_example.new_ones(())]).to(torch.float32)


# --- BatchNorm on (N, C, S) --------------------------------------------------------------------

def _bcast(t: Tensor) -> Tensor:
    return t[None, :, None]


def _pre_activation(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    rstd = torch.rsqrt(var + eps)
    x_hat = (x.to(mean.dtype) - _bcast(mean)) * _bcast(rstd)
    y = x_hat if weight is None else x_hat * _bcast(weight.to(mean.dtype))
    y = y if bias is None else y + _bcast(bias.to(mean.dtype))
    return x_hat, y, rstd


def _relu_mask(y: Tensor, g: Tensor) -> Tensor:
    """torch's ReLU backward on the output: zero where relu(y) <= 0, so a NaN y passes g."""
    return torch.where(y <= 0, 0.0, g)


def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.numel() == 0:
        zeros = x.new_zeros(x.shape[1], dtype=stats_dtype(x.dtype))
        return zeros, zeros.clone()
    var, mean = torch.var_mean(x.to(stats_dtype(x.dtype)), dim=(0, 2), correction=0)
    return mean, var


def batch_norm_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                     bias: Optional[Tensor], eps: float, relu: bool) -> Tensor:
    _x_hat, y, _rstd = _pre_activation(x, mean, var, weight, bias, eps)
    return torch.empty_like(x).copy_(y.clamp_min(0) if relu else y)  # (clamp keeps NaN)


def batch_norm_backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                               weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                               relu: bool) -> tuple[Tensor, Tensor]:
    if x.numel() == 0:
        zeros = x.new_zeros(x.shape[1], dtype=mean.dtype)
        return zeros, zeros.clone()
    x_hat, y, _rstd = _pre_activation(x, mean, var, weight, bias, eps)
    g = dy.to(mean.dtype)
    if relu:
        g = _relu_mask(y, g)
    return g.sum((0, 2)), (g * x_hat).sum((0, 2))


def batch_norm_backward_elemt(dy: Tensor, x: Tensor, mean: Tensor, var: Tensor,
                              weight: Optional[Tensor], bias: Optional[Tensor],
                              sum_dy: Optional[Tensor], sum_dy_xhat: Optional[Tensor],
                              count: Optional[Tensor], eps: float, relu: bool) -> Tensor:
    """Training (sums given): dx = w*rstd*(g - (sum_dy + x_hat*sum_dy_xhat)/count); eval
    (sums None, only reachable from batch_norm_bwd): dx = w*rstd*g."""
    x_hat, y, rstd = _pre_activation(x, mean, var, weight, bias, eps)
    g = dy.to(mean.dtype)
    if relu:
        g = _relu_mask(y, g)
    if sum_dy is not None:
        g = g - (_bcast(sum_dy) + x_hat * _bcast(sum_dy_xhat)) / count.to(mean.dtype)
    dx = g * _bcast(rstd)
    if weight is not None:
        dx = dx * _bcast(weight.to(mean.dtype))
    return torch.empty_like(x).copy_(dx)


def batch_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    mean, var = batch_norm_stats(x)
    return batch_norm_apply(x, mean, var, weight, bias, eps, relu), mean, var


def batch_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, var: Tensor, eps: float, relu: bool,
                   training: bool) -> tuple[Tensor, Tensor, Tensor]:
    sum_dy, sum_dy_xhat = batch_norm_backward_reduce(dy, x, mean, var, weight, bias, eps, relu)
    if training:
        count = torch.full((1,), x.shape[0] * x.shape[2], dtype=mean.dtype, device=x.device)
        dx = batch_norm_backward_elemt(dy, x, mean, var, weight, bias, sum_dy, sum_dy_xhat,
                                       count, eps, relu)
    else:
        dx = batch_norm_backward_elemt(dy, x, mean, var, weight, bias, None, None, None, eps,
                                       relu)
    return dx, param_grad(sum_dy_xhat, weight, x), param_grad(sum_dy, bias, x)


def batch_norm_stats_update(x: Tensor, running_mean: Tensor, running_var: Tensor,
                            momentum: float, momentum_tensor: Optional[Tensor]
                            ) -> tuple[Tensor, Tensor]:
    """Batch (mean, biased var); running = (1 - momentum) * running + momentum * batch, with the
    unbiased batch variance, updated in place."""
    mean, var = batch_norm_stats(x)
    count = x.shape[0] * x.shape[2]
    if x.numel() == 0:  # nothing to learn from: running statistics stay
        return mean, var
    if count < 2:
        raise ValueError("updating running statistics needs more than 1 value per channel")
    m = momentum if momentum_tensor is None else momentum_tensor.to(mean.dtype)
    for running, batch in ((running_mean, mean), (running_var, var * (count / (count - 1)))):
        running.copy_((1 - m) * running.to(mean.dtype) + m * batch)
    return mean, var


def batch_norm_train_apply(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor],
                           bias: Optional[Tensor], eps: float, relu: bool) -> Tensor:
    return batch_norm_apply(x, mean, var, weight, bias, eps, relu)
