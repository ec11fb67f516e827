"""`python -m fastnorm`: self-check the kernels against torch, then a quick benchmark.

On a CUDA machine the Triton kernels run compiled and the benchmarks use the anchor shapes; on a
CPU-only machine the kernels run through Triton's interpreter (the process re-executes itself with
TRITON_INTERPRET=1) on small shapes, where torch is of course faster - fastnorm's "auto" backend
uses torch's own ops for CPU tensors.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch


def _reexec_with_interpreter() -> None:
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if importlib.util.find_spec("triton") is None:
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "fastnorm", *sys.argv[1:]], env)


def self_check(device: torch.device) -> bool:
    """fastnorm (Triton) vs torch, forward and backward, a few shapes and dtypes."""
    import torch.nn.functional as F

    import fastnorm

    cases = [("layer_norm", (64, 1000)), ("layer_norm", (4, 8, 256)), ("rms_norm", (33, 1024)),
             ("layer_norm", (2, 70000))]
    dtypes = [torch.float32, torch.bfloat16]
    ok = True
    print(f"self-check on {device}: fastnorm-triton vs torch (max abs error, fwd / dx / dweight)")
    for op, shape in cases:
        for dtype in dtypes:
            torch.manual_seed(0)
            n = shape[-1]
            x = torch.randn(shape, device=device, dtype=dtype)
            w = torch.randn(n, device=device, dtype=dtype)
            dy = torch.randn(shape, device=device, dtype=dtype)
            results = []
            for impl in ("fastnorm", "torch64"):
                cast = torch.float64 if impl == "torch64" else dtype
                xi = x.detach().to(cast).requires_grad_()
                wi = w.detach().to(cast).requires_grad_()
                if impl == "fastnorm":
                    with fastnorm.use_backend("triton"):
                        fn = fastnorm.layer_norm if op == "layer_norm" else fastnorm.rms_norm
                        y = fn(xi, (n,), wi)
                else:
                    eps = {} if op == "layer_norm" else {"eps": torch.finfo(dtype).eps}
                    fn = F.layer_norm if op == "layer_norm" else F.rms_norm
                    y = fn(xi, (n,), wi, **eps)
                y.backward(dy.to(y.dtype))
                results.append((y, xi.grad, wi.grad))
            errs = [(a.double() - b).abs().max().item() for a, b in zip(*results)]
            scale = [b.abs().max().item() for b in results[1]]
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            good = all(e <= tol * max(1.0, s) for e, s in zip(errs, scale))
            ok &= good
            print(f"  {op:10s} {str(tuple(shape)):14s} {str(dtype)[6:]:8s} "
                  + " / ".join(f"{e:.1e}" for e in errs) + ("  ok" if good else "  FAIL"))
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnorm", description=__doc__.splitlines()[0])
    parser.add_argument("--no-bench", action="store_true", help="self-check only")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_results"),
                        help="folder for benchmark CSV/JSON (default $OUT or bench_results)")
    args = parser.parse_args(argv)
    _reexec_with_interpreter()

    import fastnorm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"fastnorm {fastnorm.__version__}, torch {torch.__version__}, backends available: "
          f"{fastnorm.available_backends()}")
    if "triton" not in fastnorm.available_backends():
        print("Triton is not available here; nothing of fastnorm's own to check.")
        return 1
    ok = self_check(device)
    print("self-check:", "passed" if ok else "FAILED")
    bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "benchmarks")
    if not args.no_bench:
        if not os.path.isdir(bench_dir):
            print(f"benchmarks/ not found next to the package ({bench_dir}); run from a clone")
        else:
            sys.path.insert(0, bench_dir)
            import bench_layer_norm

            bench_argv = ["--out", args.out] + (["--quick"] if device.type == "cpu" else [])
            bench_layer_norm.main(bench_argv)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
