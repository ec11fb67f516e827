"""Batch-size controller: global batch B = clip(target_snr * b_simple, B_min, B_max), quantized
to multiples of world x micro-batch, changed with hysteresis; and the learning-rate factor that
goes with B.

LR coupling (B0 = initial batch, b = b_simple):
  adascale  gain = (1 + b / B0) / (1 + b / B): the ratio of the optimal SGD step sizes at B and
            at B0 under the noise-scale model (McCandlish et al. eq. 2.6; AdaScale's gain);
  linear    B / B0;     sqrt    sqrt(B / B0);     none    1.
Training progress is counted in scale-invariant steps: each optimizer step adds its gain, so a
schedule over progress does not depend on how the batch moved.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["BatchSizeController"]

LR_SCALINGS = ("adascale", "linear", "sqrt", "none")


class BatchSizeController:
    """Chooses the global batch size from the gradient noise scale.

    Args:
        initial_batch: B0, a multiple of world_size * micro_batch.
        micro_batch: per-rank micro-batch.
        world_size: number of ranks.
        min_batch, max_batch: bounds on B (rounded inward to multiples of the unit).
        target_snr: B follows target_snr * b_simple.
        threshold: no change unless |B_new - B| > threshold * B.
        cooldown: optimizer steps that must pass between two changes.
        allow_shrink: False makes B non-decreasing.
        lr_scaling: adascale, linear, sqrt or none.
        min_accum: smallest number of micro-batches per step (2 where one process measures the
            noise scale from its micro-batches).
    """

    def __init__(self, initial_batch: int, micro_batch: int, world_size: int = 1, *,
                 min_batch: int = 0, max_batch: int = 0, target_snr: float = 1.0,
                 threshold: float = 0.1, cooldown: int = 0, allow_shrink: bool = True,
                 lr_scaling: str = "adascale", min_accum: int = 1) -> None:
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(f"BatchSizeController: lr_scaling must be one of {LR_SCALINGS}, "
                             f"got {lr_scaling!r}")
        if micro_batch <= 0 or world_size <= 0:
            raise ValueError("BatchSizeController: micro_batch and world_size must be > 0")
        self.unit = micro_batch * world_size
        self.micro_batch = micro_batch
        self.world_size = world_size
        max_batch = max_batch or initial_batch
        min_batch = max(min_batch or initial_batch, min_accum * self.unit)
        self.min_batch = -(-min_batch // self.unit) * self.unit      # round up
        self.max_batch = max_batch // self.unit * self.unit           # round down
        if self.min_batch > self.max_batch:
            raise ValueError(f"BatchSizeController: no multiple of world_size x micro_batch = "
                             f"{self.unit} in [{min_batch}, {max_batch}]")
        if initial_batch % self.unit or not self.min_batch <= initial_batch <= self.max_batch:
            raise ValueError(f"BatchSizeController: initial batch {initial_batch} must be a "
                             f"multiple of {self.unit} in [{self.min_batch}, {self.max_batch}]")
        self.initial_batch = initial_batch
        self.target_snr = float(target_snr)
        self.threshold = float(threshold)
        self.cooldown = int(cooldown)
        self.allow_shrink = allow_shrink
        self.lr_scaling = lr_scaling
        self.batch_size = initial_batch
        self.last_change = 0          # step of the last change (0: none yet)
        self.changes = 0

    @property
    def local_batch(self) -> int:
        """This rank's share of the global batch."""
        return self.batch_size // self.world_size

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step on each rank."""
        return self.local_batch // self.micro_batch

    def target(self, b_simple: float) -> int:
        """clip(target_snr * b_simple, B_min, B_max) rounded to the nearest multiple of the
        unit (world_size x micro_batch); the current B when b_simple is not known yet."""
        if not math.isfinite(b_simple):
            return self.batch_size if math.isnan(b_simple) else self.max_batch
        want = min(max(self.target_snr * b_simple, self.min_batch), self.max_batch)
        return min(max(round(want / self.unit) * self.unit, self.min_batch), self.max_batch)

    def update(self, step: int, b_simple: float) -> bool:
        """Consider a new batch size after optimizer step `step` (1-based); True when it
        changed."""
        if math.isnan(b_simple) or step - self.last_change < self.cooldown:
            return False
        new = self.target(b_simple)
        if not self.allow_shrink:
            new = max(new, self.batch_size)
        if abs(new - self.batch_size) <= self.threshold * self.batch_size:
            return False
        self.batch_size = new
        self.last_change = step
        self.changes += 1
        return True

    def lr_factor(self, b_simple: float) -> float:
        """The LR multiplier at the current batch size (the gain)."""
        ratio = self.batch_size / self.initial_batch
        if self.lr_scaling == "linear":
            return ratio
        if self.lr_scaling == "sqrt":
            return math.sqrt(ratio)
        if self.lr_scaling == "none":
            return 1.0
        if math.isnan(b_simple):
            return 1.0
        if math.isinf(b_simple):
            return ratio
        return (1.0 + b_simple / self.initial_batch) / (1.0 + b_simple / self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "last_change": self.last_change,
                "changes": self.changes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = int(state["batch_size"])
        self.last_change = int(state["last_change"])
        self.changes = int(state["changes"])
