"""The trainer's issue-8 wiring: --stratify/--imbalance/--importance-weights, --task simclr and
--virtual-devices. Exact class counts per global batch on 1 and 2 ranks (from the sampler and
from the trainer's per-step log), bitwise resume with stratified batches and with simclr (the
augmentation generator travels in the checkpoint), SimCLR on 2 gloo ranks with every norm, and
the configuration errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from fastnorm.train import ConfigError, make_batch_sampler, parse_args, train
from fastnorm.train import loop as loop_mod
from fastnorm.train.data import load_digits_split
from helpers import free_port

TINY = ["--width", "8", "--plots", "false", "--eval-every", "0"]


def _cfg(*flags: str):
    return parse_args([*TINY, *flags])


def _rows(run_dir: str, kind: str = "step") -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == kind]


# --- stratified batches ----------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2])
def test_make_batch_sampler_exact_counts(world):
    labels = load_digits_split(0)[1]
    cfg = _cfg("--stratify", "3:4,8:2", "--batch-size", "32", "--micro-batch", "8")
    samplers = [make_batch_sampler(cfg, labels, world, r) for r in range(world)]
    for s in samplers:
        s.set_epoch(0)
    batch = 32
    for step, shares in enumerate(zip(*samplers)):
        idx = torch.tensor([i for share in shares for i in share])
        assert len(idx) == batch and len(set(idx.tolist())) == batch
        assert all(len(share) == batch // world for share in shares)
        counts = torch.bincount(labels[idx], minlength=10)
        assert (counts[3].item(), counts[8].item()) == (4, 2), step
        if step == 2:   # the controller changes the batch between steps
            batch = 64
            for s in samplers:
                s.set_batch_size(batch)
    assert step > 10


def test_stratified_run_logs_exact_counts_and_recall(tmp_path):
    run = str(tmp_path / "run")
    summary = train(_cfg("--out-dir", run, "--max-steps", "40", "--batch-size", "32",
                         "--micro-batch", "8", "--max-batch-size", "128", "--batch-cooldown",
                         "3", "--stratify", "3:4", "--imbalance", "3:0.04",
                         "--importance-weights", "on"))
    steps = _rows(run)
    assert len({r["global_batch"] for r in steps}) > 1        # the batch changed on the way
    assert all(r["class_counts"] == {"3": 4} for r in steps)
    assert set(summary["recall"]) == {"3"} and 0.0 <= summary["recall"]["3"] <= 1.0
    assert _rows(run, "recall")[0]["recall"] == summary["recall"]


def _cut_after(monkeypatch, cut_step: int) -> None:
    """Make the trainer stop (as if killed) right after writing the checkpoint of cut_step."""
    real = loop_mod.save_checkpoint

    def save(state, run_dir):
        path = real(state, run_dir)
        if state["step"] == cut_step:
            raise KeyboardInterrupt("cut")
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", save)


def _final_model(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]


@pytest.mark.parametrize("flags", [
    ["--stratify", "3:4,8:4", "--importance-weights", "on", "--batch-size", "32",
     "--micro-batch", "8", "--max-batch-size", "128", "--batch-cooldown", "3"],
    ["--task", "simclr", "--batch-size", "32", "--max-batch-size", "32", "--virtual-devices",
     "4", "--leak-every", "5", "--optimizer", "adamw", "--lr", "0.003"],  # simclr's defaults
], ids=["stratify", "simclr"])
def test_resume_continues_identically(tmp_path, monkeypatch, flags):
    common = [*flags, "--max-steps", "24", "--ckpt-every", "6"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    train(_cfg("--out-dir", ref, *common))
    _cut_after(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg("--out-dir", cut, *common))
    monkeypatch.undo()
    train(_cfg("--out-dir", cut, "--resume", "auto", *common))
    a, b = _final_model(ref), _final_model(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _rows(ref), _rows(cut)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


# --- simclr on 2 gloo ranks --------------------------------------------------------------------

def _worker(rank: int, world: int, ports: list[int], root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1")
    runs = [("stratified", ["--stratify", "3:3,8:2", "--batch-size", "32", "--micro-batch",
                            "8", "--max-batch-size", "64", "--batch-cooldown", "3"])]
    runs += [(f"simclr-{norm}", ["--task", "simclr", "--norm", norm, "--adaptive-batch", "off",
                                 "--batch-size", "32", "--micro-batch", "16",
                                 "--max-batch-size", "32", "--leak-every", "4",
                                 "--optimizer", "adamw", "--lr", "0.003", "--plots", "true"])
             for norm in ("bn", "syncbn", "gn", "ln")]
    for (name, flags), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        train(_cfg("--out-dir", os.path.join(root, name), "--max-steps", "8", *flags))


def test_two_ranks_stratified_and_simclr_every_norm(tmp_path):
    mp.spawn(_worker, args=(2, [free_port() for _ in range(5)], str(tmp_path)), nprocs=2)
    steps = _rows(str(tmp_path / "stratified"))
    assert len(steps) >= 4 and len({r["global_batch"] for r in steps}) > 1
    assert all(r["class_counts"] == {"3": 3, "8": 2} for r in steps)   # summed over ranks
    for norm in ("bn", "syncbn", "gn", "ln"):
        run = str(tmp_path / f"simclr-{norm}")
        steps, leak = _rows(run), _rows(run, "leak")
        probe = _rows(run, "probe")[0]
        assert len(steps) == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
        assert [r["step"] for r in leak] == [4, 8]
        assert all(-1 <= r["leak_gap"] <= 1 for r in leak)
        assert 0.1 < probe["knn_accuracy"] <= 1 and 0.1 < probe["linear_probe_accuracy"] <= 1
        report = open(os.path.join(run, "report.md")).read()
        assert "leak_gap" in report and "knn_accuracy" in report and "leak_gap.png" in report


# --- configuration errors ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (["--importance-weights", "on"], "needs --stratify"),
    (["--task", "regress"], "--task: expected one of"),
    (["--norm", "bn2"], "--norm: expected one of"),
    (["--stratify", "3:x"], "--stratify: expected CLASS:INT"),
    (["--stratify", "3:0"], "count of class 3 must be >= 1"),
    (["--imbalance", "3:0.6,8:0.6"], "sum below 1"),
    (["--virtual-devices", "4", "--norm", "gn"], "needs --norm bn"),
    (["--virtual-devices", "3"], "must divide --micro-batch"),
    (["--task", "simclr", "--adaptive-batch", "gns"], "needs --adaptive-batch off"),
    (["--task", "simclr", "--adaptive-batch", "off", "--stratify", "3:2"],
     "apply to --task classify"),
])
def test_config_errors(flags, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*flags)


@pytest.mark.parametrize("flags, world, match", [
    (["--stratify", "3:20,8:12", "--batch-size", "32"], 1, "no other sample in the smallest"),
    (["--stratify", "3:10,8:6", "--stratify-scope", "local", "--batch-size", "32",
      "--micro-batch", "8"], 2, "per rank"),
    (["--batch-size", "48", "--micro-batch", "16"], 2, "multiple of world size"),
    (["--task", "simclr", "--batch-size", "32", "--micro-batch", "16"], 1,
     "one micro-batch per step"),
    (["--task", "simclr", "--batch-size", "33"], 2, "multiple of the world size 2"),
    (["--task", "simclr", "--adaptive-batch", "off", "--batch-size", "32", "--micro-batch",
      "16", "--norm", "bn", "--virtual-devices", "8", "--max-batch-size", "32"], 1,
     "one micro-batch per step"),
])
def test_world_config_errors(flags, world, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*flags).validate_world(world)


@pytest.mark.parametrize("world", [1, 2])
def test_simclr_defaults_to_one_micro_batch_per_rank_and_a_fixed_batch(world):
    """`--task simclr --batch-size 64` runs as given: its loss couples all samples, so the
    micro-batch it was not given is the whole per-rank batch and the batch stays fixed; an
    explicit conflicting value is still refused (test_world_config_errors)."""
    cfg = _cfg("--task", "simclr", "--batch-size", "64")
    assert cfg.adaptive_batch == "off"
    cfg.validate_world(world)
    assert cfg.micro_batch == 64 // world
    cfg = _cfg("--task", "simclr", "--batch-size", "64", "--micro-batch", str(64 // world))
    cfg.validate_world(world)
    classify = _cfg("--batch-size", "64")   # classify keeps its own defaults
    classify.validate_world(world)
    assert (classify.micro_batch, classify.adaptive_batch) == (16, "gns")


def test_class_absent_from_labels_is_a_config_error():
    labels = load_digits_split(0)[1]
    with pytest.raises(ConfigError, match="--stratify 11:2: .*class 11"):
        make_batch_sampler(_cfg("--stratify", "11:2"), labels, 1, 0)
    with pytest.raises(ConfigError, match="--imbalance 12:0.05: .*class 12"):
        train(_cfg("--imbalance", "12:0.05", "--out-dir", "/nonexistent/never-written"))
