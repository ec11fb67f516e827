"""`convert(model)`: swap a model's norm layers for fastnorm's, in place.

A module is converted by the first rule that recognizes it:
1. `register_convert(cls, factory)` for its exact class (the escape hatch; overrides the rest);
2. torch.nn LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d, SyncBatchNorm (exact types) ->
   the fastnorm.nn classes;
3. a subclass of one of those whose `forward` is the torch class's own (not overridden): swapped
   like its base, to a class made once per subclass that derives from both (so `isinstance`
   with the user's class and with fastnorm's both hold);
4. a class whose forward is one of the forms in fastnorm/_forms.py, compared by fingerprint
   (fastnorm/_fingerprint.py: the normalized syntax tree of the forward and of the helpers it
   calls, not the class's name), then checked per instance (its parameters are Parameters, its
   eps a number, timm's fast-norm flag off, ...) and, once per class, by running its forward
   and fastnorm's on a small probe input. The forms cover transformers' RMSNorm families (A:
   Llama-style, B: Gemma-style, C: weight multiplied in fp32, D: T5-style), fp32 LayerNorms
   (OLMo-1, Cohere, diffusers' FP32LayerNorm, timm's LayerNormFp32), diffusers' RMSNorm, and
   timm's LayerNorm, GroupNorm(1), RmsNorm and norm + activation layers (timm's recognized by
   module and class name too, with `_fast_norm` off); fastnorm/_adapters.py says what runs in
   their place, with each library's dtype rules. Channels-first norms (timm's LayerNorm2d,
   RmsNorm2d, their Fp32 and + act variants; torchvision's LayerNorm2d; transformers'
   ConvNeXt-style LayerNorm per data_format, each release's form; VitDet's and
   segment-anything's LayerNorm2d) run the channels-first kernels of
   `_adapters.CHANNELS_FIRST_KERNELS`.
A class whose forward source cannot be read, or matches no form, is left alone.
`convert_report(model)` says what was converted (and as which family) and, for every norm-like
module left alone, why and how to add it (also logged at INFO level on the "fastnorm" logger).

Every swap changes only `__class__` (to a subclass of the original class), so Parameters,
buffers, state_dict keys, hooks and `isinstance` checks stay as they were. A module whose
`forward` was replaced on the instance (accelerate's hooks, `kernels`' kernelize, a patch) is left
alone: a class swap would not change what it runs.

Not fused here: transformers' decoder layers add the residual outside the norm module
(`hidden = residual + attn_out; hidden = self.post_attention_layernorm(hidden)`), so swapping the
norm module alone cannot use the fused residual kernel; calling
`fastnorm.rms_norm(x, ..., residual=r, prenorm=True)` needs a change of the layer's forward.
"""
from __future__ import annotations

import copy
import inspect
import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import _adapters, _backend, _forms
from . import nn as fnn
from ._fingerprint import Fingerprint, fingerprint

log = logging.getLogger("fastnorm")

# A factory gets the module and returns the module to put in its place (the same object after a
# `__class__` swap, or a new one sharing its Parameters), or a string: the reason it was left alone.
Factory = Callable[[nn.Module], Union[nn.Module, str]]

# torch.nn class -> fastnorm class, for exact types (rule 2) and subclasses that keep the torch
# forward (rule 3).
_SWAPS: dict[type, type] = {
    nn.LayerNorm: fnn.LayerNorm, nn.RMSNorm: fnn.RMSNorm, nn.GroupNorm: fnn.GroupNorm,
    nn.BatchNorm1d: fnn.BatchNorm1d, nn.BatchNorm2d: fnn.BatchNorm2d,
    nn.BatchNorm3d: fnn.BatchNorm3d, nn.SyncBatchNorm: fnn.SyncBatchNorm,
}
_FASTNORM_CLASSES = tuple(_SWAPS.values())

_REGISTRY: dict[type, Factory] = {}       # register_convert: exact class -> factory
_declined: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_converted: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # what a registered factory made

_REGISTER_HINT = "fastnorm.register_convert(cls, factory) adds it"


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


