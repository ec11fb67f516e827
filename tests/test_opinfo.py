"""PyTorch's own OpInfo samples for F.layer_norm / rms_norm / group_norm / batch_norm, run
through fastnorm's functional API on every kernel set: outputs, gradients of every input that
requires grad, and the running statistics torch updates, against torch's call on the same
sample. The samples include what torch's authors found worth testing: N = 1, empty batches,
eps < 0, momentum < 0, no affine, and (`noncontiguous`) every tensor as a strided view."""
import pytest
import torch
import torch.nn.functional as F

import fastnorm

_frozen = torch.backends.flags_frozen()
common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations",
    reason="PyTorch's OpInfo database needs the expecttest package (pip install -e '.[test]')")
if not _frozen and torch.backends.flags_frozen():
    # torch's test helpers freeze cudnn's global flags on import (torch's own suite wants that);
    # other tests of this process set them (benchmarks/bench_models.py turns TF32 off).
    # (the flag lives in the globals of torch/backends/__init__.py's functions)
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    assert not torch.backends.flags_frozen()

OPS = {op.name: op for op in common_methods_invocations.op_db
       if op.variant_test_name == "" and op.name in (
           "nn.functional.layer_norm", "nn.functional.rms_norm", "nn.functional.group_norm",
           "nn.functional.batch_norm")}
FASTNORM = {"nn.functional.layer_norm": fastnorm.layer_norm,
            "nn.functional.rms_norm": fastnorm.rms_norm,
            "nn.functional.group_norm": fastnorm.group_norm,
            "nn.functional.batch_norm": fastnorm.batch_norm}
TORCH = {"nn.functional.layer_norm": F.layer_norm, "nn.functional.rms_norm": F.rms_norm,
         "nn.functional.group_norm": F.group_norm, "nn.functional.batch_norm": F.batch_norm}
# Per-dtype slack on top of "no further from the float64 result than twice torch's error":
# fp32 results are fp32 sums of up to ~10^4 terms.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _clone(v, dtype=None):
    """A leaf copy of a sample argument that keeps its strides (running stats are mutated, and
    each side needs its own leaves for its gradients); `dtype`: the float64 reference's copy."""
    if not isinstance(v, torch.Tensor):
        return v
    c = torch.empty_strided(v.shape, v.stride(), dtype=dtype or v.dtype, device=v.device)
    c.copy_(v.detach())
    return c.requires_grad_(v.requires_grad)


def _run(fn, sample, dtype=None):
    x = _clone(sample.input, dtype)
    args = [_clone(a, dtype) for a in sample.args]
    kwargs = {k: _clone(v, dtype) for k, v in sample.kwargs.items()}
    y = fn(x, *args, **kwargs)
    leaves = [t for t in [x, *args, *kwargs.values()]
              if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = []
    if leaves and y.numel():
        dy = torch.Generator(device=y.device).manual_seed(0)
        dy = torch.randn(y.shape, generator=dy, device=y.device, dtype=sample.input.dtype)
        dy = dy.to(y.dtype)
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    elif leaves:  # empty: every gradient is zeros (torch: zeros for weight and bias)
        grads = torch.autograd.grad(y.sum(), leaves, allow_unused=True)
    buffers = [t for t in [*args, *kwargs.values()]
               if isinstance(t, torch.Tensor) and not t.requires_grad]
    return y, grads, buffers


@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_opinfo_samples_match_torch(name, dtype, layout, device, backend):
    checked = 0
    samples = list(OPS[name].reference_inputs(device, dtype, requires_grad=True))
    for i, sample in enumerate(samples):
        if layout == "noncontiguous":
            sample = sample.noncontiguous()
        want = _run(TORCH[name], sample)
        got = _run(FASTNORM[name], sample)
        ref = _run(TORCH[name], sample, torch.float64)
        where = f"sample {i}: input {tuple(sample.input.shape)}, args " \
            f"{[tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in sample.args]}, " \
            f"kwargs {sample.kwargs}"
        assert got[0].dtype == want[0].dtype and got[0].shape == want[0].shape, where
        pairs = [(got[0], want[0], ref[0], "y")]
        pairs += [(g, w, r, f"grad {j}") for j, (g, w, r) in enumerate(zip(*(o[1] for o in (
            got, want, ref))))]
        pairs += [(g, w, r, f"buffer {j}") for j, (g, w, r) in enumerate(zip(*(o[2] for o in (
            got, want, ref))))]
        for g, w, r, what in pairs:
            if w is None:
                assert g is None or not g.any(), (where, what)
                continue
            assert g is not None and g.shape == w.shape, (where, what)
            # Where torch's result is NaN/Inf (eps < 0), fastnorm's is too.
            assert torch.equal(g.isnan(), w.isnan()), (where, what)
            assert torch.equal(g.isinf(), w.isinf()) and torch.equal(g[g.isinf()], w[w.isinf()]), \
                (where, what)
            fin = w.isfinite()
            g, w, r = g[fin].double(), w[fin].double(), r[fin]
            # Norm-wise relative slack: a reduction (dW, dB over thousands of terms) can cancel
            # to an element far smaller than its terms, and its rounding is the terms' scale.
            scale = r.abs().max() if r.numel() else 0
            bound = 2 * (w - r).abs() + TOL[dtype]["atol"] + TOL[dtype]["rtol"] * scale
            bad = (g - r).abs() > bound
            assert not bad.any(), f"{where}, {what}: fastnorm {g[bad].tolist()[:4]}, torch " \
                f"{w[bad].tolist()[:4]}, float64 {r[bad].tolist()[:4]}"
        checked += 1
    assert checked == len(samples) > 0
