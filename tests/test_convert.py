"""fastnorm.convert on real model classes: torch.nn norms, transformers' RMSNorm variants (tiny
random-weight models built from configs, no download), register_convert, convert_report, repr."""
import copy
import os

import pytest
import torch
from torch import nn

import fastnorm


@pytest.fixture(autouse=True)
def _on_test_device(device):
    """Tensors made without a device land on the test device (CUDA on a GPU machine)."""
    with torch.device(device):
        yield


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(16)
        self.rms = nn.RMSNorm(16)
        self.inorm = nn.InstanceNorm1d(4)


class _MyLayerNorm(nn.LayerNorm):  # torch's forward: swapped like nn.LayerNorm
    def extra_repr(self):
        return "mine, " + super().extra_repr()


class _MyDeeperLayerNorm(_MyLayerNorm):
    pass


class _MyBatchNorm(nn.BatchNorm2d):
    def __init__(self, channels):
        super().__init__(channels, momentum=None)


class _OwnForwardLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


def test_torch_modules_report_repr_and_state():
    model = nn.Sequential(_Block(), _MyLayerNorm(16), nn.GroupNorm(2, 4), _OwnForwardLayerNorm(16))
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert fastnorm.convert(model) is model
    assert fastnorm.nn.convert is fastnorm.convert
    assert {n: p for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys
    assert repr(model[0].ln).startswith("fastnorm.LayerNorm((16,)")
    assert repr(model[1]).startswith("fastnorm._MyLayerNorm(mine, (16,)")
    assert repr(model[2]).startswith("fastnorm.GroupNorm(2, 4")
    report = fastnorm.convert_report(model)
    assert [n for n, _ in report.converted] == ["0.ln", "0.rms", "1", "2"]
    assert report.families["1"] == ("a subclass of torch.nn.modules.normalization.LayerNorm "
                                    "with torch's forward")
    why = {name: reason for name, _cls, reason in report.left_alone}
    assert set(why) == {"0.inorm", "3"}
    assert "no kernel" in why["0.inorm"]
    assert "subclass of torch.nn.modules.normalization.LayerNorm with its own forward" in why["3"]
    assert "register_convert" in why["3"]
    assert "converted 1 fastnorm.LayerNorm, 1 fastnorm.RMSNorm, 1 fastnorm._MyLayerNorm, " \
           "1 fastnorm.GroupNorm" in str(report)


@pytest.mark.parametrize("make", [lambda: _MyLayerNorm(16), lambda: _MyDeeperLayerNorm(16),
                                  lambda: _MyBatchNorm(16)], ids=["sub", "subsub", "bn"])
def test_torch_subclass_keeping_torch_forward_is_swapped(make, device):
    import io

    torch.manual_seed(0)
    module = make()
    ref = copy.deepcopy(module)
    hook_calls = []
    hook = module.register_forward_hook(lambda *args: hook_calls.append(1))
    params, keys = list(module.parameters()), list(module.state_dict())
    base = type(module)
    fastnorm.convert(module)
    fast_base = {nn.LayerNorm: fastnorm.nn.LayerNorm, nn.BatchNorm2d: fastnorm.nn.BatchNorm2d}
    assert isinstance(module, base) and type(module) is not base
    assert isinstance(module, fast_base[next(b for b in base.__mro__ if b in fast_base)])
    assert list(module.parameters()) == params and list(module.state_dict()) == keys
    assert fastnorm.convert(module) is module and type(fastnorm.convert(module)) is type(module)
    assert type(fastnorm.convert(make())) is type(module)  # one class per subclass, cached
    x = torch.randn(4, 16, 3, 3) if isinstance(module, nn.BatchNorm2d) else torch.randn(4, 16)
    with fastnorm.use_backend("triton"):
        got = module(x)
    torch.testing.assert_close(got, ref(x))
    assert hook_calls == [1]
    if isinstance(module, nn.BatchNorm2d):  # momentum=None: the cumulative average, as torch's
        torch.testing.assert_close(module.running_var, ref.running_var)
        assert module.num_batches_tracked == ref.num_batches_tracked == 1
    hook.remove()  # (a local lambda does not pickle)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(module) and type(copy.deepcopy(module)) is type(module)


def test_block_holding_norms_is_not_reported_as_one():
    class ConvNormAct(nn.Module):  # "Norm" in the name, but a block: its LayerNorm is the norm
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(8, 8, 1)
            self.norm = _OwnForwardLayerNorm(8)

        def forward(self, x):
            return self.norm(self.conv(x).transpose(1, 2))

    class PixelNorm(nn.Module):  # a norm fastnorm does not know: reported
        def forward(self, x):
            return x / x.pow(2).mean(1, keepdim=True).sqrt()

    model = nn.Sequential(ConvNormAct(), PixelNorm())
    fastnorm.convert(model)
    why = {name: reason for name, _cls, reason in fastnorm.convert_report(model).left_alone}
    assert set(why) == {"0.norm", "1"} and "none of the forms" in why["1"]


def test_forward_set_on_the_instance_is_left_alone():
    # accelerate's hooks and kernels' kernelize replace forward on the instance, where a class
    # swap changes nothing: such a module is reported, not counted as converted
    norm = nn.LayerNorm(8)
    norm.forward = lambda x: x
    model = nn.Sequential(norm, nn.LayerNorm(8))
    fastnorm.convert(model)
    assert type(model[0]) is nn.LayerNorm and type(model[1]) is fastnorm.nn.LayerNorm
    (name, _cls, reason), = fastnorm.convert_report(model).left_alone
    assert name == "0" and "set on the instance" in reason


def test_register_convert_and_log(caplog):
    class Scale(nn.Module):  # "Norm" nowhere in the name: not reported until registered
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return x * self.weight

    class MyNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(n))

        def forward(self, x):
            return torch.nn.functional.rms_norm(x, x.shape[-1:], self.weight, 1e-6)

    class FastMyNorm(MyNorm):
        def forward(self, x):
            return fastnorm.rms_norm(x, x.shape[-1:], self.weight, 1e-6)

    def factory(m):
        if m.weight.numel() < 4:
            return "too narrow"
        m.__class__ = FastMyNorm
        return m

    model = nn.Sequential(MyNorm(8), MyNorm(2), Scale())
    report = fastnorm.convert_report(model)
    assert [n for n, _c, _r in report.left_alone] == ["0", "1"]
    assert "register_convert" in report.left_alone[0][2]
    fastnorm.register_convert(MyNorm, factory)
    with caplog.at_level("INFO", logger="fastnorm"):
        fastnorm.convert(model)
    assert "left alone 1 norm-like module" in caplog.text
    assert type(model[0]) is FastMyNorm and type(model[1]) is MyNorm
    assert fastnorm.convert_report(model).left_alone[0][2] == "too narrow"
    with pytest.raises(TypeError, match="nn.Module subclass"):
        fastnorm.register_convert(int, factory)


