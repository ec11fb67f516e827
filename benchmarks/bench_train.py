"""Trainer throughput with the gradient-noise-scale estimator off and on, 1 and 2 processes.

Each case runs `python -m fastnorm.train` (under torchrun for 2 processes) at a FIXED global
batch: "off" is `--adaptive-batch off` (plain DDP, no norms computed), "on" is
`--adaptive-batch gns` with --min-batch-size = --max-batch-size = the batch, so the estimator,
the communication hook (2 processes) or the micro-batch norms (1 process) all run but the batch
cannot move, and the two step times compare like with like. The step time is the median over
the steps after a warm-up, read from metrics.jsonl (samples / samples_per_s). Off and on runs
alternate, `--repeats` times each, so a load change on a shared machine hits both.

On a loaded machine separate runs still differ by 2x, so for several processes the script also
measures the communication hook *interleaved* (on CPU, gloo): the same processes alternate
steps of plain DDP (torch's built-in all-reduce) and of DDP with fastnorm's GNS hook on copies
of the trainer's model, same data, and compare the median step times
(`hook_overhead_interleaved_pct`). Trainer runs use CUDA when there is a GPU per process.

    python benchmarks/bench_train.py [--steps 100] [--repeats 5] [--procs 1,2] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_for(procs: int) -> str:
    """CUDA when there is a GPU per process (NCCL refuses two ranks on one GPU), else CPU."""
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= procs else "cpu"


def run_case(procs: int, gns: bool, steps: int, batch: int, micro: int, work: str) -> float:
    """Median seconds per optimizer step of one trainer run."""
    out_dir = tempfile.mkdtemp(dir=work)
    args = ["--out-dir", out_dir, "--device", device_for(procs), "--max-steps", str(steps), "--batch-size", str(batch),
            "--micro-batch", str(micro), "--min-batch-size", str(batch),
            "--max-batch-size", str(batch), "--adaptive-batch", "gns" if gns else "off",
            "--lr-scaling", "none", "--eval-every", "0", "--ckpt-every", "0",
            "--plots", "false"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={procs}"] if procs > 1 else [sys.executable]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    subprocess.run([*launcher, "-m", "fastnorm.train", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    times = [r["global_batch"] / r["samples_per_s"] for r in rows if r["kind"] == "step"]
    return statistics.median(times[len(times) // 5:])     # the first fifth is warm-up


def interleaved_worker(steps: int, local_batch: int, micro: int, out: str) -> None:
    """Under torchrun: alternate plain-DDP and GNS-hook steps; rank 0 writes the medians."""
    import torch.distributed as dist
    import torch.nn.functional as F

    sys.path.insert(0, ROOT)
    from fastnorm.train.dist import GNSHook, wrap_ddp
    from fastnorm.train.model import make_model

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    models = []
    for hooked in (False, True):
        torch.manual_seed(0)
        ddp = wrap_ddp(make_model("bn", 32, world), torch.device("cpu"))
        hook = GNSHook() if hooked else None
        if hook is not None:
            ddp.register_comm_hook(hook, GNSHook.allreduce)
        models.append((ddp, hook))
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.randn(local_batch, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (local_batch,), generator=g)
    times: list[list[float]] = [[], []]
    k = local_batch // micro
    for i in range(2 * steps):
        ddp, hook = models[i % 2]
        t0 = time.perf_counter()
        for j in range(k):
            ctx = ddp.no_sync() if j < k - 1 else contextlib.nullcontext()
            with ctx:
                xb, yb = x[j * micro:(j + 1) * micro], y[j * micro:(j + 1) * micro]
                (F.cross_entropy(ddp(xb), yb) / k).backward()
        # Both read two scalars back, as the trainer does once per step.
        pair = torch.stack(hook.pop()) if hook is not None else torch.zeros(2)
        pair.tolist()
        ddp.zero_grad(set_to_none=True)
        times[i % 2].append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        med = [statistics.median(t[len(t) // 5:]) for t in times]
        with open(out, "w") as fh:
            json.dump({"ms_plain": 1e3 * med[0], "ms_hook": 1e3 * med[1]}, fh)
    dist.destroy_process_group()


def run_interleaved(procs: int, steps: int, batch: int, micro: int, work: str) -> dict:
    out = os.path.join(work, f"interleaved_{procs}.json")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={procs}", os.path.abspath(__file__),
                    "--interleaved-worker", out, "--steps", str(steps), "--batch", str(batch),
                    "--micro-batch", str(micro)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(out) as fh:
        return json.load(fh)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="fixed global batch")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--quick", action="store_true", help="60 steps, 1 repeat")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_results"))
    parser.add_argument("--interleaved-worker", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.interleaved_worker:
        world = int(os.environ["WORLD_SIZE"])
        interleaved_worker(args.steps, args.batch // world, args.micro_batch,
                           args.interleaved_worker)
        return 0
    if args.quick:
        args.steps, args.repeats = 60, 1
    os.makedirs(args.out, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for procs in (int(p) for p in args.procs.split(",")):
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.repeats):
                for gns in (False, True):
                    times[gns].append(run_case(procs, gns, args.steps, args.batch,
                                               args.micro_batch, work))
            off, on = min(times[False]), min(times[True])
            row = {"procs": procs, "device": device_for(procs), "batch": args.batch, "micro_batch": args.micro_batch,
                   "steps_per_s_off": 1 / off, "steps_per_s_on": 1 / on,
                   "overhead_pct": 100 * (on - off) / off,
                   "ms_off_runs": [1e3 * t for t in times[False]],
                   "ms_on_runs": [1e3 * t for t in times[True]]}
            extra = ""
            if procs > 1:
                inter = run_interleaved(procs, 4 * args.steps, args.batch, args.micro_batch,
                                        work)
                row.update(inter, hook_overhead_interleaved_pct=100 * (
                    inter["ms_hook"] - inter["ms_plain"]) / inter["ms_plain"])
                extra = (f"; interleaved in the same processes: plain DDP "
                         f"{inter['ms_plain']:.2f} ms, GNS hook {inter['ms_hook']:.2f} ms "
                         f"({row['hook_overhead_interleaved_pct']:+.1f}%)")
            results.append(row)
            print(f"{procs} process(es) on {row['device']}, B={args.batch}, micro={args.micro_batch}: "
                  f"{row['steps_per_s_off']:.1f} steps/s adaptive off, "
                  f"{row['steps_per_s_on']:.1f} steps/s on (estimator overhead "
                  f"{row['overhead_pct']:+.1f}%){extra}", flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "steps": args.steps, "repeats": args.repeats,
            "note": "best of the repeats of each median step time; CPU runs on gloo"}
    path = os.path.join(args.out, "train.json")
    with open(path, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
