"""GroupNorm benchmark: fastnorm's Triton kernels against torch eager, torch.compile and Liger.

Cases: the SD-UNet GroupNorm shapes of the anchor table (8x320x128^2, 8x640x64^2, 8x1280x32^2,
32x128x64^2, G=32), NCHW and NHWC, bf16 and fp32, plain and followed by SiLU; modes fwd and
fwdbwd, and bwd (the backward alone, of one forward run before the timing) (torch.compile only
at the first shape in bf16, as in the anchor table). Ideal bytes: fwd reads x and writes y
(2 * numel * elem_size); bwd reads x and dy and writes dx (3 * numel * elem_size); fwdbwd is
both (5 * numel * elem_size); weights and statistics are ignored. fastnorm's backend is
selected once around the timing, not inside the timed call.

    python benchmarks/bench_group_norm.py [--quick] [--out DIR] [--providers torch,liger]

Provider fastnorm-triton-gns (bwd mode only): the backward with fastnorm.gns.track's
per-example squared dW/dB norms (fastnorm::group_norm_bwd_pe), against fastnorm-triton's bwd
for its overhead.

--quick (the default on a CPU) uses tiny shapes. On a CPU the default providers are torch, plus
fastnorm-triton under TRITON_INTERPRET=1; --providers overrides.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness  # noqa: E402

import fastnorm  # noqa: E402
from fastnorm._backend import triton_interpreted  # noqa: E402

SHAPES = [((8, 320, 128, 128), 32), ((8, 640, 64, 64), 32), ((8, 1280, 32, 32), 32),
          ((32, 128, 64, 64), 32)]
# --quick: one small shape (the smoke test runs the fastnorm provider through the interpreter).
QUICK_SHAPES = [((2, 32, 8, 8), 8)]
DTYPES = [torch.bfloat16, torch.float32]
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}

_FASTNORM_BACKENDS = {"fastnorm-triton": "triton", "fastnorm-cuda": "cuda"}
GnFn = Callable[[torch.Tensor, int, torch.Tensor, torch.Tensor, Optional[str]], torch.Tensor]


def _torch_gn(x, groups, w, b, activation):
    y = F.group_norm(x, groups, w, b, 1e-5)
    return F.silu(y) if activation == "silu" else y


def _fastnorm_gn(x, groups, w, b, activation):
    return fastnorm.group_norm(x, groups, w, b, 1e-5, activation=activation)


def _liger_gn(x, groups, w, b, activation):
    from liger_kernel.ops.group_norm import LigerGroupNormFunction

    y = LigerGroupNormFunction.apply(x, w, b, x.shape[1], groups, 1e-5)
    return F.silu(y) if activation == "silu" else y


def providers(device: torch.device) -> dict[str, GnFn]:
    """The providers that can run on this device, by name."""
    found: dict[str, GnFn] = {"torch": _torch_gn,
                             "torch.compile": torch.compile(_torch_gn, dynamic=False)}
    if "triton" in fastnorm.available_backends():
        found["fastnorm-triton"] = _fastnorm_gn
    if "cuda" in fastnorm.available_backends():  # the CUDA C++ kernels (fastnorm._C)
        found["fastnorm-cuda"] = _fastnorm_gn
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        found["liger"] = _liger_gn
    return found


def default_providers(device: torch.device) -> list[str]:
    """What runs without --providers: everything on a GPU; on a CPU torch eager, and the
    interpreted kernels when TRITON_INTERPRET=1 (slow: that shows correctness, not speed)."""
    if device.type == "cuda":
        return list(providers(device))
    return ["torch", "fastnorm-triton"] if triton_interpreted() else ["torch"]


def _compile_case(run: _harness.Run, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """torch.compile recompiles for every shape, dtype, layout and activation (tens of seconds
    each on a GPU); outside --quick it runs where the anchor table has it: the first shape, bf16."""
    return run.quick or (shape == SHAPES[0][0] and dtype == torch.bfloat16)


# The backward with per-example squared dW/dB norms on (fastnorm.gns.track's mode:
# fastnorm::group_norm_bwd_pe; an example is a sample n), bwd mode only.
GNS_PROVIDER = "fastnorm-triton-gns"


def _bench_gns_bwd(run: _harness.Run, x, groups, w, b, dy, activation, case, layout,
                   elem_bytes) -> None:
    sink = torch.zeros(4, device=x.device, requires_grad=True)
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))

    def fn():
        return fastnorm.functional._group_norm_with_gns(xg, groups, wg, bg, 1e-5, activation,
                                                        sink)
    _harness.run_case(run, mode="bwd", ideal_bytes=3 * elem_bytes,
                      fn=_harness.backward_only(fn, dy), grad_to_none=[xg, wg, bg, sink],
                      op="group_norm", case=case, provider=GNS_PROVIDER, dtype=x.dtype,
                      layout=layout, backend="triton")


def main(argv: Optional[list[str]] = None) -> _harness.Run:
    args = _harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = _harness.start(args)
    device = run.device
    available = providers(device)
    names = args.providers.split(",") if args.providers else default_providers(device)
    chosen = {name: available[name] for name in names if name in available}
    for shape, groups in (QUICK_SHAPES if run.quick else SHAPES):
        for dtype in DTYPES:
            for layout, memory_format in LAYOUTS.items():
                x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=memory_format)
                dy = torch.randn_like(x)
                w = torch.ones(shape[1], device=device, dtype=dtype)
                b = torch.zeros(shape[1], device=device, dtype=dtype)
                elem_bytes = x.numel() * x.element_size()
                for activation in (None, "silu"):
                    case = "x".join(map(str, shape)) + f" G={groups}" + (
                        " +silu" if activation else "")
                    for name, gn in chosen.items():
                        if name == "torch.compile" and not _compile_case(run, shape, dtype):
                            continue
                        common = dict(op="group_norm", case=case, provider=name, dtype=dtype,
                                      layout=layout,
                                      backend=_FASTNORM_BACKENDS.get(name))
                        with torch.no_grad():
                            _harness.run_case(
                                run, mode="fwd", ideal_bytes=2 * elem_bytes,
                                fn=lambda gn=gn: gn(x, groups, w, b, activation), **common)
                        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
                        _harness.run_case(
                            run, mode="fwdbwd", ideal_bytes=5 * elem_bytes,
                            fn=_harness.forward_backward(
                                lambda gn=gn: gn(xg, groups, wg, bg, activation), dy),
                            grad_to_none=[xg, wg, bg], **common)
                        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
                        _harness.run_case(
                            run, mode="bwd", ideal_bytes=3 * elem_bytes,
                            fn=_harness.backward_only(
                                lambda gn=gn: gn(xg, groups, wg, bg, activation), dy),
                            grad_to_none=[xg, wg, bg], **common)
                    if "triton" in fastnorm.available_backends() and \
                            _harness.wanted(args, GNS_PROVIDER):
                        _bench_gns_bwd(run, x, groups, w, b, dy, activation, case, layout,
                                       elem_bytes)
                del x, dy
                # Results so far, in case the GPU check's time limit stops the script early.
                _harness.write_results(run, args.out, "group_norm")
    _harness.finish(run, args, "group_norm")
    return run


if __name__ == "__main__":
    main()
