"""Functional normalization ops with torch.nn.functional's signatures and semantics.

Each function validates its arguments (with messages like torch's), picks the backend, reshapes the
input to the op's canonical view *before* entering the custom op, and reshapes the result back.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend
from . import ops as _ops  # noqa: F401  (registers the fastnorm:: ops; needs only torch)
from .ops import batch_norm as _bn_ops
from .ops import group_norm as _gn_ops
from .ops import layer_norm as _ln_ops
from .ops import layer_norm_2d as _ln2d_ops
from ._dtypes import cast, residual_stream_dtype, stats_dtype
from ._layout import batch_norm_relu, channel_view, group_norm_activation
from .reference import norm_reference

_shape_t = Union[int, Sequence[int], torch.Size]

_REDUCED = (torch.float16, torch.bfloat16)
# rms_norm(eps=None): torch's rule, the machine epsilon of the computation (opmath) type.
_EPS32 = torch.finfo(torch.float32).eps
_EPS64 = torch.finfo(torch.float64).eps


def _rms_eps(dtype: torch.dtype) -> float:
    return _EPS64 if dtype == torch.float64 else _EPS32


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


def _plain_params(input: Tensor, size: int, *params: Optional[Tensor]) -> bool:
    """The common case in one pass: every parameter given is a contiguous 1-D tensor of `size`
    elements on the input's device, all of one dtype, the input's or float32 with a
    float16/bfloat16 input (torch's rule for LayerNorm, GroupNorm and BatchNorm parameters).
    True: the full checks below (torch's messages) and `_flat` have nothing to do; False: the
    call goes through them."""
    first = device = None
    for p in params:
        if p is None:
            continue
        if first is None:
            first, device, dtype = p.dtype, input.device, input.dtype
            if first != dtype and not (first == torch.float32 and dtype in _REDUCED):
                return False
        elif p.dtype != first:
            return False
        if p.dim() != 1 or p.shape[0] != size or p.device != device or not p.is_contiguous():
            return False
    return True


def _check_dtypes(name: str, input: Tensor, params: dict[str, Optional[Tensor]],
                  fp32_under_autocast: bool) -> None:
    """torch's dtype rule for LayerNorm, GroupNorm and BatchNorm parameters (weight, bias,
    running stats): all of one dtype, which is the input's, or float32 with a float16/bfloat16
    input. With `fp32_under_autocast` (LayerNorm, GroupNorm: on CUDA torch's autocast runs them
    in float32) the rule is applied to the dtypes autocast casts to."""
    for p in params.values():  # the common case: every parameter in the input's dtype
        if p is not None and p.dtype != input.dtype:
            break
    else:
        return
    present = {what: p.dtype for what, p in params.items() if p is not None}
    dtype = input.dtype
    if fp32_under_autocast and input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        present = {w: d if d == torch.float64 else torch.float32 for w, d in present.items()}
        dtype = dtype if dtype == torch.float64 else torch.float32
    first = next(iter(present.values()))
    if all(d == first for d in present.values()) and (
            first == dtype or (first == torch.float32 and dtype in _REDUCED)):
        return
    got = ", ".join(f"{w} {d}" for w, d in present.items())
    raise RuntimeError(f"fastnorm.{name}: expected {', '.join(present)} to have one dtype, the "
                       f"input's ({dtype}) or float32 with a float16/bfloat16 input (torch's "
                       f"rule), but got input {input.dtype}, {got}")


def _normalized_rows(name: str, input: Tensor, normalized_shape: _shape_t) -> tuple[tuple[int, ...], int]:
    """Checks `normalized_shape` against the input's trailing dims; returns it and its numel."""
    kind = type(normalized_shape)
    if (kind is tuple or kind is torch.Size) and len(normalized_shape) == 1:
        n = normalized_shape[0]  # the common case, a module's (N,): one comparison
        if type(n) is int and input.dim() >= 1 and input.shape[-1] == n:
            return normalized_shape, n
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(s) for s in normalized_shape)
    if len(shape) == 0:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., "
                           "containing at least one element, but got normalized_shape = []")
    if input.dim() < len(shape) or tuple(input.shape[input.dim() - len(shape):]) != shape:
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(str(s) for s in shape)}], but got input of size"
                           f"{list(input.shape)}")
    return shape, math.prod(shape)


