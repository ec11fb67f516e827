"""SimCLR on the digits CNN with per-device BatchNorm vs SyncBatchNorm vs GroupNorm: the leak gap
and the probe accuracies, on 2 gloo processes and on one process with virtual devices.

Per run (the trainer's --task simclr): the leak gap it logs (pretext accuracy on a fixed held-out
batch of test images, train mode minus eval mode), and the kNN (k=20) / ridge linear-probe test
accuracy on the features before the projection.

The train-minus-eval gap mixes two effects: a model that learned to find an image's other view
through the statistics the two views share gains in train mode, while small-batch statistics
are noisier than the running ones and lose. So every BatchNorm model is also measured, after
training and in train mode with the same K statistic groups, on two layouts of the same
held-out views: pairs in the same group (as in training) and pairs split across groups. Their
difference, "same - split", is the leak alone: the statistics are equally noisy in both.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

NAME = "simclr_leak"


def pair_layout(ckpt: str, width: int, embed_dim: int, groups: int, n: int,
                seed: int = 0, draws: int = 8) -> dict[str, float]:
    """Pretext accuracy of a trained model on batches of n held-out images: eval mode, and
    train mode with `groups` BatchNorm groups, both views of an image in one group ("same") or
    in different groups ("split"). Averaged over `draws` view draws of each of the disjoint
    n-image batches the test split holds (one standard error of a single batch is ~0.03)."""
    import torch
    from fastnorm.train.data import load_digits_split
    from fastnorm.train.model import make_model
    from fastnorm.train.simclr import (DigitAugment, interleave_views, pretext_accuracy,
                                       set_virtual_devices, split_views)
    torch.set_num_threads(1)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = make_model("bn", width, 1, embed_dim)
    model.load_state_dict(state["model"])
    x_all = load_digits_split(seed)[2]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    acc: dict[str, list[float]] = {"eval": [], "same": [], "split": []}
    gen = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for start in range(0, len(x_all) - n + 1, n):
            for _ in range(draws):
                v1, v2 = DigitAugment()(x_all[start:start + n], gen)
                set_virtual_devices(model, 1)
                model.eval()
                acc["eval"].append(pretext_accuracy(*split_views(
                    model(interleave_views(v1, v2)))))
                set_virtual_devices(model, groups)
                model.train()
                acc["same"].append(pretext_accuracy(*split_views(
                    model(interleave_views(v1, v2)))))
                z = model(torch.cat([v1, v2]))   # groups of only first or only second views
                acc["split"].append(pretext_accuracy(z[:n], z[n:]))
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
    out = {k: sum(v) / len(v) for k, v in acc.items()}
    out["same - split"] = out["same"] - out["split"]
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = _common.parse(NAME, __doc__, argv)
    quick = args.quick
    batch = 16 if quick else 128
    steps = 4 if quick else 300
    width = 8 if quick else 32
    dim = 32
    common = ["--task", "simclr", "--adaptive-batch", "off", "--batch-size", batch,
              "--max-batch-size", batch, "--max-steps", steps, "--width", width,
              "--optimizer", "adamw", "--lr", 0.002, "--embed-dim", dim,
              "--leak-every", 2 if quick else 25, "--temperature", 0.5]
    # (label, processes, flags, BN groups for the same/split probe (0: not BN))
    settings = [
        ("2 proc, per-device BN", 2, ["--norm", "bn"], 2),
        ("2 proc, SyncBN", 2, ["--norm", "syncbn"], 2),
        ("2 proc, GN", 2, ["--norm", "gn"], 0),
        ("1 proc, BN global (K=1)", 1, ["--norm", "bn"], 8),
        ("1 proc, BN 8 virtual devices", 1, ["--norm", "bn", "--virtual-devices", 8], 8),
        ("1 proc, GN", 1, ["--norm", "gn"], 0),
        # investigation: a harder pretext task (sharper temperature), more and smaller groups
        ("1 proc, BN 8 virtual, T=0.1", 1, ["--norm", "bn", "--virtual-devices", 8,
                                            "--temperature", 0.1], 8),
        ("1 proc, BN 32 virtual, T=0.1", 1, ["--norm", "bn", "--virtual-devices", 32,
                                             "--temperature", 0.1], 32),
    ]
    if quick:
        settings = [s for s in settings if s[0] == "1 proc, BN 8 virtual devices"]
        settings = [(a, b, [f if f != 8 else 4 for f in c], 4 if d else 0)
                    for a, b, c, d in settings]
    rows, curves = [], {}
    for label, world, flags, groups in settings:
        if world == 2:
            flags = [*flags, "--micro-batch", batch // 2]
        else:
            flags = [*flags, "--micro-batch", batch]
        run_dir = os.path.join(args.out, "runs", label.replace(" ", "_").replace(",", "")
                               .replace("(", "").replace(")", "").replace("=", ""))
        run = _common.run_train([*common, *flags], run_dir, world=world)
        s = run["summary"]
        row = {"setting": label, "leak gap (train-eval)": s["leak_gap"],
               "pretext train": s["train_pretext"], "pretext eval": s["eval_pretext"]}
        if groups:
            p = pair_layout(os.path.join(run_dir, "checkpoint.pt"), width, dim, groups, batch)
            row.update({"BN groups": groups, "same group": p["same"],
                        "split groups": p["split"], "leak (same-split)": p["same - split"]})
        row.update({"kNN acc": s["knn_accuracy"], "linear probe acc": s["linear_probe_accuracy"],
                    "wall s": run["wall_s"]})
        rows.append(row)
        curves[label] = [(r["step"], r["leak_gap"]) for r in run["rows"] if r["kind"] == "leak"]
    notes = f"""
{steps} AdamW steps (lr 0.002) of {batch} images (2 views each, NT-Xent, negatives from all ranks),
width {width}, {dim}-d projection, temperature 0.5 unless said. The leak gap is measured every 25
steps by the trainer on a fixed held-out batch ({batch} test images, the ranks' slices), averaged
over ranks; the last value is shown. "same group / split groups" are train-mode pretext accuracies
of the trained model on held-out batches of {batch} test images (8 view draws of each
disjoint batch, averaged) with K BatchNorm groups (K = BN groups), both views
of an image in one group vs in different groups; "leak (same-split)" is their difference (the
statistics are equally noisy in both layouts, so only co-location differs). 2-process models are
probed on one process with K=2 groups (their per-device layout); a SyncBN model is the control
(it never saw per-group statistics). kNN (k=20, cosine) and a ridge linear probe run on the
{2 * width}-d features before the projection, eval mode, test split.
"""
    _common.write_table(args.out, NAME, "SimCLR: per-device BN vs SyncBN vs GN (leak gap)",
                        ["setting", "leak gap (train-eval)", "pretext train", "pretext eval",
                         "BN groups", "same group", "split groups", "leak (same-split)",
                         "kNN acc", "linear probe acc", "wall s"], rows, notes, {})
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, pts in curves.items():
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], ".-", label=label)
    axes[0].axhline(0, color="gray", lw=0.8)
    axes[0].set_xlabel("optimizer step")
    axes[0].set_ylabel("leak gap (train - eval pretext acc.)")
    axes[0].legend(fontsize=7)
    labels = [r["setting"] for r in rows]
    ys = range(len(rows))
    axes[1].barh([y - 0.2 for y in ys], [r["kNN acc"] for r in rows], 0.4, label="kNN")
    axes[1].barh([y + 0.2 for y in ys], [r["linear probe acc"] for r in rows], 0.4,
                 label="linear probe")
    axes[1].set_yticks(list(ys), labels, fontsize=7)
    axes[1].set_xlim(0.5, 1.0)
    axes[1].set_xlabel("test accuracy")
    axes[1].legend(fontsize=8)
    _common.save_figure(fig, args.out, NAME)
    return {"rows": rows}


if __name__ == "__main__":
    main()
