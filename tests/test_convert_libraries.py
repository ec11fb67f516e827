"""fastnorm.convert on timm's and diffusers' norm layers (recognized by their forward's code,
fastnorm/_forms.py), on look-alikes that compute something else (never converted), and on the
fingerprint itself. Where timm and diffusers are not installed, the layers of
tests/library_layers.py stand in for theirs (same attribute names, same forward code); where
they are, the last tests run the real ones. (Channels-first layers, timm's, torchvision's and
transformers': test_convert_channels_first.py.)"""
import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
import library_layers as lib
from helpers import assert_close_ref
from fastnorm import _adapters, _forms
from fastnorm._fingerprint import fingerprint


@pytest.fixture(autouse=True)
def _on_test_device(device):
    """Tensors made without a device land on the test device (CUDA on a GPU machine)."""
    with torch.device(device):
        yield


def _outputs_and_grads(model, x):
    x = x.detach().clone().requires_grad_()
    model.zero_grad()
    y = model(x)
    y_acc = y if y.dtype == torch.float64 else y.float()
    (y_acc * torch.linspace(-1, 1, y.numel(), dtype=y_acc.dtype).view(y.shape)).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return y, [x.grad, *grads]


def _assert_same_model(model, ref, x, dtype):
    """The converted model against the unconverted one: bitwise where torch runs (the "auto"
    backend on a CPU calls torch's ops or the library's own code); with fastnorm's Triton
    kernels, outputs and gradients as close to a float64 run of the unconverted model as the
    unconverted model's own (helpers.assert_close_ref: 2x its error + the dtype's slack)."""
    ref64 = copy.deepcopy(ref).double()
    want, want_g = _outputs_and_grads(ref, x)
    want64, want64_g = _outputs_and_grads(ref64, x.double())
    if x.device.type == "cpu":
        got, got_g = _outputs_and_grads(model, x)
        assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_g, want_g))
    with fastnorm.use_backend("triton"):
        got, got_g = _outputs_and_grads(model, x)
    assert got.dtype == want.dtype and len(got_g) == len(want_g) == len(want64_g)
    assert_close_ref(got, want64, want, "output")
    for i, (a, b64, b) in enumerate(zip(got_g, want64_g, want_g)):
        assert a.dtype == b.dtype
        assert_close_ref(a, b64, b, f"gradient {i}")


def _randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


# --- timm ----------------------------------------------------------------------------------------

def _timm_like_rows():
    return nn.Sequential(lib.LayerNorm(16), lib.RmsNorm(16), lib.LayerNormFp32(16),
                         lib.LayerNormAct(16, act="gelu"), lib.RmsNorm(16, affine=False))


def _timm_like_channels():
    return nn.Sequential(lib.BatchNormAct2d(16), lib.GroupNorm(16, 4), lib.GroupNorm1(16),
                         lib.GroupNormAct(16, 4, act="silu"), lib.BatchNormAct2d(16, act="silu"),
                         lib.GroupNormAct(16, 4, act="relu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows", "channels"])
def test_timm_layers_convert_and_compute_what_timm_does(layout, dtype):
    torch.manual_seed(0)
    model = _randomize(_timm_like_rows() if layout == "rows" else _timm_like_channels())
    model = model.to(dtype)
    ref = copy.deepcopy(model)
    keys, params = list(model.state_dict()), list(model.parameters())
    fastnorm.convert(model)
    report = fastnorm.convert_report(model)
    assert len(report.converted) == len(model) and not report.left_alone, str(report)
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    for module, original in zip(model, ref):
        assert isinstance(module, type(original)) and type(module) is not type(original)
        assert repr(module).startswith("fastnorm." + type(original).__name__)
    x = torch.randn(6, 5, 16) if layout == "rows" else torch.randn(6, 16, 5, 3)
    _assert_same_model(model, ref, x.to(dtype), dtype)
    assert fastnorm.convert(model) is model  # idempotent
    assert fastnorm.convert_report(model).converted == report.converted


