"""Process group setup and the DDP communication hook that measures gradient norms for free.

The hook (`GNSHook`) does what DDP's built-in all-reduce does - divide each bucket by the world
size, all-reduce SUM - and on the side it

  * adds up this rank's squared gradient norm |g_r|^2 over the buckets *before* the reduction
    (the "small" batch: this rank's local batch), and sends the mean over ranks inside the LAST
    bucket's all-reduce, as one extra element: no extra collective;
  * adds up the squared norm of each reduced bucket (the "big" batch: the global batch).

No per-parameter hook, no gradient copy except that the last bucket travels with one more
element (torch.cat of that one bucket), and no host synchronization: the two norms stay device
tensors until the caller reads them. The reduced gradients are bitwise those of plain DDP on
two ranks (same division, and a two-operand sum is commutative); with more ranks the packed
last bucket could in principle be chunked differently by the backend.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistEnv", "init_distributed", "GNSHook", "all_gather_objects", "wrap_ddp"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: Optional[str]     # None when there is a single process and no group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str = "auto") -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device and start
    the process group: nccl for CUDA, gloo for CPU, unless `backend` says otherwise. A plain
    `python -m fastnorm.train` is one process and starts no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world == 1:
        return DistEnv(rank, world, local_rank, dev, None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise RuntimeError("--dist-backend nccl needs --device cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend,
                                device_id=dev if backend == "nccl" else None)
    return DistEnv(rank, world, local_rank, dev, backend)


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; [obj] on one process."""
    if env.world == 1:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


class _DDP(DistributedDataParallel):
    """DDP that lets fastnorm.nn.SyncBatchNorm run on CPU: torch's DDP refuses every
    torch.nn.SyncBatchNorm subclass on CPU modules because torch's own kernel is CUDA-only,
    while fastnorm's runs on CPU tensors with gloo."""

    def _passing_sync_batchnorm_handle(self, module: torch.nn.Module) -> None:
        from ..nn import SyncBatchNorm
        others = [m for m in module.modules()
                  if isinstance(m, torch.nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)]
        if others:
            super()._passing_sync_batchnorm_handle(module)


def wrap_ddp(model: torch.nn.Module, device: torch.device, sync_buffers: bool = True
             ) -> DistributedDataParallel:
    """DistributedDataParallel around `model`. sync_buffers=False skips the per-forward
    broadcast of rank 0's buffers (not needed when they are equal on all ranks anyway, as with
    SyncBatchNorm, or absent)."""
    kwargs: dict[str, Any] = {}
    if not sync_buffers:
        # torch 2.13 renamed broadcast_buffers (deprecated there) to forward_sync_buffers.
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        kwargs["forward_sync_buffers" if "forward_sync_buffers" in params
               else "broadcast_buffers"] = False
    return _DDP(model, device_ids=[device] if device.type == "cuda" else None, **kwargs)


class GNSHook:
    """State and callable for `DistributedDataParallel.register_comm_hook(state, hook)`.

    Usage::

        hook = GNSHook()
        ddp.register_comm_hook(hook, GNSHook.allreduce)
        loss.backward()                      # the synchronizing micro-step
        small_sq, big_sq = hook.pop()        # 0-dim fp32 (fp64 for fp64 grads) tensors

    small_sq is the mean over ranks of |g_r|^2 (g_r: this rank's gradient of the step, batch
    B/world), big_sq is |mean_r g_r|^2 (batch B). Both are as scaled as the gradients are: divide
    by the loss scale squared under a GradScaler.
    """

    def __init__(self, process_group: Optional[Any] = None) -> None:
        self.group = process_group
        self._local_sq: Optional[torch.Tensor] = None
        self._big_sq: Optional[torch.Tensor] = None
        self._small_sq: Optional[torch.Tensor] = None

    def pop(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The two squared norms of the last synchronized backward; resets the state."""
        if self._small_sq is None or self._big_sq is None:
            raise RuntimeError("GNSHook.pop: no synchronized backward ran since the last pop")
        out = (self._small_sq, self._big_sq)
        self._local_sq = self._big_sq = self._small_sq = None
        return out

    def _add_big(self, sq: torch.Tensor) -> None:
        self._big_sq = sq if self._big_sq is None else self._big_sq + sq

    @staticmethod
    def allreduce(state, bucket):  # no annotations: DDP checks them against real types
        """The hook: (GNSHook, dist.GradBucket) -> Future[Tensor]."""
        buf = bucket.buffer()
        stat_dtype = torch.float64 if buf.dtype == torch.float64 else torch.float32
        world = dist.get_world_size(state.group)
        local = buf.detach().to(stat_dtype).square().sum()
        state._local_sq = local if state._local_sq is None else state._local_sq + local
        buf.div_(world)                                  # what DDP's own hook does
        if not bucket.is_last():
            fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()

            def reduced(f: torch.futures.Future) -> torch.Tensor:
                out = f.value()[0]
                state._add_big(out.to(stat_dtype).square().sum())
                return out
            return fut.then(reduced)
        # Last bucket: ship sum_r |g_r|^2 / world as one more element of the same all-reduce.
        packed = torch.cat([buf, (state._local_sq / world).to(buf.dtype).view(1)])
        n = buf.numel()
        fut = dist.all_reduce(packed, group=state.group, async_op=True).get_future()

        def reduced_last(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()[0]
            grads = out[:n]
            state._add_big(grads.to(stat_dtype).square().sum())
            state._small_sq = out[n].to(stat_dtype)
            return grads
        return fut.then(reduced_last)
