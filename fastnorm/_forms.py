"""The forward code of the library norm layers `fastnorm.convert` recognizes, one small class per
form, grouped by family (what fastnorm computes in their place is in fastnorm/_adapters.py).

A form is matched by fingerprint (fastnorm/_fingerprint.py): a class whose forward normalizes to
the same tree computes the same thing in the same way, whatever it and its variables are called.
The attribute names used here are role names (`weight`, `eps`, ...): a match binds each to the
matched class's own attribute (`eps` -> `variance_epsilon`), in order of first use.

These are written to compute what the libraries' layers compute, in the shape their code has
(transformers 5.x, timm 0.9-1.0, diffusers 0.3x-0.42, torchvision, or the releases named next to
a form); they are never run. A library release that changes a layer's code changes its
fingerprint, and the layer is then left alone (with the reason) until a form for the new code is
added here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._fingerprint import Foreign

# timm's and diffusers' functions that the forms name, without importing those libraries.
fast_layer_norm = Foreign("timm.layers.fast_norm.fast_layer_norm")
fast_group_norm = Foreign("timm.layers.fast_norm.fast_group_norm")
fast_rms_norm = Foreign("timm.layers.fast_norm.fast_rms_norm")
fast_rms_norm2d = Foreign("timm.layers.fast_norm.fast_rms_norm2d")
rms_norm2d = Foreign("timm.layers.fast_norm.rms_norm2d")
is_torch_npu_available = Foreign("diffusers.utils.import_utils.is_torch_npu_available")
_assert = torch._assert   # timm.layers.trace_utils._assert is torch's
rms_norm = F.rms_norm     # what timm imports as `rms_norm` on torch >= 2.4


@dataclass(frozen=True)
class Form:
    """One recognized forward: the class holding it, its family (the adapter that replaces it,
    see fastnorm/_adapters.py), where it may come from (`library`: a module prefix, and `names`:
    class names, or anything when empty), `eps` when the form has it as a literal, the roles
    that may be None (`optional`: the code tests them, or passes them to torch), and the
    family of channels-first instances where a `data_format` attribute decides it."""

    code: type
    family: str
    library: str = ""
    names: tuple[str, ...] = ()
    eps: Optional[float] = None
    optional: tuple[str, ...] = ()
    # transformers' ConvNeXt-style layers: `family` for data_format="channels_last" instances,
    # this family for "channels_first" ones
    channels_first: Optional[str] = None


# --- A: Llama-style RMSNorm: x_hat in fp32, rounded to the input dtype, times the weight ----------

class LlamaRMSNorm:  # Llama, Mistral, Qwen2/3, Phi-3, DeepSeek-V2/V3, GLM4, Granite, SmolLM3, ...
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        mean_square = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(mean_square + self.eps)
        return self.weight * x.to(dtype)


class Llama4RMSNorm:  # the same computation with a helper and the product the other way round
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        y = self._norm(x.float()).type_as(x)
        return y * self.weight


# --- B: Gemma-style RMSNorm: x_hat * (1 + w) in fp32, one rounding --------------------------------

class GemmaRMSNorm:  # Gemma 1/2/3, RecurrentGemma, VaultGemma, T5Gemma, Qwen3-Next, Qwen3.5, ...
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        y = self._norm(x.float())
        y = y * (1.0 + self.weight.float())
        return y.type_as(x)


# --- C: RMSNorm with the weight multiplied in fp32, one rounding (or no weight) -------------------

class Olmo2RMSNorm:  # OLMo2/3, GPT-OSS, FlexOlmo, DeepSeek-V4, AFMoE, ...
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        mean_square = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(mean_square + self.eps)
        return (self.weight * x).to(dtype)


class HeliumRMSNorm:  # Helium, NemotronH: the weight cast to fp32 explicitly
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        mean_square = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(mean_square + self.eps)
        return (self.weight.to(torch.float32) * x).to(dtype)


class Gemma3nRMSNorm:  # Gemma3n, Gemma4: (mean_square + eps) ** -0.5, optional weight
    def _norm(self, x):
        mean_square = x.pow(2).mean(-1, keepdim=True) + self.eps
        return x * torch.pow(mean_square, -0.5)

    def forward(self, x):
        y = self._norm(x.float())
        if self.with_scale:
            y = y * self.weight.float()
        return y.type_as(x)


class MoshiRMSNorm:  # Moshi, Kyutai speech-to-text
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        y = self._norm(x.float())
        y = y * self.weight.float()
        return y.type_as(x)


class WeightlessRMSNorm:  # Llama4 / FalconMamba weightless, NanoChat, ...
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._norm(x.float()).type_as(x)


class TorchRMSNormInFp32:  # Ergo: torch's rms_norm on fp32 copies
    def forward(self, x):
        y = F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps)
        return y.to(x.dtype)


class UnweightedRMSNorm:  # Inkling2
    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return x.to(dtype)


# --- D: T5-style RMSNorm: x_hat rounded to a half-precision weight's dtype ------------------------

class T5LayerNorm:  # T5, mT5, LongT5, UMT5, Pix2Struct, Pop2Piano, SwitchTransformers, Idefics
    def forward(self, x):
        mean_square = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(mean_square + self.eps)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            x = x.to(self.weight.dtype)
        return self.weight * x


class DiffusersRMSNorm:  # diffusers.models.normalization.RMSNorm: optional weight and bias
    def forward(self, x):
        if is_torch_npu_available():
            import torch_npu

            if self.weight is not None:
                if self.weight.dtype in [torch.float16, torch.bfloat16]:
                    x = x.to(self.weight.dtype)
            x = torch_npu.npu_rms_norm(x, self.weight, epsilon=self.eps)[0]
            if self.bias is not None:
                x = x + self.bias
        else:
            dtype = x.dtype
            mean_square = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            x = x * torch.rsqrt(mean_square + self.eps)
            if self.weight is not None:
                if self.weight.dtype in [torch.float16, torch.bfloat16]:
                    x = x.to(self.weight.dtype)
                x = x * self.weight
                if self.bias is not None:
                    x = x + self.bias
            else:
                x = x.to(dtype)
        return x


class DiffusersRMSNormNpuWeighted:  # diffusers 0.42: the NPU kernel only with a weight
    def forward(self, x):
        if is_torch_npu_available() and self.weight is not None:
            import torch_npu

            if self.weight.dtype in [torch.float16, torch.bfloat16]:
                x = x.to(self.weight.dtype)
            x = torch_npu.npu_rms_norm(x, self.weight, epsilon=self.eps)[0]
            if self.bias is not None:
                x = x + self.bias
        else:
            dtype = x.dtype
            mean_square = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            x = x * torch.rsqrt(mean_square + self.eps)
            if self.weight is not None:
                if self.weight.dtype in [torch.float16, torch.bfloat16]:
                    x = x.to(self.weight.dtype)
                x = x * self.weight
                if self.bias is not None:
                    x = x + self.bias
            else:
                x = x.to(dtype)
        return x


# --- E: LayerNorm computed in fp32 (weight and bias too), one rounding ----------------------------

class OlmoLayerNorm:  # OLMo-1: no weight, no bias, eps 1e-5 in the code
    def forward(self, x):
        dtype = x.dtype
        return F.layer_norm(x.to(dtype=torch.float32), self.normalized_shape, None, None,
                            eps=1e-5).to(dtype)


class CohereLayerNorm:  # Cohere, Cohere2: the formula written out, weight only
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        mean = x.mean(-1, keepdim=True)
        variance = (x - mean).pow(2).mean(-1, keepdim=True)
        x = (x - mean) * torch.rsqrt(variance + self.eps)
        x = self.weight.to(torch.float32) * x
        return x.to(dtype)


class FP32LayerNorm:  # diffusers.models.normalization.FP32LayerNorm
    def forward(self, x):
        dtype = x.dtype
        return F.layer_norm(
            x.float(), self.normalized_shape,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None, self.eps).to(dtype)


class LayerNormFp32:  # timm.layers.LayerNormFp32
    def forward(self, x):
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        x = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        return x


# --- timm: torch's op unless timm's fast-norm mode is on -----------------------------------------

class TimmLayerNorm:
    def forward(self, x):
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x


class TimmGroupNorm:  # GroupNorm and GroupNorm1 (timm < 1.0.13 names the flag `fast_norm`)
    def forward(self, x):
        if self._fast_norm:
            return fast_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class TimmRmsNorm:  # timm >= 1.0.13
    def forward(self, x):
        if self._fast_norm:
            x = fast_rms_norm(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return x


class TimmBatchNormAct2d:  # torch's BatchNorm2d.forward, then drop and act
    def forward(self, x):
        _assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.momentum is None:
            factor = 0.0
        else:
            factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class TimmGroupNormAct:  # GroupNormAct and GroupNorm1Act
    def forward(self, x):
        if self._fast_norm:
            x = fast_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        else:
            x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class TimmLayerNormAct:
    def forward(self, x):
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


# --- channels-first LayerNorm / RMSNorm: normalize dim 1 of (N, C, H, W) --------------------------
# A release's spelling that differs only by folded single-use assignments (fastnorm/_fingerprint.py)
# needs no form of its own: timm <= 0.6.7's one-line LayerNorm2d is LayerNorm2d's below.

class TimmLayerNorm2d:  # timm >= 0.6.11 (timm.models.layers before 0.9)
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class TimmLayerNormAct2d:  # timm >= 0.6.11
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


class TimmLayerNormAct2dNoFlag:  # timm 0.6.5-0.6.7, before the fast-norm flag
    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps).permute(0, 3, 1, 2)
        x = self.drop(x)
        x = self.act(x)
        return x


class TimmLayerNorm2dFp32:  # timm >= 1.0.17
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        x = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        x = x.permute(0, 3, 1, 2)
        return x


class TimmLayerNormAct2dFp32:  # timm >= 1.0.17
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        x = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)
        x = x.permute(0, 3, 1, 2)
        x = self.drop(x)
        x = self.act(x)
        return x


class TimmRmsNorm2d:  # timm >= 1.0.16: timm's rms_norm2d, in the input's dtype
    def forward(self, x):
        if self._fast_norm:
            x = fast_rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        return x


class TimmRmsNorm2dPermuted:  # timm 1.0.13-1.0.15: torch's F.rms_norm on the permuted input
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_rms_norm(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm(x, self.normalized_shape, self.weight, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class TimmRmsNorm2dFp32:  # timm >= 1.0.17
    def forward(self, x):
        weight = self.weight.float() if self.weight is not None else None
        x = rms_norm2d(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)
        return x


class TimmRmsNormAct2d:  # timm >= 1.0.16 (MobileNetV5)
    def forward(self, x):
        if self._fast_norm:
            x = fast_rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm2d(x, self.normalized_shape, self.weight, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


class TimmRmsNormAct2dFp32:  # timm >= 1.0.17
    def forward(self, x):
        weight = self.weight.float() if self.weight is not None else None
        x = rms_norm2d(x.float(), self.normalized_shape, weight, self.eps).to(x.dtype)
        x = self.drop(x)
        x = self.act(x)
        return x


class LayerNorm2d(nn.LayerNorm):  # torchvision >= 0.12 ConvNeXt, timm <= 0.6.7, EoMT, VideoMT
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class MeanVarLayerNorm2d:  # the mean and variance written out, in the input's dtype: VitDet,
    def forward(self, x):  # segment-anything's / SAM 2's / detectron2's LayerNorm2d, ConvNeXt's
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


# transformers' ConvNeXt-style LayerNorm (ConvNeXt(V2), SAM, SAM-HQ, SegGPT, GOT-OCR2, ... and
# their copies): the family depends on the instance's data_format (Form.channels_first).

class ConvNextLayerNorm(nn.LayerNorm):  # transformers >= 4.56: an nn.LayerNorm subclass
    def forward(self, x):
        if self.data_format == "channels_first":
            x = x.permute(0, 2, 3, 1)
            x = super().forward(x)
            x = x.permute(0, 3, 1, 2)
        else:
            x = super().forward(x)
        return x


class ConvNextLayerNormRounded:  # transformers 4.23-4.55: statistics in fp32, x_hat rounded
    def forward(self, x):
        if self.data_format == "channels_last":
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        elif self.data_format == "channels_first":
            dtype = x.dtype
            x = x.float()
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            x = x.to(dtype=dtype)
            x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


class ConvNextLayerNormMeanVar:  # transformers <= 4.22: in the input's dtype
    def forward(self, x):
        if self.data_format == "channels_last":
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        elif self.data_format == "channels_first":
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            x = self.weight[:, None, None] * x + self.bias[:, None, None]
        return x


_TIMM = "timm."
_AFFINE = ("weight", "bias")   # elementwise_affine=False / bias=False

FORMS: tuple[Form, ...] = (
    Form(LlamaRMSNorm, "llama"),
    Form(Llama4RMSNorm, "llama"),
    Form(GemmaRMSNorm, "gemma"),
    Form(Olmo2RMSNorm, "fp32_weight"),
    Form(HeliumRMSNorm, "fp32_weight"),
    Form(Gemma3nRMSNorm, "fp32_weight", optional=("weight",)),
    Form(MoshiRMSNorm, "fp32_weight"),
    Form(TorchRMSNormInFp32, "fp32_weight"),
    Form(WeightlessRMSNorm, "fp32_weight"),
    Form(UnweightedRMSNorm, "fp32_weight"),
    Form(T5LayerNorm, "t5"),
    Form(DiffusersRMSNorm, "t5", optional=_AFFINE),
    Form(DiffusersRMSNormNpuWeighted, "t5", optional=_AFFINE),
    Form(OlmoLayerNorm, "fp32_layer_norm", eps=1e-5),
    Form(CohereLayerNorm, "fp32_layer_norm"),
    Form(FP32LayerNorm, "fp32_layer_norm", optional=_AFFINE),
    Form(LayerNormFp32, "fp32_layer_norm", optional=_AFFINE),
    Form(TimmLayerNorm, "layer_norm", _TIMM, ("LayerNorm",), optional=_AFFINE),
    Form(TimmGroupNorm, "group_norm", _TIMM, ("GroupNorm", "GroupNorm1"), optional=_AFFINE),
    Form(TimmRmsNorm, "rms_norm", _TIMM, ("RmsNorm",), optional=("weight",)),
    Form(TimmBatchNormAct2d, "batch_norm_act", _TIMM, ("BatchNormAct2d",), optional=_AFFINE),
    Form(TimmGroupNormAct, "group_norm_act", _TIMM, ("GroupNormAct", "GroupNorm1Act"),
         optional=_AFFINE),
    Form(TimmLayerNormAct, "layer_norm_act", _TIMM, ("LayerNormAct",), optional=_AFFINE),
    Form(TimmLayerNorm2d, "layer_norm_2d", _TIMM, ("LayerNorm2d",), optional=_AFFINE),
    Form(TimmLayerNormAct2d, "layer_norm_act_2d", _TIMM, ("LayerNormAct2d",),
         optional=_AFFINE),
    Form(TimmLayerNormAct2dNoFlag, "layer_norm_act_2d", _TIMM, ("LayerNormAct2d",),
         optional=_AFFINE),
    Form(TimmLayerNorm2dFp32, "layer_norm_2d_fp32", _TIMM, ("LayerNorm2dFp32",),
         optional=_AFFINE),
    Form(TimmLayerNormAct2dFp32, "layer_norm_act_2d_fp32", _TIMM, ("LayerNormAct2dFp32",),
         optional=_AFFINE),
    Form(TimmRmsNorm2d, "rms_norm_2d_input_dtype", _TIMM, ("RmsNorm2d",), optional=("weight",)),
    Form(TimmRmsNorm2dPermuted, "rms_norm_2d", _TIMM, ("RmsNorm2d",), optional=("weight",)),
    Form(TimmRmsNorm2dFp32, "rms_norm_2d_fp32", _TIMM, ("RmsNorm2dFp32",),
         optional=("weight",)),
    Form(TimmRmsNormAct2d, "rms_norm_act_2d_input_dtype", _TIMM, ("RmsNormAct2d",),
         optional=("weight",)),
    Form(TimmRmsNormAct2dFp32, "rms_norm_act_2d_fp32", _TIMM, ("RmsNormAct2dFp32",),
         optional=("weight",)),
    Form(LayerNorm2d, "layer_norm_2d", optional=_AFFINE),
    Form(MeanVarLayerNorm2d, "layer_norm_2d_input_dtype"),
    Form(ConvNextLayerNorm, "layer_norm", optional=_AFFINE, channels_first="layer_norm_2d"),
    Form(ConvNextLayerNormRounded, "f_layer_norm", channels_first="layer_norm_2d_rounded"),
    Form(ConvNextLayerNormMeanVar, "f_layer_norm", channels_first="layer_norm_2d_input_dtype"),
)
