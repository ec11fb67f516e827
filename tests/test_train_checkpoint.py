"""Checkpoint and resume: a run killed with SIGKILL and resumed with --resume auto ends with
the same parameters, bit for bit, as an uninterrupted run; a crash while writing a checkpoint
leaves the previous one intact."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastnorm.train import checkpoint as ckpt_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small and quick, with batch changes (short cooldown) and checkpoints every 5 steps.
ARGS = ["--max-steps", "300", "--width", "8", "--batch-size", "32", "--micro-batch", "16",
        "--max-batch-size", "256", "--batch-cooldown", "3", "--ckpt-every", "5",
        "--eval-every", "0", "--plots", "false", "--lr", "0.05"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


def _cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "fastnorm.train", *ARGS, *extra]


def _final(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
    subprocess.run(_cmd("--out-dir", ref_dir), env=_env(), check=True, capture_output=True,
                   timeout=300)
    ref = _final(ref_dir)
    assert ref["controller"]["changes"] >= 1           # the batch moved during the run

    proc = subprocess.Popen(_cmd("--out-dir", cut_dir), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(cut_dir, "checkpoint.pt")
    deadline = time.time() + 240
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running, "the run ended before it could be killed"
    killed_at = _final(cut_dir)["step"]
    assert killed_at < ref["step"]

    subprocess.run(_cmd("--out-dir", cut_dir, "--resume", "auto"), env=_env(), check=True,
                   capture_output=True, timeout=300)
    got = _final(cut_dir)
    assert got["step"] == ref["step"] and got["samples"] == ref["samples"]
    for name, t in ref["model"].items():
        assert torch.equal(got["model"][name], t), name
    for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert got["estimator"] == ref["estimator"] and got["controller"] == ref["controller"]
    # metrics.jsonl: the steps logged after the checkpoint by the killed run were dropped.
    with open(os.path.join(cut_dir, "metrics.jsonl")) as fh:
        steps = [json.loads(line)["step"] for line in fh if '"kind": "step"' in line]
    assert steps == list(range(1, ref["step"] + 1))


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = {"step": 1, "model": {"w": torch.ones(3)}}
    ckpt_mod.save_checkpoint(first, str(tmp_path))

    def crash(obj, fh, *a, **k):
        fh.write(b"partial garbage")
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_checkpoint({"step": 2}, str(tmp_path))
    monkeypatch.undo()
    back = ckpt_mod.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert back["step"] == 1 and torch.equal(back["model"]["w"], torch.ones(3))
