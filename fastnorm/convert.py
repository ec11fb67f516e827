"""`convert(model)`: swap a model's norm layers for fastnorm's, in place.

Recognized out of the box:
- torch.nn LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d, SyncBatchNorm (exact types) ->
  the fastnorm.nn subclasses;
- channels-first LayerNorms (timm's and torchvision's `LayerNorm2d`, transformers'
  `ConvNextLayerNorm(data_format="channels_first")` and its copies) -> adapters running
  `fastnorm.layer_norm_2d` (see "channels-first LayerNorm" below);
- transformers' RMSNorm classes, each with its own numerics reproduced:
  Llama-style (`weight * x_hat.to(input_dtype)`: Llama, Mistral, Mixtral, Qwen2/3, Phi-3, ...)
  and T5LayerNorm run the RMSNorm kernel with x_hat rounded to the input dtype before the weight
  multiply; Gemma-style (`(x_hat * (1 + w.float())).type_as(x)`, fp32 throughout) runs it with
  the offset weight `1 + w` computed in fp32 outside the kernel.
  A transformers class is recognized by its name and module, its forward must be the class's own
  (not overridden), its attributes are checked (a 1-D `weight` Parameter, the eps attribute) and,
  once per class, its forward is compared with the formula on a small fp32 probe input: a
  transformers release that changes the formula is left alone, with the reason.
More classes: `register_convert(cls, factory)`. What was converted and what was left alone, and
why: `convert_report(model)` (also logged at INFO level on the "fastnorm" logger).

Every swap changes only `__class__` (to a subclass of the original class), so Parameters,
buffers, state_dict keys, hooks and `isinstance` checks stay as they were.

Not fused here: transformers' decoder layers add the residual outside the norm module
(`hidden = residual + attn_out; hidden = self.post_attention_layernorm(hidden)`), so swapping the
norm module alone cannot use the fused residual kernel; calling
`fastnorm.rms_norm(x, ..., residual=r, prenorm=True)` needs a change of the layer's forward.
"""
from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from . import _backend
from . import functional as F_fast
from . import nn as fnn

log = logging.getLogger("fastnorm")

# A factory gets the module and returns the module to put in its place (the same object after a
# `__class__` swap, or a new one sharing its Parameters), or a string: the reason it was left alone.
Factory = Callable[[nn.Module], Union[nn.Module, str]]

# torch.nn class -> fastnorm class. Exact type match: a user's own subclass of nn.LayerNorm may
# override forward, so it is left alone.
_SWAPS: dict[type, type] = {
    nn.LayerNorm: fnn.LayerNorm, nn.RMSNorm: fnn.RMSNorm, nn.GroupNorm: fnn.GroupNorm,
    nn.BatchNorm1d: fnn.BatchNorm1d, nn.BatchNorm2d: fnn.BatchNorm2d,
    nn.BatchNorm3d: fnn.BatchNorm3d, nn.SyncBatchNorm: fnn.SyncBatchNorm,
}
_FASTNORM_CLASSES = tuple(_SWAPS.values()) + (fnn.LayerNorm2d, fnn.RMSNorm2d)

_REGISTRY: dict[type, Factory] = {}       # register_convert: exact class -> factory
_declined: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_converted: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # what a registered factory made


def register_convert(cls: type, factory: Factory) -> None:
    """Make `convert` handle modules of exactly class `cls` with `factory(module)`.

    The factory returns the module to use instead (typically the same object with its
    `__class__` set to a subclass whose forward calls fastnorm, so state_dict keys and Parameters
    are unchanged; or a new module sharing the Parameters) or a string saying why this module is
    left alone (shown by `convert_report`). A registration overrides the built-in handling."""
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"fastnorm.register_convert: expected an nn.Module subclass, got {cls!r}")
    if not callable(factory):
        raise TypeError("fastnorm.register_convert: factory must be callable")
    _REGISTRY[cls] = factory


# --- transformers adapters -----------------------------------------------------------------------

def _fastnorm_adapter_name(self) -> str:
    return "fastnorm." + type(self).__name__


