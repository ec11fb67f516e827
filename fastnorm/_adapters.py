"""The forwards that `fastnorm.convert` puts in place of library norm layers, one per family.

Each is a mixin: convert makes `type(name, (Mixin, LibraryClass), ...)` and sets it as the
module's `__class__`, so `super().forward(x)` is the library's own code. A mixin runs that code
whenever the kernels would not reproduce it (a dtype mix that promotes, float64 input the library
computes in fp32, a backend that resolves to torch, a torch.func transform); otherwise it calls
fastnorm with the library's roundings. The attributes it reads are the class's roles (see
fastnorm/_forms.py): `self._fastnorm_roles` maps a role ("weight", "eps") to the attribute name
of the matched class, or to the value of a literal eps.

The families (what the library computes; what runs instead):
- "llama"  `w * x_hat.to(x.dtype)`: the RMSNorm kernel with x_hat rounded before the multiply.
- "gemma"  `(x_hat * (1 + w.float())).to(x.dtype)`: the kernel with the fp32 weight 1 + w.
- "fp32_weight" `(x_hat * w.float()).to(x.dtype)`, or no weight: the kernel, fp32 throughout.
- "t5"     `w * x_hat.to(w.dtype)` for a half-precision w (+ bias for diffusers' RMSNorm): the
           kernel with T5's roundings, forward and backward; the bias added after.
- "fp32_layer_norm" `layer_norm(x.float(), w.float(), b.float()).to(x.dtype)`: the LayerNorm
           kernel with fp32 weight and bias.
- "rms_norm" torch's `F.rms_norm` (timm's RmsNorm); "batch_norm_act", "group_norm_act",
  "layer_norm_act" timm's norm + drop + act: the norm kernel, with ReLU (BatchNorm) or SiLU
  (GroupNorm) fused when drop is Identity; any other activation runs as the module it is.
- "f_layer_norm" F.layer_norm on a plain module's attributes (transformers' old ConvNeXt-style
  LayerNorm with data_format="channels_last").
- "layer_norm_2d", "rms_norm_2d" and their "_act", "_fp32", "_input_dtype" variants, and
  "layer_norm_2d_rounded": channels-first norms (over dim 1 of (N, C, H, W)); _ChannelsFirst
  says which dtypes run the kernel for each. They need a channels-first kernel, registered in
  CHANNELS_FIRST_KERNELS.
("layer_norm" and "group_norm", timm's torch-equivalent layers, use fastnorm.nn's own classes.)
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import _backend
from . import functional as F_fast
from .nn import _batch_norm_args

# Channels-first kernels by name: "layer_norm_2d" -> f(input, weight, bias, eps) and
# "rms_norm_2d" -> f(input, weight, eps), normalizing dim 1 of (N, C, *). The channels-first
# families are recognized without them and left alone (with the reason) until they are here.
CHANNELS_FIRST_KERNELS: dict[str, Callable[..., Tensor]] = {}
CHANNELS_FIRST_KERNELS.update(layer_norm_2d=F_fast.layer_norm_2d, rms_norm_2d=F_fast.rms_norm_2d)


def _role(module: nn.Module, role: str):
    """The value of `role` on `module`: None when the class has no such role or the instance no
    such attribute (Gemma3n's RMSNorm without scale has no `weight`)."""
    name = module._fastnorm_roles.get(role)
    if name is None or isinstance(name, float):
        return name
    return getattr(module, name, None)


def _torch_runs(x: Tensor, op: str, *params: Optional[Tensor]) -> bool:
    """Whether this call must run the library's own code: fastnorm would call torch anyway, or a
    torch.func transform / forward-mode AD is active (norm_reference does not reproduce the
    library's casts there)."""
    return _backend.resolve(x, op) == "torch" or _backend.transformed(x, *params)


class LlamaRMSNorm:
    """Family A: `weight * x_hat.to(input_dtype)`, x_hat computed in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        w = _role(self, "weight")
        # Other dtype mixes promote the output, and fp64 is computed in fp32 by the library.
        if x.dtype != w.dtype or w.dtype == torch.float64 or _torch_runs(x, "rms_norm", w):
            return super().forward(x)
        rounding = "none" if w.dtype == torch.float32 else "llama"
        return F_fast._add_norm("rms_norm", x, None, (w.shape[-1],), w, None,
                                float(_role(self, "eps")), True, False, False, rounding=rounding)


class GemmaRMSNorm:
    """Family B: `(x_hat * (1 + w.float())).type_as(x)`, fp32 throughout. The offset weight is
    formed in fp32 outside the kernel, which then multiplies and rounds once."""

    def forward(self, x: Tensor) -> Tensor:
        weight = _role(self, "weight")
        if x.dtype == torch.float64 or _torch_runs(x, "rms_norm", weight):
            return super().forward(x)  # the library computes fp64 input in fp32
        w = 1.0 + weight.float()
        return F_fast._add_norm("rms_norm", x, None, (w.shape[-1],), w, None,
                                float(_role(self, "eps")), True, False, False)


class Fp32WeightRMSNorm:
    """Family C: `(x_hat * w.float()).to(input_dtype)` or, without a weight (or with
    `with_scale` off), `x_hat.to(input_dtype)`: fp32 throughout, one rounding."""

    def forward(self, x: Tensor) -> Tensor:
        with_scale = "with_scale" not in self._fastnorm_roles or _role(self, "with_scale")
        w = _role(self, "weight") if with_scale else None
        if x.dtype == torch.float64 or _torch_runs(x, "rms_norm", w):
            return super().forward(x)
        if w is not None and w.dtype not in (x.dtype, torch.float32):
            w = w.float()  # (the kernel reads the weight in its own dtype or fp32)
        return F_fast._add_norm("rms_norm", x, None, (x.shape[-1],), w, None,
                                float(_role(self, "eps")), True, False, False)


class T5RMSNorm:
    """Family D: `w * x_hat.to(w.dtype)` for a half-precision weight (T5LayerNorm, Idefics);
    diffusers' RMSNorm also without a weight (`x_hat.to(input_dtype)`) or with a bias added
    after. x * rsqrt(...) keeps x in the product, so the backward rounds dx's two terms
    separately: the "t5" rounding does too."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = _role(self, "weight"), _role(self, "bias")
        if (x.dtype == torch.float64 or (w is not None and w.dtype != x.dtype)
                or (b is not None and b.dtype != x.dtype) or _torch_runs(x, "rms_norm", w, b)):
            return super().forward(x)  # a promoting mix; fp64: the mean square is fp32
        rounding = "none" if x.dtype == torch.float32 else "t5"
        y = F_fast._add_norm("rms_norm", x, None, (x.shape[-1],), w, None,
                             float(_role(self, "eps")), True, False, False, rounding=rounding)
        return y if b is None else y + b


class Fp32LayerNorm:
    """Family E: `F.layer_norm(x.float(), shape, w.float(), b.float(), eps).to(x.dtype)`
    (diffusers' FP32LayerNorm, timm's LayerNormFp32, OLMo-1's LayerNorm, Cohere's)."""

    def forward(self, x: Tensor) -> Tensor:
        w, b = _role(self, "weight"), _role(self, "bias")
        if x.dtype == torch.float64 or _torch_runs(x, "layer_norm", w, b):
            return super().forward(x)  # the library computes fp64 input in fp32
        shape = _role(self, "normalized_shape")
        if shape is None:  # Cohere: over the last dim, the weight's length
            shape = (w.shape[-1],)
        if w is not None and w.dtype != torch.float32:
            w = w.float()
        if b is not None and b.dtype != torch.float32:
            b = b.float()
        return F_fast.layer_norm(x, shape, w, b, float(_role(self, "eps")))


class RmsNorm:
    """timm's RmsNorm with its fast-norm flag off: `F.rms_norm` (torch's)."""

    def forward(self, x: Tensor) -> Tensor:
        return F_fast.rms_norm(x, self.normalized_shape, self.weight, self.eps)


def _fused(module: nn.Module, act_type: type) -> bool:
    """Whether a timm norm + act module's drop is Identity and its act exactly `act_type`: then
    the kernel runs the activation."""
    return type(module.drop) is nn.Identity and type(module.act) is act_type


def _activation_text(module: nn.Module, act_type: type) -> str:
    act = type(module.act).__name__
    if _fused(module, act_type):
        return f"{act} fused into the kernel"
    return f"{act} after the kernel, unfused" + (
        "" if type(module.drop) is nn.Identity else f", after {type(module.drop).__name__}")


class BatchNormAct2d:
    """timm's BatchNormAct2d: BatchNorm2d (torch's forward), then `drop`, then `act`. With drop
    Identity and act an nn.ReLU the ReLU runs in the BatchNorm kernel; otherwise (SiLU
    included: the BatchNorm kernels fuse only ReLU) drop and act run as the modules they are."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # timm's own check (torch._assert)
            raise AssertionError(f"expected 4D input (got {x.dim()}D input)")
        running_mean, running_var, bn_training, factor = _batch_norm_args(self)
        fused = _fused(self, nn.ReLU)
        y = F_fast.batch_norm(x, running_mean, running_var, self.weight, self.bias, bn_training,
                              factor, self.eps, activation="relu" if fused else None)
        return y if fused else self.act(self.drop(y))

    def _fastnorm_activation(self) -> str:
        return _activation_text(self, nn.ReLU)


class GroupNormAct:
    """timm's GroupNormAct / GroupNorm1Act: GroupNorm, then `drop`, then `act`; with drop
    Identity and act an nn.SiLU the SiLU runs in the GroupNorm kernel."""

    def forward(self, x: Tensor) -> Tensor:
        fused = _fused(self, nn.SiLU)
        y = F_fast.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                              activation="silu" if fused else None)
        return y if fused else self.act(self.drop(y))

    def _fastnorm_activation(self) -> str:
        return _activation_text(self, nn.SiLU)


class LayerNormAct:
    """timm's LayerNormAct: LayerNorm over the trailing dims, then `drop`, then `act`."""

    def forward(self, x: Tensor) -> Tensor:
        y = F_fast.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(self.drop(y))

    def _fastnorm_activation(self) -> str:
        return _activation_text(self, type(None))  # (no LayerNorm kernel fuses one)


class FunctionalLayerNorm:
    """`F.layer_norm(x, normalized_shape, weight, bias, eps)` on the module's own attributes, in
    a plain nn.Module (transformers' ConvNextLayerNorm before 4.56 with
    data_format="channels_last")."""

    def forward(self, x: Tensor) -> Tensor:
        return F_fast.layer_norm(x, _role(self, "normalized_shape"), _role(self, "weight"),
                                 _role(self, "bias"), float(_role(self, "eps")))


# --- channels-first: normalize dim 1 of (N, C, H, W) ----------------------------------------------

def _param(module: nn.Module, role: str):
    """A channels-first module's `role`: the attribute its form binds, or torch's name where the
    form names none (transformers' ConvNextLayerNorm calls torch's forward through super())."""
    name = module._fastnorm_roles.get(role, role)
    return name if isinstance(name, float) else getattr(module, name, None)


class _ChannelsFirst:
    """Base of the channels-first adapters: CHANNELS_FIRST_KERNELS[_kernel] on the (N, C, H, W)
    tensor as it is (no permute copies; the output keeps the input's memory format). The
    library's own code runs for input that is not 4-D (its permute(0, 2, 3, 1) or
    weight[:, None, None] decides what happens), when fastnorm would call torch anyway, and
    where the kernel would not reproduce the library's dtype rule, `_precision`:
    - "torch": F.layer_norm's / F.rms_norm's (statistics in fp32, one rounding): every dtype;
    - "fp32": x, weight and bias cast to fp32, the result rounded once to x's dtype (timm's *Fp32
      layers): the kernel with fp32 weight and bias, every dtype but float64 (which the library
      computes in fp32);
    - "input": computed in x's dtype (the mean and variance written out, timm's rms_norm2d):
      only fp32 x and parameters, where that is the kernel's computation."""

    _kernel = "layer_norm_2d"
    _precision = "torch"
    _act = False

    def _params(self) -> tuple[Optional[Tensor], ...]:
        weight = _param(self, "weight")
        return (weight, _param(self, "bias")) if self._kernel == "layer_norm_2d" else (weight,)

    def _kernel_reproduces(self, x: Tensor, params: tuple[Optional[Tensor], ...]) -> bool:
        if self._precision == "fp32":
            return x.dtype != torch.float64
        if self._precision == "input":
            return x.dtype == torch.float32 and all(p is None or p.dtype == torch.float32
                                                    for p in params)
        return True

    def forward(self, x: Tensor) -> Tensor:
        params = self._params()
        if x.dim() != 4 or not self._kernel_reproduces(x, params) or _torch_runs(
                x, self._kernel, *params):
            return super().forward(x)
        if self._precision == "fp32":
            params = tuple(None if p is None else p.float() for p in params)
        y = CHANNELS_FIRST_KERNELS[self._kernel](x, *params, float(_param(self, "eps")))
        return self.act(self.drop(y)) if self._act else y


class _ChannelsFirstAct(_ChannelsFirst):
    """timm's norm + act layers: the norm, then `drop`, then `act` (as the modules they are:
    the channels-first kernels fuse no activation)."""

    _act = True

    def _fastnorm_activation(self) -> str:
        return _activation_text(self, type(None))


class LayerNorm2d(_ChannelsFirst):
    """`F.layer_norm` over the channels (timm's and torchvision's LayerNorm2d, transformers'
    ConvNextLayerNorm since 4.56 with data_format="channels_first", EoMT's LayerNorm2d)."""


class LayerNormAct2d(_ChannelsFirstAct):
    """timm's LayerNormAct2d."""


class LayerNorm2dFp32(_ChannelsFirst):
    """timm's LayerNorm2dFp32: LayerNorm2d computed in fp32, rounded once."""

    _precision = "fp32"


class LayerNormAct2dFp32(_ChannelsFirstAct):
    """timm's LayerNormAct2dFp32."""

    _precision = "fp32"


class LayerNorm2dInputDtype(_ChannelsFirst):
    """The mean and variance written out, in x's dtype (VitDet's and segment-anything's
    LayerNorm2d, transformers' ConvNextLayerNorm before 4.23 with
    data_format="channels_first")."""

    _precision = "input"


class RmsNorm2d(_ChannelsFirst):
    """torch's F.rms_norm over the channels (timm 1.0.13-1.0.15's RmsNorm2d)."""

    _kernel = "rms_norm_2d"


class RmsNorm2dInputDtype(_ChannelsFirst):
    """timm's RmsNorm2d (>= 1.0.16): timm's rms_norm2d, computed in x's dtype."""

    _kernel = "rms_norm_2d"
    _precision = "input"


class RmsNormAct2dInputDtype(_ChannelsFirstAct):
    """timm's RmsNormAct2d."""

    _kernel = "rms_norm_2d"
    _precision = "input"


class RmsNorm2dFp32(_ChannelsFirst):
    """timm's RmsNorm2dFp32: rms_norm2d computed in fp32, rounded once."""

    _kernel = "rms_norm_2d"
    _precision = "fp32"


class RmsNormAct2dFp32(_ChannelsFirstAct):
    """timm's RmsNormAct2dFp32."""

    _kernel = "rms_norm_2d"
    _precision = "fp32"


class LayerNorm2dRounded:
    """transformers 4.23-4.55's ConvNextLayerNorm (and its copies) with
    data_format="channels_first": x_hat computed in fp32 and rounded to x's dtype, then
    `weight[:, None, None] * x_hat + bias[:, None, None]` with torch's dtype rules. The kernel
    computes x_hat, and the affine too where everything is fp32 (the same fp32 arithmetic);
    float64 x (the library computes it in fp32) and non-4-D input run the library's code."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = _param(self, "weight"), _param(self, "bias")
        if x.dim() != 4 or x.dtype == torch.float64 or _torch_runs(x, "layer_norm_2d", weight,
                                                                     bias):
            return super().forward(x)
        kernel, eps = CHANNELS_FIRST_KERNELS["layer_norm_2d"], float(_param(self, "eps"))
        if x.dtype == weight.dtype == bias.dtype == torch.float32:
            return kernel(x, weight, bias, eps)
        return weight[:, None, None] * kernel(x, None, None, eps) + bias[:, None, None]