def test_class_whose_source_cannot_be_read_is_left_alone():
    # Named and placed like a transformers class; its source exists nowhere (exec'd)
    ns = {}
    exec("class LlamaRMSNorm(nn.Module):\n"
         "    def __init__(self, n):\n"
         "        super().__init__()\n"
         "        self.weight = nn.Parameter(torch.ones(n))\n"
         "        self.variance_epsilon = 1e-6\n"
         "    def forward(self, hidden_states):\n"
         "        input_dtype = hidden_states.dtype\n"
         "        hidden_states = hidden_states.to(torch.float32)\n"
         "        variance = hidden_states.pow(2).mean(-1, keepdim=True)\n"
         "        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)\n"
         "        return self.weight * hidden_states.to(input_dtype)\n",
         {"nn": nn, "torch": torch, "__name__": "transformers.models.fake"}, ns)
    model = nn.Sequential(ns["LlamaRMSNorm"](8))
    fastnorm.convert(model)
    assert type(model[0]) is ns["LlamaRMSNorm"]
    (name, _cls, reason), = fastnorm.convert_report(model).left_alone
    assert "source of its forward cannot be read" in reason and "register_convert" in reason


# --- transformers --------------------------------------------------------------------------------

class RenamedRMSNorm(nn.Module):
    """A user's RMSNorm computing exactly what Llama's does, under other names (class,
    attributes, variables), with annotations, a docstring, comments and other spellings."""

    def __init__(self, size: int, epsilon: float = 1e-6) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))
        self.epsilon = epsilon

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalize the last dim in fp32, round, scale."""
        original: torch.dtype = inputs.dtype
        inputs = inputs.to(dtype=torch.float32)  # = .to(torch.float32)
        ms = inputs.pow(2).mean(-1, keepdim=True)
        inputs = inputs * torch.rsqrt(ms + self.epsilon)
        return self.scale * inputs.to(original)


# family -> (config class, model class, config overrides, its norm class, fastnorm family)
_TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "LlamaRMSNorm", "A"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, "MistralRMSNorm", "A"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "Qwen2RMSNorm", "A"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, "Qwen3RMSNorm", "A"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, "Phi3RMSNorm", "A"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}, "GraniteRMSNorm", "A"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    # every token to both experts: routing cannot flip between runs
                    dict(moe_intermediate_size=16, n_routed_experts=2, num_experts_per_tok=2,
                         n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=16,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                         first_k_dense_replace=1), "DeepseekV3RMSNorm", "A"),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {"head_dim": 8}, "Glm4RMSNorm", "A"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}, "SmolLM3RMSNorm", "A"),
    "renamed": ("LlamaConfig", "LlamaForCausalLM", {}, "RenamedRMSNorm", "A"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}, "GemmaRMSNorm", "B"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}, "Gemma3RMSNorm", "B"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "Olmo2RMSNorm", "C"),
    "helium": ("HeliumConfig", "HeliumForCausalLM", {"head_dim": 8}, "HeliumRMSNorm", "C"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}, "OlmoLayerNorm", "E"),
    "t5": ("T5Config", "T5ForConditionalGeneration", None, "T5LayerNorm", "D"),
}
_FAMILY_TEXT = {"A": "RMSNorm family A (Llama-style)", "B": "RMSNorm family B (Gemma-style, 1 + w)",
                "C": "RMSNorm family C (weight multiplied in fp32)",
                "D": "RMSNorm family D (T5-style)", "E": "LayerNorm computed in fp32"}


def _tiny(family):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config_cls, model_cls, extra, norm_cls, _ = _TINY[family]
    torch.manual_seed(0)
    if extra is None:  # T5
        cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                    num_heads=4, decoder_start_token_id=0)
    else:
        cfg = getattr(transformers, config_cls)(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            pad_token_id=0, **extra)
    model = getattr(transformers, model_cls)(cfg)
    if family == "renamed":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child).__name__ == "LlamaRMSNorm":
                    setattr(parent, name, RenamedRMSNorm(child.weight.shape[0],
                                                         child.variance_epsilon))
    # Random norm weights around 1 (Gemma's 1 + w around 0): a weight rule that is wrong shows.
    with torch.no_grad():
        for m in model.modules():
            for p in m.parameters(recurse=False) if type(m).__name__ == norm_cls else ():
                p.normal_(0.0 if _TINY[family][4] == "B" else 1.0, 0.5)
    return model, norm_cls


def _logits_and_grads(model, ids):
    model.zero_grad()
    kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    logits = model(input_ids=ids, **kwargs).logits
    logits.float().square().mean().backward()
    return logits, [p.grad.float() for p in model.parameters() if p.grad is not None]


FAMILIES = list(_TINY)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_model(family, dtype):
    model, norm_cls = _tiny(family)
    model = model.to(dtype).eval()  # eval: no dropout (T5 has some); backward still runs
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = list(model.parameters())
    fastnorm.convert(model)
    report = fastnorm.convert_report(model)
    norms = [n for n, m in ref.named_modules() if type(m).__name__ == norm_cls]
    assert [n for n, _ in report.converted] == norms and not report.left_alone, str(report)
    assert {report.families[n] for n in norms} == {_FAMILY_TEXT[_TINY[family][4]]}
    assert list(model.state_dict()) == keys and list(model.parameters()) == params
    norm_type = type(dict(ref.named_modules())[norms[0]])
    assert all(isinstance(dict(model.named_modules())[n], norm_type) for n in norms)
    ids = torch.randint(0, 64, (2, 7))
    want, want_g = _logits_and_grads(ref, ids)
    if ids.device.type == "cpu":  # "auto" on CPU runs torch, the model's own code: bitwise
        got, got_g = _logits_and_grads(model, ids)
        assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(got_g, want_g))
    with fastnorm.use_backend("triton"):
        got, got_g = _logits_and_grads(model, ids)
    # fp32: the kernels' sums run in another order than torch's. bf16: the same roundings as the
    # model (x_hat to bf16 before the weight multiply, for Llama/T5), but Triton's CPU
    # interpreter truncates fp32 -> bf16 where a GPU rounds to nearest, so a few outputs differ
    # by one bf16 ulp here and the logits by a few.
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(got, want, **tol)
    assert len(got_g) == len(want_g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **(dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32
                                            else dict(atol=0.1, rtol=0.1)))


def _norm_module(family, dtype):
    model, norm_cls = _tiny(family)
    norm = next(m for m in model.modules() if type(m).__name__ == norm_cls).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(0, 1)
    return norm, norm_cls


def _ulps(a, b, dtype):
    """|a - b| in units of the dtype's spacing at b (an upper bound)."""
    spacing = b.float().abs().clamp_min(torch.finfo(dtype).tiny) * torch.finfo(dtype).eps
    return (a.float() - b.float()).abs() / spacing


