"""LayerNorm / RMSNorm effective bandwidth: fastnorm-triton vs torch eager, torch.compile, and
Liger / Apex / QuACK when importable; and the fused residual add + norm (y = norm(x + r), h = x + r
returned) vs torch's unfused `h = x + r; norm(h)`.

Ideal bytes (weights, biases, mean/rstd ignored, as in anchors-h100.md):
  forward          read x + write y                         = 2 * numel * elem_size
  backward (bwd)   read x + read dy + write dx              = 3 * numel * elem_size
  forward+backward both                                     = 5 * numel * elem_size
  residual forward read x, r + write y, h                   = 4 * numel * elem_size
  residual bwd     read h, dy, dh + write dx (dr is dx)     = 4 * numel * elem_size
What is timed is the call alone: fastnorm's backend is selected outside the timed closure (the
harness's `backend=`), bwd times only the backward of one forward run beforehand, and each result
records the device kernel launches of one call. Provider fastnorm-triton-gns (bwd mode only): the
backward with fastnorm.gns.track's per-example squared dW/dB norms (rows viewed as 32 examples,
or gcd(M, 32)), for rows the whole-row backward takes (N <= 8192).

    python benchmarks/bench_layer_norm.py            # anchor shapes on a GPU, tiny ones on CPU
    python benchmarks/bench_layer_norm.py --quick --out /tmp/bench
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

import fastnorm  # noqa: E402

# (kind, M, N, dtype): the anchor table's LayerNorm/RMSNorm rows.
GPU_CASES = [
    ("layer_norm", 32768, 1024, torch.bfloat16),
    ("layer_norm", 16384, 4096, torch.bfloat16),
    ("layer_norm", 16384, 5120, torch.bfloat16),
    ("layer_norm", 8192, 8192, torch.bfloat16),
    ("layer_norm", 4096, 16384, torch.bfloat16),
    ("layer_norm", 1024, 65536, torch.bfloat16),
    ("layer_norm", 16384, 4096, torch.float32),
    ("rms_norm", 32768, 1024, torch.bfloat16),
    ("rms_norm", 16384, 4096, torch.bfloat16),
    ("rms_norm", 8192, 8192, torch.bfloat16),
    ("rms_norm", 4096, 16384, torch.bfloat16),
    ("rms_norm", 1024, 65536, torch.bfloat16),
]
# Fused residual add + norm (transformer pre-norm blocks): h = x + r, y = norm(h), at the
# anchor shapes; the torch baseline is the unfused `h = x + r; norm(h)`.
RESIDUAL_CASES = [
    ("rms_norm", 16384, 4096, torch.bfloat16),
    ("layer_norm", 16384, 4096, torch.bfloat16),
    ("rms_norm", 4096, 16384, torch.bfloat16),
]
CPU_CASES = [
    ("layer_norm", 256, 1024, torch.float32),
    ("rms_norm", 256, 1024, torch.float32),
    ("layer_norm", 64, 4096, torch.bfloat16),
]
CPU_RESIDUAL_CASES = [("rms_norm", 256, 1024, torch.float32)]


def _torch_fn(kind: str) -> Callable:
    if kind == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)
    return lambda x, w, b: F.rms_norm(x, (x.shape[-1],), w, 1e-6)


def _fastnorm_fn(kind: str) -> Callable:
    # No backend selection here: run_case enters it once, outside the timed calls.
    def fn(x, w, b):
        if kind == "layer_norm":
            return fastnorm.layer_norm(x, (x.shape[-1],), w, b)
        return fastnorm.rms_norm(x, (x.shape[-1],), w, 1e-6)
    return fn


def _residual_fns(kind: str) -> dict[str, Callable]:
    """Name -> fn(x, r, w, b) returning (y, h): torch unfused and fastnorm fused."""
    def unfused(x, r, w, b):
        h = x + r
        return _torch_fn(kind)(h, w, b), h

    def fused(x, r, w, b):
        if kind == "layer_norm":
            return fastnorm.layer_norm(x, (x.shape[-1],), w, b, residual=r, prenorm=True)
        return fastnorm.rms_norm(x, (x.shape[-1],), w, 1e-6, residual=r, prenorm=True)

    out = {"torch": unfused}
    if "triton" in fastnorm.available_backends():
        out["fastnorm-triton"] = fused
    return out


def _liger_fn(kind: str) -> Optional[Callable]:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    if kind == "layer_norm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return lambda x, w, b: LigerRMSNormFunction.apply(x, w, 1e-6)


def _apex_fn(kind: str) -> Optional[Callable]:
    if importlib.util.find_spec("apex") is None:
        return None
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

    if kind == "layer_norm":
        return lambda x, w, b: fused_layer_norm_affine(x, w, b, (x.shape[-1],), 1e-5)
    return lambda x, w, b: fused_rms_norm_affine(x, w, (x.shape[-1],), 1e-6)


def _quack_fn(kind: str) -> Optional[Callable]:
    # QuACK's API moves between releases; a mismatch is recorded as that provider's error.
    if importlib.util.find_spec("quack") is None:
        return None
    import quack.rmsnorm as quack_norm

    if kind == "layer_norm":
        return lambda x, w, b: quack_norm.layernorm(x, w, bias=b, eps=1e-5)
    return lambda x, w, b: quack_norm.rmsnorm(x, w, eps=1e-6)


# torch.compile recompiles per shape (tens of seconds each): it runs where the anchor table has it.
COMPILE_CASES = {(16384, 4096, torch.bfloat16)}


def providers(kind: str, device: torch.device, case: tuple) -> dict[str, Callable]:
    """Name -> fn(x, weight, bias), for the providers available here."""
    out: dict[str, Callable] = {"torch": _torch_fn(kind)}
    triton_ok = "triton" in fastnorm.available_backends()
    if triton_ok:
        out["fastnorm-triton"] = _fastnorm_fn(kind)
    if "cuda" in fastnorm.available_backends():  # the CUDA C++ kernels (fastnorm._C)
        out["fastnorm-cuda"] = _fastnorm_fn(kind)
    if device.type == "cuda":
        if case in COMPILE_CASES:
            out["torch.compile"] = torch.compile(_torch_fn(kind), dynamic=False)
        for name, make in (("liger", _liger_fn), ("apex", _apex_fn), ("quack", _quack_fn)):
            fn = make(kind)
            if fn is not None:
                out[name] = fn
    return out


def _backend(name: str) -> Optional[str]:
    """The backend a provider runs under, selected by run_case outside the timed calls."""
    return {"fastnorm-triton": "triton", "fastnorm-cuda": "cuda"}.get(name)


def _bench_norm(run: _harness.Run, args, kind: str, m: int, n: int, dtype: torch.dtype) -> None:
    device = run.device
    torch.manual_seed(0)
    x = torch.randn(m, n, device=device, dtype=dtype)
    w = torch.randn(n, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype) if kind == "layer_norm" else None
    dy = torch.randn(m, n, device=device, dtype=dtype)
    size = x.numel() * x.element_size()
    case = f"{m}x{n}"
    for name, fn in providers(kind, device, (m, n, dtype)).items():
        if not _harness.wanted(args, name):
            continue
        common = dict(op=kind, case=case, provider=name, dtype=dtype, layout="",
                      backend=_backend(name))
        with torch.no_grad():
            _harness.run_case(run, mode="fwd", ideal_bytes=2 * size,
                              fn=lambda fn=fn: fn(x, w, b), **common)
        for mode, ideal, make in (("fwdbwd", 5 * size, _harness.forward_backward),
                                  ("bwd", 3 * size, _harness.backward_only)):
            leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
            xg, wg = leaves[0], leaves[1]
            bg = leaves[2] if b is not None else None
            _harness.run_case(run, mode=mode, ideal_bytes=ideal,
                              fn=make(lambda fn=fn, xg=xg, wg=wg, bg=bg: fn(xg, wg, bg), dy),
                              grad_to_none=leaves, **common)
    if "triton" in fastnorm.available_backends() and _harness.wanted(args, GNS_PROVIDER):
        _bench_gns_bwd(run, kind, x, w, b, dy, size, case)


# The backward with per-example squared dW/dB norms on (fastnorm.gns.track's mode:
# fastnorm::layer_norm_bwd_pe), bwd mode only; the rows are viewed as GNS_EXAMPLES examples.
GNS_PROVIDER = "fastnorm-triton-gns"
GNS_EXAMPLES = 32


def _bench_gns_bwd(run: _harness.Run, kind: str, x, w, b, dy, size: int, case: str) -> None:
    m, n = x.shape
    examples = math.gcd(m, GNS_EXAMPLES)
    sink = torch.zeros(4, device=x.device, requires_grad=True)
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    xg, wg = leaves[0], leaves[1]
    bg = leaves[2] if b is not None else None
    eps = 1e-5 if kind == "layer_norm" else 1e-6

    def fn():
        return fastnorm.functional._norm_with_gns(xg.view(examples, m // examples, n), (n,), wg,
                                                  bg, eps, kind == "rms_norm", sink)
    _harness.run_case(run, mode="bwd", ideal_bytes=3 * size,
                      fn=_harness.backward_only(fn, dy.view(examples, m // examples, n)),
                      grad_to_none=leaves + [sink], op=kind, case=case, provider=GNS_PROVIDER,
                      dtype=x.dtype, layout="", backend="triton")


def _bench_residual(run: _harness.Run, args, kind: str, m: int, n: int,
                    dtype: torch.dtype) -> None:
    """add + norm: fastnorm's fused op vs torch's unfused add then norm (y and h both used
    downstream, so the backward gets dy and dh)."""
    device = run.device
    torch.manual_seed(0)
    x, r, dy, dh = (torch.randn(m, n, device=device, dtype=dtype) for _ in range(4))
    w = torch.randn(n, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype) if kind == "layer_norm" else None
    size = x.numel() * x.element_size()
    for name, fn in _residual_fns(kind).items():
        if not _harness.wanted(args, name):
            continue
        # Named as the static cost report names the case, so --compare pairs them.
        common = dict(op=kind, case=f"{m}x{n} +res", provider=name, dtype=dtype, layout="",
                      backend=_backend(name))
        with torch.no_grad():
            _harness.run_case(run, mode="fwd", ideal_bytes=4 * size,
                              fn=lambda fn=fn: fn(x, r, w, b), **common)
        for mode, ideal, make in (("fwdbwd", 8 * size, _harness.forward_backward_multi),
                                  ("bwd", 4 * size, _harness.backward_only_multi)):
            leaves = [t.detach().requires_grad_() for t in (x, r, w, b) if t is not None]
            bg = leaves[3] if b is not None else None
            _harness.run_case(
                run, mode=mode, ideal_bytes=ideal,
                fn=make(lambda fn=fn, lv=leaves, bg=bg: fn(lv[0], lv[1], lv[2], bg), (dy, dh)),
                grad_to_none=leaves, **common)


def main(argv=None) -> _harness.Run:
    args = _harness.parser(__doc__.splitlines()[0]).parse_args(argv)
    run = _harness.start(args)
    cpu_quick = run.quick and run.device.type == "cpu"
    for kind, m, n, dtype in (CPU_CASES if cpu_quick else GPU_CASES):
        _bench_norm(run, args, kind, m, n, dtype)
        _harness.write_results(run, args.out, "layer_norm")  # a killed run keeps what it has
    for kind, m, n, dtype in (CPU_RESIDUAL_CASES if cpu_quick else RESIDUAL_CASES):
        _bench_residual(run, args, kind, m, n, dtype)
        _harness.write_results(run, args.out, "layer_norm")
    _harness.finish(run, args, "layer_norm")
    return run


if __name__ == "__main__":
    main()
