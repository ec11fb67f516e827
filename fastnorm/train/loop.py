"""The training loop. Read top to bottom: setup, resume, then one optimizer step per global
batch, each made of `accum` micro-batches per rank.

Where the gradient noise scale comes from:
  * several ranks: `dist.GNSHook` inside DDP's all-reduce gives mean_r |g_r|^2 (batch B/world)
    and |G|^2 of the reduced gradient (batch B);
  * one process: the gradient accumulated in .grad after the first of k micro-batches is g_1/k,
    a mean gradient of `micro` samples scaled by 1/k, so k^2 |.grad|^2 there is the small-batch
    norm; after all k micro-batches .grad is the mean gradient of the step (batch k*micro): the
    big-batch norm. Two reductions over .grad, nothing copied. (Each prefix of j micro-batches
    gives such a pair; the first and the last are the pair with the widest batch ratio.)
Both are read before clipping and divided by the loss scale squared under a GradScaler; a
non-finite pair is skipped by the estimator (the scaler skips that step too).

With --gns-source norm-layers, `fastnorm.gns.track` gives a second pair from the norm layers'
backward kernels (per-example gradients: batch 1 against the micro-batch, no accumulation
needed), and that estimate drives the controller; the whole-model one keeps running where it is
free (several ranks, or one process with >= 2 micro-batches) so both are logged side by side.

The two tasks share the loop. classify: cross-entropy per micro-batch (with --importance-weights,
sum of w[y] * loss / the rank's step share, so accumulation and DDP keep it unbiased), test
evaluation every eval_every steps, recall of the --stratify/--imbalance classes at the end.
simclr: one micro-batch per step, two views from the rank's checkpointed generator, NT-Xent with
negatives from all ranks; the leak gap on a fixed held-out batch every leak_every steps (a
collective) and the kNN / linear probes at the end.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..gns import GNSEstimator, track
from .checkpoint import (CHECKPOINT, config_mismatch, find_checkpoint, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .config import ConfigError, TrainConfig
from .controller import BatchSizeController
from .data import load_digits_split, make_batch_sampler
from .dist import DistEnv, GNSHook, all_gather_objects, init_distributed, wrap_ddp
from .model import make_model
from .report import MetricsLog, Progress, write_report
from .sampler import imbalance_indices
from .simclr import (DigitAugment, embed, interleave_views, knn_accuracy, leak_gap,
                     nt_xent_loss, ridge_probe_accuracy, set_virtual_devices, split_views)

__all__ = ["train"]


def grad_sq_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """sum over parameters of |p.grad|^2, in fp32, as a device tensor (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).float().square().sum()


