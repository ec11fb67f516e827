"""SimCLR building blocks: augmentation, NT-Xent against a loop reference, the gradient-preserving
gather on 2 gloo processes (loss and gradients equal the single-process loss on the concatenated
batch; SyncBatchNorm equals global BatchNorm, leak gap included; every norm runs), virtual-device
BatchNorm against K separate BatchNorm calls, the leak-gap metric on constructed cases, probes."""
from __future__ import annotations

import datetime
import math
import queue as queue_module
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastnorm.nn as fnn
from fastnorm.train import simclr
from helpers import assert_within_rounding, free_port


def _reference_nt_xent(z1, z2, temperature):
    """The SimCLR loss written out anchor by anchor, float64."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        sims = torch.stack([z[i] @ z[j] / temperature for j in range(2 * n) if j != i])
        total = total - (z[i] @ z[positive] / temperature - torch.logsumexp(sims, 0))
    return total / (2 * n)


def test_nt_xent_matches_reference_loss_and_gradient():
    torch.manual_seed(0)
    z1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    loss = simclr.nt_xent_loss(z1, z2, temperature=0.3)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    ref = _reference_nt_xent(z1, z2, 0.3)
    r1, r2 = torch.autograd.grad(ref, (z1, z2))
    # nt_xent computes in fp32 (like the trainer's losses): fp32 tolerances.
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, r1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, r2, rtol=1e-4, atol=1e-6)


def test_pretext_accuracy_and_bad_inputs():
    torch.manual_seed(0)
    z1 = torch.randn(16, 8)
    assert simclr.pretext_accuracy(z1, z1 + 0.01 * torch.randn(16, 8)) == 1.0
    # Positives replaced by another image's view: almost never identified.
    assert simclr.pretext_accuracy(z1, z1.roll(1, 0) + 0.01 * torch.randn(16, 8)) == 0.0
    with pytest.raises(ValueError, match="two \\[n, d\\] embeddings of the same shape"):
        simclr.nt_xent_loss(z1, z1[:3])
    with pytest.raises(ValueError, match="temperature must be positive"):
        simclr.nt_xent_loss(z1, z1, temperature=0.0)


def test_augment_views_are_seeded_and_differ():
    x = torch.rand(5, 1, 8, 8)
    aug = simclr.DigitAugment()
    a1, a2 = aug(x, torch.Generator().manual_seed(1))
    b1, b2 = aug(x, torch.Generator().manual_seed(1))
    assert a1.shape == x.shape and torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2) and not torch.equal(a1, x)
    # Mild views stay close to the image; the identity settings give it back exactly.
    ident = simclr.DigitAugment(max_rotation=0, max_scale=0, max_shift=0, contrast=0, noise=0,
                                cutout=0)
    torch.testing.assert_close(ident.view(x, torch.Generator().manual_seed(0)), x)
    with pytest.raises(ValueError, match="expected images \\[N, C, H, W\\]"):
        aug.view(x[0], torch.Generator())


def test_interleave_and_split_views():
    v1, v2 = torch.arange(4.0).view(4, 1), torch.arange(10.0, 14.0).view(4, 1)
    x = simclr.interleave_views(v1, v2)
    assert x[:, 0].tolist() == [0, 10, 1, 11, 2, 12, 3, 13]
    z1, z2 = simclr.split_views(x)
    assert torch.equal(z1, v1) and torch.equal(z2, v2)
    with pytest.raises(ValueError, match="even length"):
        simclr.split_views(x[:3])


# --- virtual devices ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: fnn.BatchNorm2d(3), lambda: nn.BatchNorm2d(3),
    lambda: fnn.BatchNorm2d(3, momentum=None), lambda: fnn.BatchNorm1d(3),
], ids=["fastnorm", "torch", "momentum-None", "1d"])
def test_virtual_device_bn_equals_separate_bn_per_chunk(make):
    torch.manual_seed(0)
    k = 4
    virtual = make()
    with torch.no_grad():
        virtual.weight.uniform_(0.5, 1.5)
        virtual.bias.uniform_(-0.5, 0.5)
        virtual.running_mean.uniform_(-1, 1)
    separate = [make() for _ in range(k)]
    for m in separate:
        m.load_state_dict(virtual.state_dict())
    shape = (8, 3, 5) if isinstance(virtual, nn.BatchNorm1d) else (8, 3, 2, 3)
    x = torch.randn(*shape) * 2 + 1
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    model = simclr.set_virtual_devices(nn.Sequential(virtual), k)
    assert type(virtual).__name__.startswith("VirtualDevice") and isinstance(virtual, type(make()))
    for step in range(2):  # the second step sees the averaged running statistics
        out = model(x)
        ref = torch.cat([m(c) for m, c in zip(separate, x_ref.chunk(k))])
        torch.testing.assert_close(out, ref)
        grad = torch.randn_like(out)
        out.backward(grad)
        ref.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(virtual.weight.grad, sum(m.weight.grad for m in separate))
        torch.testing.assert_close(virtual.bias.grad, sum(m.bias.grad for m in separate))
        for name in ("running_mean", "running_var"):
            avg = torch.stack([getattr(m, name) for m in separate]).mean(0)
            torch.testing.assert_close(getattr(virtual, name), avg)
            for m in separate:  # the k devices hold the average again (as after a broadcast)
                getattr(m, name).copy_(avg)
        assert virtual.num_batches_tracked.item() == step + 1
    # Eval mode uses the running statistics on the whole batch, like plain BatchNorm.
    model.eval()
    separate[0].eval()
    torch.testing.assert_close(model(x), separate[0](x))
    assert list(virtual.state_dict()) == list(separate[0].state_dict())
    simclr.set_virtual_devices(model, 1)
    assert type(virtual) is type(separate[0]) and not hasattr(virtual, "virtual_devices")


def test_virtual_devices_leave_sync_bn_and_reject_bad_input():
    model = nn.Sequential(fnn.SyncBatchNorm(3), fnn.BatchNorm1d(3), nn.LayerNorm(3))
    simclr.set_virtual_devices(model, 2)
    assert type(model[0]) is fnn.SyncBatchNorm and type(model[2]) is nn.LayerNorm
    assert "virtual_devices=2" in repr(model[1])
    with pytest.raises(ValueError, match="batch of 3 is not divisible into 2 virtual devices"):
        model[1](torch.randn(3, 3))
    with pytest.raises(ValueError, match="k must be a positive int"):
        simclr.set_virtual_devices(model, 0)


# --- leak gap on constructed cases ----------------------------------------------------------------

def _pairs(n=32, d=16, noisy_std=0.0, seed=0):
    """Two views of n random images; channels 0-3 of every view are replaced by independent
    noise of std `noisy_std` (no information, but it dominates unless normalized away)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, d, generator=g)
    v1 = images + 0.3 * torch.randn(n, d, generator=g)
    v2 = images + 0.3 * torch.randn(n, d, generator=g)
    if noisy_std:
        v1[:, :4] = noisy_std * torch.randn(n, 4, generator=g)
        v2[:, :4] = noisy_std * torch.randn(n, 4, generator=g)
    return v1, v2


