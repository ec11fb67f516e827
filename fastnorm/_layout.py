"""The per-family policies every backend shares, decided once: canonical views and their
channels-last test, the layout of an upstream gradient, the dtype of a parameter gradient, the
activation encoding, and what an absent optional operand is.

- Canonical views (made by the functional layer *before* an op): LayerNorm/RMSNorm rows
  (M, N) with unit column stride; GroupNorm and BatchNorm (N, C, S), S = prod(spatial dims),
  either contiguous ("channels-first") or channels-last (strides (S*C, 1, C)).
- A view that is both (C == 1 or S == 1) counts as channels-first: both layouts then address
  the same memory, so any kernel reads it correctly either way.
- Outputs (y, dx) have x's layout; an upstream gradient dy is brought into x's layout first.
- A weight/bias gradient has its parameter's dtype; statistics and partial sums are fp32 (fp64
  for fp64 input); an absent parameter's gradient is an empty tensor (a custom op cannot
  return None).
- Absent optional operands are None at the op layer. The Triton launchers substitute a stand-in
  tensor that is never read (its HAS_* flag is off), the CUDA C++ launchers take nullptr.
- Activations: the public API says `activation=None | "silu"` (GroupNorm) or `None | "relu"`
  (BatchNorm); each family's ops encode it as their schemas always have (GroupNorm: a string
  "none"/"silu", BatchNorm: `relu: bool`), converted here and nowhere else.
- Empty inputs: LayerNorm with M = 0 gives empty outputs, with N = 0 NaN statistics (torch);
  GroupNorm with HW = 0 zero mean and NaN rstd (torch's native_group_norm); BatchNorm with an
  empty batch zero statistics and zero sums (a SyncBatchNorm rank with no samples adds
  nothing). reference.py states them in code; every backend matches it (tests/test_ops.py).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ._dtypes import stats_dtype

__all__ = ["channels_last_strides", "is_channels_last", "canonical", "rows", "row_view",
           "channels_3d", "channel_view", "as_layout", "dy_like", "param_grad", "empty_if_none",
           "group_norm_activation", "batch_norm_relu", "stats_dtype"]

GROUP_NORM_ACTIVATIONS = ("none", "silu")


def channels_last_strides(x: Tensor) -> bool:
    """`x.transpose(1, 2).is_contiguous()` for an (N, C, S) view, read off the strides (torch's
    rule: size-1 dims are ignored, an empty tensor qualifies) without creating the view."""
    n, c, s = x.shape
    sn, sc, ss = x.stride()
    return (c == 1 or sc == 1) and (s == 1 or ss == c) and (n == 1 or sn == s * c) \
        or x.numel() == 0


def is_channels_last(x: Tensor) -> bool:
    """True when the (N, C, S) view x is channels-last and not also contiguous."""
    return not x.is_contiguous() and channels_last_strides(x)


def canonical(x: Tensor) -> Tensor:
    """An (N, C, S) view as one of the two layouts the kernels take: itself when contiguous or
    channels-last, else a contiguous copy."""
    if x.is_contiguous() or channels_last_strides(x):
        return x
    return x.contiguous()


def rows(t: Tensor) -> Tensor:
    """A (*, n) tensor as (M, n) rows, whatever its strides (a view when possible)."""
    dim = t.dim()
    return t if dim == 2 else t.flatten(0, -2) if dim > 2 else t.unsqueeze(0)


def row_view(input: Tensor) -> Tensor:
    """A (*, n) input as the (M, n) rows the LayerNorm kernels take: unit column stride (a view
    when possible, else a contiguous copy)."""
    x = rows(input)
    if x.stride(1) != 1 and x.shape[1] != 1 and x.numel() > 0:
        return x.contiguous()
    return x


def channels_3d(t: Tensor) -> Tensor:
    """An (N, C, *) tensor as (N, C, S), whatever its strides (a view when possible)."""
    # (flatten/unsqueeze rather than reshape(n, c, s): same result, a third of the host time,
    # and a 3-D tensor needs no view at all)
    dim = t.dim()
    return t if dim == 3 else t.flatten(2) if dim > 3 else t.unsqueeze(2)


def channel_view(input: Tensor) -> Tensor:
    """An (N, C, *) input as the canonical (N, C, S) view (a view when possible, else a copy)."""
    dim = input.dim()
    x = input if dim == 3 else input.flatten(2) if dim > 3 else input.unsqueeze(2)
    if x.is_contiguous() or channels_last_strides(x):  # (canonical, inlined: a hot path)
        return x
    return x.contiguous()


def as_layout(t: Tensor, channels_last: bool) -> Tensor:
    """t, an (N, C, S) tensor, in the given layout (no copy when it already is)."""
    if channels_last:
        return t if channels_last_strides(t) else \
            t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


def dy_like(dy: Tensor, x: Tensor) -> Tensor:
    """The upstream gradient of an (N, C, S) op in x's layout (kernels walk both together)."""
    return as_layout(dy, is_channels_last(x))


def param_grad(grad: Optional[Tensor], param: Optional[Tensor], like: Tensor) -> Tensor:
    """A parameter's gradient in the parameter's dtype; empty when the parameter is absent."""
    if param is None or grad is None:
        return like.new_empty(0)
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A custom op cannot return None: an absent gradient comes back as an empty tensor."""
    return like.new_empty(0) if t is None else t


def group_norm_activation(activation: Optional[str]) -> str:
    """The public `activation=None | "silu"` as fastnorm::group_norm_*'s argument."""
    return "none" if activation is None else activation


def batch_norm_relu(activation: Optional[str]) -> bool:
    """The public `activation=None | "relu"` as fastnorm::batch_norm_*'s `relu` argument."""
    return activation == "relu"
