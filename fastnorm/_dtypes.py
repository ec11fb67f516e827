"""The dtype rules the ops share."""
from typing import Optional

import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation run (and mean/rstd are saved) in fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual_stream_dtype(x_dtype: torch.dtype, residual_dtype: torch.dtype,
                          residual_in_fp32: bool) -> torch.dtype:
    """dtype of h = x + residual in the fused residual add + norm: the residual's, or fp32 with
    residual_in_fp32 (flash-attn's rule; fp64 inputs stay fp64)."""
    return torch.float32 if residual_in_fp32 and x_dtype != torch.float64 else residual_dtype


def cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """t in dtype (None stays None). No op when it already is: a same-dtype `.to` returns t
    too, but costs a dispatcher call of host time on every call of the paths that use this."""
    return t if t is None or t.dtype == dtype else t.to(dtype)
