"""BatchNorm vs GroupNorm vs LayerNorm as the per-device batch shrinks from 64 to 2, on the
digits CNN: test accuracy per setting.

"Per-device" batches are made real with --virtual-devices K on one process: every BatchNorm
layer normalizes each of K contiguous chunks of the 64-image micro-batch with that chunk's own
statistics (what K devices with 64/K images each would do; their running statistics are the
average of the K chunks' updates, as DDP-with-averaged-buffers would keep). The optimizer sees
the same global batch of 64 in every setting, so only the normalization statistics change, as
in the GroupNorm paper's per-GPU batch sweep. GroupNorm and LayerNorm do not look across the
batch at all: their forward on a chunk equals their forward on the whole batch, so one run of
each stands for every per-device size (computed once, shown on every row).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

NAME = "norm_batch"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = _common.parse(NAME, __doc__, argv)
    quick = args.quick
    per_device = [64, 8, 2] if quick else [64, 32, 16, 8, 4, 2]
    seeds = [0] if quick else [0, 1]
    max_steps = 6 if quick else 300
    width = 8 if quick else 32
    common = ["--batch-size", 64, "--micro-batch", 64, "--max-batch-size", 64,
              "--adaptive-batch", "off", "--max-steps", max_steps, "--eval-every", 0,
              "--width", width, "--lr", 0.05]
    acc: dict[tuple[str, int], list[float]] = {}
    loss: dict[tuple[str, int], list[float]] = {}
    for seed in seeds:
        for norm in ("gn", "ln"):
            run = _common.run_train([*common, "--norm", norm, "--seed", seed],
                                    os.path.join(args.out, "runs", f"{norm}-{seed}"))
            for b in per_device:
                acc.setdefault((norm, b), []).append(run["summary"]["test_accuracy"])
                loss.setdefault((norm, b), []).append(run["summary"]["test_loss"])
        for b in per_device:
            run = _common.run_train([*common, "--norm", "bn", "--virtual-devices", 64 // b,
                                     "--seed", seed],
                                    os.path.join(args.out, "runs", f"bn-{b}-{seed}"))
            acc.setdefault(("bn", b), []).append(run["summary"]["test_accuracy"])
            loss.setdefault(("bn", b), []).append(run["summary"]["test_loss"])

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    def spread(v: list[float]) -> float:
        return max(v) - min(v)

    rows = []
    for b in per_device:
        row: dict[str, Any] = {"per-device batch": b, "virtual devices (BN)": 64 // b}
        for norm in ("bn", "gn", "ln"):
            row[f"{norm.upper()} accuracy"] = mean(acc[(norm, b)])
            row[f"{norm.upper()} min-max"] = spread(acc[(norm, b)])
            row[f"{norm.upper()} test loss"] = mean(loss[(norm, b)])
        rows.append(row)
    notes = f"""
Test accuracy (360 test images), mean over seeds {seeds} and its spread (max - min), and the mean
test cross-entropy (more sensitive than the saturated accuracy); {max_steps}
SGD steps at a global batch of 64, lr 0.05, width {width}, one process. BN at per-device batch b
uses --virtual-devices 64/b; GN (8 groups) and LN (over channels) do not depend on b (one run per
seed, repeated on every row).
"""
    _common.write_table(args.out, NAME, "BN vs GN vs LN across per-device batch sizes",
                        list(rows[0]), rows, notes,
                        {"seeds": seeds, "per_seed": {f"{k[0]}-{k[1]}": v
                                                      for k, v in acc.items()},
                         "per_seed_loss": {f"{k[0]}-{k[1]}": v for k, v in loss.items()}})
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for norm, style in (("bn", "o-"), ("gn", "s--"), ("ln", "^:")):
        ys = [mean(acc[(norm, b)]) for b in per_device]
        lo = [min(acc[(norm, b)]) for b in per_device]
        hi = [max(acc[(norm, b)]) for b in per_device]
        ax.plot(per_device, ys, style, label=norm.upper())
        ax.fill_between(per_device, lo, hi, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.invert_xaxis()
    ax.set_xlabel("per-device batch (BN: 64 / virtual devices)")
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax.set_title("digits CNN: accuracy vs per-device batch")
    _common.save_figure(fig, args.out, NAME)
    return {"rows": rows}


if __name__ == "__main__":
    main()