def test_leak_gap_zero_without_batch_statistics():
    v1, v2 = _pairs()
    model = nn.Sequential(nn.Linear(16, 16), fnn.LayerNorm(16))
    out = simclr.leak_gap(model, v1, v2)
    assert out["gap"] == 0.0 and out["train"] == out["eval"] > 0.5


def test_leak_gap_zero_for_global_bn_with_matching_running_stats():
    v1, v2 = _pairs(noisy_std=30.0)
    model = nn.Sequential(fnn.BatchNorm1d(16, affine=False, momentum=None))
    model(simclr.interleave_views(v1, v2))  # running stats := this batch's statistics
    buffers = {k: b.clone() for k, b in model.state_dict().items()}
    model.eval()
    out = simclr.leak_gap(model, v1, v2)
    # Train and eval differ only by the n/(n-1) variance factor, which cosine ignores.
    assert out["gap"] == 0.0 and out["train"] > 0.6
    assert not model.training
    for k, b in model.state_dict().items():  # the metric leaves the running stats alone
        assert torch.equal(b, buffers[k])


def test_leak_gap_positive_when_train_statistics_carry_information():
    """Train-mode (per-chunk) statistics scale the noise channels down, eval mode's stale running
    statistics (the initial 0 and 1) do not: identification is easy in train mode and hard in
    eval mode, a clearly positive gap."""
    v1, v2 = _pairs(noisy_std=30.0)
    model = simclr.set_virtual_devices(nn.Sequential(fnn.BatchNorm1d(16, affine=False)), 4)
    model.train()
    out = simclr.leak_gap(model, v1, v2)
    assert out["train"] > 0.6 and out["gap"] > 0.4  # about 0.75 and 0.6 over seeds 0-5
    assert model.training and model[0].num_batches_tracked.item() == 0


