"""Norm layers that compute what timm's, diffusers' and torchvision's compute, with their
attribute names and the shape of their forward code, written here so that fastnorm.convert's
recognition of those libraries is tested where they are not installed (timm and torchvision
cannot be installed beside the CPU torch). timm's classes are recognized by their module too:
theirs is set to timm's (`timm.layers.norm`), and so is that of timm's fast-norm functions,
which must never run here (the fast-norm flag is off unless a test turns it on)."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn


def _timm_function(name: str):
    def fast(*args, **kwargs):
        raise AssertionError(f"timm's {name} ran: the fast-norm flag was on")
    fast.__module__, fast.__name__, fast.__qualname__ = "timm.layers.fast_norm", name, name
    return fast


fast_layer_norm = _timm_function("fast_layer_norm")
fast_group_norm = _timm_function("fast_group_norm")
fast_rms_norm = _timm_function("fast_rms_norm")
_assert = torch._assert
rms_norm = F.rms_norm


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(inplace=True), "silu": nn.SiLU(inplace=True), "gelu": nn.GELU(),
            "identity": nn.Identity()}[name]


# --- timm.layers.norm ----------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """timm's LayerNorm: channel count first, eps 1e-6; torch's op unless fast norm is on."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)
        self._fast_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x


class GroupNorm(nn.GroupNorm):
    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5,
                 affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self._fast_norm = False

    def forward(self, x):
        if self._fast_norm:
            return fast_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class GroupNorm1(nn.GroupNorm):
    """timm < 1.0.13 named the flag `fast_norm`: recognized too."""

    def __init__(self, num_channels: int, **kwargs):
        super().__init__(1, num_channels, **kwargs)
        self.fast_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_norm:
            return fast_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class RmsNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.normalized_shape = (channels,)
        self.eps = eps
        self.elementwise_affine = affine
        self._fast_norm = False
        if affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm:
            x = fast_rms_norm(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return x


class LayerNormFp32(nn.LayerNorm):
    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        x = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        return x


class LayerNorm2d(nn.LayerNorm):
    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)
        self._fast_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


# --- timm.layers.norm_act ------------------------------------------------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 act: str = "relu", drop: bool = False):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = nn.Dropout(0.5) if drop else nn.Identity()
        self.act = _act(act)

    def forward(self, x):
        # torch's BatchNorm2d.forward, spelled as timm spells it
        _assert(x.ndim == 4, f'expected 4D input (got {x.ndim}D input)')

        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum

        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum

        r"""
        Batch statistics in training, and in eval mode without running statistics.
        """
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)

        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class GroupNormAct(nn.GroupNorm):
    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5,
                 act: str = "silu"):
        super().__init__(num_groups, num_channels, eps=eps)
        self.drop = nn.Identity()
        self.act = _act(act)
        self._fast_norm = False

    def forward(self, x):
        if self._fast_norm:
            x = fast_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class LayerNormAct(nn.LayerNorm):
    def __init__(self, normalization_shape, eps: float = 1e-5, act: str = "gelu"):
        super().__init__(normalization_shape, eps=eps)
        self.drop = nn.Identity()
        self.act = _act(act)
        self._fast_norm = False

    def forward(self, x):
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class LayerNormAct2d(nn.LayerNorm):
    def __init__(self, num_channels: int, eps: float = 1e-5, act: str = "gelu"):
        super().__init__(num_channels, eps=eps)
        self.drop = nn.Identity()
        self.act = _act(act)
        self._fast_norm = False

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        x = self.drop(x)
        x = self.act(x)
        return x


for _cls in (LayerNorm, GroupNorm, GroupNorm1, RmsNorm, LayerNormFp32, LayerNorm2d):
    _cls.__module__ = "timm.layers.norm"
for _cls in (BatchNormAct2d, GroupNormAct, LayerNormAct, LayerNormAct2d):
    _cls.__module__ = "timm.layers.norm_act"


# --- diffusers.models.normalization --------------------------------------------------------------

def is_torch_npu_available() -> bool:
    return False


is_torch_npu_available.__module__ = "diffusers.utils.import_utils"


class RMSNorm(nn.Module):
    """diffusers' RMSNorm: T5's rule for a half-precision weight, optional weight and bias."""

    def __init__(self, dim, eps: float, elementwise_affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if isinstance(dim, numbers.Integral):
            dim = (dim,)
        self.dim = torch.Size(dim)
        self.weight = None
        self.bias = None
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
            if bias:
                self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, hidden_states):
        if is_torch_npu_available():
            import torch_npu

            if self.weight is not None:
                # half-precision weight: the input is cast to it first
                if self.weight.dtype in [torch.float16, torch.bfloat16]:
                    hidden_states = hidden_states.to(self.weight.dtype)
            hidden_states = torch_npu.npu_rms_norm(hidden_states, self.weight, epsilon=self.eps)[0]
            if self.bias is not None:
                hidden_states = hidden_states + self.bias
        else:
            input_dtype = hidden_states.dtype
            variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
            hidden_states = hidden_states * torch.rsqrt(variance + self.eps)

            if self.weight is not None:
                if self.weight.dtype in [torch.float16, torch.bfloat16]:
                    hidden_states = hidden_states.to(self.weight.dtype)
                hidden_states = hidden_states * self.weight
                if self.bias is not None:
                    hidden_states = hidden_states + self.bias
            else:
                hidden_states = hidden_states.to(input_dtype)

        return hidden_states


class FP32LayerNorm(nn.LayerNorm):
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        origin_dtype = inputs.dtype
        return F.layer_norm(
            inputs.float(),
            self.normalized_shape,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            self.eps,
        ).to(origin_dtype)


RMSNorm.__module__ = FP32LayerNorm.__module__ = "diffusers.models.normalization"


# --- torchvision.models.convnext -----------------------------------------------------------------

class TorchvisionLayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


TorchvisionLayerNorm2d.__module__ = "torchvision.models.convnext"
