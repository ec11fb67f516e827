"""Norm layers that compute what timm's, diffusers' and torchvision's compute (and older
transformers releases' channels-first LayerNorms), with their attribute names and the shape of
their forward code, written here so that fastnorm.convert's recognition of those libraries is
tested where they are not installed (timm and torchvision cannot be installed beside the CPU
torch). Each forward is the library's, statement for statement, as in the file and releases
named next to it. timm's classes are recognized by their module too: theirs is set to timm's
(`timm.layers.norm`, `timm.models.layers.norm` before timm 0.9), and so is that of timm's
fast-norm functions, which must never run here (the fast-norm flag is off unless a test turns it
on)."""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn


def _timm_function(name: str, module: str = "timm.layers.fast_norm"):
    def fast(*args, **kwargs):
        raise AssertionError(f"timm's {name} ran: the fast-norm flag was on")
    fast.__module__, fast.__name__, fast.__qualname__ = module, name, name
    return fast


fast_layer_norm = _timm_function("fast_layer_norm")
fast_group_norm = _timm_function("fast_group_norm")
fast_rms_norm = _timm_function("fast_rms_norm")
fast_rms_norm2d = _timm_function("fast_rms_norm2d")
# timm 0.6.11-0.6.13 had it in timm.models.layers, renamed timm.layers in 0.9
fast_layer_norm_06 = _timm_function("fast_layer_norm", "timm.models.layers.fast_norm")
_assert = torch._assert
rms_norm = F.rms_norm


def rms_norm2d(x, normalized_shape, weight=None, eps=1e-5):
    """timm.layers.fast_norm.rms_norm2d (timm >= 1.0.16): in the input's dtype."""
    assert len(normalized_shape) == 1
    v = x.pow(2)
    v = torch.mean(v, dim=1, keepdim=True)
    x = x * torch.rsqrt(v + eps)
    if weight is not None:
        x = x * weight.reshape(1, -1, 1, 1)
    return x


rms_norm2d.__module__ = "timm.layers.fast_norm"


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
    """timm/layers/norm.py, timm 0.6.11-1.0.31 (timm/models/layers/norm.py before 0.9)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)
        self._fast_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class LayerNorm2dFp32(nn.LayerNorm):
    """timm/layers/norm.py, timm >= 1.0.17."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True, **kwargs):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        x = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        x = x.permute(0, 3, 1, 2)
        return x


class RmsNorm2d(nn.Module):
    """timm/layers/norm.py, timm >= 1.0.16: timm's rms_norm2d, in the input's dtype."""

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
        # NOTE fast norm fallback needs our rms norm impl, so both paths through here.
        # Since there is no built-in PyTorch impl, always use APEX RmsNorm if is installed.
        if self._fast_norm:
            x = fast_rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        return x


class RmsNorm2dV1013(RmsNorm2d):
    """timm/layers/norm.py RmsNorm2d, timm 1.0.13-1.0.15: torch's F.rms_norm, permuted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        # NOTE fast norm fallback needs our rms norm impl, so both paths through here.
        # Since there is no built-in PyTorch impl, always use APEX RmsNorm if is installed.
        if self._fast_norm:
            x = fast_rms_norm(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm(x, self.normalized_shape, self.weight, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class RmsNorm2dFp32(RmsNorm2d):
    """timm/layers/norm.py, timm >= 1.0.17."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        x = rms_norm2d(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)
        return x


class LayerNorm2dV067(nn.LayerNorm):
    """timm/models/layers/norm.py LayerNorm2d, timm 0.5.4-0.6.7 (before the fast-norm flag)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        ).permute(0, 3, 1, 2)


class LayerNorm2dV0613(LayerNorm2d):
    """timm/models/layers/norm.py LayerNorm2d, timm 0.6.11-0.6.13: timm >= 0.9's code, with
    fast_layer_norm from timm.models.layers.fast_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm_06(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


def _is_contiguous(tensor: torch.Tensor) -> bool:
    # jit is oh so lovely :/
    if torch.jit.is_scripting():
        return tensor.is_contiguous()
    else:
        return tensor.is_contiguous(memory_format=torch.contiguous_format)


class ConvNextLayerNorm2dV054(nn.LayerNorm):
    """timm/models/convnext.py LayerNorm2d, timm 0.5.4: for input that is not NCHW-contiguous,
    the variance is torch.var_mean's unbiased one, which no layer_norm computes."""

    def __init__(self, normalized_shape, eps=1e-6):
        super().__init__(normalized_shape, eps=eps)

    def forward(self, x) -> torch.Tensor:
        if _is_contiguous(x):
            return F.layer_norm(
                x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
            ).permute(0, 3, 1, 2)
        else:
            s, u = torch.var_mean(x, dim=1, keepdim=True)
            x = (x - u) * torch.rsqrt(s + self.eps)
            x = x * self.weight[:, None, None] + self.bias[:, None, None]
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
    """timm/layers/norm_act.py, timm 0.6.11-1.0.31."""

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


class LayerNormAct2dV067(LayerNormAct2d):
    """timm/models/layers/norm_act.py LayerNormAct2d, timm 0.6.5-0.6.7."""

    def forward(self, x):
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        ).permute(0, 3, 1, 2)
        x = self.drop(x)
        x = self.act(x)
        return x


