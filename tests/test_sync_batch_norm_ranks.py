"""SyncBatchNorm across gloo processes on 127.0.0.1 vs single-process BatchNorm on the
concatenated batch: outputs, input gradients, all-reduced weight/bias gradients and running
statistics, with uneven batches, an empty rank and a process-group subset; and exactly one
collective per direction.

Each test spawns its processes once and runs several scenarios in them (start-up dominates).
The children inherit TRITON_INTERPRET (set by conftest) and PYTHONPATH through the environment.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastnorm
import fastnorm.sync_batch_norm
from helpers import free_port

C = 3
SPATIAL = (2, 3)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class _CollectiveCounter:
    """Counts all_reduce / all_gather calls (wrapping torch.distributed's functions)."""

    def __init__(self):
        self.calls = 0
        self._originals = {}
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor"):
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._wrap(original))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return counted

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls

    def restore(self):
        for name, fn in self._originals.items():
            setattr(dist, name, fn)


def _check_against_single_process(rank, batches, channels_last, momentum, relu, group=None,
                                  members=None, steps=2):
    """This rank runs SyncBatchNorm on its slice of a batch that every rank generates in full;
    the reference is torch BatchNorm2d in float64 on the members' concatenated slices."""
    device = _device()
    members = list(range(len(batches))) if members is None else members
    offsets = [sum(batches[:i]) for i in range(len(batches))]
    # Identical parameters on every rank.
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(C, generator=gen) + 0.5
    bias = torch.randn(C, generator=gen)
    ours = fastnorm.nn.SyncBatchNorm(C, momentum=momentum, process_group=group).to(device)
    ref = nn.BatchNorm2d(C, momentum=momentum).double().to(device)
    with torch.no_grad():
        for module in (ours, ref):
            module.weight.copy_(weight)
            module.bias.copy_(bias)
    counter = _CollectiveCounter()
    try:
        for step in range(steps):
            gen = torch.Generator().manual_seed(100 + step)
            full_x = torch.randn(sum(batches), C, *SPATIAL, generator=gen) * 2 + 3
            full_dy = torch.randn(sum(batches), C, *SPATIAL, generator=gen)
            mine = slice(offsets[rank], offsets[rank] + batches[rank])
            x = _in_layout(full_x[mine], channels_last).to(device).requires_grad_()
            dy = _in_layout(full_dy[mine], channels_last).to(device)
            counter.take()
            if relu:  # the functional path, which fuses the ReLU
                ours.num_batches_tracked.add_(1)
                factor = 1.0 / ours.num_batches_tracked if momentum is None else momentum
                y = fastnorm.sync_batch_norm.sync_batch_norm(
                    x, ours.running_mean, ours.running_var, ours.weight, ours.bias, factor,
                    ours.eps, group, activation="relu")
            else:
                y = ours(x)
            forward_calls = counter.take()
            y.backward(dy)
            backward_calls = counter.take()
            assert (forward_calls, backward_calls) == (1, 1), (forward_calls, backward_calls)
            assert x.numel() == 0 or y.stride() == x.stride(), "memory format not kept"

            # Reference on the members' data only.
            idx = torch.cat([torch.arange(offsets[r], offsets[r] + batches[r]) for r in members])
            ref_x = full_x[idx].double().to(device).requires_grad_()
            ref_y = ref(ref_x)
            if relu:
                ref_y = F.relu(ref_y)
            ref_y.backward(full_dy[idx].double().to(device))
            local = slice(sum(batches[r] for r in members if r < rank), None)
            local = slice(local.start, local.start + batches[rank])
            torch.testing.assert_close(y.double(), ref_y[local].detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.grad.double(), ref_x.grad[local], atol=1e-5, rtol=1e-5)
            grads = torch.stack([ours.weight.grad, ours.bias.grad])
            dist.all_reduce(grads, group=group)
            torch.testing.assert_close(grads.double(), torch.stack([ref.weight.grad,
                                                                    ref.bias.grad]),
                                       atol=1e-4, rtol=1e-5)
            for module in (ours, ref):
                module.weight.grad = module.bias.grad = None
            counter.take()
        # Running stats: right, and bitwise identical on every rank of the group.
        torch.testing.assert_close(ours.running_mean.double(), ref.running_mean, atol=1e-6,
                                   rtol=1e-5)
        torch.testing.assert_close(ours.running_var.double(), ref.running_var, atol=1e-6,
                                   rtol=1e-5)
        assert int(ours.num_batches_tracked) == steps
        stats = torch.cat([ours.running_mean, ours.running_var])
        gathered = [torch.empty_like(stats) for _ in members]
        dist.all_gather(gathered, stats, group=group)
        assert all(torch.equal(g, stats) for g in gathered), "running stats differ across ranks"
        # Eval: running statistics, no communication.
        ours.eval()
        ref.eval()
        x = _in_layout(full_x[mine], channels_last).to(device)
        counter.take()
        y = ours(x)
        assert counter.take() == 0
        torch.testing.assert_close(y.double(), ref(full_x[mine].double().to(device)), atol=1e-5,
                                   rtol=1e-5)
    finally:
        counter.restore()