# --- probes ---------------------------------------------------------------------------------------

def test_knn_and_ridge_probes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g) * 3
    y_train = torch.arange(200) % 4
    y_test = torch.arange(100) % 4
    train = centers[y_train] + torch.randn(200, 6, generator=g)
    test = centers[y_test] + torch.randn(100, 6, generator=g)
    assert simclr.knn_accuracy(train, y_train, test, y_test, k=5) > 0.9
    assert simclr.knn_accuracy(train, y_train, test, y_test, k=5, weighted=True) > 0.9
    assert simclr.ridge_probe_accuracy(train, y_train, test, y_test) > 0.9
    # Random labels: chance level.
    y_rand = torch.randint(0, 4, (200,), generator=g)
    assert simclr.knn_accuracy(train, y_rand, test, y_test, k=5) < 0.45
    # k=1 on the training set itself is exact.
    assert simclr.knn_accuracy(train, y_train, train, y_train, k=1) == 1.0
    with pytest.raises(ValueError, match="k must be in \\[1, 200\\]"):
        simclr.knn_accuracy(train, y_train, test, y_test, k=0)
    model = nn.Sequential(nn.Linear(6, 3), fnn.BatchNorm1d(3)).train()
    emb = simclr.embed(model, test, batch_size=32)
    assert emb.shape == (100, 3) and model.training
    model.eval()
    torch.testing.assert_close(emb, model(test))


# --- 2 gloo processes -----------------------------------------------------------------------------

WORLD = 2
N_LOCAL = 4  # images per rank


def _model(norm: str) -> nn.Module:
    layer = {"bn": lambda c: fnn.BatchNorm2d(c), "syncbn": lambda c: fnn.SyncBatchNorm(c),
             "gn": lambda c: fnn.GroupNorm(2, c), "ln": lambda c: fnn.GroupNorm(1, c)}[norm]
    head_norm = {"bn": fnn.BatchNorm1d, "syncbn": fnn.SyncBatchNorm, "gn": fnn.LayerNorm,
                 "ln": fnn.LayerNorm}[norm]
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), layer(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 64, 16), head_norm(16), nn.ReLU(), nn.Linear(16, 8))