def _rows_view(input: Tensor, shape: tuple[int, ...], n: int) -> Tensor:
    """The input as (M, n) rows with unit column stride (a view when possible, else a copy)."""
    if input.dim() == 2 and len(shape) == 1 and input.stride(1) == 1:
        return input
    x2d = input.reshape(math.prod(input.shape[:input.dim() - len(shape)]), n)
    if x2d.stride(-1) != 1 and x2d.numel() > 0:
        x2d = x2d.contiguous()
    return x2d


def _as_int(name: str, what: str, position: int, value: object) -> int:
    """An int argument as torch's argument parser takes it (not a float, not a bool)."""
    if not isinstance(value, bool):
        if isinstance(value, int):
            return value
        try:
            return operator.index(value)  # numpy integers and the like
        except TypeError:
            pass
    raise TypeError(f"{name}(): argument '{what}' (position {position}) must be int, not "
                    f"{type(value).__name__}")


def _flat(param: Optional[Tensor]) -> Optional[Tensor]:
    if param is None or (param.dim() == 1 and param.is_contiguous()):
        return param
    return param.reshape(-1).contiguous()


def _shaped(y: Tensor, input: Tensor) -> Tensor:
    """y (computed on a canonical view) with the input's shape; no view op when it has it.
    (view_as: passing a torch.Size to view costs the host twice as much.)"""
    return y if y.shape == input.shape else y.view_as(input)