class _LlamaRMSNormForward:
    """transformers' Llama-style RMSNorm: `weight * (x_hat in fp32).to(input_dtype)`.
    T5LayerNorm is the same computation when weight and input share a dtype."""

    def forward(self, hidden_states: Tensor) -> Tensor:
        w = self.weight
        # Other dtype mixes promote the output (and fp64 is computed in fp32 by the model):
        # the model's own code handles them, as does a backend that runs torch.
        if (hidden_states.dtype != w.dtype or w.dtype == torch.float64
                or _backend.resolve(hidden_states, "rms_norm") == "torch"):
            return super().forward(hidden_states)
        rounding = "none" if w.dtype == torch.float32 else self._fastnorm_rounding
        return F_fast._add_norm("rms_norm", hidden_states, None, (w.shape[-1],), w, None,
                                self.variance_epsilon, True, False, False, rounding=rounding)


class _GemmaRMSNormForward:
    """transformers' Gemma RMSNorm: `(x_hat * (1 + w.float())).type_as(x)`, fp32 throughout.
    The offset weight is formed in fp32 outside the kernel, which then multiplies and rounds
    once, as the model does."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float64 or _backend.resolve(x, "rms_norm") == "torch":
            return super().forward(x)  # the model computes fp64 input in fp32
        w = 1.0 + self.weight.float()
        return F_fast._add_norm("rms_norm", x, None, (w.shape[-1],), w, None, self.eps, True,
                                False, False)


def _reference(kind: str, x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The formula each adapter computes, for the fp32 probe."""
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x_hat * (1.0 + weight) if kind == "gemma" else weight * x_hat


_HF_KINDS: dict[str, tuple[str, str]] = {}  # class name -> (kind, eps attribute)
for _name in ("Llama", "Mistral", "Mixtral", "Qwen2", "Qwen2Moe", "Qwen3", "Qwen3Moe", "Phi3",
              "Olmo2", "Cohere2", "Granite", "GraniteMoe", "Starcoder2", "InternLM2"):
    _HF_KINDS[f"{_name}RMSNorm"] = ("llama", "variance_epsilon")
for _name in ("T5", "MT5", "LongT5", "UMT5", "Pop2Piano"):
    _HF_KINDS[f"{_name}LayerNorm"] = ("t5", "variance_epsilon")
for _name in ("Gemma", "Gemma2", "Gemma3"):
    _HF_KINDS[f"{_name}RMSNorm"] = ("gemma", "eps")

_adapter_classes: dict[type, type] = {}
_probe_results: dict[type, Optional[str]] = {}


def _hf_kind(cls: type) -> Optional[tuple[str, str]]:
    if not cls.__module__.startswith("transformers."):
        return None
    return _HF_KINDS.get(cls.__name__)


def _probe(module: nn.Module, kind: str, eps: float) -> Optional[str]:
    """None when the class's forward equals the adapter's formula on a small fp32 input (checked
    once per class), else why not."""
    cls = type(module)
    if cls not in _probe_results:
        n = module.weight.shape[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, n, generator=g, device="cpu")  # not the default device: a CPU probe
        w = torch.randn(n, generator=g, device="cpu")
        probe = cls.__new__(cls)
        nn.Module.__init__(probe)
        probe.__dict__.update({k: v for k, v in module.__dict__.items()
                               if k not in ("_parameters", "_buffers", "_modules")})
        probe.weight = nn.Parameter(w, requires_grad=False)
        try:
            with torch.no_grad():
                got = cls.forward(probe, x)
            ok = torch.allclose(got, _reference(kind, x, w, eps), rtol=1e-5, atol=1e-6)
            _probe_results[cls] = None if ok else (
                f"its forward differs from the {kind}-style RMSNorm formula fastnorm reproduces "
                "(a changed transformers release?)")
        except Exception as exc:  # a forward we cannot run on the probe is not recognized
            _probe_results[cls] = f"probing its forward failed ({type(exc).__name__}: {exc})"
    return _probe_results[cls]


def _convert_hf_norm(module: nn.Module) -> Union[nn.Module, str]:
    cls = type(module)
    kind, eps_attr = _hf_kind(cls)
    own = cls.__dict__.get("forward")
    if own is None:
        return f"{cls.__name__} does not define its own forward (a subclass?)"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return "expected a 1-D `weight` Parameter"
    eps = getattr(module, eps_attr, None)
    if not isinstance(eps, (float, int)):
        return f"expected a float `{eps_attr}` attribute"
    if set(dict(module.named_parameters(recurse=False))) != {"weight"} or \
            list(module.named_buffers(recurse=False)) or list(module.children()):
        return "expected `weight` as its only Parameter and no buffers or submodules"
    reason = _probe(module, kind, float(eps))
    if reason is not None:
        return reason
    module.__class__ = _adapter_class(cls)
    return module


