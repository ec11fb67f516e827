"""Functional normalization ops with torch.nn.functional's signatures and semantics.

Each function validates its arguments (with messages like torch's), picks the backend, reshapes the
input to the op's canonical view *before* entering the custom op, and reshapes the result back.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend

if importlib.util.find_spec("triton") is not None:
    from . import ops as _ops  # noqa: F401  (registers the custom ops; needs triton)

_shape_t = Union[int, Sequence[int], torch.Size]


def _check_float_input(name: str, input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"fastnorm.{name}: expected a Tensor as input, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"fastnorm.{name}: expected a floating-point input (float16, bfloat16, "
                        f"float32 or float64), got {input.dtype}")


def _check_param(name: str, what: str, param: Optional[Tensor], input: Tensor,
                 shape: Sequence[int], shape_name: str) -> None:
    if param is None:
        return
    if tuple(param.shape) != tuple(shape):
        raise RuntimeError(f"Expected {what} to be of same shape as {shape_name}, but got {what} "
                           f"of shape {list(param.shape)} and {shape_name} = {list(shape)}")
    if param.device != input.device:
        raise RuntimeError(f"fastnorm.{name}: expected input and {what} on the same device, but "
                           f"input is on {input.device} and {what} on {param.device}")
    if not param.is_floating_point():
        raise TypeError(f"fastnorm.{name}: expected a floating-point {what}, got {param.dtype}")


def _normalized_rows(name: str, input: Tensor, normalized_shape: _shape_t) -> tuple[tuple[int, ...], int]:
    """Checks `normalized_shape` against the input's trailing dims; returns it and its numel."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(s) for s in normalized_shape)
    if len(shape) == 0:
        raise RuntimeError(f"fastnorm.{name}: normalized_shape must have at least one dimension, "
                           "got []")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(str(s) for s in shape)}], but got input of size"
                           f"{list(input.shape)}")
    return shape, math.prod(shape)


def _rows_view(input: Tensor, shape: tuple[int, ...], n: int) -> Tensor:
    """The input as (M, n) rows with unit column stride (a view when possible, else a copy)."""
    x2d = input.reshape(math.prod(input.shape[:input.dim() - len(shape)]), n)
    if x2d.stride(-1) != 1 and x2d.numel() > 0:
        x2d = x2d.contiguous()
    return x2d


def _flat(param: Optional[Tensor]) -> Optional[Tensor]:
    return None if param is None else param.reshape(-1).contiguous()


