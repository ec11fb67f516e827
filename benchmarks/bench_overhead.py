"""Per-call host overhead: fastnorm's functional ops vs torch's own call, on small inputs where
the call itself (Python dispatch, checks) is most of the time.

CPU tensors under "auto" go straight to torch's op, so the goal is "within 10 % of torch". On a
GPU the same loop times the host side of launching the Triton kernels (no synchronization inside
the loop, so it measures launch throughput), next to torch's own launch.

    python benchmarks/bench_overhead.py                 # CPU tensors, backend "auto"
    python benchmarks/bench_overhead.py --device cuda   # CUDA tensors (Triton kernels)

The machine may be shared: every number is the minimum over `--repeats` timing runs of
`--calls` back-to-back calls, alternating fastnorm and torch, which filters out other load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fastnorm  # noqa: E402


def _cases(device: str) -> dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    x = torch.randn(1, 4096, device=device)
    w, b = torch.randn(4096, device=device), torch.randn(4096, device=device)
    x4 = torch.randn(2, 32, 4, 4, device=device)
    c_w, c_b = torch.randn(32, device=device), torch.randn(32, device=device)
    rm, rv = torch.zeros(32, device=device), torch.ones(32, device=device)
    return {
        "layer_norm 1x4096": (lambda: fastnorm.layer_norm(x, (4096,), w, b),
                              lambda: F.layer_norm(x, (4096,), w, b)),
        "rms_norm 1x4096": (lambda: fastnorm.rms_norm(x, (4096,), w),
                            lambda: F.rms_norm(x, (4096,), w)),
        "group_norm 2x32x4x4": (lambda: fastnorm.group_norm(x4, 8, c_w, c_b),
                                lambda: F.group_norm(x4, 8, c_w, c_b)),
        "batch_norm eval 2x32x4x4": (
            lambda: fastnorm.batch_norm(x4, rm, rv, c_w, c_b, False),
            lambda: F.batch_norm(x4, rm, rv, c_w, c_b, False)),
    }


def _time_per_call(fn: Callable[[], torch.Tensor], calls: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def measure(device: str, calls: int, repeats: int) -> list[dict]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for name, (ours, ref) in _cases(device).items():
        for _ in range(3):  # warm-up: first calls compile kernels / fill caches
            ours(), ref()
        best_ours = best_ref = float("inf")
        for _ in range(repeats):
            best_ours = min(best_ours, _time_per_call(ours, calls, sync))
            best_ref = min(best_ref, _time_per_call(ref, calls, sync))
        rows.append({"case": name, "device": device, "backend": fastnorm.get_backend(),
                     "fastnorm_us": best_ours * 1e6, "torch_us": best_ref * 1e6,
                     "ratio": best_ours / best_ref})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the call overhead, not a thread pool's scheduling, is measured
    rows = measure(args.device, args.calls, args.repeats)
    print(f"{'case':28s} {'fastnorm us':>12s} {'torch us':>10s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['case']:28s} {r['fastnorm_us']:12.2f} {r['torch_us']:10.2f} {r['ratio']:7.3f}")
    if args.json:
        meta = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
