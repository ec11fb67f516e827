"""Channels-first LayerNorm effective bandwidth: fastnorm.layer_norm_2d (Triton) against the
permute formulation (`F.layer_norm(x.permute(0, 2, 3, 1), (C,), w, b).permute(0, 3, 1, 2)`,
what timm's and torchvision's LayerNorm2d run), timm's `LayerNorm2d` module when timm is
importable, and torch.compile of the permute formulation (GPU, first shape only).

Cases: the ConvNeXt stage shapes 64x96x56x56, 64x192x28x28, 64x384x14x14, 64x768x7x7, bf16
and fp32, NCHW and channels-last (NHWC) inputs; modes fwd, fwdbwd and bwd (the backward alone,
of one forward run before the timing). Ideal bytes (weights and statistics ignored):
  forward          read x + write y                 = 2 * numel * elem_size
  backward (bwd)   read x + read dy + write dx      = 3 * numel * elem_size
  forward+backward both                             = 5 * numel * elem_size
The upstream gradient dy has the layout each provider's output has (fastnorm keeps the
input's; the permute formulation returns channels-last strides), as a following layer would
give it. fastnorm's backend is selected once around the timing, not inside the timed call.

    python benchmarks/bench_layer_norm_2d.py [--quick] [--out DIR] [--providers torch,timm]

--quick (the default on a CPU) runs one tiny shape: on a CPU the fastnorm provider runs
through the Triton interpreter (TRITON_INTERPRET=1), which shows that it runs, not its speed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

import fastnorm  # noqa: E402

SHAPES = [(64, 96, 56, 56), (64, 192, 28, 28), (64, 384, 14, 14), (64, 768, 7, 7)]
QUICK_SHAPES = [(2, 24, 6, 6)]
DTYPES = [torch.bfloat16, torch.float32]
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}
EPS = 1e-6

Ln2dFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _permuted(x, w, b):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, EPS).permute(0, 3, 1, 2)


def _fastnorm(x, w, b):
    return fastnorm.layer_norm_2d(x, w, b, EPS)


def _timm_fn() -> Optional[Ln2dFn]:
    """timm's LayerNorm2d module (fast norm off, its default), called as a module, computing
    with the case's own weight and bias tensors (so their gradients are those timed)."""
    if importlib.util.find_spec("timm") is None:
        return None
    from timm.layers import LayerNorm2d

    modules: dict = {}  # (weight, bias) objects -> the module using them (kept alive here)

    def fn(x, w, b):
        key = (id(w), id(b))
        if key not in modules:
            m = LayerNorm2d(x.shape[1], eps=EPS)
            del m.weight, m.bias  # plain attributes instead: the leaves themselves
            m.weight, m.bias = w, b
            modules[key] = m
        return modules[key](x)
    return fn


def providers(device: torch.device, first_case: bool) -> dict[str, Ln2dFn]:
    """Name -> fn(x, weight, bias), for the providers available here."""
    out: dict[str, Ln2dFn] = {"torch": _permuted}
    if device.type == "cuda" and first_case:
        out["torch.compile"] = torch.compile(_permuted, dynamic=False)
    timm_fn = _timm_fn()
    if timm_fn is not None:
        out["timm"] = timm_fn
    if "triton" in fastnorm.available_backends():
        out["fastnorm-triton"] = _fastnorm
    return out


def _bench_case(run: _harness.Run, args, shape: tuple, dtype: torch.dtype, layout: str,
                first_case: bool) -> None:
    device = run.device
    torch.manual_seed(0)
    n, c, h, w_ = shape
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    w = torch.randn(c, device=device, dtype=dtype)
    b = torch.randn(c, device=device, dtype=dtype)
    size = x.numel() * x.element_size()
    case = "x".join(str(d) for d in shape)
    for name, fn in providers(device, first_case).items():
        if not _harness.wanted(args, name):
            continue
        backend = "triton" if name.startswith("fastnorm") else None
        common = dict(op="layer_norm_2d", case=case, provider=name, dtype=dtype, layout=layout,
                      backend=backend)
        with torch.no_grad():
            _harness.run_case(run, mode="fwd", ideal_bytes=2 * size,
                              fn=lambda fn=fn: fn(x, w, b), **common)
        with torch.no_grad(), (fastnorm.use_backend(backend) if backend
                               else contextlib.nullcontext()):
            # dy in the layout of this provider's output (what the next layer would hand back)
            dy = torch.empty_like(fn(x, w, b)).normal_()
        for mode, ideal, make in (("fwdbwd", 5 * size, _harness.forward_backward),
                                  ("bwd", 3 * size, _harness.backward_only)):
            leaves = [t.detach().requires_grad_() for t in (x, w, b)]
            _harness.run_case(run, mode=mode, ideal_bytes=ideal,
                              fn=make(lambda fn=fn, lv=leaves: fn(*lv), dy),
                              grad_to_none=leaves, **common)


def main(argv=None) -> _harness.Run:
    args = _harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = _harness.start(args)
    shapes = QUICK_SHAPES if run.quick else SHAPES
    first = True
    for shape in shapes:
        for dtype in DTYPES:
            for layout in LAYOUTS:
                _bench_case(run, args, shape, dtype, layout, first)
                first = False
                _harness.write_results(run, args.out, "layer_norm_2d")  # a killed run keeps rows
    _harness.finish(run, args, "layer_norm_2d")
    return run


if __name__ == "__main__":
    main()