# --- families -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Family:
    """What a recognized form is converted to: `mixin` (fastnorm/_adapters.py, or a fastnorm.nn
    class) put before the library class; `text` for the report; `kernel`: the channels-first
    kernel it needs; `own_names`: the mixin reads torch's attribute names directly, so the
    roles must be bound to them; `probe`: the probe's input layout ("rows": (2, 3, n),
    "channels": (2, C, 3, 3)) and whether it also runs in bf16 (where the library's casts decide
    the output)."""

    mixin: type
    text: str
    kernel: Optional[str] = None
    own_names: bool = False
    probe: str = "rows"
    probe_bf16: bool = False


_FAMILIES: dict[str, _Family] = {
    "llama": _Family(_adapters.LlamaRMSNorm, "RMSNorm family A (Llama-style)", probe_bf16=True),
    "gemma": _Family(_adapters.GemmaRMSNorm, "RMSNorm family B (Gemma-style, 1 + w)",
                     probe_bf16=True),
    "fp32_weight": _Family(_adapters.Fp32WeightRMSNorm,
                           "RMSNorm family C (weight multiplied in fp32)", probe_bf16=True),
    "t5": _Family(_adapters.T5RMSNorm, "RMSNorm family D (T5-style)", probe_bf16=True),
    "fp32_layer_norm": _Family(_adapters.Fp32LayerNorm, "LayerNorm computed in fp32",
                               probe_bf16=True),
    "layer_norm": _Family(fnn.LayerNorm, "LayerNorm (torch's)", own_names=True),
    "group_norm": _Family(fnn.GroupNorm, "GroupNorm (torch's)", own_names=True,
                          probe="channels"),
    "rms_norm": _Family(_adapters.RmsNorm, "RMSNorm (torch's F.rms_norm)", own_names=True),
    "batch_norm_act": _Family(_adapters.BatchNormAct2d, "BatchNorm2d + act", own_names=True,
                              probe="channels"),
    "group_norm_act": _Family(_adapters.GroupNormAct, "GroupNorm + act", own_names=True,
                              probe="channels"),
    "layer_norm_act": _Family(_adapters.LayerNormAct, "LayerNorm + act", own_names=True),
    "f_layer_norm": _Family(_adapters.FunctionalLayerNorm, "LayerNorm (torch's F.layer_norm)"),
    # channels-first: normalize dim 1 of (N, C, H, W)
    "layer_norm_2d": _Family(_adapters.LayerNorm2d, "channels-first LayerNorm",
                             kernel="layer_norm_2d", probe="channels"),
    "layer_norm_act_2d": _Family(_adapters.LayerNormAct2d, "channels-first LayerNorm + act",
                                 kernel="layer_norm_2d", probe="channels"),
    "layer_norm_2d_fp32": _Family(_adapters.LayerNorm2dFp32,
                                  "channels-first LayerNorm computed in fp32",
                                  kernel="layer_norm_2d", probe="channels", probe_bf16=True),
    "layer_norm_act_2d_fp32": _Family(_adapters.LayerNormAct2dFp32,
                                      "channels-first LayerNorm computed in fp32 + act",
                                      kernel="layer_norm_2d", probe="channels",
                                      probe_bf16=True),
    "layer_norm_2d_input_dtype": _Family(
        _adapters.LayerNorm2dInputDtype,
        "channels-first LayerNorm in the input's dtype (the kernel for fp32 input)",
        kernel="layer_norm_2d", probe="channels"),
    "layer_norm_2d_rounded": _Family(
        _adapters.LayerNorm2dRounded,
        "channels-first LayerNorm, x_hat rounded to the input's dtype before the affine",
        kernel="layer_norm_2d", probe="channels", probe_bf16=True),
    "rms_norm_2d": _Family(_adapters.RmsNorm2d, "channels-first RMSNorm (torch's F.rms_norm)",
                           kernel="rms_norm_2d", probe="channels"),
    "rms_norm_2d_input_dtype": _Family(
        _adapters.RmsNorm2dInputDtype,
        "channels-first RMSNorm in the input's dtype (the kernel for fp32 input)",
        kernel="rms_norm_2d", probe="channels"),
    "rms_norm_act_2d_input_dtype": _Family(
        _adapters.RmsNormAct2dInputDtype,
        "channels-first RMSNorm in the input's dtype (the kernel for fp32 input) + act",
        kernel="rms_norm_2d", probe="channels"),
    "rms_norm_2d_fp32": _Family(_adapters.RmsNorm2dFp32, "channels-first RMSNorm computed in fp32",
                                kernel="rms_norm_2d", probe="channels", probe_bf16=True),
    "rms_norm_act_2d_fp32": _Family(_adapters.RmsNormAct2dFp32,
                                    "channels-first RMSNorm computed in fp32 + act",
                                    kernel="rms_norm_2d", probe="channels", probe_bf16=True),
}
_SUBCLASS_TEXT = "a subclass of {} with torch's forward"
_RECOGNIZED = ("transformers' RMSNorm families A-D and fp32 LayerNorms, diffusers' RMSNorm and "
               "FP32LayerNorm, timm's norm layers, channels-first LayerNorms of timm, "
               "torchvision and transformers; see fastnorm/_forms.py")


