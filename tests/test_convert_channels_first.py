"""fastnorm.convert on channels-first norm layers (normalizing dim 1 of (N, C, H, W)): timm's
LayerNorm2d, LayerNormAct2d, RmsNorm2d, RmsNormAct2d and their Fp32 variants (releases 0.5.4 to
1.0.x), torchvision's LayerNorm2d, and transformers' ConvNeXt-style LayerNorm in each release's
form: up to 4.22 and 4.23-4.55 through the look-alikes of tests/library_layers.py (copies of those
releases' forwards), 4.56 on, VitDet's and EoMT's through the installed transformers. Each is
converted to the family its dtype rule calls for and computes the library's output in both
memory layouts, on the reference and Triton kernels, forward and backward; Parameters,
state_dict, idempotence and pickling hold; the library's own code runs for what the kernels do
not reproduce; and layers whose forward computes something else are left alone with the reason.
(The fingerprint itself: test_convert_libraries.py; the kernels: test_layer_norm_2d.py.)"""
import copy
import io
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_ref
from test_layer_norm_2d import LAYOUTS, _layout
from torch import nn

import fastnorm
import library_layers as lib
from fastnorm import _adapters

C = 16
LN = "channels-first LayerNorm"
LN_INPUT = "channels-first LayerNorm in the input's dtype (the kernel for fp32 input)"
LN_ROUNDED = "channels-first LayerNorm, x_hat rounded to the input's dtype before the affine"
LN_FP32 = "channels-first LayerNorm computed in fp32"
RMS = "channels-first RMSNorm (torch's F.rms_norm)"
RMS_INPUT = "channels-first RMSNorm in the input's dtype (the kernel for fp32 input)"
RMS_FP32 = "channels-first RMSNorm computed in fp32"


def _transformers(model: str, name: str) -> type:
    modeling = pytest.importorskip(f"transformers.models.{model}.modeling_{model}")
    return getattr(modeling, name)


# id -> (the layer, built fresh; its family in convert_report)
CASES = {
    "timm-LayerNorm2d": (lambda: lib.LayerNorm2d(C), LN),
    "timm-0.6.13-LayerNorm2d": (lambda: lib.LayerNorm2dV0613(C), LN),
    "timm-0.6.7-LayerNorm2d": (lambda: lib.LayerNorm2dV067(C), LN),
    "timm-LayerNormAct2d": (lambda: lib.LayerNormAct2d(C, act="gelu"),
                            LN + " + act: GELU after the kernel, unfused"),
    "timm-0.6.7-LayerNormAct2d": (lambda: lib.LayerNormAct2dV067(C, act="relu"),
                                  LN + " + act: ReLU after the kernel, unfused"),
    "timm-LayerNorm2dFp32": (lambda: lib.LayerNorm2dFp32(C), LN_FP32),
    "timm-LayerNormAct2dFp32": (lambda: lib.LayerNormAct2dFp32(C, act="silu"),
                                LN_FP32 + " + act: SiLU after the kernel, unfused"),
    "timm-RmsNorm2d": (lambda: lib.RmsNorm2d(C), RMS_INPUT),
    "timm-1.0.13-RmsNorm2d": (lambda: lib.RmsNorm2dV1013(C), RMS),
    "timm-RmsNorm2dFp32": (lambda: lib.RmsNorm2dFp32(C), RMS_FP32),
    "timm-RmsNormAct2d": (lambda: lib.RmsNormAct2d(C, act="gelu"),
                          RMS_INPUT + " + act: GELU after the kernel, unfused"),
    "timm-RmsNormAct2dFp32": (lambda: lib.RmsNormAct2dFp32(C, act="identity"),
                              RMS_FP32 + " + act: Identity after the kernel, unfused"),
    "torchvision-LayerNorm2d": (lambda: lib.TorchvisionLayerNorm2d(C, eps=1e-6), LN),
    "transformers-4.22-ConvNextLayerNorm": (
        lambda: lib.ConvNextLayerNormV422(C, data_format="channels_first"), LN_INPUT),
    "transformers-4.55-ConvNextLayerNorm": (
        lambda: lib.ConvNextLayerNormV455(C, data_format="channels_first"), LN_ROUNDED),
    "transformers-ConvNextLayerNorm": (
        lambda: _transformers("convnext", "ConvNextLayerNorm")(C, data_format="channels_first"),
        LN),
    "transformers-VitDetLayerNorm": (lambda: _transformers("vitdet", "VitDetLayerNorm")(C),
                                     LN_INPUT),
    "transformers-EomtLayerNorm2d": (lambda: _transformers("eomt", "EomtLayerNorm2d")(C), LN),
}


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _outputs_and_grads(model, x):
    x = x.detach().clone().requires_grad_()
    model.zero_grad()
    y = model(x)
    y_acc = y if y.dtype == torch.float64 else y.float()
    (y_acc * torch.linspace(-1, 1, y.numel(), dtype=y_acc.dtype,
                            device=y.device).view(y.shape)).sum().backward()
    return y, [x.grad] + [p.grad for p in model.parameters()]


