"""StratifiedBatchSampler: ranks are simulated by constructing one sampler per rank with explicit
num_replicas/rank (the plan needs no communication, so no processes are needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastnorm.train
from fastnorm.train import StratifiedBatchSampler  # the public path, as for the other classes
from fastnorm.train.sampler import imbalance_indices, parse_class_map

# 10 classes; 3 and 8 rare (12 and 7 samples), the other 8 classes make a filler pool of 300.
SIZES = [40, 35, 45, 12, 30, 40, 35, 40, 7, 35]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(10), SIZES))
COUNTS = {3: 2, 8: 1}
FILLER = int(sum(s for c, s in enumerate(SIZES) if c not in COUNTS))


def _samplers(world: int, batch_size: int = 12, counts=COUNTS, **kw):
    return [StratifiedBatchSampler(LABELS, batch_size, counts, num_replicas=world, rank=r, **kw)
            for r in range(world)]


def _epoch(samplers) -> list[list[list[int]]]:
    """One epoch: per step, the list of every rank's share."""
    return [list(step) for step in zip(*samplers)]


def _class_count(indices, c) -> int:
    return int((LABELS[np.asarray(indices, dtype=np.int64)] == c).sum())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_counts_disjoint_ranks_and_filler_once(world):
    samplers = _samplers(world, batch_size=12)
    steps = _epoch(samplers)
    f = 12 - sum(COUNTS.values())
    assert len(steps) == len(samplers[0]) == FILLER // f
    filler_seen = []
    rare_per_rank = np.zeros(world, dtype=int)
    for shares in steps:
        assert all(len(s) == 12 // world for s in shares)
        batch = np.concatenate(shares)
        assert len(set(batch.tolist())) == batch.size  # ranks disjoint, no repeat in a batch
        for c, n in COUNTS.items():
            assert _class_count(batch, c) == n
            # scope="global": a rank holds n // world or one more.
            assert all(n // world <= _class_count(s, c) <= -(-n // world) for s in shares)
        rare_per_rank += [_class_count(s, 8) for s in shares]
        filler_seen += [i for i in batch.tolist() if LABELS[i] not in COUNTS]
    assert len(filler_seen) == len(set(filler_seen)) == (FILLER // f) * f
    # Listed classes cycle through permutations: class 3 (12 samples, 2 per batch) shows all its
    # samples once in every 6 consecutive batches from the epoch's start.
    class3 = np.flatnonzero(LABELS == 3)
    for start in range(0, len(steps) - 5, 6):
        seen = [i for shares in steps[start:start + 6] for i in np.concatenate(shares).tolist()
                if LABELS[i] == 3]
        assert sorted(seen) == class3.tolist()
    # Class 8 has 1 sample per global batch: over the epoch every rank gets its turns.
    assert rare_per_rank.sum() == len(steps) and (rare_per_rank >= len(steps) // (2 * world)).all()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_local_counts_per_rank(world):
    counts = {3: 1, 8: 1}
    samplers = _samplers(world, batch_size=6 * world, counts=counts, scope="local")
    steps = _epoch(samplers)
    assert len(steps) == FILLER // (6 * world - 2 * world)
    for shares in steps:
        for s in shares:
            assert len(s) == 6
            assert _class_count(s, 3) == 1 and _class_count(s, 8) == 1
        batch = np.concatenate(shares)
        # Class 8 has 7 samples: a global block of `world` (<= 7) draws them without repeats.
        assert len(set(batch.tolist())) == batch.size


def test_deterministic_per_seed_and_epoch():
    a, b = _samplers(2, seed=5), _samplers(2, seed=5)
    first = _epoch(a)
    assert first == _epoch(b)
    for s in a + b:
        s.set_epoch(1)
    second = _epoch(a)
    assert second == _epoch(b) and second != first
    assert _epoch(_samplers(2, seed=6)) != first
    # Iterating an exhausted epoch again without set_epoch repeats it (like DistributedSampler).
    assert _epoch(a) == second


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batch_size_change_mid_epoch(world):
    samplers = _samplers(world, batch_size=12)
    iters = [iter(s) for s in samplers]
    steps = [[next(it) for it in iters] for _ in range(3)]
    for s in samplers:
        s.set_batch_size(24)  # takes effect at the next batch, inside the running iteration
    steps += [list(shares) for shares in zip(*iters)]
    sizes = [sum(len(s) for s in shares) for shares in steps]
    assert sizes[:3] == [12] * 3 and set(sizes[3:]) == {24}
    assert len(steps) == 3 + (FILLER - 3 * 9) // 21
    filler = []
    for shares in steps:
        batch = np.concatenate(shares)
        assert all(_class_count(batch, c) == n for c, n in COUNTS.items())
        filler += [i for i in batch.tolist() if LABELS[i] not in COUNTS]
    assert len(filler) == len(set(filler))
    assert len(samplers[0]) == FILLER // 21


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_from_state_dict_continues_identically(world):
    full = _samplers(world, batch_size=12, seed=3)
    for s in full:
        s.set_epoch(2)
    iters = [iter(s) for s in full]
    reference = [[next(it) for it in iters] for _ in range(4)]
    for s in full:
        s.set_batch_size(18)
    reference += [list(shares) for shares in zip(*iters)]

    run = _samplers(world, batch_size=12, seed=3)
    for s in run:
        s.set_epoch(2)
    iters = [iter(s) for s in run]
    got = [[next(it) for it in iters] for _ in range(4)]
    for s in run:
        s.set_batch_size(18)
    got += [[next(it) for it in iters] for _ in range(2)]
    states = [s.state_dict() for s in run]
    # A fresh process: new samplers, state loaded, the trainer's usual set_epoch keeps it.
    resumed = _samplers(world, batch_size=12, seed=3)
    for s, state in zip(resumed, states):
        s.load_state_dict(state)
        s.set_epoch(2)
    assert resumed[0].batch_size == 18
    got += _epoch(resumed)
    assert got == reference


def test_resume_on_another_world_size_keeps_the_global_plan():
    two = _samplers(2, batch_size=12, seed=1)
    steps = _epoch(two)
    reference = [sorted(np.concatenate(s).tolist()) for s in steps]
    half = _samplers(2, batch_size=12, seed=1)
    iters = [iter(s) for s in half]
    for _ in range(5):
        [next(it) for it in iters]
    three = _samplers(3, batch_size=12, seed=1)
    for s in three:
        s.load_state_dict(half[0].state_dict())
    rest = [sorted(np.concatenate(s).tolist()) for s in _epoch(three)]
    assert rest == reference[5:]
    local = _samplers(2, batch_size=12, seed=1, scope="local")
    with pytest.raises(ValueError, match="num_replicas is 2 in the state, 3 here"):
        _samplers(3, batch_size=12, seed=1, scope="local")[0].load_state_dict(
            local[0].state_dict())


def test_class_weights_formula_and_exact_epoch_average():
    b = 12
    sampler = StratifiedBatchSampler(LABELS, b, COUNTS)
    w = sampler.class_weights(dtype=torch.float64)
    n_total, f = LABELS.size, b - sum(COUNTS.values())
    for c in range(10):
        expected = SIZES[c] * b / (n_total * COUNTS[c]) if c in COUNTS else \
            FILLER * b / (n_total * f)
        assert w[c].item() == pytest.approx(expected, rel=1e-12)
    priors = np.bincount(LABELS) / n_total
    sampler.set_batch_size(13)  # f = 10 divides 300: one epoch covers the filler pool exactly
    w = sampler.class_weights(dtype=torch.float64).numpy()
    estimates = []
    for batch in sampler:
        y = LABELS[batch]
        assert w[y].sum() == pytest.approx(13, rel=1e-12)  # weights of a global batch sum to B
        estimates.append(np.bincount(y, weights=w[y], minlength=10) / 13)
    # Listed classes: exact in every batch; all classes: exact on the epoch average.
    estimates = np.array(estimates)
    np.testing.assert_allclose(estimates[:, list(COUNTS)], np.broadcast_to(
        priors[list(COUNTS)], (len(estimates), len(COUNTS))), rtol=1e-12)
    np.testing.assert_allclose(estimates.mean(0), priors, rtol=1e-12)


@pytest.mark.parametrize("scope", ["global", "local"])
def test_weighted_loss_is_unbiased_monte_carlo(scope):
    """Per-sample losses that vary within a class: over 100 epochs the mean of the weighted batch
    loss sits within 4 standard errors of the population mean, while the unweighted batch mean is
    far off (rare classes are over-represented and carry large losses)."""
    world = 2
    rng = np.random.default_rng(0)
    losses = rng.exponential(1.0, LABELS.size) + np.where(np.isin(LABELS, list(COUNTS)), 5.0, 0)
    truth = losses.mean()
    samplers = _samplers(world, batch_size=12, counts={3: 1, 8: 1}, scope=scope, seed=9)
    w = samplers[0].class_weights(dtype=torch.float64).numpy()
    weighted, plain = [], []
    for epoch in range(100):
        for s in samplers:
            s.set_epoch(epoch)
        for shares in zip(*samplers):
            # What each rank computes, then DDP's average over ranks.
            per_rank = [(w[LABELS[s]] * losses[s]).mean() for s in shares]
            weighted.append(np.mean(per_rank))
            plain.append(np.mean([losses[s].mean() for s in shares]))
    weighted = np.array(weighted)
    se = weighted.std() / np.sqrt(weighted.size)  # batches within an epoch are only mildly
    assert abs(weighted.mean() - truth) < 4 * se  # dependent (without replacement: less var)
    assert abs(np.mean(plain) - truth) > 20 * se


def test_rare_class_with_fewer_samples_than_its_count_repeats_and_warns():
    with pytest.warns(UserWarning, match="class 8 has 7 samples but every global batch takes 9"):
        sampler = StratifiedBatchSampler(LABELS, 20, {8: 9})
    for batch in sampler:
        assert _class_count(batch, 8) == 9
        assert set(batch) >= set(np.flatnonzero(LABELS == 8).tolist())


def test_dataloader_batch_sampler():
    x = torch.arange(LABELS.size, dtype=torch.float32).unsqueeze(1)
    y = torch.as_tensor(LABELS)
    samplers = _samplers(2, batch_size=12)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=samplers[1])
    assert len(loader) == len(samplers[1])
    batches = list(loader)
    expected = _epoch(_samplers(2, batch_size=12))
    assert len(batches) == len(expected)
    for (xb, yb), shares in zip(batches, expected):
        assert xb.shape == (6, 1)
        assert xb[:, 0].long().tolist() == shares[1]
        assert yb.tolist() == LABELS[shares[1]].tolist()


def test_defaults_without_torch_distributed():
    s = StratifiedBatchSampler(torch.as_tensor(LABELS), 12, COUNTS)
    assert (s.num_replicas, s.rank, s.local_batch_size) == (1, 0, 12)


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(counts={11: 1}), ValueError, "class 11 in counts does not occur in labels"),
    (dict(counts={3: -1}), ValueError, "count of class 3 is negative"),
    (dict(counts={3: 0}), ValueError, "count of class 3 is 0"),
    (dict(counts={3: 1.5}), TypeError, "must be an int"),
    (dict(counts={3: 8, 8: 4}), ValueError, "counts sum to 12, which leaves no filler slot"),
    (dict(batch_size=13, num_replicas=2), ValueError, "13 is not divisible by num_replicas=2"),
    (dict(batch_size=12, num_replicas=2, scope="local", counts={3: 4, 8: 2}), ValueError,
     "per-rank counts sum to 6, which leaves no filler slot in a rank batch of 6"),
    (dict(scope="rank"), ValueError, "scope must be 'global' or 'local'"),
    (dict(num_replicas=2, rank=2), ValueError, "rank 2 is out of range"),
    (dict(batch_size=0), ValueError, "batch_size must be a positive int"),
    (dict(batch_size=400), ValueError, "filler pool holds only 300"),
    (dict(counts={c: 1 for c in range(10)}, batch_size=20), ValueError, "filler pool is empty"),
])
def test_bad_inputs(kwargs, error, fragment):
    args = dict(labels=LABELS, batch_size=12, counts=COUNTS, num_replicas=1, rank=0)
    args.update(kwargs)
    with pytest.raises(error, match=fragment):
        StratifiedBatchSampler(args.pop("labels"), args.pop("batch_size"), args.pop("counts"),
                               **args)