# --- recognizing a class (rules 3 and 4) -------------------------------------------------------

@dataclass(frozen=True)
class _Match:
    """A class matched to a form: the family and the roles (role -> attribute name, or the
    literal eps)."""

    form: _forms.Form
    roles: dict[str, Union[str, float]]


_form_prints: dict[type, Fingerprint] = {}
_class_matches: dict[type, Union[_Match, str]] = {}


def _form_print(form: _forms.Form) -> Fingerprint:
    fp = _form_prints.get(form.code)
    if fp is None:
        fp = fingerprint(form.code)
        if isinstance(fp, str):  # fastnorm's own source must be readable
            raise RuntimeError(f"fastnorm: cannot fingerprint {form.code.__qualname__}: {fp}")
        _form_prints[form.code] = fp
    return fp


def _torch_base(cls: type) -> Optional[type]:
    """The torch class of _SWAPS that `cls` subclasses (the nearest), if any."""
    return next((base for base in cls.__mro__[1:] if base in _SWAPS), None)


def _one_input_forward(cls: type) -> bool:
    """Whether `cls.forward(self, x)` takes exactly one input (every form does): a cheap test
    that spares fingerprinting the model's other classes."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return (code is not None and code.co_argcount == 2 and code.co_kwonlyargcount == 0
            and not code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS))


def _class_match(cls: type) -> Union[_Match, str]:
    """The form `cls.forward` is (cached per class), or why it is none."""
    found = _class_matches.get(cls)
    if found is not None:
        return found
    if not _one_input_forward(cls):
        found = ("its forward takes other arguments than the input (or is wrapped); "
                 + _REGISTER_HINT)
    else:
        fp = fingerprint(cls)
        if isinstance(fp, str):
            found = f"{fp}; {_REGISTER_HINT}"
        else:
            found = f"its forward is none of the forms fastnorm recognizes ({_RECOGNIZED}); " \
                    + _REGISTER_HINT
            for form in _forms.FORMS:
                if form.library and not (cls.__module__.startswith(form.library)
                                         and cls.__name__ in form.names):
                    continue
                canon = _form_print(form)
                if canon.text == fp.text:
                    roles: dict[str, Union[str, float]] = dict(zip(canon.attributes,
                                                                    fp.attributes))
                    if form.eps is not None:
                        roles["eps"] = form.eps
                    found = _Match(form, roles)
                    break
    _class_matches[cls] = found
    return found


# --- adapter classes ------------------------------------------------------------------------------

_adapter_classes: dict[tuple[type, str], type] = {}


def _fastnorm_adapter_name(self) -> str:
    return "fastnorm." + type(self).__name__


def _adapter_reduce_ex(self, protocol):
    # The adapter classes are made at run time, so pickle cannot find them by name: rebuild
    # from the library class instead (torch.save(model) / torch.load, copy.deepcopy work).
    return (_new_adapter, (self._fastnorm_source, self._fastnorm_family), self.__dict__)


def _new_adapter(source_cls: type, family: str) -> nn.Module:
    cls = _adapter_class(source_cls, family)
    return cls.__new__(cls)


def _adapter_class(cls: type, family: str) -> type:
    """The subclass of `cls` whose forward runs fastnorm for `family` (made once): a torch
    subclass (family "torch") gets the fastnorm.nn class of its base, a matched form its
    family's mixin."""
    key = (cls, family)
    new_cls = _adapter_classes.get(key)
    if new_cls is None:
        if family == "torch":
            mixin, roles, text = _SWAPS[_torch_base(cls)], {}, _SUBCLASS_TEXT.format(
                _qualname(_torch_base(cls)))
        else:
            match = _class_match(cls)
            mixin, roles, text = _FAMILIES[family].mixin, match.roles, _FAMILIES[family].text
        # The library's constructor stays the class's (`type(module)(...)` builds a layer as
        # the library would), whatever the mixin's is.
        new_cls = type(cls.__name__, (mixin, cls),
                       {"__module__": __name__, "__qualname__": cls.__qualname__,
                        "__init__": cls.__init__,
                        "__doc__": f"{cls.__name__} computed by fastnorm ({text}); a subclass "
                                   f"of {_qualname(cls)}.",
                        "_get_name": _fastnorm_adapter_name, "_fastnorm_source": cls,
                        "_fastnorm_family": family, "_fastnorm_text": text,
                        "_fastnorm_roles": roles, "__reduce_ex__": _adapter_reduce_ex})
        _adapter_classes[key] = new_cls
    return new_cls


