"""Public API: backend control, drop-in modules, state_dict compatibility, convert()."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastnorm
from fastnorm import _backend


def test_backend_names_and_context_manager():
    assert fastnorm.get_backend() == "auto"
    assert "torch" in fastnorm.available_backends()
    with fastnorm.use_backend("torch"):
        assert fastnorm.get_backend() == "torch"
        with fastnorm.use_backend("triton"):
            assert fastnorm.get_backend() == "triton"
        assert fastnorm.get_backend() == "torch"
    assert fastnorm.get_backend() == "auto"
    fastnorm.set_backend("torch")
    try:
        assert fastnorm.get_backend() == "torch"
    finally:
        fastnorm.set_backend("auto")


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        fastnorm.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        with fastnorm.use_backend("fast"):
            pass


def test_unavailable_cuda_backend_says_why():
    # Without fastnorm._C (not built, or no GPU), forcing the CUDA C++ backend must explain.
    from fastnorm import cuda

    reason = cuda.unavailable_reason()
    if reason is None:
        assert "cuda" in fastnorm.available_backends()
        return
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: " + re.escape(reason)):
        fastnorm.set_backend("cuda")
    assert "cuda" not in fastnorm.available_backends()


def test_auto_uses_torch_for_cpu_tensors():
    x = torch.randn(3, 4)
    assert _backend.resolve(x, "layer_norm") == "torch"
    if torch.cuda.is_available():
        assert _backend.resolve(x.cuda(), "layer_norm") == "triton"


def test_cpu_tensor_on_triton_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(3, 4)
    monkeypatch.setattr(_backend, "_current", "triton")
    with pytest.raises(RuntimeError, match="backend 'triton' runs on CUDA tensors.*TRITON_INTERPRET"):
        fastnorm.layer_norm(x, (4,))


def test_env_variable_selects_backend():
    code = "import fastnorm; print(fastnorm.get_backend())"
    env = dict(os.environ, FASTNORM_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "torch", out.stderr
    # A bad value does not break the import; the first op (or get_backend) says what is wrong.
    env["FASTNORM_BACKEND"] = "bogus"
    code = ("import fastnorm, torch; print('imported', flush=True); "
            "fastnorm.layer_norm(torch.randn(2, 4), (4,))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "imported", out.stderr
    assert out.returncode != 0 and "FASTNORM_BACKEND='bogus'" in out.stderr


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_modules_match_torch_nn(backend, device):
    torch.manual_seed(0)
    for ref, ours in [(nn.LayerNorm((4, 6)), fastnorm.nn.LayerNorm((4, 6))),
                      (nn.LayerNorm(6, elementwise_affine=False), fastnorm.nn.LayerNorm(6, elementwise_affine=False)),
                      (nn.LayerNorm(6, bias=False), fastnorm.nn.LayerNorm(6, bias=False)),
                      (nn.RMSNorm(6), fastnorm.nn.RMSNorm(6)),
                      (nn.RMSNorm([4, 6], eps=1e-3), fastnorm.nn.RMSNorm([4, 6], eps=1e-3))]:
        assert isinstance(ours, type(ref))
        assert repr(ours) == "fastnorm." + repr(ref)  # the same text, marked as fastnorm's
        ours.load_state_dict(ref.state_dict())
        ref, ours = ref.to(device), ours.to(device)
        for p in ref.parameters():
            with torch.no_grad():
                p.normal_()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(5, 4, 6, device=device)
        with fastnorm.use_backend(backend):
            torch.testing.assert_close(ours(x), ref(x))


def test_state_dict_round_trip_both_ways():
    for ref_cls, our_cls in [(nn.LayerNorm, fastnorm.nn.LayerNorm), (nn.RMSNorm, fastnorm.nn.RMSNorm)]:
        ref, ours = ref_cls(8), our_cls(8)
        assert list(ref.state_dict()) == list(ours.state_dict())
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
        ours.load_state_dict(ref.state_dict())
        back = ref_cls(8)
        back.load_state_dict(ours.state_dict())
        for a, b in zip(ref.state_dict().values(), back.state_dict().values()):
            assert torch.equal(a, b)


def test_constructor_defaults_match_torch():
    for kwargs in [dict(), dict(eps=1e-6), dict(elementwise_affine=False), dict(bias=False),
                   dict(dtype=torch.float64)]:
        ref, ours = nn.LayerNorm(10, **kwargs), fastnorm.nn.LayerNorm(10, **kwargs)
        assert ref.state_dict().keys() == ours.state_dict().keys()
        for a, b in zip(ref.state_dict().values(), ours.state_dict().values()):
            assert torch.equal(a, b) and a.dtype == b.dtype
    assert fastnorm.nn.RMSNorm(10).eps is None


class _Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.LayerNorm(dim, bias=False))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_convert_transformer_block(triton_backend, device):
    torch.manual_seed(0)
    block = _Block().to(device)
    ref = _Block().to(device)
    ref.load_state_dict(block.state_dict())
    params_before = {name: p for name, p in block.named_parameters()}
    converted = fastnorm.convert(block)
    assert converted is block
    assert type(block.norm1) is fastnorm.nn.LayerNorm and type(block.norm2) is fastnorm.nn.RMSNorm
    assert type(block.mlp[3]) is fastnorm.nn.LayerNorm
    assert all(p is params_before[n] for n, p in block.named_parameters())
    x = torch.randn(2, 5, 32, device=device)
    y, y_ref = block(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (n, p), p_ref in zip(block.named_parameters(), ref.parameters()):
        # fp32 sums in another order: error relative to the gradient's scale, not per element.
        scale = p_ref.grad.abs().max().item()
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=2e-6 * scale, msg=n)
    assert fastnorm.convert(block) is block  # idempotent
    assert type(block.norm1) is fastnorm.nn.LayerNorm


def test_convert_top_level_norm_and_leaves_subclasses_alone():
    ln = nn.LayerNorm(4)
    assert fastnorm.convert(ln) is ln and type(ln) is fastnorm.nn.LayerNorm

    class MyNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    m = nn.Sequential(MyNorm(4))
    fastnorm.convert(m)
    assert type(m[0]) is MyNorm
