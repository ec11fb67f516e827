"""The dtype rules the ops share."""
import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation run (and mean/rstd are saved) in fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual_stream_dtype(x_dtype: torch.dtype, residual_dtype: torch.dtype,
                          residual_in_fp32: bool) -> torch.dtype:
    """dtype of h = x + residual in the fused residual add + norm: the residual's, or fp32 with
    residual_in_fp32 (flash-attn's rule; fp64 inputs stay fp64)."""
    return torch.float32 if residual_in_fp32 and x_dtype != torch.float64 else residual_dtype