def _views(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return simclr.DigitAugment()(torch.rand(N_LOCAL, 1, 8, 8, generator=g), g)


def _worker(rank: int, port: int, queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=60))
        results = {}
        # The gather alone, on raw embeddings with a gradient.
        g = torch.Generator().manual_seed(rank)
        z1 = torch.randn(N_LOCAL, 5, generator=g, dtype=torch.float64).requires_grad_()
        z2 = torch.randn(N_LOCAL, 5, generator=g, dtype=torch.float64).requires_grad_()
        loss = simclr.nt_xent_loss(z1, z2, 0.5)
        loss.backward()
        results["gather"] = (loss.item(), z1.grad.numpy().copy(), z2.grad.numpy().copy(),
                             simclr.pretext_accuracy(z1, z2))
        for norm in ("syncbn", "bn", "gn", "ln"):
            model = _model(norm)
            v1, v2 = _views(rank)
            z1, z2 = simclr.split_views(model(simclr.interleave_views(v1, v2)))
            loss = simclr.nt_xent_loss(z1, z2, 0.5)
            loss.backward()
            grads = []
            for p in model.parameters():  # what DDP does: average the gradients over ranks
                dist.all_reduce(p.grad)
                grads.append((p.grad / WORLD).numpy().copy())
            results[norm] = (loss.item(), grads, simclr.leak_gap(model, v1, v2))
        queue.put((rank, results))
    except Exception as exc:  # report instead of hanging the parent
        queue.put((rank, repr(exc)))
        raise
    finally:
        # Results travel as numpy copies and floats, not tensors: a tensor travels as a shared
        # file descriptor, which can fail once the sending process has exited.
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    # Poll rather than block: a rank that dies without reporting (killed, crashed in C++) fails
    # the fixture at once with its exit code instead of after the whole timeout.
    deadline, grace = time.monotonic() + 300, None
    while len(results) < WORLD:
        try:
            rank, value = queue.get(timeout=1)
        except queue_module.Empty:
            # A rank that exited with 0 has put its result: the queue holds it. One that failed
            # may have put its error just before exiting: read the queue a few seconds more.
            dead = {i: p.exitcode for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in results}
            grace = grace or (time.monotonic() + 5 if dead else None)
            if (grace and time.monotonic() > grace) or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                pytest.fail(f"ranks without results: exit codes {dead or 'none (timed out)'}")
            continue
        assert not isinstance(value, str), f"rank {rank} failed: {value}"
        results[rank] = value
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_gather_on_two_ranks_equals_single_process_on_concatenated_batch(two_ranks):
    zs = [[], []]
    for rank in range(WORLD):
        g = torch.Generator().manual_seed(rank)
        zs[0].append(torch.randn(N_LOCAL, 5, generator=g, dtype=torch.float64))
        zs[1].append(torch.randn(N_LOCAL, 5, generator=g, dtype=torch.float64))
    z1 = torch.cat(zs[0]).requires_grad_()
    z2 = torch.cat(zs[1]).requires_grad_()
    ref = simclr.nt_xent_loss(z1, z2, 0.5)
    ref.backward()
    losses = [two_ranks[r]["gather"][0] for r in range(WORLD)]
    assert sum(losses) / WORLD == pytest.approx(ref.item(), rel=1e-5)
    assert losses[0] != pytest.approx(losses[1])  # each rank's own anchors
    acc = sum(two_ranks[r]["gather"][3] for r in range(WORLD)) / WORLD
    assert acc == simclr.pretext_accuracy(z1.detach(), z2.detach())
    for r in range(WORLD):
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        # Rank r's embeddings feed every rank's loss: their gradient is the sum over ranks,
        # WORLD times the gradient of the mean loss (DDP divides by WORLD).
        for got, full in zip(two_ranks[r]["gather"][1:3], (z1.grad, z2.grad)):
            torch.testing.assert_close(torch.from_numpy(got) / WORLD, full[rows],
                                       rtol=1e-5, atol=1e-7)


