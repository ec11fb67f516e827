"""Checkpoints: one file per run directory, `checkpoint.pt`, replaced atomically.

Rank 0 writes the whole state to `checkpoint.pt.tmp`, fsyncs it and renames it over
`checkpoint.pt` (os.replace is atomic on POSIX), so a crash while writing leaves the previous
checkpoint as it was. The RNG states of every rank travel in it, gathered to rank 0.
"""
from __future__ import annotations

import glob
import os
import random
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["CHECKPOINT", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "rng_state", "set_rng_state", "config_mismatch"]

CHECKPOINT = "checkpoint.pt"

# Keys that may change between a run and its resumption: they do not alter the trajectory up to
# the checkpoint (max_steps and the schedule's horizon change what follows, on purpose).
RESUMABLE_CHANGES = frozenset({"out_dir", "resume", "max_steps", "ckpt_every", "eval_every",
                               "log_every", "plots"})


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(state: dict[str, Any], run_dir: str) -> str:
    """Write `state` to run_dir/checkpoint.pt atomically; returns the path."""
    path = os.path.join(run_dir, CHECKPOINT)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def find_checkpoint(resume: str, out_dir: str, runs_root: str = "runs") -> Optional[str]:
    """The checkpoint file `--resume` points at. `auto`: the one in out_dir when out_dir is
    given, else the newest run under runs_root holding one; None when there is none.
    A directory or file path: its checkpoint, or a FileNotFoundError saying what is missing."""
    if resume == "auto":
        if out_dir:
            path = os.path.join(out_dir, CHECKPOINT)
            return path if os.path.isfile(path) else None
        found = glob.glob(os.path.join(runs_root, "*", CHECKPOINT))
        return max(found, key=os.path.getmtime) if found else None
    path = os.path.join(resume, CHECKPOINT) if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        where = f"directory {resume!r} holds no {CHECKPOINT}" if os.path.isdir(resume) \
            else f"{resume!r} does not exist"
        raise FileNotFoundError(f"--resume: {where}; pass a run directory with a checkpoint, "
                                "or --resume auto")
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    # weights_only=False: the state holds numpy/python RNG states and plain dicts we wrote.
    return torch.load(path, map_location="cpu", weights_only=False)


def config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's config and the current one, ignoring
    the keys that may change on resume."""
    from .config import TrainConfig
    defaults = TrainConfig().to_dict()
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        # A key added after the checkpoint was written reads as its default.
        a, b = saved.get(key, defaults.get(key, "<absent>")), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out
