"""--gns-source norm-layers: the noise scale from the norm layers' per-example gradients
(fastnorm.gns.track) drives the batch controller. One process without micro-batches, the
accumulation scaling (k micro-batches give the same per-example norms as one), both estimates
in metrics.jsonl and the comparison plot in report.md, resume, 2 gloo ranks, and the config
errors."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from fastnorm.gns import GNSEstimator
from fastnorm.train import ConfigError, parse_args, train
from fastnorm.train import loop as loop_mod
from helpers import free_port

TINY = ["--width", "8", "--eval-every", "0", "--plots", "false"]
NORM = ["--norm", "ln", "--gns-source", "norm-layers"]


@pytest.fixture(autouse=True)
def _keep_process_state():
    # train() sets the thread count and seeds torch: restore both for later tests.
    n, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(n)
    torch.set_rng_state(rng)


def _cfg(*flags: str):
    return parse_args([*TINY, *flags])


def _rows(run_dir: str, kind: str = "step") -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [r for r in map(json.loads, fh) if r["kind"] == kind]


def test_one_process_norm_layers_drive_the_batch(tmp_path):
    run = str(tmp_path / "run")
    # --min-batch-size 16 = one micro-batch: allowed (no accumulation needed for the estimate).
    summary = train(_cfg("--out-dir", run, *NORM, "--max-steps", "20", "--batch-size", "32",
                         "--micro-batch", "16", "--min-batch-size", "16", "--max-batch-size",
                         "128", "--batch-cooldown", "3", "--plots", "true"))
    steps = _rows(run)
    assert summary["gns_source"] == "norm-layers" and summary["batch_changes"] > 0
    assert len({r["global_batch"] for r in steps}) > 1
    for r in steps:
        assert r["b_simple"] == r["b_simple_norm"] and 0 < r["b_simple_norm"] < 1e6
        assert "b_simple_model" in r
    # The whole-model estimate runs (and is logged) while a step has >= 2 micro-batches.
    assert steps[0]["accum"] == 2 and steps[0]["b_simple_model"] > 0
    report = open(os.path.join(run, "report.md")).read()
    assert "![noise scale sources](gns_sources.png)" in report
    assert "median of b_simple(norm layers) / b_simple(whole model)" in report
    assert os.path.getsize(os.path.join(run, "gns_sources.png")) > 0


def test_model_source_logs_no_norm_estimate(tmp_path):
    run = str(tmp_path / "run")
    train(_cfg("--out-dir", run, "--norm", "ln", "--max-steps", "3", "--batch-size", "32",
               "--micro-batch", "16", "--plots", "true"))
    steps = _rows(run)
    assert all(r["b_simple"] == r["b_simple_model"] and "b_simple_norm" not in r
               for r in steps)
    assert not os.path.exists(os.path.join(run, "gns_sources.png"))


def test_noise_scale_is_null_in_the_log_until_measured(tmp_path, monkeypatch):
    """A first step whose |G|^2 estimate is 0 (made so here: the small norm scaled to
    B_big / B_small times the big one) used to log b_simple = tr(Sigma) / 1e-30; it logs null
    (valid JSON, no NaN) until the estimate is positive, and the report handles the gap."""

    class ZeroFirst(GNSEstimator):
        def update(self, small, big, small_batch, big_batch):
            if self.updates == 0:
                small = big * big_batch / small_batch
            return super().update(small, big, small_batch, big_batch)

    monkeypatch.setattr(loop_mod, "GNSEstimator", ZeroFirst)
    run = str(tmp_path / "run")
    summary = train(_cfg("--out-dir", run, "--max-steps", "4", "--batch-size", "32",
                         "--micro-batch", "16", "--plots", "true"))
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        text = fh.read()
    assert "NaN" not in text and "Infinity" not in text
    steps = _rows(run)
    first = steps[0]
    assert first["b_simple"] is None and first["grad_sq"] is None
    assert first["b_simple_model"] is None and first["trace_sigma"] > 0
    later = [r["b_simple"] for r in steps[1:] if r["b_simple"] is not None]
    assert later and all(0 < b < 1e6 for b in later)
    assert summary["b_simple"] == steps[-1]["b_simple"]
    assert os.path.getsize(os.path.join(run, "batch_size.png")) > 0


def _norm_updates(monkeypatch, run_dir: str, micro: int) -> list[tuple]:
    """The (small, big, small_batch, big_batch) pairs the norm-layer estimator got."""
    seen: list[tuple] = []

    class Recording(GNSEstimator):
        def update(self, small, big, small_batch, big_batch):
            if small_batch == 1:
                seen.append((small, big, small_batch, big_batch))
            return super().update(small, big, small_batch, big_batch)

    monkeypatch.setattr(loop_mod, "GNSEstimator", Recording)
    train(_cfg("--out-dir", run_dir, *NORM, "--max-steps", "1", "--batch-size", "32",
               "--micro-batch", str(micro), "--min-batch-size", str(micro)))
    return seen


def test_accumulation_is_undone(tmp_path, monkeypatch):
    # The first step sees the same 32 examples and weights whether it runs as 1 or 4 backward
    # calls: the mean per-example |g_i|^2 must agree (each call's loss is scaled by 1/k).
    one = _norm_updates(monkeypatch, str(tmp_path / "k1"), 32)
    four = _norm_updates(monkeypatch, str(tmp_path / "k4"), 8)
    assert [u[3] for u in one[:1] + four[:1]] == [32, 8]
    assert math.isclose(one[0][0], four[0][0], rel_tol=1e-4)
    # A micro-batch's mean gradient is noisier than the step's: larger squared norm.
    assert four[0][1] > one[0][1]


def test_resume_keeps_the_norm_estimator(tmp_path, monkeypatch):
    common = [*NORM, "--batch-size", "32", "--micro-batch", "16", "--min-batch-size", "16",
              "--batch-cooldown", "2", "--max-steps", "10", "--ckpt-every", "4"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    train(_cfg("--out-dir", ref, *common))
    real = loop_mod.save_checkpoint

    def save(state, run_dir):
        path = real(state, run_dir)
        if state["step"] == 4:
            raise KeyboardInterrupt("cut")
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg("--out-dir", cut, *common))
    monkeypatch.undo()
    train(_cfg("--out-dir", cut, "--resume", "auto", *common))
    keys = ("loss", "global_batch", "b_simple_norm", "b_simple_model")
    assert [[r[k] for k in keys] for r in _rows(ref)] == [[r[k] for k in keys]
                                                          for r in _rows(cut)]


def test_group_norm_layers_drive_the_estimate(tmp_path):
    run = str(tmp_path / "run")
    train(_cfg("--out-dir", run, "--norm", "gn", "--gns-source", "norm-layers",
               "--max-steps", "2", "--batch-size", "32", "--micro-batch", "16"))
    rows = _rows(run)
    assert rows and all(r["b_simple_norm"] > 0 for r in rows)


@pytest.mark.parametrize("flags, match", [
    (["--gns-source", "norm-layers"], r"use --norm ln or gn \(got --norm bn"),
    (["--gns-source", "norm-layers", "--norm", "syncbn"], "use --norm ln or gn"),
    (NORM + ["--adaptive-batch", "off"], "needs --adaptive-batch gns"),
    (NORM + ["--micro-batch", "1"], "--micro-batch must be >= 2"),
    (["--gns-source", "layers"], r"--gns-source: expected one of \['model', 'norm-layers'\]"),
])
def test_config_errors(flags, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*flags)


def test_one_micro_batch_is_enough_for_norm_layers():
    with pytest.raises(ConfigError, match="or --gns-source norm-layers"):
        _cfg("--norm", "ln", "--batch-size", "32", "--micro-batch", "32").validate_world(1)
    _cfg(*NORM, "--batch-size", "32", "--micro-batch", "32").validate_world(1)


# --- 2 gloo ranks --------------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(_cfg("--out-dir", root, *NORM, "--max-steps", "12", "--batch-size", "32",
               "--micro-batch", "8", "--max-batch-size", "64", "--batch-cooldown", "3",
               "--plots", "true"))


@pytest.mark.slow
def test_two_ranks_log_both_estimates(tmp_path):
    run = str(tmp_path / "run")
    mp.spawn(_worker, args=(2, free_port(), run), nprocs=2)
    steps = _rows(run)
    assert len(steps) >= 6
    # Several ranks: the DDP comm hook updates the whole-model estimate at every step. Either
    # estimate is null while its |G|^2 average is not positive (a short noisy run has such
    # steps), a positive batch size otherwise.
    for key in ("b_simple_model", "b_simple_norm"):
        assert all(r[key] is None or r[key] > 0 for r in steps), key
    assert all(r["b_simple"] == r["b_simple_norm"] for r in steps)
    both = [r for r in steps if r["b_simple_model"] is not None and r["b_simple_norm"] is not None]
    assert both
    report = open(os.path.join(run, "report.md")).read()
    assert f"over the {len(both)} steps with both" in report
