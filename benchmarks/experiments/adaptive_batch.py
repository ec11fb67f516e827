"""Adaptive (gradient-noise-scale) vs fixed batch size on the digits CNN: optimizer steps,
samples and wall time to a target test accuracy.

One process, SGD + Nesterov, the trainer's defaults otherwise (AdaScale LR gain for the adaptive
run; the fixed runs have no gain, so lr is the same base LR). Test accuracy is evaluated every
`eval_every` optimizer steps; "to target" is the first evaluation at or above the target, and
its wall time is the sum of the training-step times up to it (evaluations excluded).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

NAME = "adaptive_batch"


def _to_target(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    steps = {r["step"]: r for r in rows if r["kind"] == "step"}
    for r in rows:
        if r["kind"] == "eval" and r["test_accuracy"] >= target:
            wall = sum(s["step_seconds"] for k, s in steps.items() if k <= r["step"])
            return {"steps_to_target": r["step"], "samples_to_target": r["samples"],
                    "seconds_to_target": wall}
    return {"steps_to_target": None, "samples_to_target": None, "seconds_to_target": None}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = _common.parse(NAME, __doc__, argv)
    quick = args.quick
    target = 0.5 if quick else 0.99
    seeds = [0] if quick else [0, 1]
    max_steps = 12 if quick else 300
    eval_every = 4 if quick else 5
    width = 8 if quick else 32
    settings = [("adaptive (GNS), B0=32", ["--adaptive-batch", "gns", "--batch-size", "32",
                                           "--max-batch-size", "512"]),
                ("fixed B=32", ["--adaptive-batch", "off", "--batch-size", "32"]),
                ("fixed B=128", ["--adaptive-batch", "off", "--batch-size", "128",
                                 "--max-batch-size", "128"]),
                ("fixed B=512", ["--adaptive-batch", "off", "--batch-size", "512",
                                 "--micro-batch", "64"])]
    rows, curves = [], {}
    for label, flags in settings:
        for seed in seeds:
            run = _common.run_train(
                [*flags, "--max-steps", max_steps, "--eval-every", eval_every, "--width",
                 width, "--seed", seed], os.path.join(args.out, "runs", f"{label}-{seed}"
                                                      .replace(" ", "_").replace(",", "")
                                                      .replace("(", "").replace(")", "")
                                                      .replace("=", "")))
            s, r = run["summary"], run["rows"]
            steps = [x for x in r if x["kind"] == "step"]
            rows.append({"setting": label, "seed": seed, **_to_target(r, target),
                         "final_test_accuracy": s["test_accuracy"], "steps": s["steps"],
                         "samples": s["samples"], "final_batch": steps[-1]["global_batch"],
                         "train_seconds": s["train_seconds"]})
            if seed == seeds[0]:
                t, cum = {}, 0.0
                for x in steps:
                    cum += x["step_seconds"]
                    t[x["step"]] = cum
                curves[label] = [(e["samples"], t[e["step"]], e["test_accuracy"])
                                 for e in r if e["kind"] == "eval"]
    # Means over seeds (None when a seed never reached the target).
    summary = []
    for label, _ in settings:
        mine = [r for r in rows if r["setting"] == label]
        hit = [r for r in mine if r["steps_to_target"] is not None]
        mean = (lambda k: sum(r[k] for r in hit) / len(hit)) if hit else (lambda k: None)
        summary.append({"setting": label, "seeds reaching target": f"{len(hit)}/{len(mine)}",
                        "steps to target": mean("steps_to_target"),
                        "samples to target": mean("samples_to_target"),
                        "seconds to target": mean("seconds_to_target"),
                        "final test accuracy": sum(r["final_test_accuracy"] for r in mine)
                        / len(mine),
                        "final batch": mine[0]["final_batch"]})
    notes = f"""
Target: test accuracy >= {target}. Mean over seeds {seeds} of the seeds that reach it; {max_steps}
optimizer steps at most (the adaptive run counts scale-invariant steps, so it takes fewer optimizer
steps), evaluation every {eval_every} steps, width {width}, one process (one CPU thread).
Seconds are training-step time only, on a shared 2-core machine: compare them within this table,
not across runs of it. Per-seed rows are in {NAME}.json.
"""
    _common.write_table(args.out, NAME, "Adaptive vs fixed batch size (digits CNN)",
                        list(summary[0]), summary, notes,
                        {"target": target, "seeds": seeds, "per_seed": rows})
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, pts in curves.items():
        axes[0].plot([p[0] for p in pts], [p[2] for p in pts], ".-", label=label)
        axes[1].plot([p[1] for p in pts], [p[2] for p in pts], ".-", label=label)
    for ax, xl in zip(axes, ("samples seen", "training seconds")):
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy")
        ax.set_ylim(max(0.0, target - 0.25), 1.0)
        ax.set_xscale("log")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"adaptive vs fixed batch (seed {seeds[0]})")
    _common.save_figure(fig, args.out, NAME)
    return {"rows": summary}


if __name__ == "__main__":
    main()