def _adapter_reduce_ex(self, protocol):
    # The adapter classes are made at run time, so pickle cannot find them by name: rebuild
    # from the transformers class instead (torch.save(model) / torch.load work).
    return (_new_adapter, (self._fastnorm_source,), self.__dict__)


def _new_adapter(source_cls: type) -> nn.Module:
    cls = _adapter_class(source_cls)
    return cls.__new__(cls)


def _adapter_class(cls: type) -> type:
    """The subclass of transformers class `cls` whose forward runs fastnorm (made once)."""
    new_cls = _adapter_classes.get(cls)
    if new_cls is None:
        kind = _hf_kind(cls)[0]
        mixin = _GemmaRMSNormForward if kind == "gemma" else _LlamaRMSNormForward
        new_cls = type(cls.__name__, (mixin, cls),
                       {"__module__": __name__, "__qualname__": cls.__qualname__,
                        "__doc__": f"{cls.__name__} computed by fastnorm's RMSNorm kernel "
                                   f"({kind}-style numerics); a subclass of {cls.__module__}."
                                   f"{cls.__qualname__}.",
                        "_get_name": _fastnorm_adapter_name, "_fastnorm_source": cls,
                        "_fastnorm_rounding": kind,
                        "__reduce_ex__": _adapter_reduce_ex})
        _adapter_classes[cls] = new_cls
    return new_cls


# --- channels-first LayerNorm (timm / torchvision LayerNorm2d, transformers ConvNextLayerNorm) ----
# Each computes F.layer_norm over dim 1 of an (N, C, H, W) input (permute, layer_norm, permute;
# old transformers releases spell the same formula out with mean and var). Recognized by module
# and class name, then per module by its attributes, and once per class (and affine variant) by
# running its own forward on a small fp32 probe against the formula. The adapter subclass runs
# fastnorm.layer_norm_2d on 4-D inputs and the class's own forward on anything else (whose
# behaviour, errors included, is the model's). Output values are the model's; the memory format
# is the input's (the permute formulation returns channels-last strides for an NCHW input).

def _channels_first_kind(cls: type) -> Optional[str]:
    module, name = cls.__module__, cls.__name__
    if module == "timm.layers.norm" and name == "LayerNorm2d":
        return "timm"
    if module == "torchvision.models.convnext" and name == "LayerNorm2d":
        return "torchvision"
    if module.startswith("transformers.models.") and name.endswith("LayerNorm") and \
            "data_format" in getattr(cls.__init__, "__code__", _NO_CODE).co_varnames:
        return "transformers"  # ConvNextLayerNorm and its copies (ConvNextV2, SAM, SegGpt...)
    return None


_NO_CODE = (lambda: None).__code__
_cf_adapter_classes: dict[type, type] = {}
_cf_probe_results: dict[tuple, Optional[str]] = {}


class _ChannelsFirstLayerNormForward:
    """forward of the adapters: fastnorm.layer_norm_2d over dim 1 of a 4-D input."""

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            return super().forward(x)
        return F_fast.layer_norm_2d(x, self.weight, self.bias, self.eps)


def _cf_probe(module: nn.Module) -> Optional[str]:
    """None when the class's forward equals layer_norm over dim 1 on a small fp32 CPU input
    (checked once per class and affine variant), else why not."""
    cls = type(module)
    key = (cls, module.weight is None, module.bias is None)
    if key not in _cf_probe_results:
        c = module.normalized_shape[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, c, 3, 5, generator=g, device="cpu") * 2 + 1
        w = None if module.weight is None else torch.randn(c, generator=g, device="cpu")
        b = None if module.bias is None else torch.randn(c, generator=g, device="cpu")
        probe = cls.__new__(cls)
        nn.Module.__init__(probe)
        probe.__dict__.update({k: v for k, v in module.__dict__.items()
                               if k not in ("_parameters", "_buffers", "_modules")})
        probe.weight = None if w is None else nn.Parameter(w, requires_grad=False)
        probe.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        want = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (c,), w, b,
                                              module.eps).permute(0, 3, 1, 2)
        try:
            with torch.no_grad():
                got = cls.forward(probe, x)
            ok = isinstance(got, Tensor) and got.shape == x.shape and \
                torch.allclose(got, want, rtol=1e-5, atol=1e-5)
            _cf_probe_results[key] = None if ok else (
                "its forward differs from layer_norm over the channels (dim 1), the formula "
                "fastnorm.layer_norm_2d computes (a changed release?)")
        except Exception as exc:  # a forward we cannot run on the probe is not recognized
            _cf_probe_results[key] = f"probing its forward failed ({type(exc).__name__}: {exc})"
    return _cf_probe_results[key]