# --- checks of one instance -----------------------------------------------------------------------

def _role_problem(module: nn.Module, role: str, name: Union[str, float], form: _forms.Form
                  ) -> Optional[str]:
    """Why `module`'s attribute bound to `role` does not fit it, or None."""
    if isinstance(name, float):
        return None
    value = getattr(module, name, None)
    if role == "_fast_norm":
        return None if value is False else (
            "timm's fast-norm mode is on for it (timm.layers.set_fast_norm: Apex or timm's "
            "low-precision autocast path), which fastnorm does not reproduce: build the model "
            "with it off to convert it")
    if role in ("weight", "bias"):
        if value is None and role in form.optional:
            return None
        if not isinstance(value, nn.Parameter) or value.dim() != 1:
            return f"expected `{name}` to be a 1-D Parameter"
    elif role == "eps":
        if not isinstance(value, (float, int)) or isinstance(value, bool):
            return f"expected a number in `{name}`"
    elif role in ("act", "drop"):
        if not isinstance(value, nn.Module):
            return f"expected `{name}` to be a module"
    elif role == "normalized_shape":
        if not (isinstance(value, tuple) and value and all(isinstance(n, int) for n in value)):
            return f"expected a tuple of ints in `{name}`"
    return None


def _instance_family(module: nn.Module, match: _Match) -> Union[str, tuple[str, str]]:
    """The family this instance converts to, or (family, why it is left alone)."""
    family = match.form.family
    if match.form.channels_first is not None:  # transformers' ConvNeXt-style: per instance
        layout = getattr(module, match.roles["data_format"], None)
        family = {"channels_last": family,
                  "channels_first": match.form.channels_first}.get(layout)
        if family is None:
            return match.form.family, f"unknown data_format {layout!r}"
    spec = _FAMILIES[family]
    if spec.own_names and any(role != name for role, name in match.roles.items()
                              if role not in ("_fast_norm", "data_format")):
        return family, "its attributes are not named as torch's (the adapter reads torch's)"
    for role, name in match.roles.items():
        problem = _role_problem(module, role, name, match.form)
        if problem is not None:
            return family, problem
    if spec.kernel is not None and spec.kernel not in _adapters.CHANNELS_FIRST_KERNELS:
        return family, (f"{spec.text}: fastnorm has no channels-first kernel "
                        f"(fastnorm.{spec.kernel}) in this build; {_REGISTER_HINT} meanwhile")
    return family


# --- the probe: the library's forward against fastnorm's, once per class and family --------------

_probe_results: dict[tuple[type, str], Optional[str]] = {}


def _probe_copy(module: nn.Module, dtype: torch.dtype, seed: int) -> nn.Module:
    """A copy of `module` on the CPU with fresh random parameters and buffers (positive float
    buffers: running variances) in `dtype`, the same for the same seed; children copied too."""
    g = torch.Generator().manual_seed(seed)
    probe = type(module).__new__(type(module))
    probe.__dict__.update(module.__dict__)
    probe._parameters = {
        k: None if p is None else nn.Parameter(
            torch.randn(p.shape, generator=g, device="cpu").to(dtype), requires_grad=False)
        for k, p in module._parameters.items()}
    probe._buffers = {
        k: None if b is None else (torch.rand(b.shape, generator=g, device="cpu") + 0.5).to(dtype)
        if b.is_floating_point() else torch.zeros(b.shape, dtype=b.dtype, device="cpu")
        for k, b in module._buffers.items()}
    probe._modules = {k: None if m is None else copy.deepcopy(m).to("cpu", torch.float32)
                      for k, m in module._modules.items()}
    return probe


