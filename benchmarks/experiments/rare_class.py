"""A rare class (digit 3 subsampled to 3 % of the training split): random batches vs fixed-count
stratified batches with importance weights. (1) the variance of the mini-batch gradient
estimator of the full-data gradient, at fixed parameters; (2) the rare class's test recall after
training.

(1) At fixed parameters theta (BatchNorm in eval mode, so the loss is a sum of per-sample terms
and the full-data gradient G is well defined), draw M batches from each sampler and compute the
estimator g_b: the mean loss gradient for random batches, the importance-weighted mean
(1/B) sum w[y] grad l for stratified ones (and, to show why the weights are needed, stratified
without them). Reported: the total variance E|g_b - G|^2 (trace of the estimator's covariance
plus its squared bias), the squared bias |mean g_b - G|^2 (for an unbiased estimator it is about
variance / M), and the same two restricted to the classifier row of the rare class, where a
batch without a rare sample gives a one-sided estimate. theta: the model after 60 and after 300
steps of a random-batch run.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

NAME = "rare_class"
RARE = 3


def gradient_variance(ckpt: str, width: int, prevalence: float, count: int, batch: int,
                      num_batches: int, seed: int = 0) -> list[dict[str, Any]]:
    """Variance and bias of the three mini-batch estimators at the checkpoint's parameters."""
    import torch
    import torch.nn.functional as F
    from fastnorm.train.data import DistributedBatchSampler, load_digits_split
    from fastnorm.train.model import make_model
    from fastnorm.train.sampler import StratifiedBatchSampler, imbalance_indices
    torch.set_num_threads(1)
    x, y = load_digits_split(seed)[:2]
    keep = torch.as_tensor(imbalance_indices(y, {RARE: prevalence}, seed))
    x, y = x[keep], y[keep]
    model = make_model("bn", width, 1)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["model"])
    model.eval()
    params = [p for p in model.parameters()]
    assert isinstance(list(model.children())[-1], torch.nn.Linear)

    def grad(idx: torch.Tensor, w: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        per = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
        loss = (per * w[y[idx]]).mean() if w is not None else per.mean()
        gs = torch.autograd.grad(loss, params)
        flat = torch.cat([g.reshape(-1) for g in gs]).double()
        # the head is the last Linear: its weight and bias are the last two parameters
        rare = torch.cat([gs[-2][RARE], gs[-1][RARE:RARE + 1]]).double()
        return flat, rare

    full, full_rare = grad(torch.arange(len(y)), None)
    random = DistributedBatchSampler(len(y), batch, num_replicas=1, rank=0, seed=seed)
    strat = StratifiedBatchSampler(y, batch, {RARE: count}, num_replicas=1, rank=0, seed=seed)
    weights = strat.class_weights()

    def draws(sampler: Any) -> Any:
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from sampler
            epoch += 1

    out = []
    for label, sampler, w in (("random", random, None),
                              (f"stratified {RARE}:{count} + weights", strat, weights),
                              (f"stratified {RARE}:{count}, no weights", strat, None)):
        it = draws(sampler)
        gs, rs, none = [], [], 0
        for _ in range(num_batches):
            idx = torch.tensor(next(it))
            none += int((y[idx] == RARE).sum() == 0)
            g, r = grad(idx, w)
            gs.append(g)
            rs.append(r)
        g, r = torch.stack(gs), torch.stack(rs)
        out.append({"estimator": label,
                    "variance": ((g - full) ** 2).sum(1).mean().item(),
                    "bias^2": ((g.mean(0) - full) ** 2).sum().item(),
                    "rare-row variance": ((r - full_rare) ** 2).sum(1).mean().item(),
                    "rare-row bias^2": ((r.mean(0) - full_rare) ** 2).sum().item(),
                    "|G|^2": (full ** 2).sum().item(),
                    "batches without the rare class": none / num_batches})
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = _common.parse(NAME, __doc__, argv)
    quick = args.quick
    prevalence, count, batch = 0.03, 4, 32
    seeds = [0] if quick else [0, 1, 2]
    steps = 6 if quick else 300
    early = 3 if quick else 60
    num_batches = 20 if quick else 400
    width = 8 if quick else 32
    recall_prevalences = [prevalence] if quick else [prevalence, 0.01]
    common = ["--adaptive-batch", "off", "--batch-size", batch, "--max-batch-size", batch,
              "--width", width, "--eval-every", 0]
    rare = ["--imbalance", f"{RARE}:{prevalence}"]
    settings = [("random", "random", []),
                ("stratified + weights", "weighted", ["--stratify", f"{RARE}:{count}",
                                                      "--importance-weights", "on"]),
                ("stratified, no weights", "unweighted", ["--stratify", f"{RARE}:{count}"])]
    recall_rows, per_seed = [], []
    for prev in recall_prevalences:
        for label, slug, flags in settings:
            rec, acc = [], []
            for seed in seeds:
                run = _common.run_train(
                    [*common, "--imbalance", f"{RARE}:{prev}", *flags, "--max-steps", steps,
                     "--seed", seed], os.path.join(args.out, "runs", f"{slug}-{prev}-{seed}"))
                rec.append(run["summary"]["recall"][str(RARE)])
                acc.append(run["summary"]["test_accuracy"])
                per_seed.append({"prevalence": prev, "setting": label, "seed": seed,
                                 "recall": rec[-1], "test_accuracy": acc[-1]})
            recall_rows.append({"prevalence": prev, "setting": label,
                                f"class {RARE} recall": sum(rec) / len(rec),
                                "recall min": min(rec), "recall max": max(rec),
                                "test accuracy": sum(acc) / len(acc)})
    var_rows = []
    for when, n_steps in ((f"after {early} steps", early), (f"after {steps} steps", steps)):
        run_dir = os.path.join(args.out, "runs", f"theta-{n_steps}")
        if n_steps == steps:
            run_dir = os.path.join(args.out, "runs", f"random-{prevalence}-0")
        else:
            _common.run_train([*common, *rare, "--max-steps", n_steps, "--seed", 0], run_dir)
        for r in gradient_variance(os.path.join(run_dir, "checkpoint.pt"), width, prevalence,
                                   count, batch, num_batches):
            var_rows.append({"parameters": when, **r})
    base = {r["parameters"]: r["variance"] for r in var_rows if r["estimator"] == "random"}
    base_rare = {r["parameters"]: r["rare-row variance"] for r in var_rows
                 if r["estimator"] == "random"}
    for r in var_rows:
        r["variance / random"] = r["variance"] / base[r["parameters"]]
        r["rare-row var / random"] = r["rare-row variance"] / base_rare[r["parameters"]]
    columns = ["parameters", "estimator", "variance", "variance / random", "bias^2",
               "rare-row variance", "rare-row var / random", "rare-row bias^2", "|G|^2",
               "batches without the rare class"]
    notes = f"""
Digit {RARE} kept at {prevalence:.0%} of the training split (--imbalance {RARE}:{prevalence};
the test split is untouched, 10 % of it is class {RARE}), batch {batch}, one process,
BatchNorm model (eval mode for the variance measurement). Variance: mean over {num_batches}
batches of
|g_b - G|^2 (G: gradient of the mean loss over the whole training split); bias^2: |mean g_b - G|^2
(about variance / {num_batches} when unbiased). "rare-row": the classifier's weight row and bias
of class {RARE}.

Class {RARE} test recall (37 test images of class {RARE}: one image is 0.027) after {steps} SGD
steps (lr 0.1, adaptive batch off), mean over seeds {seeds}, at prevalence {recall_prevalences}:

| prevalence | setting | class {RARE} recall | min | max | test accuracy |
|---|---|---|---|---|---|
""" + "\n".join(f"| {r['prevalence']} | {r['setting']} | {r[f'class {RARE} recall']:.4f} | "
                f"{r['recall min']:.4f} | "
                f"{r['recall max']:.4f} | {r['test accuracy']:.4f} |" for r in recall_rows)
    _common.write_table(args.out, NAME, f"Rare class at {prevalence:.0%}: random vs "
                        "stratified batches", columns, var_rows, notes,
                        {"recall": recall_rows, "recall_per_seed": per_seed})
    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    whens = list(dict.fromkeys(r["parameters"] for r in var_rows))
    ests = list(dict.fromkeys(r["estimator"] for r in var_rows))
    for j, est in enumerate(ests):
        vals = [next(r for r in var_rows if r["parameters"] == w and r["estimator"] == est)
                for w in whens]
        xs = [i + (j - 1) * 0.27 for i in range(len(whens))]
        axes[0].bar(xs, [v["variance"] for v in vals], 0.27, label=f"{est}: total")
        axes[0].bar(xs, [v["rare-row variance"] for v in vals], 0.12, color="k", alpha=0.5)
    axes[0].set_xticks(range(len(whens)), whens)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("E|g_b - G|^2 (black: rare-class row)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("gradient estimator variance")
    for j, r in enumerate(recall_rows):
        pts = [p["recall"] for p in per_seed if p["setting"] == r["setting"]
               and p["prevalence"] == r["prevalence"]]
        axes[1].scatter([j] * len(pts), pts, alpha=0.6)
        axes[1].plot([j - 0.2, j + 0.2], [r[f"class {RARE} recall"]] * 2, "k-")
    axes[1].set_xticks(range(len(recall_rows)), [f"{r['setting']}\n{r['prevalence']:.0%}"
                                                 for r in recall_rows], fontsize=6)
    axes[1].set_ylabel(f"class {RARE} test recall")
    axes[1].set_ylim(0, 1.02)
    axes[1].set_title("rare-class recall after training")
    _common.save_figure(fig, args.out, NAME)
    return {"variance": var_rows, "recall": recall_rows}


if __name__ == "__main__":
    main()