def layer_norm(input: Tensor, normalized_shape: _shape_t, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               residual: Optional[Tensor] = None, prenorm: bool = False,
               residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Layer normalization over the trailing `normalized_shape` dims, as
    `torch.nn.functional.layer_norm`.

    Statistics are computed in fp32 (fp64 for fp64 input); the output has the input's dtype, and
    weight/bias may be fp32 with a low-precision input.

    Fused residual add (flash-attn's `layer_norm_fn` conventions): with `residual=r` the norm
    runs on `h = input + r` in one pass; `prenorm=True` returns `(y, h)`, the new residual
    stream, else `y` only. h has r's dtype, or fp32 with `residual_in_fp32=True`.
    """
    if residual is not None or prenorm:
        return _add_norm("layer_norm", input, residual, normalized_shape, weight, bias, eps,
                         False, prenorm, residual_in_fp32)
    if _backend.torch_selected(input) or _backend.transformed(input, weight, bias):
        return F.layer_norm(input, (normalized_shape,) if isinstance(normalized_shape, int)
                            else normalized_shape, weight, bias, eps)
    _check_float_input("layer_norm", input)
    shape, n = _normalized_rows("layer_norm", input, normalized_shape)
    plain = len(shape) == 1 and _plain_params(input, n, weight, bias)
    if not plain:
        _check_param("layer_norm", "weight", weight, input, shape, "normalized_shape")
        _check_param("layer_norm", "bias", bias, input, shape, "normalized_shape")
        _check_dtypes("layer_norm", input, {"weight": weight, "bias": bias}, True)
    if _backend.resolve(input, "layer_norm") == "torch":
        return F.layer_norm(input, shape, weight, bias, eps)
    if plain:  # the op views (*, n) as rows itself (inside its autograd node)
        return _ln_ops.layer_norm(input, weight, bias, float(eps))
    y = _ln_ops.layer_norm(_rows_view(input, shape, n), _flat(weight), _flat(bias), float(eps))
    return _shaped(y, input)


def _norm_with_gns(input: Tensor, normalized_shape: _shape_t, weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: Optional[float], is_rms: bool,
                   sink: Tensor) -> Tensor:
    """layer_norm / rms_norm whose backward also accumulates the norm-layer noise-scale sums
    into `sink.grad` (fastnorm::layer_norm_fwd_gns; used by fastnorm.gns.track). An example is
    the leading batch index: the rows of input[i] (one example for an input with no batch
    dims)."""
    name = "rms_norm" if is_rms else "layer_norm"
    _check_float_input(name, input)
    shape, n = _normalized_rows(name, input, normalized_shape)
    _check_param(name, "weight", weight, input, shape, "normalized_shape")
    if not is_rms:
        _check_param(name, "bias", bias, input, shape, "normalized_shape")
        _check_dtypes(name, input, {"weight": weight, "bias": bias}, True)
    if eps is None:
        eps = _rms_eps(input.dtype)
    lead = input.dim() - len(shape)
    rows_per_example = max(1, math.prod(input.shape[1:lead])) if lead > 0 else 1
    y = _ln_ops.layer_norm_gns(
        input if len(shape) == 1 else _rows_view(input, shape, n), _flat(weight),
        None if is_rms else _flat(bias), sink, float(eps), is_rms, rows_per_example)
    return _shaped(y, input)


def rms_norm(input: Tensor, normalized_shape: _shape_t, weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, residual: Optional[Tensor] = None,
             prenorm: bool = False,
             residual_in_fp32: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Root-mean-square normalization over the trailing `normalized_shape` dims, as
    `torch.nn.functional.rms_norm`. `eps=None` is torch's rule: the machine epsilon of the
    computation type, `torch.finfo(torch.float32).eps` for float16/bfloat16/float32 input and
    `torch.finfo(torch.float64).eps` for float64. As in torch, the weight may have any floating
    dtype; the output has the input's.
    `residual`, `prenorm`, `residual_in_fp32`: the fused residual add, as in `layer_norm`."""
    if residual is not None or prenorm:
        return _add_norm("rms_norm", input, residual, normalized_shape, weight, None, eps,
                         True, prenorm, residual_in_fp32)
    if _backend.torch_selected(input) or _backend.transformed(input, weight):
        return F.rms_norm(input, (normalized_shape,) if isinstance(normalized_shape, int)
                          else normalized_shape, weight, eps)
    _check_float_input("rms_norm", input)
    shape, n = _normalized_rows("rms_norm", input, normalized_shape)
    plain = len(shape) == 1 and _plain_params(input, n, weight)
    if not plain:
        _check_param("rms_norm", "weight", weight, input, shape, "normalized_shape")
    if eps is None:
        eps = _rms_eps(input.dtype)
    if _backend.resolve(input, "rms_norm") == "torch":
        return F.rms_norm(input, shape, weight, eps)
    if plain:  # the op views (*, n) as rows itself (inside its autograd node)
        return _ln_ops.rms_norm(input, weight, float(eps))
    return _shaped(_ln_ops.rms_norm(_rows_view(input, shape, n), _flat(weight), float(eps)),
                   input)


# --- Channels-first LayerNorm / RMSNorm ----------------------------------------------------------

def _check_channels_first(name: str, input: Tensor, params: dict) -> None:
    """The checks of the permute formulation (`F.layer_norm(x.permute(0, 2, 3, 1), (C,), ...)`),
    with its messages: a floating (N, C, *) input, parameters of shape [C]."""
    _check_float_input(name, input)
    if input.dim() < 2:
        raise RuntimeError(f"fastnorm.{name}: expected an input of shape (N, C, *) with at least "
                           f"2 dimensions, but got {input.dim()}-D input of shape "
                           f"{list(input.shape)}")
    for what, param in params.items():
        _check_param(name, what, param, input, (input.shape[1],), "normalized_shape")


def _layer_norm_2d_torch(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float) -> Tensor:
    # torch's own ops: the permute formulation of timm's and torchvision's LayerNorm2d.
    return F.layer_norm(input.movedim(1, -1), (input.shape[1],), weight, bias,
                        eps).movedim(-1, 1)


def layer_norm_2d(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                  eps: float = 1e-6) -> Tensor:
    """Layer normalization over the channels (dim 1) of an (N, C, *) input at every position:
    what timm's and torchvision's `LayerNorm2d` and transformers' channels-first
    `ConvNextLayerNorm` compute as `F.layer_norm(x.permute(0, 2, 3, 1), (C,), weight, bias,
    eps).permute(0, 3, 1, 2)`, without the permutes' copies. Any number of spatial dims (none:
    (N, C)); weight and bias of shape [C]; `eps` defaults to 1e-6 as in those modules.

    NCHW-contiguous and channels-last inputs run without a copy (one read of x, one write of
    y) and the output keeps the input's memory format; other strides are made contiguous first.
    (The permute formulation returns channels-last strides whatever the input's; on backend
    "torch", and "auto" on a CPU, this function is that formulation, strides included.)
    Statistics are fp32 (fp64 for fp64 input); weight/bias may be fp32 with a low-precision
    input; dtype rules and CUDA autocast as `F.layer_norm`.
    """
    if _backend.torch_selected(input) or _backend.transformed(input, weight, bias):
        return _layer_norm_2d_torch(input, weight, bias, eps)
    _check_channels_first("layer_norm_2d", input, {"weight": weight, "bias": bias})
    _check_dtypes("layer_norm_2d", input, {"weight": weight, "bias": bias}, True)
    if _backend.resolve(input, "layer_norm_2d") == "torch":
        return _layer_norm_2d_torch(input, weight, bias, eps)
    return _ln2d_ops.layer_norm_2d(input, _flat(weight), _flat(bias), float(eps))


def _rms_norm_2d_torch(input: Tensor, weight: Optional[Tensor], eps: Optional[float]) -> Tensor:
    return F.rms_norm(input.movedim(1, -1), (input.shape[1],), weight, eps).movedim(-1, 1)


def rms_norm_2d(input: Tensor, weight: Optional[Tensor] = None,
                eps: Optional[float] = None) -> Tensor:
    """Root-mean-square normalization over the channels (dim 1) of an (N, C, *) input at every
    position: `F.rms_norm(x.movedim(1, -1), (C,), weight, eps).movedim(-1, 1)` without the
    copies. `eps=None` is torch's rule (the machine epsilon of the computation type); weight of
    shape [C], any floating dtype, as `F.rms_norm`. Layouts as `layer_norm_2d`."""
    if _backend.torch_selected(input) or _backend.transformed(input, weight):
        return _rms_norm_2d_torch(input, weight, eps)
    _check_channels_first("rms_norm_2d", input, {"weight": weight})
    if eps is None:
        eps = _rms_eps(input.dtype)
    if _backend.resolve(input, "rms_norm_2d") == "torch":
        return _rms_norm_2d_torch(input, weight, eps)
    return _ln2d_ops.rms_norm_2d(input, _flat(weight), float(eps))


# --- BatchNorm -----------------------------------------------------------------------------------

def _check_batch_norm_args(name: str, input: Tensor, running_mean: Optional[Tensor],
                           running_var: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], activation: Optional[str]
                           ) -> tuple[bool, bool]:
    """Validates BatchNorm arguments (torch's messages where torch has one); returns whether a
    ReLU is fused and whether the tensors are plain (`_plain_params`: `_flat` would not change
    them)."""
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
    if _plain_params(input, channels, running_mean, running_var, weight, bias):
        return batch_norm_relu(activation), True
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
    _check_dtypes(name, input, {"weight": weight, "bias": bias, "running_mean": running_mean,
                                "running_var": running_var}, False)
    return batch_norm_relu(activation), False


_batch_norm_view = channel_view  # (the name SyncBatchNorm and the benchmarks used)


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
    if activation is not None and activation != "relu":
        raise ValueError(f"fastnorm.batch_norm: activation must be None or 'relu', got "
                         f"{activation!r}")
    if momentum is None:  # torch's own message, before anything runs
        raise TypeError("batch_norm(): argument 'momentum' (position 7) must be float, not "
                        "NoneType")
    if (_backend.torch_selected(input)
            or _backend.transformed(input, running_mean, running_var, weight, bias)
            or (isinstance(input, Tensor) and input.dim() < 2)):
        # (< 2-D: torch's own quirks, an empty 1-D input returns empty, are the contract.)
        if type(momentum) is not float:  # (cheaper than isinstance(momentum, Tensor))
            momentum = float(momentum)
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if activation == "relu" else y
    relu, plain = _check_batch_norm_args("batch_norm", input, running_mean, running_var, weight,
                                         bias, activation)
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
    # The ops run on the (N, C, S) view, for NCHW and channels-last inputs alike.
    rm, rv = (running_mean, running_var) if plain else (_flat(running_mean), _flat(running_var))
    if not plain:
        weight, bias = _flat(weight), _flat(bias)
    if training:
        if running_mean is not None and count > 0:
            # The running statistics are updated by the launch that finalizes the batch ones.
            momentum_t = momentum.reshape(1) if isinstance(momentum, Tensor) else None
            y = _bn_ops.batch_norm_training_update(
                input, rm, rv, 0.0 if momentum_t is not None else float(momentum), momentum_t,
                weight, bias, float(eps), relu)
            # Strided buffers were updated through contiguous copies: write them back, so the
            # caller's tensors change in place whatever their strides (as torch's do).
            if not plain:
                if not running_mean.is_contiguous():
                    running_mean.copy_(rm.view(running_mean.shape))
                if not running_var.is_contiguous():
                    running_var.copy_(rv.view(running_var.shape))
            return y
        return _bn_ops.batch_norm_training(input, weight, bias, float(eps), relu)
    # The op contract keeps statistics in the stats dtype; running stats may be x's dtype.
    stats = stats_dtype(input.dtype)
    if rm.dtype != stats:
        rm = rm.to(stats)
    if rv.dtype != stats:
        rv = rv.to(stats)
    return _bn_ops.batch_norm_eval(input, rm, rv, weight, bias, float(eps), relu)


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
    if activation is not None and activation != "silu":
        raise ValueError(f"fastnorm.group_norm: unknown activation {activation!r}; expected None "
                         "or 'silu'")
    if _backend.torch_selected(input) or _backend.transformed(input, weight, bias):
        y = F.group_norm(input, num_groups, weight, bias, eps)
        return F.silu(y) if activation == "silu" else y
    num_groups, plain = _check_group_norm(input, num_groups, weight, bias)
    if _backend.resolve(input, "group_norm") == "torch":
        y = F.group_norm(input, num_groups, weight, bias, eps)
        return F.silu(y) if activation == "silu" else y
    if not plain:
        weight, bias = _flat(weight), _flat(bias)
    # The op runs on the (N, C, HW) view, for NCHW and channels-last inputs alike.
    return _gn_ops.group_norm(input, weight, bias, num_groups, float(eps),
                              "none" if activation is None else activation)


def _group_norm_with_gns(input: Tensor, num_groups: int, weight: Optional[Tensor],
                         bias: Optional[Tensor], eps: float, activation: Optional[str],
                         sink: Tensor) -> Tensor:
    """group_norm whose backward also accumulates the norm-layer noise-scale sums into
    `sink.grad` (fastnorm::group_norm_fwd_gns; used by fastnorm.gns.track). An example is the
    batch index n."""
    num_groups, _plain = _check_group_norm(input, num_groups, weight, bias)
    return _gn_ops.group_norm_gns(input, _flat(weight), _flat(bias), sink, num_groups,
                                  float(eps), group_norm_activation(activation))


def _check_group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor],
                      bias: Optional[Tensor]) -> tuple[int, bool]:
    """torch's argument checks of group_norm; num_groups as an int, and whether the parameters
    are plain (`_plain_params`: `_flat` would not change them)."""
    _check_float_input("group_norm", input)
    num_groups = _as_int("group_norm", "num_groups", 2, num_groups)
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received "
                           f"{input.dim()}")
    n, c = input.shape[0], input.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, "
                           f"but got input of shape {list(input.shape)} and "
                           f"num_groups={num_groups}")
    # torch's check (also outside training): one value per group has no variance. Its product
    # of sizes can be 1 only when the first factor is.
    if n * c // num_groups == 1:
        F._verify_batch_size([n * c // num_groups, num_groups] + list(input.shape[2:]))
    if _plain_params(input, c, weight, bias):
        return num_groups, True
    for what, param in (("weight", weight), ("bias", bias)):
        if param is not None and (param.dim() != 1 or param.numel() != c):
            raise RuntimeError(f"Expected {what} to be a vector of size equal to the number of "
                               f"channels in input, but got {what} of shape "
                               f"{list(param.shape)} and input of shape {list(input.shape)}")
        _check_param("group_norm", what, param, input, (c,), "num_channels")
    _check_dtypes("group_norm", input, {"weight": weight, "bias": bias}, True)
    return num_groups, False


# --- Fused residual add + LayerNorm/RMSNorm ------------------------------------------------------

def _check_residual(name: str, input: Tensor, residual: Tensor) -> None:
    if not isinstance(residual, Tensor):
        raise TypeError(f"fastnorm.{name}: expected residual to be a Tensor, got "
                        f"{type(residual).__name__}")
    if residual.shape != input.shape:
        raise RuntimeError(f"fastnorm.{name}: residual must have the input's shape "
                           f"{list(input.shape)}, got {list(residual.shape)}")
    if residual.device != input.device:
        raise RuntimeError(f"fastnorm.{name}: expected input and residual on the same device, "
                           f"but input is on {input.device} and residual on {residual.device}")
    if not (residual.dtype == input.dtype or
            (residual.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16))):
        raise TypeError(f"fastnorm.{name}: residual must have the input's dtype ({input.dtype}) "
                        f"or be float32 with a float16/bfloat16 input, got {residual.dtype}")


def _add_residual(input: Tensor, residual: Tensor, residual_in_fp32: bool) -> Tensor:
    """h = input + residual, unfused, in the dtype the fused op gives h."""
    h_dtype = residual_stream_dtype(input.dtype, residual.dtype, residual_in_fp32)
    return cast(input, h_dtype) + cast(residual, h_dtype)


def _add_norm(name: str, input: Tensor, residual: Optional[Tensor], normalized_shape: _shape_t,
              weight: Optional[Tensor], bias: Optional[Tensor], eps: Optional[float],
              is_rms: bool, prenorm: bool, residual_in_fp32: bool,
              rounding: str = "none") -> Union[Tensor, tuple[Tensor, Tensor]]:
    """layer_norm / rms_norm with a fused residual add (see `layer_norm`). Also the entry of the
    transformers adapters (fastnorm.convert), which pass `rounding="llama"` (x_hat rounded to
    the input dtype before the weight multiply, Llama's `weight * hidden.to(input_dtype)`) or
    "t5" (the same forward; see fastnorm::add_layer_norm_fwd for the backward)."""
    _check_float_input(name, input)
    shape, n = _normalized_rows(name, input, normalized_shape)
    plain = len(shape) == 1 and _plain_params(input, n, weight, bias)
    if not plain:
        _check_param(name, "weight", weight, input, shape, "normalized_shape")
        _check_param(name, "bias", bias, input, shape, "normalized_shape")
        if not is_rms:
            _check_dtypes(name, input, {"weight": weight, "bias": bias}, True)
    if residual is not None:
        _check_residual(name, input, residual)
    if eps is None:
        eps = _rms_eps(input.dtype)
    if residual is None:
        if residual_in_fp32 and input.dtype in (torch.float16, torch.bfloat16):
            h = input.float()  # flash-attn: the first layer starts an fp32 residual stream
        else:
            h = input
    if rounding == "none" and input.is_cuda and torch.is_autocast_enabled("cuda"):
        # Unfused torch keeps h in the residual's dtype and runs the norm in fp32 under CUDA
        # autocast (fp32 output); the fused op cannot do both, so add, then the plain op.
        if residual is not None:
            h = _add_residual(input, residual, residual_in_fp32)
        src = h if residual is not None else input
        y = (rms_norm(src, shape, weight, eps) if is_rms
             else layer_norm(src, shape, weight, bias, eps))
        return (y, h) if prenorm else y
    # Forward-mode AD and torch.func transforms run torch's ops (the kernels have no jvp or
    # batching rule), as in every other fastnorm op.
    if _backend.torch_selected(input) or _backend.transformed(input, residual, weight, bias) \
            or _backend.resolve(input, name) == "torch":
        if residual is not None:
            h = _add_residual(input, residual, residual_in_fp32)
        src = h if residual is not None else input
        y = norm_reference(src, shape, weight, bias, eps, is_rms, rounding, input.dtype)
        return (y, h) if prenorm else y
    if plain:  # the op views (*, n) as rows itself (inside its node)
        if residual is not None:
            return _ln_ops.add_norm_residual(input, residual, weight, bias, float(eps), is_rms,
                                             bool(residual_in_fp32), rounding, bool(prenorm))
        y = _ln_ops.add_norm_rows(input, weight, bias, float(eps), is_rms,
                                  bool(residual_in_fp32), rounding)
        return (y, h) if prenorm else y
    # h is written when it is returned or a backward needs it; else the kernel skips that write.
    store = prenorm or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, residual, weight, bias)))
    x2d = _rows_view(input, shape, n)
    r2d = None if residual is None else _rows_view(residual, shape, n)
    y, h2d, _mean, _rstd = _ln_ops.add_layer_norm(
        x2d, r2d, _flat(weight), _flat(bias), float(eps), is_rms, bool(residual_in_fp32),
        rounding, bool(store))
    y = y.view_as(input)
    if not prenorm:
        return y
    return y, (h2d.view_as(input) if residual is not None else h)