def _probe_shape(module: nn.Module, match: _Match, family: _Family) -> tuple[int, ...]:
    def role(name: str):
        # (a form that calls torch's forward through super() names no attributes: torch's own)
        attr = match.roles.get(name, name)
        return getattr(module, attr, None) if isinstance(attr, str) else None

    weight, shape = role("weight"), role("normalized_shape")
    if family.probe == "channels":
        channels = (weight.shape[0] if weight is not None else shape[0] if shape is not None
                    else getattr(module, "num_channels", None) or module.num_features)
        return (2, channels, 3, 3)
    if shape is not None:
        return (2, 3, *shape)
    return (2, 3, weight.shape[-1] if weight is not None else 8)


def _probe(module: nn.Module, match: _Match, family_name: str) -> Optional[str]:
    """None when the class's forward and fastnorm's agree on a small CPU input (fp32, and bf16
    for the families whose casts decide the output), checked once per class and family; else
    why not."""
    cls = type(module)
    key = (cls, family_name)
    if key in _probe_results:
        return _probe_results[key]
    family = _FAMILIES[family_name]
    result = None
    try:
        adapter = _adapter_class(cls, family_name)
        shape = _probe_shape(module, match, family)
        for dtype in (torch.float32, torch.bfloat16) if family.probe_bf16 else (torch.float32,):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0),
                            device="cpu").to(dtype)
            # fastnorm's op layer with its torch reference kernels, whatever the device and the
            # selected backend
            with torch.no_grad(), _backend.use_backend("reference"):
                want = cls.forward(_probe_copy(module, dtype, 1), x.clone())
                library = _probe_copy(module, dtype, 1)
                library.__class__ = adapter
                got = adapter.forward(library, x.clone())
            tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6
            if got.dtype != want.dtype or got.shape != want.shape or not torch.allclose(
                    got.double(), want.double(), rtol=tol, atol=tol):
                result = (f"its forward differs from what fastnorm computes for "
                          f"{family.text} on a {str(dtype)[6:]} probe (a changed library "
                          f"release?); {_REGISTER_HINT}")
                break
    except Exception as exc:  # a forward we cannot run on the probe is not converted
        result = f"probing its forward failed ({type(exc).__name__}: {exc})"
    _probe_results[key] = result
    return result


# --- convert -------------------------------------------------------------------------------------

def _forward_on_instance(module: nn.Module) -> Optional[str]:
    if "forward" in module.__dict__:
        return ("its forward is set on the instance (an accelerate hook, kernels' kernelize, a "
                "patch), which a class swap would not replace: convert the model before that "
                "forward is set")
    return None


def _swap_exact(module: nn.Module) -> Union[nn.Module, str]:
    reason = _forward_on_instance(module)
    if reason is not None:
        return reason
    module.__class__ = _SWAPS[type(module)]
    return module


def _swap_to_adapter(module: nn.Module, family: str) -> Union[nn.Module, str]:
    try:
        adapter = _adapter_class(type(module), family)
    except TypeError as exc:  # e.g. no consistent MRO with fastnorm's class
        return f"its class cannot be combined with fastnorm's ({exc}); {_REGISTER_HINT}"
    module.__class__ = adapter
    return module


def _swap_subclass(module: nn.Module) -> Union[nn.Module, str]:
    reason = _forward_on_instance(module)
    if reason is not None:
        return reason
    return _swap_to_adapter(module, "torch")


def _convert_matched(module: nn.Module) -> Union[nn.Module, str]:
    reason = _forward_on_instance(module)
    if reason is not None:
        return reason
    match = _class_match(type(module))
    family = _instance_family(module, match)
    if isinstance(family, tuple):
        return family[1]
    reason = _probe(module, match, family)
    if reason is not None:
        return reason
    return _swap_to_adapter(module, family)


def _handler(cls: type) -> Optional[Factory]:
    if cls in _REGISTRY:
        return _REGISTRY[cls]
    if cls in _SWAPS:
        return _swap_exact
    if cls.__module__.startswith("torch.") or issubclass(cls, _FASTNORM_CLASSES):
        return None
    base = _torch_base(cls)
    if base is not None and getattr(cls, "forward", None) is base.forward:
        return _swap_subclass
    if isinstance(_class_match(cls), _Match):
        return _convert_matched
    return None


