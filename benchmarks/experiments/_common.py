"""Shared pieces of the experiments: run the trainer (in this process for one rank, under
torchrun for several), read its metrics, write a markdown + JSON table and a PNG plot.

Each experiment is one command, `python benchmarks/experiments/NAME.py [--out DIR] [--quick]`,
writing NAME.md, NAME.json and NAME.png under --out
(default benchmarks/results/experiments/NAME/). --quick is the seconds-long smoke version the
tests run; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse(name: str, doc: str, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "experiments",
                                                 name))
    p.add_argument("--quick", action="store_true", help="tiny smoke settings (seconds)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return args


def run_train(flags: Sequence[str], run_dir: str, world: int = 1) -> dict[str, Any]:
    """Train with `flags` into run_dir (replaced if it exists); returns the summary, the
    metrics rows and the run's wall time. One rank runs in this process, several under
    `torch.distributed.run` (gloo on CPU)."""
    import shutil
    shutil.rmtree(run_dir, ignore_errors=True)
    base = ["--out-dir", run_dir, "--plots", "false", "--ckpt-every", "0", *map(str, flags)]
    t0 = time.perf_counter()
    if world == 1:
        import contextlib
        import io
        from fastnorm.train import parse_args, train
        with contextlib.redirect_stdout(io.StringIO()):   # the trainer's progress lines
            summary = train(parse_args(base))
    else:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", "-m", "fastnorm.train", *base]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        summary = {}
    rows = read_rows(run_dir)
    if not summary:   # several ranks: rebuild what the summary holds from the log
        summary = {"steps": max(r["step"] for r in rows if r["kind"] == "step")}
        for r in rows:
            if r["kind"] == "leak":
                summary.update(leak_gap=r["leak_gap"], train_pretext=r["train_pretext"],
                               eval_pretext=r["eval_pretext"])
            elif r["kind"] == "probe":
                summary.update(knn_accuracy=r["knn_accuracy"],
                               linear_probe_accuracy=r["linear_probe_accuracy"])
            elif r["kind"] == "eval":
                summary.update(test_accuracy=r["test_accuracy"])
    return {"summary": summary, "rows": rows, "wall_s": time.perf_counter() - t0}


def read_rows(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def machine() -> str:
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), "
            f"{platform.system()}, python {platform.python_version()}")


def write_table(out: str, name: str, title: str, columns: list[str],
                rows: list[dict[str, Any]], notes: str, meta: dict[str, Any]) -> None:
    """name.md (a markdown table with the notes below it) and name.json (rows + meta)."""
    import torch
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "torch": torch.__version__, **meta}

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "" if v is None else str(v)

    lines = [f"# {title}", "", f"{meta['date']}; {meta['machine']}; torch {meta['torch']}.",
             "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", notes.strip(), "", f"![{name}]({name}.png)", ""]
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write("\n".join(lines))
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump({"meta": meta, "columns": columns, "rows": rows}, fh, indent=1)


def pyplot() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig: Any, out: str, name: str) -> None:
    """The experiment's plot as out/name.png (then closed)."""
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=100)
    pyplot().close(fig)