def test_timm_activation_fused_where_the_kernel_has_it(monkeypatch):
    calls = []
    for name in ("batch_norm", "group_norm"):
        real = getattr(_adapters.F_fast, name)
        monkeypatch.setattr(_adapters.F_fast, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(
                                (_name, k.get("activation"))) or _real(*a, **k))
    model = nn.Sequential(lib.BatchNormAct2d(8, act="relu"), lib.BatchNormAct2d(8, act="silu"),
                          lib.BatchNormAct2d(8, act="relu", drop=True),
                          lib.GroupNormAct(8, 4, act="silu"), lib.GroupNormAct(8, 4, act="relu"))
    fastnorm.convert(model)
    model.eval()  # (Dropout off: the unfused path is checked for its order, not its noise)
    ref_calls = [(type(m.act).__name__, type(m.drop).__name__) for m in model]
    model(torch.randn(2, 8, 3, 3))
    assert calls == [("batch_norm", "relu"), ("batch_norm", None), ("batch_norm", None),
                     ("group_norm", "silu"), ("group_norm", None)], ref_calls
    families = fastnorm.convert_report(model).families
    assert families["0"] == "BatchNorm2d + act: ReLU fused into the kernel"
    assert families["1"] == "BatchNorm2d + act: SiLU after the kernel, unfused"
    assert families["2"] == "BatchNorm2d + act: ReLU after the kernel, unfused, after Dropout"
    assert families["3"] == "GroupNorm + act: SiLU fused into the kernel"


def test_timm_batch_norm_act_momentum_none_eval_and_rank_check():
    torch.manual_seed(0)
    model = _randomize(lib.BatchNormAct2d(8))
    model.momentum = None
    ref = copy.deepcopy(model)
    fastnorm.convert(model)
    x = torch.randn(4, 8, 3, 3)
    with fastnorm.use_backend("triton"):
        for _ in range(2):   # cumulative average over two batches
            torch.testing.assert_close(model(x), ref(x))
        torch.testing.assert_close(model.running_mean, ref.running_mean)
        torch.testing.assert_close(model.running_var, ref.running_var)
        assert model.num_batches_tracked == ref.num_batches_tracked == 2
        model.eval(), ref.eval()
        torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(AssertionError, match=r"expected 4D input \(got 3D input\)"):
        model(torch.randn(4, 8, 3))


def test_timm_fast_norm_mode_and_other_modules_are_left_alone():
    fast = lib.LayerNorm(8)
    fast._fast_norm = True            # timm.layers.set_fast_norm() before building the model
    old_flag = lib.GroupNorm1(8)
    old_flag.fast_norm = True         # timm < 1.0.13's attribute name
    elsewhere = type("LayerNorm", (nn.LayerNorm,), {"forward": lib.LayerNorm.forward,
                                                    "__module__": "mylib.layers"})(8)
    elsewhere._fast_norm = False
    model = nn.Sequential(fast, old_flag, elsewhere)
    fastnorm.convert(model)
    assert [type(m) for m in model] == [lib.LayerNorm, lib.GroupNorm1, type(elsewhere)]
    why = {name: reason for name, _cls, reason in fastnorm.convert_report(model).left_alone}
    assert "timm's fast-norm mode is on" in why["0"] and "timm's fast-norm mode is on" in why["1"]
    assert "none of the forms" in why["2"]  # timm's forms are timm's classes only