# The families whose x_hat is rounded to the input dtype before the weight multiply.
_ROUNDS_X_HAT = ("llama", "t5")


@pytest.mark.parametrize("family", ["llama", "gemma", "t5", "olmo2", "helium"])
def test_transformers_norm_rounding_fp16(family):
    """One norm module in fp16, where the CPU interpreter rounds like a GPU: forward and weight
    gradient bitwise equal to the module's own code (the plain RMSNorm kernel is not, for
    Llama/T5: the x_hat rounding matters; for OLMo2/Helium, fp32 throughout, it is), dx within
    one ulp in nearly all elements (T5's own backward rounds its two dx terms separately: so
    does fastnorm's for T5)."""
    norm, norm_cls = _norm_module(family, torch.float16)
    ref = copy.deepcopy(norm)
    torch.manual_seed(1)
    x = (torch.randn(256, 32) * 3).half()
    dy = torch.randn(256, 32).half()
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    fastnorm.convert(norm)
    assert repr(norm).startswith(f"fastnorm.{norm_cls}(")
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with fastnorm.use_backend("triton"):
        got = norm(xs[0])
        w = (1.0 + norm.weight.float()) if family == "gemma" else norm.weight
        plain = fastnorm.rms_norm(x, (32,), w.detach(), eps)
    want = ref(xs[1])
    got.backward(dy)
    want.backward(dy)
    # sums run in another order than torch's: allow a rare one-ulp flip
    assert (got != want).float().mean() <= 1e-3 and (_ulps(got, want, torch.float16) <= 1).all()
    if family in _ROUNDS_X_HAT:
        assert (plain != want).float().mean() > 0.1
    else:
        assert (plain != want).float().mean() <= 1e-3
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad, atol=0, rtol=2e-3)
    dx_ulps = _ulps(xs[0].grad, xs[1].grad, torch.float16)
    assert (xs[0].grad != xs[1].grad).float().mean() <= 2e-3
    if family == "t5":  # a flipped rounding of one of T5's two dx terms: an ulp of that term
        scale = xs[1].grad.abs().max() * torch.finfo(torch.float16).eps
        assert ((xs[0].grad - xs[1].grad).abs() <= 2 * scale).all()
    else:
        assert (dx_ulps <= 1).all()


