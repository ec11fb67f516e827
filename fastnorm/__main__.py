"""`python -m fastnorm [check]`: self-check the kernels against torch, then a quick benchmark.
(`python -m fastnorm train ...` is `python -m fastnorm.train ...`, the trainer.)

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
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    from ._backend import _interpret_env  # Triton's own reading ("1", "true", "on", ...)

    if _interpret_env():
        return
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "fastnorm", *sys.argv[1:]], env)


def _check_cases():
    """(label, input shape, memory format, size of the weight, fastnorm fn, torch fn); each fn
    takes (x, weight). The torch fns run in float64 as the reference."""
    import torch.nn.functional as F

    import fastnorm

    cl = torch.channels_last

    def rms_eps(x):
        return {"eps": torch.finfo(torch.float32 if x.dtype == torch.float64 else x.dtype).eps}

    def bn(fn, relu):
        def run(x, w):
            y = fn(x, None, None, w, None, training=True)
            return F.relu(y) if relu else y
        return run

    return [
        ("layer_norm", (64, 1000), None, 1000,
         lambda x, w: fastnorm.layer_norm(x, (1000,), w), lambda x, w: F.layer_norm(x, (1000,), w)),
        ("layer_norm", (4, 8, 256), None, 256,
         lambda x, w: fastnorm.layer_norm(x, (256,), w), lambda x, w: F.layer_norm(x, (256,), w)),
        ("rms_norm", (33, 1024), None, 1024,
         lambda x, w: fastnorm.rms_norm(x, (1024,), w),
         lambda x, w: F.rms_norm(x, (1024,), w, **rms_eps(x))),
        ("layer_norm", (2, 70000), None, 70000,
         lambda x, w: fastnorm.layer_norm(x, (70000,), w), lambda x, w: F.layer_norm(x, (70000,), w)),
        ("group_norm+silu", (2, 64, 8, 8), None, 64,
         lambda x, w: fastnorm.group_norm(x, 8, w, activation="silu"),
         lambda x, w: F.silu(F.group_norm(x, 8, w))),
        ("group_norm NHWC", (2, 64, 8, 8), cl, 64,
         lambda x, w: fastnorm.group_norm(x, 8, w), lambda x, w: F.group_norm(x, 8, w)),
        ("batch_norm", (8, 16, 6, 6), None, 16,
         bn(fastnorm.batch_norm, False), bn(F.batch_norm, False)),
        ("batch_norm+relu NHWC", (8, 16, 6, 6), cl, 16,
         lambda x, w: fastnorm.batch_norm(x, None, None, w, None, True, activation="relu"),
         bn(F.batch_norm, True)),
    ]


def self_check(device: torch.device) -> bool:
    """fastnorm (Triton) vs torch in float64, forward and backward, a few shapes and dtypes."""
    import fastnorm

    ok = True
    print(f"self-check on {device}: fastnorm-triton vs torch in float64 "
          "(max abs error: y / dx / dweight)")
    for label, shape, memory_format, wsize, ours, ref in _check_cases():
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            x = torch.randn(shape, device=device)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            w = torch.rand(wsize, device=device) + 0.5
            dy = torch.randn(shape, device=device)
            results = []
            for impl, cast in ((ours, dtype), (ref, torch.float64)):
                xi = x.detach().to(cast).requires_grad_()
                wi = w.detach().to(cast).requires_grad_()
                with fastnorm.use_backend("triton"):
                    y = impl(xi, wi)
                y.backward(dy.to(cast))
                results.append((y, xi.grad, wi.grad))
            errs = [(a.double() - b).abs().max().item() for a, b in zip(*results)]
            scale = [b.abs().max().item() for b in results[1]]
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            good = all(e <= tol * max(1.0, s) for e, s in zip(errs, scale))
            ok &= good
            print(f"  {label:21s} {str(tuple(shape)):15s} {str(dtype)[6:]:8s} "
                  + " / ".join(f"{e:.1e}" for e in errs) + ("  ok" if good else "  FAIL"))
    return ok


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from .train.__main__ import main as train_main
        return train_main(argv[1:])
    if argv[:1] == ["check"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m fastnorm [check]",
                                     description=__doc__.splitlines()[0])
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
            bench_argv = ["--out", args.out] + (["--quick"] if device.type == "cpu" else [])
            for name in ("bench_layer_norm", "bench_group_norm", "bench_batch_norm"):
                importlib.import_module(name).main(bench_argv)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