def _is_fastnorm(module: nn.Module) -> bool:
    return (isinstance(module, _FASTNORM_CLASSES) or "_fastnorm_family" in vars(type(module))
            or module in _converted)


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

    Converted (module docstring for the rules): torch.nn LayerNorm, RMSNorm, GroupNorm,
    BatchNorm1d/2d/3d, SyncBatchNorm and their subclasses that keep torch's forward;
    transformers' RMSNorm families (Llama-, Gemma-, OLMo2- and T5-style) and fp32 LayerNorms,
    recognized by their forward's code; diffusers' RMSNorm and FP32LayerNorm; timm's LayerNorm,
    GroupNorm, RmsNorm, LayerNormFp32 and norm + activation layers; channels-first LayerNorms
    and RMSNorms (timm's, torchvision's, transformers' ConvNeXt-style); classes added with
    `register_convert`. `convert_report(model)` says what was converted and what norm-like
    modules were left alone and why; a summary is logged at INFO level on the "fastnorm" logger.

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
    run fastnorm's kernels, and `families` says as what (module name -> e.g. "RMSNorm family A
    (Llama-style)"); `left_alone` lists (module name, class, reason) of the norm-like modules
    (torch.nn norm classes and their subclasses, recognized library classes, and any class with
    "Norm" in its name that holds no norm itself) that do not."""

    converted: list[tuple[str, str]] = field(default_factory=list)
    left_alone: list[tuple[str, str, str]] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for _name, cls in self.converted:
            kinds[cls] = kinds.get(cls, 0) + 1
        done = ", ".join(f"{n} {c}" for c, n in kinds.items()) or "nothing"
        return f"converted {done}; left alone {len(self.left_alone)} norm-like module(s)"

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += [f"  converted   {name or '<root>'}: {cls}"
                  + (f" [{self.families[name]}]" if name in self.families else "")
                  for name, cls in self.converted]
        lines += [f"  left alone  {name or '<root>'}: {cls}: {why}"
                  for name, cls, why in self.left_alone]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _family_text(module: nn.Module) -> Optional[str]:
    text = vars(type(module)).get("_fastnorm_text")
    if text is not None:
        activation = getattr(module, "_fastnorm_activation", None)
        return text if activation is None else f"{text}: {activation()}"
    if type(module) in _FASTNORM_CLASSES:
        return f"{_qualname(_torch_base(type(module)))} (torch's)"
    return None


def _left_alone_reason(module: nn.Module) -> Optional[str]:
    cls = type(module)
    if module in _declined:
        return _declined[module]
    if _handler(cls) is not None:
        return "recognized but not converted yet: run fastnorm.convert(model)"
    if isinstance(module, _TORCH_NORM_BASES):
        base = _torch_base(cls)
        if base is not None:
            match = _class_match(cls)
            return (f"a subclass of {_qualname(base)} with its own forward (only subclasses "
                    "that keep torch's forward are swapped, or whose forward is a recognized "
                    "form); " + (match if isinstance(match, str) else _REGISTER_HINT))
        return f"fastnorm has no kernel for this norm ({_REGISTER_HINT} with your own)"
    if _NORM_NAME.search(cls.__name__):
        # A block that holds norms ("NormMlpClassifierHead", "ConvNormAct") is not one: its
        # norms are reported themselves.
        if any(isinstance(child, _TORCH_NORM_BASES) or _NORM_NAME.search(type(child).__name__)
               for child in module.children()):
            return None
        if cls.__module__.startswith("torch."):
            return f"fastnorm has no kernel for this module ({_REGISTER_HINT} with your own)"
        match = _class_match(cls)
        return match if isinstance(match, str) else None
    return None


def convert_report(model: nn.Module) -> ConvertReport:
    """Which modules of `model` run fastnorm's kernels (and as which family) and which
    norm-like modules do not, with the reason and how to add them (e.g. a subclass with its own
    forward, a forward that is none of the recognized forms, a norm fastnorm has no kernel
    for). `print(fastnorm.convert_report(model))` shows a table."""
    report = ConvertReport()
    for name, module in model.named_modules():
        if _is_fastnorm(module):
            report.converted.append((name, module._get_name()))
            text = _family_text(module)
            if text is not None:
                report.families[name] = text
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