@pytest.mark.parametrize("family", ["llama", "gemma", "t5", "olmo2"])
def test_transformers_norm_module_bf16(family):
    """bf16: within 2 ulps of the module's own code on CPU (Triton's interpreter truncates
    fp32 -> bf16 where a GPU rounds to nearest, so bitwise needs a GPU); the x_hat rounding is
    taken for Llama/T5 and not for Gemma."""
    norm, _ = _norm_module(family, torch.bfloat16)
    torch.manual_seed(1)
    x = (torch.randn(64, 32) * 3).bfloat16()
    want = norm(x)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    fastnorm.convert(norm)
    with fastnorm.use_backend("triton"):
        got = norm(x)
        w = (1.0 + norm.weight.float()) if family == "gemma" else norm.weight
        plain = fastnorm.rms_norm(x, (32,), w.detach(), eps)
    assert got.dtype == want.dtype and (_ulps(got, want, torch.bfloat16) <= 2).all()
    assert torch.equal(got, plain) == (family not in _ROUNDS_X_HAT)


def test_explain():
    x = torch.randn(4, 8)
    info = fastnorm.explain(x, "rms_norm")
    assert info["backend"] == "torch" and "cpu" in info["reason"] and info["selected"] == "auto"
    with fastnorm.use_backend("triton"):
        info = fastnorm.explain(x, "layer_norm")
    assert info["backend"] == "triton" and "'triton' was selected" in info["reason"]
    with pytest.raises(ValueError, match="unknown op"):
        fastnorm.explain(x, "instance_norm")