def fused_add_rms_norm_(input: Tensor, residual: Tensor, weight: Optional[Tensor],
                        eps: Optional[float] = None) -> None:
    """In place, as vLLM's `fused_add_rms_norm`: `residual += input`, then
    `input = rms_norm(residual, weight, eps)` over the last dim, in one pass (inference only:
    no autograd). Both must have the same shape and dtype and unit stride in the last dim."""
    _check_float_input("fused_add_rms_norm_", input)
    _check_residual("fused_add_rms_norm_", input, residual)
    if residual.dtype != input.dtype:
        raise TypeError("fastnorm.fused_add_rms_norm_: residual must have the input's dtype "
                        f"({input.dtype}) to be updated in place, got {residual.dtype}")
    if torch.is_grad_enabled() and (input.requires_grad or residual.requires_grad or
                                    (weight is not None and weight.requires_grad)):
        raise RuntimeError("fastnorm.fused_add_rms_norm_ updates its inputs in place and has "
                           "no backward; use rms_norm(x, ..., residual=r, prenorm=True) to train")
    n = input.shape[-1] if input.dim() else 1
    shape = (n,)
    _normalized_rows("fused_add_rms_norm_", input, shape)
    _check_param("fused_add_rms_norm_", "weight", weight, input, shape, "normalized_shape")
    if eps is None:
        eps = _rms_eps(input.dtype)
    if _backend.resolve(input, "rms_norm") == "torch":
        residual.add_(input)
        input.copy_(F.rms_norm(residual, shape, weight, eps))
        return
    x2d = input.view(-1, n) if input.numel() else input.reshape(-1, n)
    r2d = residual.view(-1, n) if residual.numel() else residual.reshape(-1, n)
    if x2d.stride(-1) != 1 or r2d.stride(-1) != 1:
        raise RuntimeError("fastnorm.fused_add_rms_norm_: input and residual need unit stride in "
                           "the last dim and rows viewable as (-1, N)")
    _ln_ops.add_layer_norm_inplace_(x2d, r2d, _flat(weight), None, float(eps), True)
