"""Argument checks of the op contract, shared by each op's fake and its real implementation, so
a direct `torch.ops.fastnorm.*` call with bad shapes or dtypes fails with a clear message
(under torch.compile, at trace time) before any kernel runs. `torch._check` raises a
RuntimeError and works on fake and symbolic tensors alike."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._dtypes import stats_dtype


def check(cond, op: str, message: str) -> None:
    torch._check(cond, lambda: f"fastnorm::{op}: {message}")


def input_(op: str, x: Tensor, rank: int, what: str = "x") -> None:
    check(x.dim() == rank, op, f"expected {what} to be {rank}-D (the op's canonical view), got "
                               f"{x.dim()}-D of shape {list(x.shape)}")
    check(x.is_floating_point(), op, f"expected a floating-point {what}, got {x.dtype}")


def like(op: str, what: str, t: Optional[Tensor], x: Tensor, x_name: str = "x") -> None:
    """t has x's shape (a gradient or residual of x)."""
    if t is None:
        return
    check(t.shape == x.shape, op, f"expected {what} of {x_name}'s shape {list(x.shape)}, got "
                                  f"{list(t.shape)}")
    check(t.device == x.device, op, f"expected {what} on {x.device}, got {t.device}")
    check(t.is_floating_point(), op, f"expected a floating-point {what}, got {t.dtype}")


def param(op: str, what: str, t: Optional[Tensor], size, x: Tensor) -> None:
    """An optional per-feature / per-channel parameter of length `size`."""
    if t is None:
        return
    check(t.dim() == 1 and t.shape[0] == size, op,
          f"expected {what} of shape [{size}], got {list(t.shape)}")
    check(t.device == x.device, op, f"expected {what} on {x.device}, got {t.device}")
    check(t.is_floating_point(), op, f"expected a floating-point {what}, got {t.dtype}")


def stats(op: str, what: str, t: Tensor, shape: Sequence, x: Tensor) -> None:
    """A saved statistic: the shape given, in x's statistics dtype (fp32; fp64 for fp64 x)."""
    dtype = stats_dtype(x.dtype)
    check(t.dim() == len(shape) and all(a == b for a, b in zip(t.shape, shape)), op,
          f"expected {what} of shape {list(shape)}, got {list(t.shape)}")
    check(t.dtype == dtype, op, f"expected {what} in {dtype} (the statistics dtype of a "
                                f"{x.dtype} input), got {t.dtype}")
    check(t.device == x.device, op, f"expected {what} on {x.device}, got {t.device}")


def unit_column_stride(op: str, x: Tensor, what: str = "x") -> None:
    # One column has no column stride to speak of (torch calls such a tensor contiguous
    # whatever its stride, so .contiguous() would not change it).
    check(x.numel() == 0 or x.stride(1) == 1 or x.shape[1] == 1, op,
          f"expected {what} rows with unit column stride, got strides {list(x.stride())}")


def choice(op: str, what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"fastnorm::{op}: {what} must be one of {tuple(allowed)}, got {value!r}")