def test_transformers_compile_fullgraph():
    model, _ = _tiny("llama")
    model.eval()
    fastnorm.convert(model)
    ids = torch.randint(0, 64, (2, 7))
    with fastnorm.use_backend("triton"):
        want, want_g = _logits_and_grads(model, ids)
        # (use_cache=False: no DynamicCache, which older torch releases cannot trace)
        compiled = torch.compile(lambda i: model(input_ids=i, use_cache=False).logits,
                                 fullgraph=True, backend="aot_eager")
        model.zero_grad()
        got = compiled(ids)
        got.float().square().mean().backward()
    torch.testing.assert_close(got, want)
    for a, b in zip([p.grad for p in model.parameters() if p.grad is not None], want_g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["t5", "llama", "olmo2", "gemma"])
def test_transformers_fp32_weight_with_bf16_input(family):
    """bf16 input with an fp32 weight: Llama's and T5's output is fp32 (type promotion), and the
    adapter leaves such calls to the model's own forward, whatever the backend; OLMo2's and
    Gemma's is bf16 (cast at the end), and the kernel computes it (within an ulp or two of the
    model's code under the CPU interpreter, which truncates where a GPU rounds)."""
    model, norm_cls = _tiny(family)
    norm = next(m for m in model.modules() if type(m).__name__ == norm_cls)
    ref = copy.deepcopy(norm)
    fastnorm.convert(norm)
    x = torch.randn(3, 32).bfloat16()
    with fastnorm.use_backend("triton"):
        got = norm(x)
    want = ref(x)
    if family in _ROUNDS_X_HAT:
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    else:
        assert got.dtype == want.dtype == torch.bfloat16
        assert (_ulps(got, want, torch.bfloat16) <= 2).all()


def test_converted_transformers_model_pickles():
    import io

    model, _ = _tiny("qwen2")
    model.eval()
    fastnorm.convert(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert fastnorm.convert_report(loaded).summary() == fastnorm.convert_report(model).summary()
    ids = torch.randint(0, 64, (1, 5))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert type(copy.deepcopy(model).model.norm) is type(model.model.norm)