def _convert_channels_first(module: nn.Module) -> Union[nn.Module, str]:
    kind = _channels_first_kind(type(module))
    if kind == "timm" and getattr(module, "_fast_norm", False):
        return ("timm's fast norm is on (timm.layers.set_fast_norm): its forward runs APEX or a "
                "low-precision layer_norm under autocast, not the formula fastnorm reproduces")
    if kind == "transformers" and getattr(module, "data_format", None) != "channels_first":
        return (f"data_format={getattr(module, 'data_format', None)!r}: a LayerNorm over the "
                "last dim, not over the channels (only channels_first is converted)")
    shape = getattr(module, "normalized_shape", None)
    eps = getattr(module, "eps", None)
    if not (isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], int)):
        return "expected a one-element `normalized_shape` tuple (the channel count)"
    if not isinstance(eps, (float, int)):
        return "expected a float `eps` attribute"
    for what in ("weight", "bias"):
        p = getattr(module, what, None)
        if p is not None and not (isinstance(p, nn.Parameter) and p.shape == shape):
            return f"expected `{what}` to be None or a Parameter of shape {list(shape)}"
    if set(dict(module.named_parameters(recurse=False))) - {"weight", "bias"} or \
            list(module.named_buffers(recurse=False)) or list(module.children()):
        return "expected `weight` and `bias` as its only Parameters and no buffers or submodules"
    reason = _cf_probe(module)
    if reason is not None:
        return reason
    module.__class__ = _cf_adapter_class(type(module), kind)
    return module


def _new_cf_adapter(source_cls: type, kind: str) -> nn.Module:
    cls = _cf_adapter_class(source_cls, kind)
    return cls.__new__(cls)


def _cf_adapter_reduce_ex(self, protocol):
    # Made at run time, so pickle cannot find the class by name: rebuild from the source class.
    return (_new_cf_adapter, (self._fastnorm_source, self._fastnorm_kind), self.__dict__)


def _cf_adapter_class(cls: type, kind: str) -> type:
    """The subclass of `cls` whose forward runs fastnorm.layer_norm_2d (made once)."""
    new_cls = _cf_adapter_classes.get(cls)
    if new_cls is None:
        new_cls = type(cls.__name__, (_ChannelsFirstLayerNormForward, cls),
                       {"__module__": __name__, "__qualname__": cls.__qualname__,
                        "__doc__": f"{cls.__name__} computed by fastnorm.layer_norm_2d; a "
                                   f"subclass of {cls.__module__}.{cls.__qualname__}.",
                        "_get_name": _fastnorm_adapter_name, "_fastnorm_source": cls,
                        "_fastnorm_kind": kind, "__reduce_ex__": _cf_adapter_reduce_ex})
        _cf_adapter_classes[cls] = new_cls
    return new_cls


# --- convert -------------------------------------------------------------------------------------

def _handler(cls: type) -> Optional[Factory]:
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    if cls in _SWAPS:
        new_cls = _SWAPS[cls]

        def swap(module: nn.Module) -> nn.Module:
            module.__class__ = new_cls
            return module
        return swap
    if _hf_kind(cls) is not None:
        return _convert_hf_norm
    if _channels_first_kind(cls) is not None:
        return _convert_channels_first
    return None


def _is_fastnorm(module: nn.Module) -> bool:
    return (isinstance(module, _FASTNORM_CLASSES) or type(module) in _adapter_classes.values()
            or type(module) in _cf_adapter_classes.values() or module in _converted)


def _convert_tree(module: nn.Module) -> nn.Module:
    factory = None if _is_fastnorm(module) else _handler(type(module))
    if factory is not None:
        out = factory(module)
        if isinstance(out, str):
            _declined[module] = out
        else:
            _declined.pop(module, None)
            _converted.add(out)
            module = out
    for name, child in list(module.named_children()):
        new = _convert_tree(child)
        if new is not child:
            setattr(module, name, new)
    return module


