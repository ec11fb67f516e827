"""A 2-process torchrun run of `-m fastnorm.train` on CPU/gloo: it trains, the batch adapts,
and the run directory holds config.json, metrics.jsonl with every field, the plots and
report.md; the last line names the run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"step", "samples", "global_batch", "micro_batch", "accum", "lr", "gain", "grad_sq",
          "trace_sigma", "b_simple", "loss", "accuracy", "samples_per_s"}


def test_torchrun_two_processes(tmp_path):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastnorm.train", "--out-dir", run_dir, "--max-steps", "40", "--width", "8",
           "--batch-size", "32", "--micro-batch", "8", "--max-batch-size", "128",
           "--batch-cooldown", "3", "--eval-every", "10", "--ckpt-every", "10",
           "--norm", "syncbn"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"run directory: {run_dir}"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "report.md",
                 "loss_accuracy.png", "batch_size.png", "lr.png"):
        path = os.path.join(run_dir, name)
        assert os.path.getsize(path) > 0, name
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    steps = [r for r in rows if r["kind"] == "step"]
    assert FIELDS <= set(steps[0]), FIELDS - set(steps[0])
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(r["global_batch"] == 2 * r["micro_batch"] * r["accum"] for r in steps)
    assert any(r["global_batch"] > 32 for r in steps)             # the batch grew
    # Null while the |G|^2 average is not positive (this short run: throughout, and the
    # controller grew the batch on that "very large" reading), a positive batch size otherwise.
    assert all(r["b_simple"] is None or r["b_simple"] > 0 for r in steps)
    assert all(r["trace_sigma"] > 0 for r in steps)
    assert [r for r in rows if r["kind"] == "eval"][-1]["test_accuracy"] > 0.5
    with open(os.path.join(run_dir, "config.json")) as fh:
        assert json.load(fh)["norm"] == "syncbn"
    report = open(os.path.join(run_dir, "report.md")).read()
    assert "![batch size](batch_size.png)" in report and "test_accuracy" in report