def test_converted_timm_layers_pickle_and_copy(monkeypatch):
    import sys
    import types

    # pickle finds a class by its module: make timm's module paths lead to the stand-ins
    for name in ("timm", "timm.layers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for name in ("timm.layers.norm", "timm.layers.norm_act"):
        monkeypatch.setitem(sys.modules, name, lib)
    model = nn.Sequential(lib.LayerNorm(8), lib.RmsNorm(8), lib.BatchNormAct2d(8))
    fastnorm.convert(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert [type(m) for m in copy.deepcopy(model)] == [type(m) for m in model]
    x = torch.randn(2, 8)
    assert torch.equal(loaded[0](x), model[0](x))


# --- diffusers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", ["weight", "weight+bias", "none"])
def test_diffusers_rms_norm(affine, dtype):
    torch.manual_seed(0)
    norm = lib.RMSNorm(16, eps=1e-6, elementwise_affine=affine != "none",
                       bias=affine == "weight+bias")
    norm = _randomize(norm).to(dtype)
    ref = copy.deepcopy(norm)
    fastnorm.convert(norm)
    assert fastnorm.convert_report(norm).families[""] == "RMSNorm family D (T5-style)"
    x = (torch.randn(64, 16) * 3).to(dtype)
    _assert_same_model(norm, ref, x, dtype)
    if dtype == torch.float16 and affine != "none":
        # fp16, where the CPU interpreter rounds like a GPU: the forward is T5's, rounding for
        # rounding (x_hat to fp16, times w in fp16, + bias in fp16)
        with fastnorm.use_backend("triton"), torch.no_grad():
            assert (norm(x) != ref(x)).float().mean() <= 1e-2


@pytest.mark.parametrize("params", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [lib.FP32LayerNorm, lib.LayerNormFp32])
def test_fp32_layer_norms(cls, params):
    torch.manual_seed(0)
    norm = _randomize(cls(16)).to(params)
    ref = copy.deepcopy(norm)
    fastnorm.convert(norm)
    assert fastnorm.convert_report(norm).families[""] == "LayerNorm computed in fp32"
    for dtype in (torch.float32, torch.bfloat16):
        _assert_same_model(norm, ref, torch.randn(8, 16).to(dtype), dtype)


def test_float64_input_runs_the_library_code():
    # The fp32 forms compute float64 input in fp32; fastnorm leaves such calls to them.
    norm = _randomize(lib.RMSNorm(16, eps=1e-6)).double()
    ref = copy.deepcopy(norm)
    fastnorm.convert(norm)
    x = torch.randn(4, 16, dtype=torch.float64)
    with fastnorm.use_backend("triton"):
        assert torch.equal(norm(x), ref(x))


# --- look-alikes: other computations are never converted ------------------------------------------

class OffsetInWeightDtypeRMSNorm(nn.Module):
    """Gemma's form, but 1 + w added in the weight's dtype (then cast)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n) * 0.5)
        self.eps = 1e-6

    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        output = self._norm(x.float())
        output = output * (1.0 + self.weight).float()
        return output.type_as(x)


class SumNotMeanRMSNorm(nn.Module):
    """Llama's form with a sum for the mean (an L2 norm)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).sum(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class ExtraBiasRMSNorm(SumNotMeanRMSNorm):
    """Llama's form plus a bias."""

    def __init__(self, n):
        super().__init__(n)
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype) + self.bias


class EpsOutsideRMSNorm(SumNotMeanRMSNorm):
    """Llama's form with eps added after the rsqrt."""

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * (torch.rsqrt(variance) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rms_norm(x, normalized_shape, weight=None, eps=1e-5):
    """Not torch's F.rms_norm: scales by the mean absolute value (as a stand-in for a library's
    own helper of the same name)."""
    x = x / (x.abs().mean(-1, keepdim=True) + eps)
    return x if weight is None else x * weight


class OwnRmsNormHelper(lib.RmsNorm):
    """timm's RmsNorm form, where `rms_norm` names another function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast_norm:
            x = lib.fast_rms_norm(x, self.normalized_shape, self.weight, self.eps)
        else:
            x = rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return x


OwnRmsNormHelper.__module__, OwnRmsNormHelper.__name__ = "timm.layers.norm", "RmsNorm"


@pytest.mark.parametrize("cls", [OffsetInWeightDtypeRMSNorm, SumNotMeanRMSNorm, ExtraBiasRMSNorm,
                                 EpsOutsideRMSNorm, OwnRmsNormHelper])
def test_look_alike_computing_something_else_is_left_alone(cls):
    # (channels-first look-alikes: test_convert_channels_first.py)
    torch.manual_seed(0)
    module = _randomize(cls(8)).bfloat16()
    x = torch.randn(4, 3, 8).bfloat16()
    want = module(x)
    fastnorm.convert(module)
    assert type(module) is cls
    (_name, _cls, reason), = fastnorm.convert_report(module).left_alone
    assert "none of the forms fastnorm recognizes" in reason and "register_convert" in reason
    with fastnorm.use_backend("triton"):
        assert torch.equal(module(x), want)


def test_fingerprint_unifies_spellings_and_resolves_globals():
    class A(nn.Module):
        def forward(self, x):
            y = torch.nn.functional.rms_norm(x.float(), (8,), self.w, self.e)
            return y.type_as(x)

    class B(nn.Module):
        def forward(self, hidden):
            """Same computation, other names and spellings."""
            out: torch.Tensor = F.rms_norm(hidden.to(dtype=torch.float32), (8,), self.g,
                                           self.eps)
            return out.to(hidden.dtype)

    class C(nn.Module):
        def forward(self, hidden):
            out = rms_norm(hidden.to(torch.float32), (8,), self.g, self.eps)  # not torch's
            return out.to(hidden.dtype)

    a, b, c = fingerprint(A), fingerprint(B), fingerprint(C)
    assert a.text == b.text and a.attributes == ("w", "e") and b.attributes == ("g", "eps")
    assert c.text != b.text


class Folded(nn.Module):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class OneLine(nn.Module):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ReadTwice(nn.Module):  # y read twice: not folded
    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        return F.layer_norm(y, self.normalized_shape, self.weight, self.bias, self.eps) + y


class ReadTwiceInline(nn.Module):  # (what folding it would give: x.permute evaluated twice)
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps) + x.permute(0, 2, 3, 1)


class CallBefore(nn.Module):  # a call evaluated before the read: not folded
    def forward(self, x):
        y = x.float()
        return self.act(x) + y


class CallBeforeInline(nn.Module):
    def forward(self, x):
        return self.act(x) + x.float()


class ReadLater(nn.Module):  # y is read again after the next statement: not folded
    def forward(self, x):
        y = x.float()
        x = y * 2
        return x + y


class ReadLaterInline(nn.Module):
    def forward(self, x):
        x = x.float() * 2
        return x + y  # noqa: F821  (what folding would give: y unbound)


class InTry(nn.Module):  # a caught exception could see x between the two: not folded
    def forward(self, x):
        try:
            x = x.float()
            x = self.act(x)
        except RuntimeError:
            pass
        return x


class InTryInline(nn.Module):
    def forward(self, x):
        try:
            x = self.act(x.float())
        except RuntimeError:
            pass
        return x


def test_fingerprint_folds_single_use_assignments_only():
    assert fingerprint(Folded).text == fingerprint(OneLine).text
    assert fingerprint(Folded).attributes == ("normalized_shape", "weight", "bias", "eps")
    assert fingerprint(Folded).text == fingerprint(_forms.LayerNorm2d).text
    for kept, folded in ((ReadTwice, ReadTwiceInline), (CallBefore, CallBeforeInline),
                         (ReadLater, ReadLaterInline), (InTry, InTryInline)):
        assert fingerprint(kept).text != fingerprint(folded).text, kept.__name__


def test_fingerprint_names_timm_06_modules_by_their_later_path():
    # timm 0.6.11-0.6.13's LayerNorm2d calls timm.models.layers.fast_norm.fast_layer_norm,
    # which timm 0.9 moved to timm.layers.fast_norm: one form; a function elsewhere: another
    assert fingerprint(lib.LayerNorm2dV0613).text == fingerprint(lib.LayerNorm2d).text
    assert fingerprint(NotTimm06LayerNorm2d).text != fingerprint(lib.LayerNorm2d).text


fast_layer_norm_elsewhere = lib._timm_function("fast_layer_norm", "timm_models.layers.fast_norm")


class NotTimm06LayerNorm2d(lib.LayerNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        if self._fast_norm:
            x = fast_layer_norm_elsewhere(x, self.normalized_shape, self.weight, self.bias,
                                          self.eps)
        else:
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


def test_every_form_has_a_readable_fingerprint_and_is_unique():
    texts = [fingerprint(form.code).text for form in _forms.FORMS]
    assert len(set(texts)) == len(texts)


# --- the real libraries, where installed ----------------------------------------------------------

def test_real_diffusers_layers():
    normalization = pytest.importorskip("diffusers.models.normalization")
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(normalization.RMSNorm(16, eps=1e-6),
                                     normalization.RMSNorm(16, eps=1e-6, bias=True),
                                     normalization.FP32LayerNorm(16)))
    ref = copy.deepcopy(model)
    fastnorm.convert(model)
    report = fastnorm.convert_report(model)
    assert len(report.converted) == 3 and not report.left_alone, str(report)
    _assert_same_model(model, ref, torch.randn(4, 16), torch.float32)


@pytest.mark.parametrize("name,kwargs,converted", [
    # timm's LayerNorm in the blocks, as convnext_tiny; LayerNorm2d elsewhere
    ("convnext_atto", dict(conv_mlp=False), {"fastnorm.LayerNorm", "fastnorm.LayerNorm2d"}),
    ("convnext_atto", {}, {"fastnorm.LayerNorm2d"}),  # LayerNorm2d everywhere
    ("vit_tiny_patch16_224", {}, {"fastnorm.LayerNorm"}),
    ("mobilenetv3_small_100", {}, {"fastnorm.BatchNormAct2d"}),  # ReLU (fused), hard-swish
    ("efficientnet_b0", {}, {"fastnorm.BatchNormAct2d"}),        # SiLU
    ("resnetv2_50d_gn", {}, {"fastnorm.GroupNormAct"}),          # ReLU
    ("convnext_atto_rms", {}, {"fastnorm.RmsNorm2d"})],
    # sorted: a set's repr follows the hash seed, and xdist's workers must collect equal ids
    ids=lambda v: ",".join(sorted(v)) if isinstance(v, set) else str(v))
def test_real_timm_models(name, kwargs, converted):
    """Real timm models (where timm is installed, e.g. the GPU machines): the norms converted as
    expected, every other norm-like module left alone with the reason and how to add it, and
    the converted model's output and input gradient as close to a float64 run as timm's own
    (2x its error + the dtype's slack)."""
    timm = pytest.importorskip("timm")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    try:
        # (no dropout: the three runs must compute the same function; BatchNorm in training
        # mode, on the batch's statistics)
        model = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0,
                                  **kwargs)
    except RuntimeError as exc:  # a model this timm release does not have
        pytest.skip(f"timm {timm.__version__} has no {name}: {exc}")
    ref = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    fastnorm.convert(model)
    report = fastnorm.convert_report(model)
    print(f"timm {timm.__version__} {name} {kwargs}: {report.summary()}")
    assert {cls for _name, cls in report.converted} == converted, str(report)
    norm_like = [n for n, m in ref.named_modules() if "Norm" in type(m).__name__
                 and not any("Norm" in type(c).__name__ for c in m.children())]  # (not blocks)
    reported = {n for n, _ in report.converted} | {n for n, _c, _r in report.left_alone}
    assert reported >= set(norm_like), str(report)
    for _name, _cls, reason in report.left_alone:  # why, and how to add it
        assert "register_convert" in reason, str(report)
    x = torch.randn(2, 3, 224, 224)
    outs, grads = [], []
    for m, inp in ((model, x), (ref, x), (ref64, x.double())):
        inp = inp.clone().requires_grad_()
        out = m(inp)
        out.sum().backward()
        outs.append(out)
        grads.append(inp.grad)
    assert_close_ref(outs[0], outs[2], outs[1], "output")
    assert_close_ref(grads[0], grads[2], grads[1], "input gradient")
