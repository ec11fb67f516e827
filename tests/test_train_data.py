"""DistributedBatchSampler protocol: per-rank shares of one global plan, disjoint; one epoch
is a pass without replacement; set_batch_size at the next batch; exact mid-epoch resume."""
from __future__ import annotations

import pytest

from fastnorm.train import DistributedBatchSampler


def _ranks(n=100, batch=20, world=2, seed=3):
    return [DistributedBatchSampler(n, batch, num_replicas=world, rank=r, seed=seed)
            for r in range(world)]


def test_ranks_disjoint_and_epoch_without_replacement():
    ranks = _ranks()
    per_rank = [list(s) for s in ranks]
    assert all(len(b) == 10 for shares in per_rank for b in shares)
    assert len(per_rank[0]) == 5
    seen = [i for shares in per_rank for b in shares for i in b]
    assert sorted(seen) == list(range(100))      # every index exactly once
    for s in ranks:
        s.set_epoch(1)
    again = [list(s) for s in ranks]
    assert again != per_rank                     # a new permutation per epoch
    # Same (seed, epoch) everywhere: a fresh sampler reproduces the plan.
    fresh = _ranks()[1]
    fresh.set_epoch(1)
    assert list(fresh) == again[1]


def test_tail_left_out_and_batch_change_at_next_batch():
    (s,) = _ranks(n=50, batch=16, world=1)
    it = iter(s)
    first = next(it)
    s.set_batch_size(8)
    rest = list(it)
    assert len(first) == 16 and [len(b) for b in rest] == [8] * 4   # 16+32 of 50, tail 2 out
    assert len(set(first).union(*map(set, rest))) == 48
    with pytest.raises(ValueError, match="multiple of num_replicas"):
        _ranks()[0].set_batch_size(21)
    with pytest.raises(ValueError, match="exceeds"):
        _ranks()[0].set_batch_size(120)


def test_mid_epoch_resume_is_exact():
    (a,) = _ranks(world=1)
    a.set_epoch(2)
    it = iter(a)
    head = [next(it), next(it)]
    state = a.state_dict()
    tail = list(it)
    (b,) = _ranks(world=1)
    b.load_state_dict(state)
    b.set_epoch(2)                               # the trainer's call on resume: keeps position
    assert list(b) == tail and len(head + tail) == 5
    # A checkpoint right after an epoch's last batch resumes into an empty rest of the epoch.
    (c,) = _ranks(world=1)
    it = iter(c)
    for _ in range(5):
        next(it)
    (d,) = _ranks(world=1)
    d.load_state_dict(c.state_dict())
    assert list(d) == []
    d.set_epoch(1)
    assert len(list(d)) == 5
