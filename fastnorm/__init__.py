"""fastnorm: fast normalization layers for PyTorch.

    import fastnorm
    y = fastnorm.layer_norm(x, (x.shape[-1],), weight, bias)
    y = fastnorm.group_norm(x, 32, weight, bias, activation="silu")
    model = fastnorm.convert(model)          # swaps torch.nn norm layers in place
    with fastnorm.use_backend("torch"): ...  # "auto" (default), "triton", "cuda", "torch"
"""
from . import nn
from ._backend import available_backends, get_backend, set_backend, use_backend
from .functional import batch_norm, group_norm, layer_norm, rms_norm
from ._version import __version__
from .nn import convert

__all__ = ["layer_norm", "rms_norm", "group_norm", "batch_norm", "nn", "convert",
           "set_backend", "get_backend", "use_backend", "available_backends", "__version__"]