def lr_schedule(cfg: TrainConfig, progress: float) -> float:
    """Base LR at `progress` scale-invariant steps: linear warm-up, cosine decay to
    lr * min_lr_ratio at max_steps."""
    warm = min(1.0, (progress + 1.0) / (cfg.warmup_steps + 1.0))
    t = min(progress / cfg.max_steps, 1.0)
    return cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(
        math.pi * t)))


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # No weight decay on norm parameters and biases (1-D tensors).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def _resolve_run(cfg: TrainConfig, env: DistEnv) -> tuple[str, Optional[str]]:
    """(run directory, checkpoint to resume or None), decided on rank 0 and shared, so all
    ranks agree on the timestamped default directory; errors are raised on every rank."""
    result: list[Any] = [None]
    if env.is_main:
        try:
            ckpt = find_checkpoint(cfg.resume, cfg.out_dir) if cfg.resume else None
            out_dir = cfg.out_dir or (os.path.dirname(ckpt) if ckpt else
                                      os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
            if not cfg.resume and os.path.isfile(os.path.join(out_dir, CHECKPOINT)):
                raise FileExistsError(f"{out_dir} already holds a {CHECKPOINT}: pass --resume "
                                      "auto to continue it, or another --out-dir")
            result[0] = ("ok", out_dir, ckpt)
        except (OSError, ConfigError) as e:
            result[0] = ("error", type(e).__name__, str(e))
    if env.world > 1:
        dist.broadcast_object_list(result, src=0)
    if result[0][0] == "error":
        kind = {"FileNotFoundError": FileNotFoundError, "FileExistsError": FileExistsError}
        raise kind.get(result[0][1], RuntimeError)(result[0][2])
    return result[0][1], result[0][2]


def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              autocast: Any) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), 512):
            with autocast():
                out = model(x[i:i + 512]).float()
            loss += F.cross_entropy(out, y[i:i + 512], reduction="sum").item()
            correct += (out.argmax(1) == y[i:i + 512]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def _recall(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[int],
            autocast: Any) -> dict[str, float]:
    """Test recall (share of class c's test samples predicted as c) of each listed class."""
    model.eval()
    with torch.no_grad():
        pred = torch.cat([_forward(model, x[i:i + 512], autocast).argmax(1)
                          for i in range(0, len(x), 512)])
    model.train()
    return {str(c): (pred[y == c] == c).float().mean().item() for c in classes}


def _reported(est: GNSEstimator, value: float) -> float:
    """`value` (est.grad_sq or est.b_simple) as logged and reported: nan, written as null in
    metrics.jsonl, until the estimator has measured |G|^2 (GNSEstimator.measured); before that
    the two are the clamp 1e-30 and tr(Sigma) / 1e-30 (~1e32), no measurements."""
    return value if est.measured else math.nan


def _forward(model: torch.nn.Module, x: torch.Tensor, autocast: Any) -> torch.Tensor:
    with autocast():
        return model(x).float()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training described by `cfg`; returns the summary (also in report.md)."""
    t_start = time.perf_counter()
    env = init_distributed(cfg.device, cfg.dist_backend)
    cfg.validate_world(env.world)
    dev = env.device
    if cfg.threads or dev.type == "cpu":
        torch.set_num_threads(cfg.threads or 1)
    out_dir, ckpt_path = _resolve_run(cfg, env)
    gns_on = cfg.adaptive_batch == "gns"
    gns_norm = gns_on and cfg.gns_source == "norm-layers"

    # ---- data, model, optimizer, estimator, controller ------------------------------------
    x_tr, y_tr, x_te, y_te = (t.to(dev) for t in load_digits_split(cfg.seed))
    counts, prevalence = cfg.class_maps()
    listed = sorted(set(counts) | set(prevalence))   # classes whose counts/recall we report
    if prevalence:                                   # make them rare in the TRAIN split only
        try:
            keep = torch.as_tensor(imbalance_indices(y_tr.cpu(), prevalence, cfg.seed))
        except ValueError as e:
            raise ConfigError(f"--imbalance {cfg.imbalance}: {e}") from None
        x_tr, y_tr = x_tr[keep.to(dev)], y_tr[keep.to(dev)]
    simclr = cfg.task == "simclr"
    if cfg.max_batch_size > len(x_tr):
        raise ConfigError(f"--max-batch-size {cfg.max_batch_size} exceeds the training set "
                          f"({len(x_tr)} samples)")
    torch.manual_seed(cfg.seed)                 # same init everywhere (DDP broadcasts anyway)
    model = make_model(cfg.norm, cfg.width, env.world,
                       cfg.embed_dim if simclr else 10).to(dev)
    if cfg.virtual_devices > 1:
        set_virtual_devices(model, cfg.virtual_devices)
    tracker = None
    if gns_norm:
        try:
            tracker = track(model, loss_reduction="mean")   # all ranks: the default group
        except ValueError as e:
            raise ConfigError(f"--gns-source norm-layers with --norm {cfg.norm}: {e}") from e
    torch.manual_seed(cfg.seed + 1000 * env.rank)
    optimizer = make_optimizer(cfg, model)
    amp = cfg.amp if cfg.amp != "auto" else ("bf16" if dev.type == "cuda" else "off")
    if amp == "fp16" and dev.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device (use bf16 or off on CPU)")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def autocast() -> Any:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=amp_dtype)

    scaler = torch.amp.GradScaler(dev.type, enabled=(amp == "fp16"))
    estimator = GNSEstimator(cfg.gns_memory)          # the whole model's gradient
    norm_estimator = GNSEstimator(cfg.gns_memory) if gns_norm else None
    driver = norm_estimator if norm_estimator is not None else estimator   # -> the controller
    controller = BatchSizeController(
        cfg.batch_size, cfg.micro_batch, env.world, min_batch=cfg.min_batch_size,
        max_batch=cfg.max_batch_size if gns_on else cfg.batch_size, target_snr=cfg.target_snr,
        threshold=cfg.batch_threshold, cooldown=cfg.batch_cooldown,
        allow_shrink=cfg.allow_shrink, lr_scaling=cfg.lr_scaling,
        min_accum=2 if gns_on and env.world == 1 and not gns_norm else 1)
    sampler = make_batch_sampler(cfg, y_tr.cpu(), env.world, env.rank)
    step, samples, progress, epoch = 0, 0, 0.0, 0
    # simclr: the views come from a per-rank generator (checkpointed with the RNG states); the
    # leak gap is measured on a fixed held-out batch (this rank's slice of the test split).
    aug, aug_gen = DigitAugment(), torch.Generator().manual_seed(cfg.seed * 1000 + env.rank)
    if simclr:
        n_leak = cfg.batch_size // env.world
        if cfg.batch_size > len(x_te):
            raise ConfigError(f"--task simclr: the leak-gap batch is one global batch of the "
                              f"test split ({len(x_te)} images); --batch-size "
                              f"{cfg.batch_size} is larger")
        leak_views = aug(x_te[env.rank * n_leak:(env.rank + 1) * n_leak],
                         torch.Generator().manual_seed(cfg.seed * 1000 + env.rank + 500))

    # ---- resume --------------------------------------------------------------------------
    if ckpt_path is not None:
        state = load_checkpoint(ckpt_path)
        diff = config_mismatch(state["config"], {**cfg.to_dict(), "out_dir": out_dir})
        if state["world_size"] != env.world:
            diff.append(f"world size: checkpoint {state['world_size']}, now {env.world}")
        if diff:
            raise ConfigError(f"checkpoint {ckpt_path} comes from an incompatible config: "
                              + "; ".join(diff))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        estimator.load_state_dict(state["estimator"])
        if norm_estimator is not None:   # same gns_source: config_mismatch checked it
            norm_estimator.load_state_dict(state["estimator_norm"])
        controller.load_state_dict(state["controller"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"][env.rank])
        if "aug" in state["rng"][env.rank]:   # absent in checkpoints older than simclr
            aug_gen.set_state(state["rng"][env.rank]["aug"])
        step, samples, progress, epoch = (state["step"], state["samples"], state["progress"],
                                          state["epoch"])
    sampler.set_batch_size(controller.batch_size)
    weights = (sampler.class_weights().to(dev) if cfg.importance_weights == "on" else None)

    ddp: torch.nn.Module = model
    hook: Optional[GNSHook] = None
    if env.world > 1:
        ddp = wrap_ddp(model, dev, sync_buffers=(cfg.norm == "bn"))
        if gns_on:
            hook = GNSHook()
            ddp.register_comm_hook(hook, GNSHook.allreduce)
    params = [p for p in model.parameters() if p.requires_grad]

    if env.is_main:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as fh:
            json.dump({**cfg.to_dict(), "out_dir": out_dir}, fh, indent=1)
    log = MetricsLog(os.path.join(out_dir, "metrics.jsonl"),
                     resume_step=step if ckpt_path else None) if env.is_main else None
    bar = Progress(cfg.max_steps, progress, cfg.log_every, enabled=env.is_main)
    if env.is_main:
        bar.write(f"fastnorm.train: {env.world} process(es) on {dev} ({env.backend or 'no'} "
                  f"process group), norm={cfg.norm}, adaptive batch {cfg.adaptive_batch}"
                  + (f" (noise scale from {cfg.gns_source})" if gns_on else "") + ", "
                  f"B0={cfg.batch_size}, run dir {out_dir}"
                  + (f", resumed at step {step}" if ckpt_path else ""))

    def checkpoint() -> None:
        nonlocal last_ckpt
        last_ckpt = step
        rngs = all_gather_objects({**rng_state(), "aug": aug_gen.get_state()}, env)
        if env.is_main:
            save_checkpoint({
                "version": 1, "config": {**cfg.to_dict(), "out_dir": out_dir},
                "world_size": env.world, "step": step, "samples": samples,
                "progress": progress, "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "estimator": estimator.state_dict(), "controller": controller.state_dict(),
                **({"estimator_norm": norm_estimator.state_dict()}
                   if norm_estimator is not None else {}),
                "sampler": sampler.state_dict(), "rng": rngs}, out_dir)

    def evaluate() -> tuple[float, float]:
        test_loss, test_acc = _evaluate(model, x_te, y_te, autocast)
        log.write({"kind": "eval", "step": step, "samples": samples, "test_loss": test_loss,
                   "test_accuracy": test_acc})
        bar.write(f"step {step}: test loss {test_loss:.4f}, test accuracy {test_acc:.4f}")
        nonlocal last_eval
        last_eval = step
        return test_loss, test_acc

    def measure_leak() -> dict[str, float]:
        """Pretext accuracy train - eval mode on the held-out batch, averaged over ranks (every
        rank calls it: the gather, and SyncBatchNorm's train-mode forward, are collectives)."""
        r = leak_gap(model, *leak_views)
        acc = torch.tensor([r["train"], r["eval"]], dtype=torch.float64)
        if env.world > 1:
            dist.all_reduce(acc)
            acc /= env.world
        tr, ev = acc.tolist()
        row = {"kind": "leak", "step": step, "samples": samples, "train_pretext": tr,
               "eval_pretext": ev, "leak_gap": tr - ev}
        if env.is_main:
            log.write(row)
            bar.write(f"step {step}: pretext accuracy train mode {tr:.3f}, eval mode {ev:.3f}, "
                      f"leak gap {tr - ev:+.3f}")
        nonlocal last_eval, last_leak
        last_eval, last_leak = step, row
        return row

    # ---- the loop --------------------------------------------------------------------------
    test_loss = test_acc = math.nan
    last_eval = last_ckpt = -1
    last_leak: dict[str, float] = {}
    zero = torch.zeros((), device=dev)
    t_train = time.perf_counter()
    while progress < cfg.max_steps:
        sampler.set_epoch(epoch)
        for local_idx in sampler:
            t0 = time.perf_counter()
            batch, k = controller.batch_size, controller.accum_steps
            gain = controller.lr_factor(driver.b_simple)
            lr = lr_schedule(cfg, progress) * gain
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = torch.tensor(local_idx, device=dev)
            loss_sum, correct, small_sq, big_sq = zero, zero, zero, zero
            # The whole-model pair: the comm hook on several ranks, >= 2 micro-batches on one.
            model_pair = gns_on and (env.world > 1 or k >= 2)
            for i, micro in enumerate(idx.split(cfg.micro_batch)):
                last = i == k - 1
                sync = contextlib.nullcontext() if last or env.world == 1 else ddp.no_sync()
                with sync:
                    if simclr:   # k == 1: the whole local batch, negatives from all ranks
                        v1, v2 = aug(x_tr[micro], aug_gen)
                        with autocast():
                            z1, z2 = split_views(ddp(interleave_views(v1, v2)).float())
                        loss = term = nt_xent_loss(z1, z2, cfg.temperature)
                    else:
                        with autocast():
                            out = ddp(x_tr[micro]).float()
                        if weights is None:
                            loss = F.cross_entropy(out, y_tr[micro])
                            term = loss / k
                        else:    # sum of w[y] * loss over the micro-batch / the local batch
                            per = F.cross_entropy(out, y_tr[micro], reduction="none")
                            term = (weights[y_tr[micro]] * per).sum() / len(local_idx)
                            loss = term * k
                        correct = correct + (out.argmax(1) == y_tr[micro]).sum()
                    scaler.scale(term).backward()
                loss_sum = loss_sum + loss.detach()
                if model_pair and env.world == 1 and i == 0:
                    small_sq = grad_sq_norm(params) * (k * k)
            if model_pair:
                if hook is not None:
                    small_sq, big_sq = hook.pop()
                else:
                    big_sq = grad_sq_norm(params)
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            norm_pair = None
            if tracker is not None:
                # measure() sums the k backward calls of this step (all ranks): the mean over
                # the step's examples of |g_i|^2 (batch 1) and the mean over calls of the
                # micro-batch's own |G|^2 (batch micro_batch, not the accumulated step
                # gradient). Each backward took scale * loss / k with loss the micro-batch mean
                # (--importance-weights: the mean of w[y] * loss), so both norms carry
                # (scale / k)^2: undone below. One host sync and one all_reduce of 4 numbers.
                norm_pair = tracker.measure()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            # The one host sync of a step: four scalars.
            loss_v, correct_v, small_v, big_v = torch.stack(
                [loss_sum / k, correct.float(), small_sq, big_sq]).tolist()
            step += 1
            samples += batch
            progress += gain
            if model_pair:
                small_batch = cfg.micro_batch if env.world == 1 else batch // env.world
                estimator.update(small_v / scale ** 2, big_v / scale ** 2, small_batch, batch)
            if norm_pair is not None:
                undo = (k / scale) ** 2
                norm_estimator.update(norm_pair.small_sq_norm * undo,
                                      norm_pair.big_sq_norm * undo, norm_pair.small_batch,
                                      norm_pair.big_batch)
            if gns_on:
                if controller.update(step, driver.b_simple):
                    sampler.set_batch_size(controller.batch_size)
                    if weights is not None:
                        weights = sampler.class_weights().to(dev)
            extra: dict[str, Any] = {}
            if listed:   # this global batch's count of each listed class (a tiny all-reduce)
                per_class = torch.bincount(y_tr[idx], minlength=max(listed) + 1)[listed]
                if env.world > 1:
                    dist.all_reduce(per_class)
                extra["class_counts"] = dict(zip(map(str, listed), per_class.tolist()))
            if not simclr:
                extra["accuracy"] = correct_v / len(local_idx)
            if env.is_main:
                dt = time.perf_counter() - t0
                log.write({"kind": "step", "step": step, "samples": samples,
                           "global_batch": batch, "micro_batch": cfg.micro_batch,
                           "accum": k, "lr": lr, "gain": gain,
                           "grad_sq": _reported(driver, driver.grad_sq),
                           "trace_sigma": driver.trace_sigma,
                           "b_simple": _reported(driver, driver.b_simple),
                           "b_simple_model": _reported(estimator, estimator.b_simple),
                           **({"b_simple_norm": _reported(norm_estimator,
                                                          norm_estimator.b_simple)}
                              if norm_estimator is not None else {}),
                           "loss": loss_v, **extra,
                           "samples_per_s": batch / dt, "step_seconds": dt,
                           "progress": progress, "epoch": epoch})
                bar.update(gain, step, {"B": batch,
                                        "b_simple": round(_reported(driver, driver.b_simple), 1),
                                        "loss": loss_v, "lr": lr})
                if not simclr and cfg.eval_every and step % cfg.eval_every == 0:
                    test_loss, test_acc = evaluate()
            if simclr and cfg.leak_every and step % cfg.leak_every == 0:
                measure_leak()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                checkpoint()
            if progress >= cfg.max_steps:
                break
        else:
            epoch += 1
            continue
        break
    train_seconds = time.perf_counter() - t_train

    # ---- the end ---------------------------------------------------------------------------
    extra_summary: dict[str, Any] = {}
    if simclr:
        leak = measure_leak() if last_eval != step else last_leak
        if env.is_main:
            # Probes on the features before the projection (the last Linear), eval mode.
            backbone = torch.nn.Sequential(*list(model.children())[:-1])
            f_tr, f_te = embed(backbone, x_tr), embed(backbone, x_te)
            probe = {"knn_accuracy": knn_accuracy(f_tr, y_tr, f_te, y_te, k=20),
                     "linear_probe_accuracy": ridge_probe_accuracy(f_tr, y_tr, f_te, y_te)}
            log.write({"kind": "probe", "step": step, **probe})
            bar.write(f"kNN accuracy {probe['knn_accuracy']:.4f}, linear probe "
                      f"{probe['linear_probe_accuracy']:.4f} (test split)")
            extra_summary = {"leak_gap": leak["leak_gap"], "train_pretext": leak["train_pretext"],
                             "eval_pretext": leak["eval_pretext"], **probe}
    elif env.is_main:
        if last_eval != step:
            test_loss, test_acc = evaluate()
        if listed:
            extra_summary["recall"] = _recall(model, x_te, y_te, listed, autocast)
            log.write({"kind": "recall", "step": step, "recall": extra_summary["recall"]})
            bar.write("test recall: " + ", ".join(
                f"class {c} {r:.3f}" for c, r in extra_summary["recall"].items()))
    if last_ckpt != step:
        checkpoint()
    bar.close()
    summary: dict[str, Any] = {}
    if env.is_main:
        summary = {"task": cfg.task, **({} if simclr else {"test_accuracy": test_acc,
                                                            "test_loss": test_loss}),
                   **extra_summary, "steps": step,
                   "samples": samples, "epochs": samples / len(x_tr),
                   "final_global_batch": controller.batch_size,
                   "batch_changes": controller.changes,
                   "b_simple": _reported(driver, driver.b_simple),
                   "gns_source": cfg.gns_source if gns_on else "off",
                   **({"b_simple_model": _reported(estimator, estimator.b_simple),
                       "b_simple_norm": _reported(norm_estimator, norm_estimator.b_simple)}
                      if norm_estimator is not None else {}),
                   "target_snr": cfg.target_snr, "world_size": env.world, "device": str(dev),
                   "norm": cfg.norm, "virtual_devices": cfg.virtual_devices,
                   "stratify": cfg.stratify, "imbalance": cfg.imbalance,
                   "importance_weights": cfg.importance_weights, "optimizer": cfg.optimizer,
                   "lr_scaling": cfg.lr_scaling,
                   "adaptive_batch": cfg.adaptive_batch,
                   "train_seconds": round(train_seconds, 2),
                   "total_seconds": round(time.perf_counter() - t_start, 2), "run_dir": out_dir}
        log.close()
        if cfg.plots:
            write_report(out_dir, summary)
        print(f"done: {step} steps, {samples} samples ({summary['epochs']:.1f} epochs) in "
              f"{train_seconds:.1f} s; global batch {cfg.batch_size} -> "
              f"{controller.batch_size} ({controller.changes} changes), b_simple "
              f"{summary['b_simple']:.1f}", flush=True)
        if simclr:
            print(f"leak gap {summary['leak_gap']:+.4f}; kNN accuracy "
                  f"{summary['knn_accuracy']:.4f}, linear probe "
                  f"{summary['linear_probe_accuracy']:.4f}", flush=True)
        else:
            print(f"test accuracy {test_acc:.4f} (test loss {test_loss:.4f})", flush=True)
        print(f"run directory: {out_dir}", flush=True)
    if env.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