class LayerNormAct2dFp32(LayerNormAct2d):
    """timm/layers/norm_act.py, timm >= 1.0.17."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        x = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        x = x.permute(0, 3, 1, 2)
        x = self.drop(x)
        x = self.act(x)
        return x


class RmsNormAct2d(RmsNorm2d):
    """timm/layers/norm_act.py, timm >= 1.0.16 (MobileNetV5's norm)."""

    def __init__(self, channels: int, eps: float = 1e-6, act: str = "gelu"):
        super().__init__(channels, eps=eps)
        self.drop = nn.Identity()
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm:
            x = fast_rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class RmsNormAct2dFp32(RmsNormAct2d):
    """timm/layers/norm_act.py, timm >= 1.0.17."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        x = rms_norm2d(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)
        x = self.drop(x)
        x = self.act(x)
        return x


for _cls in (LayerNorm, GroupNorm, GroupNorm1, RmsNorm, LayerNormFp32, LayerNorm2d,
             LayerNorm2dFp32, RmsNorm2d, RmsNorm2dV1013, RmsNorm2dFp32):
    _cls.__module__ = "timm.layers.norm"
for _cls in (BatchNormAct2d, GroupNormAct, LayerNormAct, LayerNormAct2d, LayerNormAct2dFp32,
             RmsNormAct2d, RmsNormAct2dFp32):
    _cls.__module__ = "timm.layers.norm_act"
LayerNorm2dV067.__module__ = LayerNorm2dV0613.__module__ = "timm.models.layers.norm"
LayerNormAct2dV067.__module__ = "timm.models.layers.norm_act"
ConvNextLayerNorm2dV054.__module__ = "timm.models.convnext"
# (timm's class names, for the forms restricted to them)
for _cls, _name in ((RmsNorm2dV1013, "RmsNorm2d"), (LayerNorm2dV067, "LayerNorm2d"),
                    (LayerNorm2dV0613, "LayerNorm2d"), (LayerNormAct2dV067, "LayerNormAct2d"),
                    (ConvNextLayerNorm2dV054, "LayerNorm2d")):
    _cls.__name__ = _cls.__qualname__ = _name


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
    """torchvision/models/convnext.py LayerNorm2d, torchvision 0.12 (its first) to 0.2x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


TorchvisionLayerNorm2d.__module__ = "torchvision.models.convnext"


# --- transformers' ConvNeXt-style LayerNorm before 4.56 (4.56 on: the installed one) -------------

class ConvNextLayerNormV422(nn.Module):
    """transformers/models/convnext/modeling_convnext.py ConvNextLayerNorm, transformers
    up to 4.22: channels_first in the input's dtype (VitDet's LayerNorm computes the same)."""

    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        if self.data_format not in ["channels_last", "channels_first"]:
            raise NotImplementedError(f"Unsupported data format: {self.data_format}")
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                                               self.eps)
        elif self.data_format == "channels_first":
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


class ConvNextLayerNormV455(ConvNextLayerNormV422):
    """The same file, transformers 4.23-4.55 (and its copies: ConvNextV2, SAM, SAM-HQ, SegGPT,
    GOT-OCR2, DeepseekVLHybrid): statistics in fp32, x_hat rounded to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias,
                                               self.eps)
        elif self.data_format == "channels_first":
            input_dtype = x.dtype
            x = x.float()
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            x = x.to(dtype=input_dtype)
            x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x
