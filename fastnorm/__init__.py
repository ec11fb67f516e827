"""fastnorm: fast normalization layers for PyTorch.

    import fastnorm
    y = fastnorm.layer_norm(x, (x.shape[-1],), weight, bias)
    y = fastnorm.group_norm(x, 32, weight, bias, activation="silu")
    y = fastnorm.layer_norm_2d(img, weight, bias)  # over C of (N, C, H, W): timm's LayerNorm2d
    model = fastnorm.convert(model)          # swaps norm layers in place (torch.nn, transformers)
    print(fastnorm.convert_report(model))    # what was converted, what was left alone and why
    y, h = fastnorm.rms_norm(x, (n,), w, residual=r, prenorm=True)  # fused add: h = x + r
    fastnorm.explain(x, "layer_norm")        # which backend would run, and why
    with fastnorm.use_backend("torch"): ...  # also "auto", "triton", "cuda", "reference"
"""
import torch as _torch

from ._version import MIN_TORCH as _MIN_TORCH

# The op layer registers its autocast rules at import; on an older torch that would end in an
# AttributeError from deep inside it, so say which torch is needed instead.
if not hasattr(_torch.library, "register_autocast"):
    raise ImportError(f"fastnorm needs torch >= {_MIN_TORCH} (torch.library.register_autocast); "
                      f"found torch {_torch.__version__}")

from . import nn
from ._backend import available_backends, get_backend, set_backend, use_backend
from .functional import (batch_norm, fused_add_rms_norm_, group_norm, layer_norm, layer_norm_2d,
                         rms_norm, rms_norm_2d)
from ._explain import explain
from ._version import __version__
from .convert import ConvertReport, convert_report, register_convert
from .nn import convert

__all__ = ["layer_norm", "rms_norm", "layer_norm_2d", "rms_norm_2d", "fused_add_rms_norm_",
           "group_norm", "batch_norm", "nn", "convert", "register_convert", "convert_report",
           "ConvertReport", "explain", "set_backend", "get_backend", "use_backend",
           "available_backends", "__version__"]
