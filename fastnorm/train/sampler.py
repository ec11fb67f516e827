"""Fixed-count stratified batches across processes, with the importance weights that keep the
loss unbiased.

`StratifiedBatchSampler` is a DataLoader `batch_sampler`: each item it yields is the list of
dataset indices of *this rank's* share of one global batch (one optimizer step). Every rank
builds the same global plan from (seed, epoch) alone, so no communication is needed, and takes
its own disjoint slice of it.

The plan for one epoch
----------------------
* The *filler pool* is every sample whose class is not listed in `counts`. It is permuted once
  per epoch and consumed front to back without replacement; the epoch ends when the pool holds
  fewer samples than the next batch needs (those few leftover samples, a different random set
  each epoch, are skipped: every batch is full, so exact counts and equal rank shares hold).
* Each *listed class* c contributes n_c samples to every global batch (n_c = counts[c] for
  scope="global", counts[c] * num_replicas for scope="local"). It is drawn from a stream of
  fresh random permutations of its samples, in blocks of n_c; a permutation's tail shorter than
  n_c is skipped, so a global batch never holds a sample twice. A listed class with fewer than
  n_c samples cannot fill its block without repeats: its block then concatenates fresh
  permutations (a sample repeats within the batch, possibly on different ranks; a warning says
  so at construction). Class streams restart every epoch, so the plan is a function of
  (seed, epoch) only.
* The global batch is the listed blocks followed by the filler samples, rotated by a random
  offset in [0, R) (R = num_replicas); rank r takes positions r, r + R, r + 2R, ... and shuffles
  its share. With scope="local" every block length is a multiple of R, so every rank gets
  exactly counts[c] of class c; with scope="global" a rank gets counts[c] // R or one more, and
  which ranks get the extra one changes from step to step.

Importance weights (`class_weights`)
------------------------------------
With N samples, m_c of class c, F in the filler pool, a global batch of B and f = B - sum n_c
filler slots per batch, the population share of class c is p_c = m_c / N and its expected batch
share is q_c = n_c / B (listed) or (f / B)(m_c / F) (filler). The weight is w_c = p_c / q_c:

    listed c:  w_c = m_c B / (N n_c)          filler c:  w_c = F B / (N f)  (one value for all)

Filler classes need a weight too: their batch share (f / B)(m_c / F) differs from m_c / N by the
same factor for every unlisted class (rare classes take slots, so the others are under-sampled).

Unbiasedness. Every listed draw is marginally uniform over its class (each position of a random
permutation is) and every filler draw marginally uniform over the filler pool. For per-sample
losses l_i, the estimator  L_hat = (1/B) sum_{j in batch} w_{y_j} l_j  has expectation

    E[L_hat] = (1/B) [ sum_listed n_c w_c (1/m_c) sum_{i in c} l_i
                       + f w_F (1/F) sum_{i in pool} l_i ]
             = (1/N) [ sum_listed sum_{i in c} l_i + sum_{i in pool} l_i ] = (1/N) sum_i l_i,

the population loss. The weights of any global batch sum to exactly B
(sum_listed n_c w_c + f w_F = B (sum_listed m_c + F) / N = B), so "weighted sum / sum of weights"
and "weighted mean over the batch" are the same number for the global batch.

How to use them: on each rank, `loss = (w[y] * per_sample_loss).mean()` (divide by the *local*
batch size B / R, not by the local sum of weights). DDP's gradient average over ranks then gives
exactly the gradient of L_hat. With scope="global" a rank's share of weights does not sum to
B / R, and dividing by it would turn L_hat into a (biased) ratio estimator. The weights depend on
the batch size: fetch them again after `set_batch_size`.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["StratifiedBatchSampler", "parse_class_map", "imbalance_indices"]

# Independent random streams of one epoch's plan: SeedSequence([seed, epoch, stream, ...]).
_FILLER, _CLASS, _REPEAT, _SHUFFLE = 0, 1, 2, 3
_STATE_VERSION = 1


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


def _default_world(num_replicas: Optional[int], rank: Optional[int]) -> tuple[int, int]:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialized else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    return int(num_replicas), int(rank)


class StratifiedBatchSampler:
    """Batch sampler whose every global batch holds exactly `counts[c]` samples of each listed
    class c (scope="local": every rank's batch does, and `counts` are per-rank counts), the rest
    filled without replacement from the samples of the unlisted classes.

    Args:
        labels: one non-negative integer class per dataset index (sequence, array or tensor).
        batch_size: the global batch size B (all ranks together); divisible by `num_replicas`.
        counts: {class: count} with positive counts; per global batch (scope="global") or per
            rank batch (scope="local"). Their total (times num_replicas for "local") must leave
            at least one filler slot in the global batch.
        num_replicas, rank: default to torch.distributed's world size and rank when it is
            initialized, else 1 and 0.
        seed: the plan is a function of (seed, epoch); every rank must pass the same seed.
        scope: "global" or "local", see above.

    Iterating yields, per optimizer step, this rank's B / num_replicas indices (a list of int).
    An epoch is one pass over the filler pool; `len(sampler)` is the number of batches of a full
    epoch at the current batch size. See the module docstring for the plan and the weights.

    Protocol (shared with the trainer's plain batch sampler): `set_epoch(e)` (a no-op when `e` is
    the current epoch, so a resumed mid-epoch position survives the trainer's usual call),
    `set_batch_size(B)` (takes effect at the next batch, also inside a running iteration),
    `state_dict()` / `load_state_dict()` (exact mid-epoch resume; the state counts the batches
    *yielded*, so a DataLoader with workers, which prefetches, is ahead of the consumed steps:
    save the state with num_workers=0 or account for the prefetch). Iterating an exhausted epoch
    again without `set_epoch` repeats it, like torch's DistributedSampler.
    """

    def __init__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int,
                 counts: Mapping[int, int], *, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, seed: int = 0, scope: str = "global") -> None:
        name = "StratifiedBatchSampler"
        labels_np = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor)
                     else np.asarray(labels))
        if labels_np.ndim != 1 or labels_np.size == 0:
            raise ValueError(f"{name}: labels must be a non-empty 1-D sequence of class ids, "
                             f"got shape {tuple(labels_np.shape)}")
        if not np.issubdtype(labels_np.dtype, np.integer):
            if np.issubdtype(labels_np.dtype, np.floating) and \
                    np.array_equal(labels_np, np.round(labels_np)):
                labels_np = labels_np.astype(np.int64)
            else:
                raise TypeError(f"{name}: labels must be integers, got dtype {labels_np.dtype}")
        labels_np = labels_np.astype(np.int64)
        if labels_np.min() < 0:
            raise ValueError(f"{name}: labels must be non-negative, found {labels_np.min()}")
        if scope not in ("global", "local"):
            raise ValueError(f"{name}: scope must be 'global' or 'local', got {scope!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"{name}: seed must be a non-negative int, got {seed!r}")
        num_replicas, rank = _default_world(num_replicas, rank)
        if num_replicas < 1:
            raise ValueError(f"{name}: num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"{name}: rank {rank} is out of range for num_replicas="
                             f"{num_replicas}")

        present = np.unique(labels_np)
        counts_clean: dict[int, int] = {}
        for c, n in dict(counts).items():
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise TypeError(f"{name}: counts keys must be int class ids, got {c!r}")
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
                raise TypeError(f"{name}: count of class {c} must be an int, got {n!r}")
            if n < 0:
                raise ValueError(f"{name}: count of class {c} is negative ({n})")
            if n == 0:
                raise ValueError(f"{name}: count of class {c} is 0; a listed class needs a "
                                 "positive count (leave it out of counts to sample it as filler)")
            if c not in present:
                raise ValueError(f"{name}: class {c} in counts does not occur in labels "
                                 f"(classes present: {present.tolist()})")
            counts_clean[int(c)] = int(n)

        self.labels = labels_np
        self.counts = dict(sorted(counts_clean.items()))
        self.scope = scope
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.num_classes = int(labels_np.max()) + 1
        listed = np.isin(labels_np, list(self.counts))
        self._filler_pool = np.flatnonzero(~listed)
        if self._filler_pool.size == 0:
            raise ValueError(f"{name}: every class is listed in counts, so the filler pool is "
                             "empty; an epoch is one pass over the unlisted classes' samples")
        self._class_pools = {c: np.flatnonzero(labels_np == c) for c in self.counts}
        # Global samples per batch of each listed class (constant: independent of B).
        factor = num_replicas if scope == "local" else 1
        self._per_batch = {c: n * factor for c, n in self.counts.items()}
        for c, n in self._per_batch.items():
            if self._class_pools[c].size < n:
                warnings.warn(f"{name}: class {c} has {self._class_pools[c].size} samples but "
                              f"every global batch takes {n}: its samples repeat within a batch",
                              stacklevel=2)
        self._fingerprint = hashlib.sha1(labels_np.tobytes()).hexdigest()

        self._check_batch_size(batch_size)
        self._batch_size = int(batch_size)
        self._epoch = 0
        self._reset_position()

    # --- validation and state ------------------------------------------------------------------

    def _check_batch_size(self, batch_size: Any) -> None:
        name = "StratifiedBatchSampler"
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"{name}: batch_size must be a positive int, got {batch_size!r}")
        if batch_size % self.num_replicas:
            raise ValueError(f"{name}: batch_size {batch_size} is not divisible by "
                             f"num_replicas={self.num_replicas}")
        listed = sum(self._per_batch.values())
        if self.scope == "local":
            per_rank = batch_size // self.num_replicas
            if sum(self.counts.values()) >= per_rank:
                raise ValueError(
                    f"{name}: per-rank counts sum to {sum(self.counts.values())}, which leaves "
                    f"no filler slot in a rank batch of {per_rank} (batch_size {batch_size} / "
                    f"{self.num_replicas} ranks); scope='local' counts are per rank")
        elif listed >= batch_size:
            raise ValueError(f"{name}: counts sum to {listed}, which leaves no filler slot in a "
                             f"global batch of {batch_size}")
        if batch_size - listed > self._filler_pool.size:
            raise ValueError(f"{name}: a batch of {batch_size} needs {batch_size - listed} "
                             f"filler samples but the filler pool holds only "
                             f"{self._filler_pool.size}")

    def _reset_position(self) -> None:
        self._step = 0                                   # batches yielded this epoch
        self._filler_pos = 0                             # filler samples consumed this epoch
        self._blocks = {c: 0 for c in self.counts}       # class blocks consumed this epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batch_size(self) -> int:
        """The current global batch size."""
        return self._batch_size

    @property
    def local_batch_size(self) -> int:
        """This rank's share of the current global batch."""
        return self._batch_size // self.num_replicas

    def _filler_per_batch(self, batch_size: Optional[int] = None) -> int:
        return (self._batch_size if batch_size is None else batch_size) - \
            sum(self._per_batch.values())

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning, unless it is already the current epoch (then
        the position, e.g. one restored by `load_state_dict`, is kept)."""
        if int(epoch) != self._epoch:
            self._epoch = int(epoch)
            self._reset_position()

    def set_batch_size(self, batch_size: int) -> None:
        """Change the global batch size; the next batch drawn uses it. Raises ValueError when it
        is not divisible by num_replicas or leaves no filler slot."""
        self._check_batch_size(batch_size)
        self._batch_size = int(batch_size)

    def __len__(self) -> int:
        """Batches in a full epoch at the current batch size."""
        return self._filler_pool.size // self._filler_per_batch()

    def batches_left(self) -> int:
        """Batches left in the current epoch at the current batch size."""
        return (self._filler_pool.size - self._filler_pos) // self._filler_per_batch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the plan exactly where it is (plain Python types)."""
        return {"version": _STATE_VERSION, "epoch": self._epoch, "step": self._step,
                "filler_pos": self._filler_pos, "blocks": dict(self._blocks),
                "batch_size": self._batch_size, "seed": self.seed, "scope": self.scope,
                "counts": dict(self.counts), "num_replicas": self.num_replicas,
                "labels_sha1": self._fingerprint}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`. The labels, counts, seed and scope must match (and, for
        scope="local", num_replicas); with scope="global" the global plan does not depend on the
        number of ranks, so a run may resume on another world size."""
        name = "StratifiedBatchSampler.load_state_dict"
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{name}: unknown state version {state.get('version')!r}")
        expected = {"seed": self.seed, "scope": self.scope, "labels_sha1": self._fingerprint,
                    "counts": self.counts}
        if self.scope == "local":
            expected["num_replicas"] = self.num_replicas
        for key, value in expected.items():
            got = state[key]
            if key == "counts":
                got = {int(c): int(n) for c, n in got.items()}
            if got != value:
                what = "labels differ" if key == "labels_sha1" else \
                    f"{key} is {got!r} in the state, {value!r} here"
                raise ValueError(f"{name}: incompatible state: {what}")
        self._check_batch_size(state["batch_size"])
        self._batch_size = int(state["batch_size"])
        self._epoch = int(state["epoch"])
        self._step = int(state["step"])
        self._filler_pos = int(state["filler_pos"])
        self._blocks = {int(c): int(n) for c, n in state["blocks"].items()}

    # --- the plan ------------------------------------------------------------------------------

    def _class_block(self, c: int, block: int, cache: dict) -> np.ndarray:
        """Block number `block` (0-based, this epoch) of listed class c: n_c dataset indices."""
        pool, n = self._class_pools[c], self._per_batch[c]
        per_perm = pool.size // n
        if per_perm == 0:  # fewer samples than a block: concatenate fresh permutations
            rng = _rng(self.seed, self._epoch, _REPEAT, c, block)
            reps = -(-n // pool.size)
            return np.concatenate([pool[rng.permutation(pool.size)] for _ in range(reps)])[:n]
        perm_index, offset = divmod(block, per_perm)
        if cache.get(c, (None,))[0] != perm_index:  # keep one permutation per class
            cache[c] = (perm_index, pool[_rng(self.seed, self._epoch, _CLASS, c, perm_index)
                                         .permutation(pool.size)])
        return cache[c][1][offset * n:(offset + 1) * n]

    def _filler_permutation(self) -> np.ndarray:
        return self._filler_pool[_rng(self.seed, self._epoch, _FILLER)
                                 .permutation(self._filler_pool.size)]

    def _global_batch(self, f: int, cache: dict, filler: np.ndarray) -> np.ndarray:
        parts = [self._class_block(c, self._blocks[c], cache) for c in self.counts]
        parts.append(filler[self._filler_pos:self._filler_pos + f])
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[list[int]]:
        if self.batches_left() == 0:  # exhausted: repeat the epoch (as DistributedSampler does)
            self._reset_position()
        epoch = self._epoch
        filler = self._filler_permutation()
        cache: dict = {}
        while epoch == self._epoch:  # set_epoch / load_state_dict to another epoch ends it
            f = self._filler_per_batch()
            if self._filler_pos + f > self._filler_pool.size:
                return
            batch = self._global_batch(f, cache, filler)
            # The same draws on every rank (rank-independent RNG use). A random rotation before
            # dealing varies which ranks get a class's extra sample (scope="global"); blocks of
            # a multiple of R (scope="local") still give every rank exactly its counts.
            rng = _rng(self.seed, self._epoch, _SHUFFLE, self._step)
            batch = np.roll(batch, -int(rng.integers(self.num_replicas)))
            share = batch[self.rank::self.num_replicas]
            share = share[rng.permutation(share.size)]
            self._filler_pos += f
            for c in self._blocks:
                self._blocks[c] += 1
            self._step += 1
            yield share.tolist()

    # --- weights -------------------------------------------------------------------------------

    def class_weights(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-class importance weights w[c] = population share / batch share at the current
        batch size (index by label: `w[y]`; classes absent from the labels get 0). Use them as
        `(w[y] * per_sample_loss).mean()` on every rank — see the module docstring for why that
        (and not a division by the local sum of weights) is unbiased."""
        n_total = self.labels.size
        b = self._batch_size
        f = self._filler_per_batch()
        present = np.bincount(self.labels, minlength=self.num_classes).astype(np.float64)
        w = np.where(present > 0, self._filler_pool.size * b / (n_total * f), 0.0)
        for c, n in self._per_batch.items():
            w[c] = present[c] * b / (n_total * n)
        return torch.tensor(w, dtype=dtype)


def parse_class_map(spec: str, value_type: type = int, *, flag: str = "") -> dict[int, Any]:
    """Parse "3:4,8:4" (or "3:0.05,8:0.05" with value_type=float) into {3: 4, 8: 4}; the error
    names `flag` (e.g. "--stratify")."""
    where = f"{flag}: " if flag else ""
    out: dict[int, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition(":")
        try:
            if not sep:
                raise ValueError
            c, v = int(key), value_type(value)
        except ValueError:
            raise ValueError(f"{where}expected CLASS:{value_type.__name__.upper()} pairs "
                             f"separated by commas (e.g. '3:4,8:4'), got {item!r}") from None
        if c in out:
            raise ValueError(f"{where}class {c} is given twice")
        out[c] = v
    return out


def imbalance_indices(labels: Sequence[int] | np.ndarray | torch.Tensor,
                      prevalence: Mapping[int, float], seed: int = 0) -> np.ndarray:
    """Indices (sorted) of a subset in which class c makes up `prevalence[c]` of the samples,
    by keeping a random subset of class c and all samples of the other classes. With N_o samples
    in the unlisted classes and P = sum of the prevalences, class c keeps
    round(prevalence[c] * N_o / (1 - P)) samples (at least 1)."""
    labels_np = (labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor)
                 else np.asarray(labels)).astype(np.int64)
    total = float(sum(prevalence.values()))
    if not 0.0 < total < 1.0 or any(p <= 0 for p in prevalence.values()):
        raise ValueError(f"imbalance: prevalences must be positive and sum below 1, got "
                         f"{dict(prevalence)}")
    rest = int((~np.isin(labels_np, list(prevalence))).sum())
    rng = _rng(seed, 0, 99)
    keep = [np.flatnonzero(~np.isin(labels_np, list(prevalence)))]
    for c, p in sorted(prevalence.items()):
        pool = np.flatnonzero(labels_np == c)
        want = max(1, int(round(p * rest / (1.0 - total))))
        if pool.size == 0:
            raise ValueError(f"imbalance: class {c} does not occur in labels")
        if want > pool.size:
            raise ValueError(f"imbalance: class {c} would need {want} samples for prevalence "
                             f"{p}, but has only {pool.size}")
        keep.append(rng.choice(pool, size=want, replace=False))
    return np.sort(np.concatenate(keep))