def _check_outside_group(rank, group):
    """A rank outside the module's process group normalizes its own batch, without
    communication, as torch's SyncBatchNorm does."""
    device = _device()
    x = torch.randn(4, C, *SPATIAL, generator=torch.Generator().manual_seed(rank)).to(device)
    ours = fastnorm.nn.SyncBatchNorm(C, process_group=group).to(device)
    counter = _CollectiveCounter()
    try:
        y = ours(x)
        assert counter.take() == 0
    finally:
        counter.restore()
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))


def _check_transform_errors(rank):
    """Forward-mode AD / torch.func and double backward across ranks raise errors that say
    what is unsupported (every rank the same way, so none waits in a collective)."""
    device = _device()
    x = torch.randn(4, C, *SPATIAL, generator=torch.Generator().manual_seed(rank)).to(device)
    ours = fastnorm.nn.SyncBatchNorm(C).to(device)
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="not supported across ranks"):
            ours(dual)
    y = ours(x.requires_grad_())
    with pytest.raises(RuntimeError, match="double backward .* across ranks is not supported"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def _worker(rank, world_size, port, scenarios):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        for backend, kwargs in scenarios:
            if backend == "transform errors":
                _check_transform_errors(rank)
                continue
            group = None
            members = kwargs.pop("members", None)
            if members is not None:
                # Every rank creates every group, members or not.
                group = dist.new_group(members)
                if rank not in members:
                    _check_outside_group(rank, group)
                    continue
            with fastnorm.use_backend(backend):
                _check_against_single_process(rank, group=group, members=members, **kwargs)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world_size, scenarios, monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    mp.spawn(_worker, args=(world_size, free_port(), scenarios), nprocs=world_size, join=True)


# The Triton kernels on CUDA, or through the interpreter on CPU; "torch" runs the same
# collectives around plain torch ops.
KERNELS = "triton"


@pytest.mark.slow
def test_sync_batch_norm_two_ranks(monkeypatch):
    scenarios = [
        (KERNELS, dict(batches=[5, 2], channels_last=True, momentum=0.1, relu=False)),
        (KERNELS, dict(batches=[3, 4], channels_last=False, momentum=None, relu=True)),
        ("torch", dict(batches=[1, 4], channels_last=False, momentum=0.1, relu=False)),
        ("transform errors", {}),
    ]
    _spawn(2, scenarios, monkeypatch)


@pytest.mark.slow
def test_sync_batch_norm_three_ranks_empty_rank_and_subgroup(monkeypatch):
    scenarios = [
        (KERNELS, dict(batches=[3, 0, 4], channels_last=False, momentum=0.1, relu=False)),
        (KERNELS, dict(batches=[0, 2, 3], channels_last=True, momentum=0.1, relu=True)),
        (KERNELS, dict(batches=[2, 3, 4], channels_last=True, momentum=0.1, relu=False,
                       members=[0, 2])),
    ]
    _spawn(3, scenarios, monkeypatch)
