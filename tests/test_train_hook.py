"""The GNS communication hook on 2 gloo ranks: reduced gradients bitwise equal to plain DDP,
and the two squared norms equal to a reference computed by hand from each rank's gradient,
with and without gradient accumulation. Plus the one-process source (micro-batch prefixes)."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastnorm.train.dist import GNSHook
from fastnorm.train.loop import grad_sq_norm
from helpers import free_port


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Several parameters and a small bucket cap: more than one bucket, so the last-bucket
    # packing and the per-bucket sums are both exercised.
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 3))


def _data(rank: int, accum: int, micro: int = 4):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(micro, 6, generator=g), torch.randint(0, 3, (micro,), generator=g))
            for _ in range(accum)]


def _backward(ddp: nn.Module, data) -> None:
    k = len(data)
    for i, (x, y) in enumerate(data):
        last = i == k - 1
        ctx = ddp.no_sync() if not last and hasattr(ddp, "no_sync") else contextlib.nullcontext()
        with ctx:
            (F.cross_entropy(ddp(x), y) / k).backward()


def _worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    for accum in (1, 3):
        data = _data(rank, accum)
        # Reference by hand: this rank's accumulated gradient without any DDP.
        local = _model()
        _backward(local, data)
        g_r = torch.cat([p.grad.flatten() for p in local.parameters()]).double()
        all_g = [torch.zeros_like(g_r) for _ in range(world)]
        dist.all_gather(all_g, g_r)
        small_ref = sum(g.square().sum() for g in all_g) / world
        big_ref = (sum(all_g) / world).square().sum()

        # One warm-up step each: DDP rebuilds its buckets after the first iteration (the first
        # bucket is large), so the measured step runs with several buckets.
        plain = nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=0.004)
        hooked = nn.parallel.DistributedDataParallel(_model(), bucket_cap_mb=0.004)
        hook = GNSHook()
        hooked.register_comm_hook(hook, GNSHook.allreduce)
        for ddp in (plain, hooked):
            _backward(ddp, data)
            ddp.zero_grad(set_to_none=True)
        hook.pop()
        _backward(plain, data)
        calls = []
        original = dist.all_reduce
        dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        try:
            _backward(hooked, data)
        finally:
            dist.all_reduce = original
        for p, q in zip(plain.parameters(), hooked.parameters()):
            assert torch.equal(p.grad, q.grad), f"accum={accum}: gradients differ from DDP"
        small, big = hook.pop()
        torch.testing.assert_close(small.double(), small_ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(big.double(), big_ref, rtol=1e-5, atol=0)
        # No extra collective: exactly one all_reduce per bucket, as plain DDP, >= 2 buckets.
        n_buckets = len(hooked.reducer._get_zeros_like_grad_buckets())
        assert len(calls) == n_buckets >= 2, (len(calls), n_buckets)
    dist.destroy_process_group()


def test_comm_hook_two_ranks(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)


def test_one_process_micro_batch_prefix_norms():
    """What the trainer reads on one process: k^2 |.grad|^2 after the first of k micro-batches
    is |g_1|^2, and |.grad|^2 after all of them is |mean_i g_i|^2."""
    model = _model()
    data = _data(0, 3)
    per_micro = []
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        per_micro.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
    model.zero_grad(set_to_none=True)
    params = list(model.parameters())
    k = len(data)
    for i, (x, y) in enumerate(data):
        (F.cross_entropy(model(x), y) / k).backward()
        if i == 0:
            small = grad_sq_norm(params) * k * k
    big = grad_sq_norm(params)
    torch.testing.assert_close(small, per_micro[0].square().sum())
    torch.testing.assert_close(big, (sum(per_micro) / k).square().sum())