def _grad_terms(model: nn.Module, x: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    """Runs the SimCLR loss forward and backward (gradients left in .grad); returns the loss
    and, per parameter, the sum over the batch (and pixels) of the |terms| its gradient adds up:
    |dy| (x) |input| for Conv2d and Linear (the layer's vector-Jacobian product at |input| with
    cotangent |dy|; the weights do not enter it), |dy * x_hat| and |dy| for BatchNorm's weight
    and bias. Run in float64, it gives the scale of each gradient's fp32 rounding error."""
    inputs, dys, hooks = {}, {}, []

    def record(module, args, out):
        inputs[module] = args[0].detach()
        out.register_hook(lambda dy: dys.__setitem__(module, dy.detach()))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            hooks.append(m.register_forward_hook(record))
    try:
        z1, z2 = simclr.split_views(model(x))
        loss = simclr.nt_xent_loss(z1, z2, 0.5)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    terms = {}
    for m, inp in inputs.items():
        dy = dys[m]
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            dims = [d for d in range(dy.dim()) if d != 1]
            x_hat = F.batch_norm(inp, None, None, training=True, eps=m.eps)
            terms[m.weight], terms[m.bias] = (dy * x_hat).abs().sum(dims), dy.abs().sum(dims)
        else:
            with torch.enable_grad():
                terms[m.weight], terms[m.bias] = torch.autograd.grad(
                    m(inp.abs()), (m.weight, m.bias), dy.abs())
    return loss.item(), [terms[p] for p in model.parameters()]


def test_syncbn_on_two_ranks_equals_global_bn(two_ranks):
    """SyncBatchNorm over 2 ranks: loss, DDP-averaged gradients and leak gap equal BatchNorm over
    the concatenated batch in one process (global statistics).

    Tolerances come from the numbers, not from a machine: loss and gradients are compared with
    the float64 run of the same model within ROUNDING_FACTOR * eps32 * (sum of |terms|). Each
    gradient element is an fp32 sum over the global batch, in an order that depends on the
    ranks' split and on the CPU (vector width, reduction order); an element that is 0 in exact
    arithmetic (a conv bias followed by BatchNorm) is pure rounding noise of that size (1.4e-6 on
    one machine, where 1e-6 was the old fixed atol). The scale is per tensor, its largest sum of
    |terms|: rounding upstream (BatchNorm's input gradient, a difference of terms that cancel;
    activations that BatchNorm's shift brings near 0) reaches every element at the scale of the
    layer, not of that element's own terms. Largest error seen: 4 eps * that scale (the last
    layer, whose dy comes from the NT-Xent gradient). Torch's own single-process fp32 gradients
    are held to the same bound, so a failure there points at the bound, not at SyncBatchNorm."""
    views = [_views(r) for r in range(WORLD)]
    x = torch.cat([simclr.interleave_views(v1, v2) for v1, v2 in views])
    exact = _model("bn").double()
    loss64, terms = _grad_terms(exact, x.double())
    model = _model("bn")
    z1, z2 = simclr.split_views(model(x))
    simclr.nt_xent_loss(z1, z2, 0.5).backward()
    # Each anchor adds -s_pos / t + logsumexp_j(s_j / t) over its 2N - 1 others, cosines |s| <= 1:
    # |terms| <= 2 / t + log(2N - 1) per anchor; the loss is their mean.
    loss_terms = torch.tensor(2 / 0.5 + math.log(x.shape[0] - 1), dtype=torch.float64)
    loss = sum(two_ranks[r]["syncbn"][0] for r in range(WORLD)) / WORLD
    assert_within_rounding(torch.tensor(loss), torch.tensor(loss64, dtype=torch.float64),
                           loss_terms, "loss")
    names = [n for n, _ in exact.named_parameters()]
    for name, got, p, p64, t in zip(names, two_ranks[0]["syncbn"][1], model.parameters(),
                                    exact.parameters(), terms):
        assert_within_rounding(torch.from_numpy(got), p64.grad, t.max(), f"2-rank grad {name}")
        assert_within_rounding(p.grad, p64.grad, t.max(), f"single-process fp32 grad {name}")
    v1 = torch.cat([v[0] for v in views])
    v2 = torch.cat([v[1] for v in views])
    gap = simclr.leak_gap(model, v1, v2)
    # Exact: accuracies count argmaxes of cosine similarities whose top two differ by >= 2e-4
    # for these inputs (float64), far above fp32 rounding.
    for key in ("train", "eval"):
        assert sum(two_ranks[r]["syncbn"][2][key] for r in range(WORLD)) / WORLD == gap[key]


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_every_norm_runs_on_two_ranks(two_ranks, norm):
    for r in range(WORLD):
        loss, grads, gap = two_ranks[r][norm]
        assert torch.isfinite(torch.tensor(loss)) and all(torch.isfinite(torch.from_numpy(g)).all()
                                                          for g in grads)
        assert set(gap) == {"train", "eval", "gap"}
        if norm != "bn":  # no batch statistics: train and eval mode agree exactly
            assert gap["gap"] == 0.0
    # DDP-averaged gradients are the same on both ranks.
    for a, b in zip(two_ranks[0][norm][1], two_ranks[1][norm][1]):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b))