def _assert_computes_what_the_library_does(model, ref, x):
    """The converted model against the unconverted one, in both layouts: bitwise where torch
    runs (the "auto" backend on a CPU runs the library's code); on the reference and Triton
    kernels, outputs and gradients as close to a float64 run as the library's own
    (helpers.assert_close_ref)."""
    ref64 = copy.deepcopy(ref).double()
    for layout in LAYOUTS:
        xl = _layout(x, layout)
        want, want_g = _outputs_and_grads(ref, xl)
        want64, want64_g = _outputs_and_grads(ref64, xl.double())
        if x.device.type == "cpu":
            got, got_g = _outputs_and_grads(model, xl)
            assert torch.equal(got, want) and all(map(torch.equal, got_g, want_g)), layout
        for backend in ("reference", "triton"):
            with fastnorm.use_backend(backend):
                got, got_g = _outputs_and_grads(model, xl)
            assert got.dtype == want.dtype
            assert_close_ref(got, want64, want, f"{backend}, {layout}: output")
            for i, (a, b64, b) in enumerate(zip(got_g, want64_g, want_g)):
                assert a.dtype == b.dtype
                assert_close_ref(a, b64, b, f"{backend}, {layout}: gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_converted_and_computes_what_the_library_does(case, dtype, device):
    make, family = CASES[case]
    model = _randomize(nn.Sequential(nn.Conv2d(3, C, 1), make(), nn.Conv2d(C, 4, 1)))
    model = model.to(device, dtype)
    ref = copy.deepcopy(model)
    params, keys = list(model.parameters()), list(model.state_dict())
    assert fastnorm.convert(model) is model
    norm = model[1]
    assert isinstance(norm, type(ref[1])) and type(norm) is not type(ref[1])
    assert repr(norm).startswith("fastnorm." + type(ref[1]).__name__)
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == keys
    report = fastnorm.convert_report(model)
    assert [name for name, _ in report.converted] == ["1"] and not report.left_alone
    assert report.families["1"] == family
    assert fastnorm.convert(model) is model and model[1] is norm  # idempotent
    assert fastnorm.convert_report(model).converted == report.converted
    _assert_computes_what_the_library_does(model, ref, torch.randn(2, 3, 5, 6, device=device,
                                                                   dtype=dtype))


@pytest.mark.parametrize("case", ["timm-LayerNorm2d", "timm-LayerNorm2dFp32", "timm-RmsNorm2dFp32",
                                  "transformers-4.55-ConvNextLayerNorm"])
def test_half_precision_output_rounds_where_the_library_rounds(case, device):
    # fp16, which Triton's CPU interpreter rounds as a GPU does: torch's and timm's Fp32 layers
    # round once, transformers 4.23-4.55 rounds x_hat, then the product and the sum; the
    # kernels' fp32 sums in another order than torch's may round an element the other way
    norm = _randomize(CASES[case][0]()).to(device, torch.float16)
    ref = copy.deepcopy(norm)
    fastnorm.convert(norm)
    x = (torch.randn(4, C, 8, 8, device=device) * 3).half()
    with fastnorm.use_backend("triton"), torch.no_grad():
        assert (norm(x) != ref(x)).float().mean() <= 1e-2


def test_converted_layers_pickle_and_copy(monkeypatch, device):
    # pickle finds a class by its module: make the libraries' module paths lead to the
    # look-alikes (the adapters rebuild from the library class, see convert._adapter_reduce_ex)
    for name in ("timm", "timm.layers", "torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name in ("timm.layers.norm", "timm.layers.norm_act", "torchvision.models.convnext"):
        monkeypatch.setitem(sys.modules, name, lib)
    model = _randomize(nn.Sequential(
        lib.LayerNorm2d(C), lib.LayerNormAct2d(C), lib.LayerNorm2dFp32(C), lib.RmsNorm2d(C),
        lib.RmsNormAct2dFp32(C), lib.TorchvisionLayerNorm2d(C),
        lib.ConvNextLayerNormV455(C, data_format="channels_first"))).to(device)
    fastnorm.convert(model)
    assert len(fastnorm.convert_report(model).converted) == len(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        assert [type(m) for m in other] == [type(m) for m in model]
        x = torch.randn(2, C, 4, 3, device=device)
        with fastnorm.use_backend("triton"):
            assert torch.equal(other(x), model(x))


def _recording_kernels(monkeypatch):
    """Channels-first kernels that compute the kernels' contract in torch (F.layer_norm /
    F.rms_norm over dim 1, fp32 statistics) and record their calls."""
    calls = []

    def layer_norm_2d(x, weight=None, bias=None, eps=1e-6):
        calls.append("layer_norm_2d")
        return F.layer_norm(x.movedim(1, -1), x.shape[1:2], weight, bias, eps).movedim(-1, 1)

    def rms_norm_2d(x, weight=None, eps=None):
        calls.append("rms_norm_2d")
        return F.rms_norm(x.movedim(1, -1), x.shape[1:2], weight, eps).movedim(-1, 1)

    monkeypatch.setitem(_adapters.CHANNELS_FIRST_KERNELS, "layer_norm_2d", layer_norm_2d)
    monkeypatch.setitem(_adapters.CHANNELS_FIRST_KERNELS, "rms_norm_2d", rms_norm_2d)
    return calls


def test_without_a_registered_kernel_they_wait_and_with_one_it_runs(monkeypatch):
    cases = ("timm-LayerNorm2d", "timm-LayerNormAct2d", "timm-RmsNorm2dFp32",
             "torchvision-LayerNorm2d", "transformers-4.55-ConvNextLayerNorm")
    model = _randomize(nn.Sequential(*(CASES[c][0]() for c in cases)))
    ref = copy.deepcopy(model)
    for kernel in ("layer_norm_2d", "rms_norm_2d"):
        monkeypatch.delitem(_adapters.CHANNELS_FIRST_KERNELS, kernel)
    fastnorm.convert(model)
    report = fastnorm.convert_report(model)
    assert not report.converted and len(report.left_alone) == len(cases)
    for name, _cls, reason in report.left_alone:
        kernel = "rms_norm_2d" if cases[int(name)].startswith("timm-Rms") else "layer_norm_2d"
        assert f"no channels-first kernel (fastnorm.{kernel})" in reason, reason
        assert "register_convert" in reason
    calls = _recording_kernels(monkeypatch)
    fastnorm.convert(model)
    assert len(fastnorm.convert_report(model).converted) == len(cases)
    calls.clear()  # (the probes of convert ran them too)
    x = torch.randn(2, C, 5, 3)
    with fastnorm.use_backend("reference"):
        torch.testing.assert_close(model(x), ref(x))
    assert calls == ["layer_norm_2d", "layer_norm_2d", "rms_norm_2d", "layer_norm_2d",
                     "layer_norm_2d"]


def _result(module, x):
    """module(x), or the error it raises."""
    try:
        return module(x)
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("case,shape,dtype", [
    # not (N, C, H, W): timm's permute(0, 2, 3, 1) raises; the mean/var forms' own broadcasting
    # normalizes an unbatched (C, H, W) input over H
    ("timm-LayerNorm2d", (C, 4, 3), torch.float32),
    ("transformers-VitDetLayerNorm", (C, 4, 3), torch.float32),
    ("transformers-4.55-ConvNextLayerNorm", (C, 4, 3), torch.float32),
    # computed in the input's dtype by the library: only fp32 runs the kernel
    ("timm-RmsNorm2d", (2, C, 4, 3), torch.bfloat16),
    ("transformers-VitDetLayerNorm", (2, C, 4, 3), torch.float16),
    # float64 computed in fp32 by the library
    ("timm-LayerNorm2dFp32", (2, C, 4, 3), torch.float64),
    ("transformers-4.55-ConvNextLayerNorm", (2, C, 4, 3), torch.float64),
], ids=lambda v: v if isinstance(v, str) else str(v))
def test_the_library_code_runs_where_the_kernel_would_not_reproduce_it(case, shape, dtype,
                                                                       monkeypatch):
    norm = _randomize(CASES[case][0]()).to(dtype)
    ref = copy.deepcopy(norm)
    fastnorm.convert(norm)
    assert type(norm) is not type(ref)
    calls = _recording_kernels(monkeypatch)
    x = torch.randn(shape).to(dtype)
    with fastnorm.use_backend("triton"):
        want, got = _result(ref, x), _result(norm, x)
    if case == "timm-LayerNorm2d":
        assert isinstance(want, RuntimeError) and "permute" in str(want)
        assert type(got) is type(want) and str(got) == str(want)
    else:
        assert torch.equal(got, want)
    assert calls == []


class OverAllDimsLayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d but normalizing over (C, H, W): another reduction."""

    def forward(self, x):
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


class WrongPermuteLayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d with the wrong inverse permutation."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 2, 1)
        return x


class NoBiasLayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d that drops its bias."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, None, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class NotTimmLayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d code outside timm: its fast_layer_norm would be someone else's."""

    forward = lib.LayerNorm2d.forward


for _cls in (OverAllDimsLayerNorm2d, WrongPermuteLayerNorm2d, NoBiasLayerNorm2d):
    _cls.__module__ = "torchvision.models.convnext"
NotTimmLayerNorm2d.__module__ = "mylib.layers"


def test_left_alone_with_the_reason(device):
    fast_ln, fast_rms = lib.LayerNorm2d(C), lib.RmsNorm2d(C)
    fast_ln._fast_norm = fast_rms._fast_norm = True  # timm.layers.set_fast_norm() before
    not_timm = NotTimmLayerNorm2d(C)
    not_timm._fast_norm = False
    odd_format = lib.ConvNextLayerNormV455(C, data_format="channels_first")
    odd_format.data_format = "channels_middle"
    model = _randomize(nn.Sequential(
        fast_ln, fast_rms, not_timm, OverAllDimsLayerNorm2d(C), WrongPermuteLayerNorm2d(C),
        NoBiasLayerNorm2d(C), lib.ConvNextLayerNorm2dV054(C), odd_format)).to(device)
    reference = copy.deepcopy(model)
    fastnorm.convert(model)
    report = fastnorm.convert_report(model)
    assert not report.converted
    why = {name: reason for name, _cls, reason in report.left_alone}
    assert list(why) == [str(i) for i in range(len(model))]
    assert "timm's fast-norm mode is on" in why["0"] and "timm's fast-norm mode is on" in why["1"]
    for name in "23456":  # timm's forms are timm's; other formulas; timm 0.5.4's unbiased var
        assert "none of the forms fastnorm recognizes" in why[name], why[name]
        assert "register_convert" in why[name]
    assert "unknown data_format 'channels_middle'" in why["7"]
    assert [type(m) for m in model] == [type(m) for m in reference]
    # their outputs stay theirs (ConvNextLayerNorm2dV054's on a channels-last input: the
    # unbiased variance)
    x = _layout(torch.randn(2, C, 4, 4, device=device), "channels_last")
    with fastnorm.use_backend("triton"):
        for m, r in zip(model[2:7], reference[2:7]):
            assert torch.equal(m(x), r(x))


@pytest.mark.parametrize("make,family", [
    (lambda: _transformers("convnext", "ConvNextLayerNorm")(C, data_format="channels_last"),
     "LayerNorm (torch's)"),
    (lambda: lib.ConvNextLayerNormV455(C, data_format="channels_last"),
     "LayerNorm (torch's F.layer_norm)"),
    (lambda: lib.ConvNextLayerNormV422(C, data_format="channels_last"),
     "LayerNorm (torch's F.layer_norm)"),
], ids=["transformers", "transformers-4.55", "transformers-4.22"])
def test_channels_last_data_format_converts_as_a_layer_norm_over_the_last_dim(make, family,
                                                                              device):
    norm = _randomize(make()).to(device)
    ref = copy.deepcopy(norm)
    fastnorm.convert(norm)
    assert fastnorm.convert_report(norm).families[""] == family
    x = torch.randn(2, 5, 3, C, device=device)  # (N, H, W, C)
    want, want_g = _outputs_and_grads(ref, x)
    with fastnorm.use_backend("triton"):
        got, got_g = _outputs_and_grads(norm, x)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)
