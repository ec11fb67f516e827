"""Data: the embedded digits dataset and the batch-sampler protocol the trainer uses.

Batch-sampler protocol (what the trainer relies on, and all it relies on; a sampler such as a
stratified one plugs in through `make_batch_sampler`):

  * iterating yields, per optimizer step, the list of dataset indices of THIS rank's share of
    the global batch (global batch_size / num_replicas indices); every rank derives the same
    global plan from (seed, epoch) without communication, and the ranks' shares are disjoint;
    an epoch is one pass without replacement over the data (the tail that does not fill a whole
    global batch is left out);
  * set_epoch(e): the epoch to iterate next (a new e starts at the epoch's beginning, the
    current e continues where it stopped - which is what a mid-epoch resume needs);
  * set_batch_size(B): the global batch from the next batch on; B % num_replicas == 0;
  * state_dict() / load_state_dict(): the exact position, for a mid-epoch resume.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

__all__ = ["DistributedBatchSampler", "make_batch_sampler", "load_digits_split"]


class DistributedBatchSampler:
    """Random batches without replacement, one global permutation per (seed, epoch), each rank
    taking its contiguous slice of every global batch.

    Args:
        num_samples: dataset size.
        batch_size: global batch size, a multiple of num_replicas.
        num_replicas, rank: default to the initialized process group (1 and 0 without one).
        seed: seed of the permutations.
    """

    def __init__(self, num_samples: int, batch_size: int, *, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, seed: int = 0) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist
            initialized = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (
                dist.get_world_size() if initialized else 1)
            rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        if num_samples <= 0:
            raise ValueError(f"DistributedBatchSampler: num_samples must be > 0, got "
                             f"{num_samples}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"DistributedBatchSampler: rank {rank} not in [0, {num_replicas})")
        self.num_samples = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0     # indices of this epoch's permutation already handed out
        self.batch_size = 0
        self.set_batch_size(batch_size)

    def set_batch_size(self, batch_size: int) -> None:
        if batch_size <= 0 or batch_size % self.num_replicas:
            raise ValueError(f"DistributedBatchSampler: global batch size {batch_size} must be "
                             f"a positive multiple of num_replicas={self.num_replicas}")
        if batch_size > self.num_samples:
            raise ValueError(f"DistributedBatchSampler: global batch size {batch_size} exceeds "
                             f"the dataset ({self.num_samples} samples)")
        self.batch_size = int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self._permutation()
        while self.position + self.batch_size <= self.num_samples:
            batch = perm[self.position:self.position + self.batch_size]
            share = self.batch_size // self.num_replicas
            self.position += self.batch_size   # before yield: a state_dict now is after it
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()
        self.position = 0                      # a completed pass; set_epoch moves on

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size,
                "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError("DistributedBatchSampler.load_state_dict: state is for "
                             f"{state['num_samples']} samples / seed {state['seed']}, this "
                             f"sampler has {self.num_samples} / {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.set_batch_size(int(state["batch_size"]))


def make_batch_sampler(cfg: Any, labels: torch.Tensor, world: int, rank: int) -> Any:
    """The batch sampler named by cfg.sampler, over a dataset with these labels (a stratified
    sampler needs them). The seam where other samplers plug in: --stratify gives a
    StratifiedBatchSampler; its errors (a class absent from the labels, counts that leave no
    filler slot) come back as ConfigError naming the flag."""
    counts = cfg.class_maps()[0] if hasattr(cfg, "class_maps") else {}
    if counts:
        from .config import ConfigError
        from .sampler import StratifiedBatchSampler
        try:
            return StratifiedBatchSampler(labels, cfg.batch_size, counts, num_replicas=world,
                                          rank=rank, seed=cfg.seed, scope=cfg.stratify_scope)
        except ValueError as e:
            raise ConfigError(f"--stratify {cfg.stratify}: {e}") from None
    if cfg.sampler == "random":
        return DistributedBatchSampler(len(labels), cfg.batch_size, num_replicas=world,
                                       rank=rank, seed=cfg.seed)
    raise ValueError(f"unknown sampler {cfg.sampler!r}")


def load_digits_split(seed: int = 0, test_fraction: float = 0.2
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes, no download), as float32
    images (N, 1, 8, 8) standardized with the training mean/std, and a stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError("fastnorm.train's default dataset needs scikit-learn: "
                          "pip install scikit-learn") from None
    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data, digits.target,
                                              test_size=test_fraction, random_state=seed,
                                              stratify=digits.target)
    x_tr = torch.tensor(x_tr, dtype=torch.float32).view(-1, 1, 8, 8)
    x_te = torch.tensor(x_te, dtype=torch.float32).view(-1, 1, 8, 8)
    mean, std = x_tr.mean(), x_tr.std()
    return ((x_tr - mean) / std, torch.tensor(y_tr, dtype=torch.long),
            (x_te - mean) / std, torch.tensor(y_te, dtype=torch.long))