def convert(module: nn.Module, sync_batchnorm: bool = False,
            process_group: Optional[Any] = None) -> nn.Module:
    """Swap every norm layer in `module` (itself included) that fastnorm implements for the
    fastnorm one, in place, and return `module`. Idempotent.

    Converted: torch.nn LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d, SyncBatchNorm (exact
    types); timm/torchvision LayerNorm2d and transformers' channels-first ConvNextLayerNorm;
    transformers' Llama/Mistral/Qwen2/Phi-3/Gemma-style RMSNorm and T5LayerNorm (module
    docstring); classes added with `register_convert`. `convert_report(model)` says what was
    converted and what norm-like modules were left alone and why; a summary is logged at INFO
    level on the "fastnorm" logger.

    The layers keep their identity: only their class changes, so Parameter objects, buffers,
    hooks and optimizer state stay as they were (the fastnorm classes add no state).

    sync_batchnorm=True also replaces BatchNorm1d/2d/3d (torch's or fastnorm's) by new
    `fastnorm.nn.SyncBatchNorm` modules on `process_group` (default: the whole world), like
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm`: they share the Parameter and buffer
    objects, so an optimizer built before still works. When `module` itself is replaced, the
    new module is returned."""
    module = _convert_tree(module)
    if sync_batchnorm:
        module = _to_sync_batchnorm(module, process_group)
    if log.isEnabledFor(logging.INFO):
        log.info("fastnorm.convert: %s", convert_report(module).summary())
    return module


# --- report --------------------------------------------------------------------------------------

_NORM_NAME = re.compile(r"norm", re.IGNORECASE)
_TORCH_NORM_BASES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
                     nn.LocalResponseNorm, nn.CrossMapLRN2d)


@dataclass
class ConvertReport:
    """What `convert` did to a model: `converted` lists (module name, class) of the modules that
    run fastnorm's kernels; `left_alone` lists (module name, class, reason) of the norm-like
    modules (torch.nn norm classes and their subclasses, and any class with "Norm" in its name)
    that do not."""

    converted: list[tuple[str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for _name, cls in self.converted:
            kinds[cls] = kinds.get(cls, 0) + 1
        done = ", ".join(f"{n} {c}" for c, n in kinds.items()) or "nothing"
        return f"converted {done}; left alone {len(self.left_alone)} norm-like module(s)"

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  converted   {name or '<root>'}: {cls}" for name, cls in self.converted]
        lines += [f"  left alone  {name or '<root>'}: {cls}: {why}"
                  for name, cls, why in self.left_alone]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _left_alone_reason(module: nn.Module) -> Optional[str]:
    cls = type(module)
    if module in _declined:
        return _declined[module]
    if _handler(cls) is not None:
        return "recognized but not converted yet: run fastnorm.convert(model)"
    if isinstance(module, _TORCH_NORM_BASES):
        base = next((b for b in cls.__mro__[1:] if b in _SWAPS), None)
        if base is not None:
            return (f"a subclass of {_qualname(base)} (its forward may differ; only exact types "
                    "are swapped): fastnorm.register_convert(cls, factory) adds it")
        return "fastnorm has no kernel for this norm"
    if _NORM_NAME.search(cls.__name__):
        return "not a recognized class: fastnorm.register_convert(cls, factory) adds one"
    return None


def convert_report(model: nn.Module) -> ConvertReport:
    """Which modules of `model` run fastnorm's kernels and which norm-like modules do not, with
    the reason (e.g. a subclass with its own forward, a norm fastnorm has no kernel for, a class
    nobody registered). `print(fastnorm.convert_report(model))` shows a table."""
    report = ConvertReport()
    for name, module in model.named_modules():
        if _is_fastnorm(module):
            report.converted.append((name, module._get_name()))
            continue
        reason = _left_alone_reason(module)
        if reason is not None:
            report.left_alone.append((name, _qualname(type(module)), reason))
    return report


# --- SyncBatchNorm -------------------------------------------------------------------------------

_SYNC_SOURCES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, fnn.BatchNorm1d,
                 fnn.BatchNorm2d, fnn.BatchNorm3d)


def _to_sync_batchnorm(module: nn.Module, process_group: Optional[Any]) -> nn.Module:
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm for exact BatchNorm{1,2,3}d types, building
    fastnorm SyncBatchNorm modules that share the original Parameters and buffers."""
    out = module
    if type(module) in _SYNC_SOURCES:
        out = fnn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group,
                                bias=module.bias is not None)
        with torch.no_grad():
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _to_sync_batchnorm(child, process_group))
    return out
