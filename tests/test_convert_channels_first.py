"""fastnorm.convert() of channels-first LayerNorms: timm's and torchvision's LayerNorm2d and
transformers' ConvNextLayerNorm(data_format="channels_first") (old and new forms), through
look-alike classes with their forward (those libraries are not installed here): converted,
same outputs, Parameters and state_dict, idempotent, picklable; and left alone, with the
reason, when fast norm is on, data_format is channels_last or the forward computes something
else."""
import copy
import io
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_layer_norm_2d import LAYOUTS, _layout, _TimmStyleLayerNorm2d
from torch import nn

import fastnorm


def _lookalike(module_name, cls):
    """`cls` as if defined in `module_name` (timm, torchvision and transformers are not
    installed here; convert recognizes classes by module and name, then probes their forward)."""
    cls.__module__ = module_name
    cls.__qualname__ = cls.__name__
    return cls


def _importable(monkeypatch, cls):
    """Make `cls` importable from its (look-alike) module for the test, as pickle needs."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    setattr(sys.modules[cls.__module__], cls.__name__, cls)


def _timm_class():
    class LayerNorm2d(_TimmStyleLayerNorm2d):
        def forward(self, x):  # timm's own forward (fast norm off), not inherited
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)
    return _lookalike("timm.layers.norm", LayerNorm2d)


def _torchvision_class():
    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)
    return _lookalike("torchvision.models.convnext", LayerNorm2d)


def _hf_new_class():
    class ConvNextLayerNorm(nn.LayerNorm):  # transformers >= 4.5x: an nn.LayerNorm subclass
        def __init__(self, normalized_shape, *, eps=1e-6, data_format="channels_last", **kw):
            super().__init__(normalized_shape, eps=eps, **kw)
            self.data_format = data_format

        def forward(self, features):
            if self.data_format == "channels_first":
                return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return super().forward(features)
    return _lookalike("transformers.models.convnext.modeling_convnext", ConvNextLayerNorm)


def _hf_old_class():
    class ConvNextLayerNorm(nn.Module):  # older releases: mean/var spelled out
        def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(normalized_shape))
            self.bias = nn.Parameter(torch.zeros(normalized_shape))
            self.eps = eps
            self.data_format = data_format
            self.normalized_shape = (normalized_shape,)

        def forward(self, x):
            if self.data_format == "channels_last":
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            u = x.mean(1, keepdim=True)
            s = (x - u).pow(2).mean(1, keepdim=True)
            x = (x - u) / torch.sqrt(s + self.eps)
            return self.weight[:, None, None] * x + self.bias[:, None, None]
    return _lookalike("transformers.models.sam.modeling_sam", ConvNextLayerNorm)


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


@pytest.mark.parametrize("make,kwargs", [
    (_timm_class, {}), (_torchvision_class, {"eps": 1e-6}),
    (_hf_new_class, {"data_format": "channels_first"}),
    (_hf_old_class, {"data_format": "channels_first"}),
], ids=["timm", "torchvision", "transformers", "transformers-old"])
def test_convert_channels_first_layer_norms(make, kwargs, device, monkeypatch):
    cls = make()
    model = _randomize(nn.Sequential(nn.Conv2d(3, 16, 1), cls(16, **kwargs),
                                     nn.Conv2d(16, 8, 1))).to(device)
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert fastnorm.convert(model) is model
    assert fastnorm.convert(model) is model  # idempotent
    assert isinstance(model[1], cls) and type(model[1]) is not cls
    assert repr(model[1]).startswith("fastnorm.")
    assert dict(model.named_parameters()) == params and list(model.state_dict()) == keys
    report = fastnorm.convert_report(model)
    assert [name for name, _ in report.converted] == ["1"] and not report.left_alone
    x = torch.randn(2, 3, 5, 6, device=device)
    for backend_name in ("reference", "triton"):
        for layout in LAYOUTS:
            xl = _layout(x, layout)
            with fastnorm.use_backend(backend_name):
                torch.testing.assert_close(model(xl), reference(xl))
    # a torch.save round trip keeps the adapter (its class is made at run time)
    _importable(monkeypatch, cls)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded[1]) is type(model[1])


def test_convert_leaves_what_it_cannot_reproduce_alone(device):
    timm_cls = _timm_class()
    fast = timm_cls(8)
    fast._fast_norm = True

    class LayerNorm2d(nn.LayerNorm):  # normalizes over (C, H, W): another reduction
        def forward(self, x):
            return F.group_norm(x, 1, self.weight, self.bias, self.eps)
    wrong_dim = _lookalike("torchvision.models.convnext", LayerNorm2d)(8)

    class LayerNorm2d(nn.LayerNorm):  # drops the bias
        def forward(self, x):
            return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight,
                                None, self.eps).permute(0, 3, 1, 2)
    no_bias = _lookalike("timm.layers.norm", LayerNorm2d)(8)
    hf = _hf_new_class()
    channels_last = hf(8)
    unrecognized = type("LayerNorm2d", (_TimmStyleLayerNorm2d,), {})(8)  # not timm's module
    model = _randomize(nn.Sequential(fast, wrong_dim, no_bias, channels_last, unrecognized))
    reference = copy.deepcopy(model)
    fastnorm.convert(model)
    report = fastnorm.convert_report(model)
    assert not report.converted
    why = {name: reason for name, _cls, reason in report.left_alone}
    assert "fast norm is on" in why["0"]
    assert "differs from layer_norm over the channels" in why["1"]
    assert "differs from layer_norm over the channels" in why["2"]
    assert "data_format='channels_last'" in why["3"]
    assert "subclass of torch.nn" in why["4"]
    x = torch.randn(2, 8, 8, 8)
    with fastnorm.use_backend("reference"):
        torch.testing.assert_close(model(x), reference(x))


def test_converted_adapter_runs_the_model_forward_on_other_ranks():
    cls = _hf_old_class()
    norm = _randomize(cls(6, data_format="channels_first"))
    reference = copy.deepcopy(norm)
    fastnorm.convert(norm)
    assert type(norm) is not cls
    x = torch.randn(6, 4, 5)  # 3-D: the model's own broadcasting, not (N, C, *)
    with fastnorm.use_backend("reference"):
        torch.testing.assert_close(norm(x), reference(x))
