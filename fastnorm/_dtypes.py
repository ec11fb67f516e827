"""The one dtype rule every op follows."""
import torch


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and accumulation run (and mean/rstd are saved) in fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