def test_bad_labels_and_batch_size_changes():
    with pytest.raises(TypeError, match="labels must be integers"):
        StratifiedBatchSampler(np.array([0.5, 1.0]), 2, {})
    with pytest.raises(ValueError, match="labels must be non-negative"):
        StratifiedBatchSampler([-1, 0, 1], 2, {})
    s = _samplers(2)[0]
    with pytest.raises(ValueError, match="7 is not divisible by num_replicas=2"):
        s.set_batch_size(7)
    with pytest.raises(ValueError, match="counts sum to 3, which leaves no filler slot"):
        s.set_batch_size(2)
    assert s.batch_size == 12
    other = StratifiedBatchSampler(LABELS, 12, {3: 1, 8: 1}, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="incompatible state: counts"):
        other.load_state_dict(s.state_dict())
    shuffled = StratifiedBatchSampler(LABELS[::-1].copy(), 12, COUNTS, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="incompatible state: labels differ"):
        shuffled.load_state_dict(s.state_dict())


def test_parse_class_map_and_imbalance():
    assert parse_class_map("3:4,8:4") == {3: 4, 8: 4}
    assert parse_class_map("3:0.05, 8:0.05", float) == {3: 0.05, 8: 0.05}
    with pytest.raises(ValueError, match="--stratify: expected CLASS:INT pairs"):
        parse_class_map("3=4", flag="--stratify")
    with pytest.raises(ValueError, match="class 3 is given twice"):
        parse_class_map("3:1,3:2")
    labels = np.repeat(np.arange(10), 100)
    keep = imbalance_indices(labels, {3: 0.05, 8: 0.05}, seed=0)
    kept = np.bincount(labels[keep], minlength=10)
    assert kept[3] == kept[8] == 44 and kept.sum() == 888  # 44 / 888 = 4.95 %
    assert (kept[[0, 1, 2, 4, 5, 6, 7, 9]] == 100).all()
    np.testing.assert_array_equal(keep, imbalance_indices(labels, {3: 0.05, 8: 0.05}, seed=0))
    with pytest.raises(ValueError, match="class 3 would need 900 samples"):
        imbalance_indices(labels, {3: 0.5})


def test_exported_from_the_trainer_package():
    assert StratifiedBatchSampler is fastnorm.train.sampler.StratifiedBatchSampler
    assert "StratifiedBatchSampler" in fastnorm.train.__all__
    assert all(hasattr(fastnorm.train, name) for name in fastnorm.train.__all__)
