"""What a person sees: a progress display on rank 0, metrics.jsonl, and at the end PNG plots and
report.md."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Optional

__all__ = ["Progress", "MetricsLog", "read_metrics", "write_report"]


class Progress:
    """tqdm bar when stdout is a terminal, otherwise a plain line every `every` steps."""

    def __init__(self, total: float, initial: float = 0.0, every: int = 25,
                 enabled: bool = True) -> None:
        self.enabled = enabled
        self.every = max(1, every)
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=round(total, 1), initial=round(initial, 1), unit="step",
                            dynamic_ncols=True,
                            bar_format="{percentage:3.0f}%|{bar:20}| {n:.0f}/{total:.0f} "
                                       "[{elapsed}<{remaining}]{postfix}")

    def update(self, progress_delta: float, step: int, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        if self.bar is not None:
            # tqdm drops the total once n exceeds it; the last step may overshoot max_steps.
            self.bar.update(min(progress_delta, self.bar.total - self.bar.n))
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.every == 0:
            print(f"step {step} {text}", flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class MetricsLog:
    """Appends one JSON object per line to run_dir/metrics.jsonl. On resume the lines after the
    checkpoint's step (written by the interrupted run) are dropped first."""

    def __init__(self, path: str, resume_step: Optional[int] = None) -> None:
        self.path = path
        if resume_step is not None and os.path.exists(path):
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            with open(path, "w") as fh:
                for r in kept:
                    fh.write(json.dumps(r) + "\n")
        self.fh = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps({k: _json_safe(v) for k, v in record.items()}) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _json_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_metrics(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut short by a kill
                    break
    return out


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list, list]:
    pts = [(r["samples"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run_dir: str, summary: dict[str, Any]) -> list[str]:
    """Plots (loss_accuracy.png, batch_size.png, lr.png; leak_gap.png for simclr; gns_sources.png
    with --gns-source norm-layers) and report.md from metrics.jsonl; returns the files
    written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    steps = [r for r in rows if r.get("kind") == "step"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    files = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(steps, "loss"), lw=0.8, alpha=0.6, label="train loss (rank 0 batch)")
    ax.plot(*_series(evals, "test_loss"), "o-", label="test loss")
    ax.set_yscale("log")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    ax2.plot(*_series(evals, "test_accuracy"), "s-", color="tab:green", label="test accuracy")
    ax2.set_ylabel("test accuracy")
    ax2.set_ylim(0, 1)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right")
    ax.set_title("loss and accuracy")
    files.append(_save(fig, run_dir, "loss_accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(steps, "global_batch"), drawstyle="steps-post", label="global batch B")
    x, b = _series(steps, "b_simple")
    if x:
        ax.plot(x, b, lw=0.8, alpha=0.7, label="b_simple (noise scale)")
        snr = summary.get("target_snr", 1.0)
        if snr != 1.0:
            ax.plot(x, [snr * v for v in b], lw=0.8, ls="--", label=f"{snr} x b_simple")
    ax.set_yscale("log")
    # b_simple is null until |G|^2 is measured, then can start orders of magnitude above B (a
    # barely positive |G|^2 average): cap the view.
    top = max([r["global_batch"] for r in steps] or [1])
    ax.set_ylim(bottom=1, top=100 * top)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("samples")
    ax.legend()
    ax.set_title("batch size against the gradient noise scale")
    files.append(_save(fig, run_dir, "batch_size.png"))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*_series(steps, "lr"), label="learning rate")
    ax.set_xlabel("samples seen")
    ax.set_ylabel("learning rate")
    ax2 = ax.twinx()
    ax2.plot(*_series(steps, "gain"), lw=0.8, ls="--", color="tab:orange",
             label="gain (LR / base schedule)")
    ax2.set_ylabel("gain")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right")
    ax.set_title("learning rate")
    files.append(_save(fig, run_dir, "lr.png"))
    leaks = [r for r in rows if r.get("kind") == "leak"]
    if leaks:   # --task simclr
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key, label in (("train_pretext", "train mode"), ("eval_pretext", "eval mode"),
                           ("leak_gap", "leak gap (train - eval)")):
            ax.plot(*_series(leaks, key), "o-", label=label)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("pretext accuracy (held-out batch)")
        ax.legend()
        ax.set_title("contrastive pretext accuracy and leak gap")
        files.append(_save(fig, run_dir, "leak_gap.png"))
    gns_lines: list[str] = []
    xn, bn = _series(steps, "b_simple_norm")
    if xn:   # --gns-source norm-layers
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(xn, bn, lw=0.9, label="norm layers (drives the batch)")
        xm, bm = _series(steps, "b_simple_model")
        if xm:
            ax.plot(xm, bm, lw=0.9, label="whole model")
        ax.plot(*_series(steps, "global_batch"), drawstyle="steps-post", lw=0.8, color="gray",
                label="global batch B")
        ax.set_yscale("log")
        top = max([r["global_batch"] for r in steps] or [1])   # same cap as batch_size.png
        ax.set_ylim(bottom=1, top=100 * top)
        ax.set_xlabel("samples seen")
        ax.set_ylabel("b_simple (samples)")
        ax.legend()
        ax.set_title("noise scale: norm layers against the whole model")
        files.append(_save(fig, run_dir, "gns_sources.png"))
        ratios = sorted(r["b_simple_norm"] / r["b_simple_model"] for r in steps
                        if r.get("b_simple_norm") is not None
                        and r.get("b_simple_model") is not None and r["b_simple_model"] > 0)
        if ratios:
            n = len(ratios)
            med = (ratios[(n - 1) // 2] + ratios[n // 2]) / 2
            says = (f"the median of b_simple(norm layers) / b_simple(whole model) over the {n} "
                    f"steps with both is {med:.3g}.")
        else:
            says = ("no step had the whole-model estimate (one process with a single "
                    "micro-batch per step), so there is nothing to compare.")
        gns_lines = ["![noise scale sources](gns_sources.png)", "",
                     "The norm-layer noise scale (per-example gradients of the norm layers' "
                     "weights and biases) against the whole model's (micro-batch or DDP "
                     f"estimate): {says}", ""]
    plt.close("all")

    lines = ["# fastnorm.train run", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in summary.items() if k != "config"]
    lines += ["", "![loss and accuracy](loss_accuracy.png)", "",
              "![batch size](batch_size.png)", "", "![learning rate](lr.png)", "",
              *(["![leak gap](leak_gap.png)", ""] if leaks else []), *gns_lines,
              "Config: `config.json`; per-step numbers: `metrics.jsonl`.", ""]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    files.append(path)
    return files


def _save(fig: Any, run_dir: str, name: str) -> str:
    path = os.path.join(run_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