def layer_norm(input: Tensor, normalized_shape: _shape_t, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Layer normalization over the trailing `normalized_shape` dims, as
    `torch.nn.functional.layer_norm`.

    Statistics are computed in fp32 (fp64 for fp64 input); the output has the input's dtype, and
    weight/bias may be fp32 with a low-precision input.
    """
    _check_float_input("layer_norm", input)
    shape, n = _normalized_rows("layer_norm", input, normalized_shape)
    _check_param("layer_norm", "weight", weight, input, shape, "normalized_shape")
    _check_param("layer_norm", "bias", bias, input, shape, "normalized_shape")
    if _backend.resolve(input, "layer_norm") == "torch":
        return F.layer_norm(input, shape, weight, bias, eps)
    y, _mean, _rstd = torch.ops.fastnorm.layer_norm_fwd(
        _rows_view(input, shape, n), _flat(weight), _flat(bias), float(eps))
    return y.view(input.shape)


def rms_norm(input: Tensor, normalized_shape: _shape_t, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """Root-mean-square normalization over the trailing `normalized_shape` dims, as
    `torch.nn.functional.rms_norm`; `eps=None` means `torch.finfo(input.dtype).eps`."""
    _check_float_input("rms_norm", input)
    shape, n = _normalized_rows("rms_norm", input, normalized_shape)
    _check_param("rms_norm", "weight", weight, input, shape, "normalized_shape")
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    if _backend.resolve(input, "rms_norm") == "torch":
        return F.rms_norm(input, shape, weight, eps)
    y, _rstd = torch.ops.fastnorm.rms_norm_fwd(_rows_view(input, shape, n), _flat(weight), float(eps))
    return y.view(input.shape)


# --- BatchNorm -----------------------------------------------------------------------------------

def _check_batch_norm_args(name: str, input: Tensor, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], activation: Optional[str]) -> bool:
    """Validates BatchNorm arguments (torch's messages where torch has one); returns whether a
    ReLU is fused."""
    _check_float_input(name, input)
    if input.dim() < 2:
        raise ValueError(f"fastnorm.{name}: expected an input with at least 2 dims (N, C, ...), "
                         f"got {input.dim()}-D input")
    if activation not in (None, "relu"):
        raise ValueError(f"fastnorm.{name}: activation must be None or 'relu', got {activation!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be "
                         "None")
    channels = input.shape[1]
    for what, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.numel() != channels:
            raise RuntimeError(f"{what} should contain {channels} elements not {t.numel()}")
        if t.device != input.device:
            raise RuntimeError(f"fastnorm.{name}: expected input and {what} on the same device, "
                               f"but input is on {input.device} and {what} on {t.device}")
        if not t.is_floating_point():
            raise TypeError(f"fastnorm.{name}: expected a floating-point {what}, got {t.dtype}")
    return activation == "relu"


def _batch_norm_view(input: Tensor) -> Tensor:
    """The input as (N, C, S), S = prod(spatial dims), contiguous or channels-last (a view when
    possible, else a copy), the two layouts the kernels take."""
    n, c = input.shape[:2]
    x = input.reshape(n, c, math.prod(input.shape[2:]))
    if not (x.is_contiguous() or x.transpose(1, 2).is_contiguous()):
        x = x.contiguous()
    return x


def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                          count: Union[int, Tensor], momentum: Union[float, Tensor]) -> None:
    """running = (1 - momentum) * running + momentum * batch, with the unbiased batch variance;
    all on the device (count and momentum may be tensors), so no host sync."""
    with torch.no_grad():
        if isinstance(momentum, Tensor):
            momentum = momentum.to(running_mean.dtype)
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               training: bool = False, momentum: Union[float, Tensor] = 0.1, eps: float = 1e-5,
               *, activation: Optional[str] = None) -> Tensor:
    """Batch normalization over all dims but the channel dim 1, as
    `torch.nn.functional.batch_norm`, optionally followed by a fused ReLU (`activation="relu"`).

    Training normalizes with the batch statistics and, when running stats are given, updates them
    in place with the unbiased batch variance; eval normalizes with the running stats in one pass.
    `momentum` may be a 0-dim tensor (the modules pass 1/num_batches_tracked for momentum=None,
    which then needs no host sync). The output keeps the input's memory format.
    """
    relu = _check_batch_norm_args("batch_norm", input, running_mean, running_var, weight, bias,
                                  activation)
    channels = input.shape[1]
    if training:
        count = input.numel() // channels if channels else 0
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"size {input.size()}")
    elif running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if _backend.resolve(input, "batch_norm") == "torch":
        if isinstance(momentum, Tensor):
            momentum = float(momentum)
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if relu else y
    x = _batch_norm_view(input)
    if training:
        if running_mean is not None and count > 0:
            # The running statistics are updated by the launch that finalizes the batch ones.
            momentum_t = momentum.reshape(1) if isinstance(momentum, Tensor) else None
            mean, var = torch.ops.fastnorm.batch_norm_stats_update(
                x.detach(), _flat(running_mean), _flat(running_var),
                0.0 if momentum_t is not None else float(momentum), momentum_t)
            y = torch.ops.fastnorm.batch_norm_train_apply(x, mean, var, _flat(weight),
                                                          _flat(bias), float(eps), relu)
        else:
            y, mean, var = torch.ops.fastnorm.batch_norm_fwd(x, _flat(weight), _flat(bias),
                                                             float(eps), relu)
    else:
        y = torch.ops.fastnorm.batch_norm_apply(x, _flat(running_mean), _flat(running_var),
                                                _flat(weight), _flat(bias), float(eps), relu)
    return y.view(input.shape)


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               activation: Optional[str] = None) -> Tensor:
    """Group normalization over (C/num_groups channels x all spatial positions) per sample, as
    `torch.nn.functional.group_norm`, optionally followed by `activation` ("silu") in the same
    kernel: `fastnorm.group_norm(x, g, w, b, activation="silu")` equals
    `F.silu(F.group_norm(x, g, w, b))`.

    Input is (N, C, *). NCHW-contiguous and channels-last inputs run without a copy and the
    output keeps their memory format. Statistics are fp32 (fp64 for fp64 input); weight/bias may
    be fp32 with a low-precision input.
    """
    _check_float_input("group_norm", input)
    if activation not in (None, "silu"):
        raise ValueError(f"fastnorm.group_norm: unknown activation {activation!r}; expected None "
                         "or 'silu'")
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received "
                           f"{input.dim()}")
    n, c = input.shape[0], input.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, "
                           f"but got input of shape {list(input.shape)} and "
                           f"num_groups={num_groups}")
    for what, param in (("weight", weight), ("bias", bias)):
        if param is not None and (param.dim() != 1 or param.numel() != c):
            raise RuntimeError(f"Expected {what} to be a vector of size equal to the number of "
                               f"channels in input, but got {what} of shape "
                               f"{list(param.shape)} and input of shape {list(input.shape)}")
        _check_param("group_norm", what, param, input, (c,), "num_channels")
    if _backend.resolve(input, "group_norm") == "torch":
        y = F.group_norm(input, num_groups, weight, bias, eps)
        return F.silu(y) if activation == "silu" else y
    # (N, C, HW) is a view for NCHW and channels-last inputs alike; the op handles both layouts.
    x3 = input.reshape(n, c, math.prod(input.shape[2:]))
    y, _mean, _rstd = torch.ops.fastnorm.group_norm_fwd(
        x3, _flat(weight), _flat(bias), int(num_groups), float(eps), activation or "none")
    return y.view(input.shape)
