"""Building blocks of the contrastive (SimCLR) task on 8x8 digits.

* `DigitAugment`: two random views of a batch of images, torch ops only, seeded by a
  torch.Generator (small rotation/scale/shift, contrast jitter, noise, cutout).
* `interleave_views` / `split_views`: the batch layout the model sees, [v1_0, v2_0, v1_1, ...]:
  both views of an image are neighbours, so any contiguous, even-sized chunk of the batch holds
  both views of its images, as a device does in data-parallel SimCLR.
* `gather_with_grad` and `nt_xent_loss`: NT-Xent with negatives from all ranks; the gather's
  backward sums the gradient over ranks, so DDP's gradient average gives the gradient of the
  global loss.
* `set_virtual_devices(model, k)`: BatchNorm statistics over k separate chunks of one process's
  batch, i.e. per-device BatchNorm on k simulated devices.
* `pretext_accuracy` and `leak_gap`: top-1 positive-pair identification, in train mode minus
  eval mode on the same batch (BatchNorm that leaks shows a positive gap).
* `embed`, `knn_accuracy`, `ridge_probe_accuracy`: probes of the learned embeddings.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitAugment", "interleave_views", "split_views", "gather_with_grad",
           "nt_xent_loss", "pretext_accuracy", "leak_gap", "set_virtual_devices", "embed",
           "knn_accuracy", "ridge_probe_accuracy"]


# --- augmentation --------------------------------------------------------------------------------

class DigitAugment:
    """Random views of images [N, C, H, W] (the digits are [N, 1, 8, 8], values in [0, 1]).

    Per image, independently: an affine warp (rotation up to `max_rotation` degrees, scale in
    [1 - max_scale, 1 + max_scale], shift up to `max_shift` pixels, bilinear, zero padding), a
    contrast factor in [1 - contrast, 1 + contrast], Gaussian noise of std `noise`, and with
    probability `cutout_p` a zeroed `cutout` x `cutout` square. All randomness comes from the
    generator passed to the call (a CPU torch.Generator), so a seeded generator gives the same
    views on any device.
    """

    def __init__(self, max_rotation: float = 15.0, max_scale: float = 0.1,
                 max_shift: float = 1.0, contrast: float = 0.3, noise: float = 0.05,
                 cutout: int = 3, cutout_p: float = 0.5) -> None:
        self.max_rotation, self.max_scale, self.max_shift = max_rotation, max_scale, max_shift
        self.contrast, self.noise, self.cutout, self.cutout_p = contrast, noise, cutout, cutout_p

    def view(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """One random view of every image of `x`."""
        if x.dim() != 4:
            raise ValueError(f"DigitAugment: expected images [N, C, H, W], got shape "
                             f"{tuple(x.shape)}")
        n, _, h, w = x.shape

        def uniform(*shape: int) -> Tensor:  # in [-1, 1), drawn on the CPU generator
            return (torch.rand(*shape, generator=generator) * 2 - 1).to(x.device, x.dtype)

        angle = uniform(n) * math.radians(self.max_rotation)
        scale = 1 + uniform(n) * self.max_scale
        # affine_grid works in [-1, 1] coordinates: one pixel is 2 / size.
        shift = uniform(n, 2) * self.max_shift * torch.tensor([2 / w, 2 / h], dtype=x.dtype,
                                                              device=x.device)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + uniform(n, 1, 1, 1) * self.contrast) + mean
        out = out + self.noise * torch.randn(out.shape, generator=generator).to(out)
        if self.cutout > 0 and self.cutout_p > 0:
            size = min(self.cutout, h, w)
            top = torch.randint(0, h - size + 1, (n,), generator=generator).to(x.device)
            left = torch.randint(0, w - size + 1, (n,), generator=generator).to(x.device)
            apply = (torch.rand(n, generator=generator) < self.cutout_p).to(x.device)
            rows = torch.arange(h, device=x.device).view(1, h, 1)
            cols = torch.arange(w, device=x.device).view(1, 1, w)
            inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + size).view(n, 1, 1))
                      & (cols >= left.view(n, 1, 1)) & (cols < (left + size).view(n, 1, 1)))
            out = out.masked_fill((inside & apply.view(n, 1, 1)).unsqueeze(1), 0.0)
        return out

    def __call__(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Two independent random views of `x`."""
        return self.view(x, generator), self.view(x, generator)


def interleave_views(v1: Tensor, v2: Tensor) -> Tensor:
    """[v1_0, v2_0, v1_1, v2_1, ...]: the layout in which every contiguous even-sized chunk (one
    device's, or one virtual device's, share) holds both views of its images."""
    if v1.shape != v2.shape:
        raise ValueError(f"interleave_views: views differ in shape: {tuple(v1.shape)} vs "
                         f"{tuple(v2.shape)}")
    return torch.stack([v1, v2], dim=1).flatten(0, 1)


def split_views(z: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `interleave_views`: (z[0::2], z[1::2])."""
    if z.shape[0] % 2:
        raise ValueError(f"split_views: an interleaved batch has an even length, got "
                         f"{z.shape[0]}")
    return z[0::2], z[1::2]


# --- NT-Xent with a gradient-preserving gather ---------------------------------------------------

def _world(group: Optional[Any]) -> tuple[int, int]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1, 0
    return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward all-reduces (sums) the gradient of the gathered
    tensor and returns this rank's slice: rank r's input feeds every rank's loss, so its gradient
    is the sum of those losses' gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[Any], world: int, rank: int) -> Tensor:
        ctx.group, ctx.rank, ctx.n = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None, None


def gather_with_grad(x: Tensor, group: Optional[Any] = None) -> Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks of `group` along dim 0, rank
    order, keeping the autograd graph. Without torch.distributed or on one rank: `x` itself."""
    world, rank = _world(group)
    if world == 1:
        return x
    return _GatherWithGrad.apply(x, group, world, rank)


def _contrastive_logits(z1: Tensor, z2: Tensor, temperature: float, group: Optional[Any],
                        with_grad: bool) -> tuple[Tensor, Tensor]:
    """Logits [2n, 2N] of this rank's 2n anchors against all 2N embeddings (self excluded) and
    the index of each anchor's positive. Rows/columns: all first views (rank order), then all
    second views."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent_loss: expected two [n, d] embeddings of the same shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent_loss: temperature must be positive, got {temperature}")
    world, rank = _world(group)
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    if with_grad:
        all1, all2 = gather_with_grad(z1, group), gather_with_grad(z2, group)
    elif world > 1:
        with torch.no_grad():
            parts1, parts2 = [torch.empty_like(z1) for _ in range(world)], \
                [torch.empty_like(z2) for _ in range(world)]
            torch.distributed.all_gather(parts1, z1.contiguous(), group=group)
            torch.distributed.all_gather(parts2, z2.contiguous(), group=group)
            all1, all2 = torch.cat(parts1), torch.cat(parts2)
    else:
        all1, all2 = z1, z2
    big_n = n * world
    with torch.autocast(z1.device.type, enabled=False):  # similarities in fp32 under AMP too
        logits = torch.cat([z1, z2]) @ torch.cat([all1, all2]).t() / temperature
    local = torch.arange(n, device=z1.device) + rank * n
    self_index = torch.cat([local, local + big_n])
    positive = torch.cat([local + big_n, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, self_index), torch.tensor(float("-inf"), device=z1.device))
    return logits, positive


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5,
                 group: Optional[Any] = None) -> Tensor:
    """NT-Xent (SimCLR) loss of this rank's pairs (z1[i], z2[i]) with negatives from all ranks.

    z1, z2: [n, d], the same n on every rank. Each of the 2n local embeddings is an anchor whose
    positive is its other view and whose negatives are the other 2N - 2 embeddings of the global
    batch (N = n * world size); the result is the mean cross-entropy over the local anchors
    (cosine similarity / temperature, in fp32). The mean over ranks — what DDP's gradient average
    optimizes — equals the single-process loss on the concatenated batch, gradients included.
    Every rank of `group` must call it (it all-gathers when torch.distributed is initialized).
    """
    logits, positive = _contrastive_logits(z1, z2, temperature, group, with_grad=True)
    return F.cross_entropy(logits, positive)


@torch.no_grad()
def pretext_accuracy(z1: Tensor, z2: Tensor, group: Optional[Any] = None) -> float:
    """Fraction of this rank's 2n anchors whose most similar other embedding (cosine, over the
    global batch) is its positive. Collective when torch.distributed is initialized."""
    logits, positive = _contrastive_logits(z1, z2, 1.0, group, with_grad=False)
    return (logits.argmax(dim=1) == positive).float().mean().item()


@torch.no_grad()
def leak_gap(model: nn.Module, v1: Tensor, v2: Tensor, group: Optional[Any] = None
             ) -> dict[str, float]:
    """Pretext accuracy of `model` on the interleaved views in train mode minus eval mode, same
    batch. In train mode BatchNorm normalizes with statistics of the batch (or of each
    (virtual) device's chunk), which a model can exploit to find an image's other view; eval mode
    uses the running statistics and cannot. The model's buffers (running statistics) and
    train/eval flags are restored afterwards. Returns {"train": a, "eval": b, "gap": a - b};
    with several ranks the accuracies are this rank's (average them across ranks to report), and
    every rank must call it (the train-mode forward of SyncBatchNorm and the gather are
    collectives)."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        out = {}
        x = interleave_views(v1, v2)
        for mode in ("train", "eval"):
            model.train(mode == "train")
            z1, z2 = split_views(model(x))
            out[mode] = pretext_accuracy(z1, z2, group)
    finally:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        for m, training in modes.items():
            m.training = training
    out["gap"] = out["train"] - out["eval"]
    return out


# --- virtual devices ------------------------------------------------------------------------------

class _VirtualDeviceBatchNorm:
    """forward() mixed in front of a BatchNorm class by `set_virtual_devices`: in training mode
    the batch (dim 0) is split into `virtual_devices` contiguous equal chunks, each normalized
    with its own statistics by the original forward; the running statistics become the average
    of the k per-chunk updates (each chunk updates a copy of the buffers with the class's own
    rule, momentum=None included), num_batches_tracked advances once."""

    virtual_devices: int

    def forward(self, input: Tensor) -> Tensor:
        k = self.virtual_devices
        if not self.training or k == 1:
            return super().forward(input)
        if input.shape[0] % k:
            raise ValueError(f"set_virtual_devices: batch of {input.shape[0]} is not divisible "
                             f"into {k} virtual devices")
        names = [n for n in ("running_mean", "running_var", "num_batches_tracked")
                 if getattr(self, n, None) is not None]
        originals = {n: getattr(self, n) for n in names}
        updated: dict[str, list[Tensor]] = {n: [] for n in names}
        outputs = []
        try:
            for chunk in input.chunk(k):
                for n in names:
                    setattr(self, n, originals[n].clone())
                outputs.append(super().forward(chunk))
                for n in names:
                    updated[n].append(getattr(self, n))
        finally:
            for n in names:
                setattr(self, n, originals[n])
        with torch.no_grad():
            for n in names:
                if n == "num_batches_tracked":
                    originals[n].copy_(updated[n][0])
                else:
                    originals[n].copy_(torch.stack(updated[n]).mean(0))
        return torch.cat(outputs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_devices={self.virtual_devices}"


_VIRTUAL_CLASSES: dict[type, type] = {}  # BatchNorm class -> its virtual-device subclass
_VIRTUAL_BASES: dict[type, type] = {}    # and back


def set_virtual_devices(model: nn.Module, k: int) -> nn.Module:
    """Make every BatchNorm layer of `model` (torch.nn.BatchNorm1d/2d/3d, fastnorm.nn's, and
    subclasses) compute training-mode statistics over `k` contiguous equal chunks of its batch,
    as per-device BatchNorm does on k devices; k=1 restores the original classes. In place (the
    class is swapped: parameters, buffers and state_dict keys are unchanged); returns `model`.

    Layout assumption: chunk j of the batch is virtual device j's data, so feed the model
    `interleave_views(v1, v2)` with a per-process image count divisible by k; each chunk then
    holds both views of its images. SyncBatchNorm layers are left alone: their statistics are
    global by design (on one process, over the whole batch), which is the control experiment.

    Running statistics: the average of the k per-chunk updates (the mean of the k devices'
    running buffers). DDP with broadcast_buffers=True instead keeps rank 0's; the two agree in
    expectation, the average has less variance.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"set_virtual_devices: k must be a positive int, got {k!r}")
    for module in model.modules():
        cls = type(module)
        base = _VIRTUAL_BASES.get(cls, cls)
        if not issubclass(base, nn.modules.batchnorm._BatchNorm) or \
                issubclass(base, nn.SyncBatchNorm):
            continue
        if k == 1:
            module.__class__ = base
            if hasattr(module, "virtual_devices"):
                del module.virtual_devices
            continue
        if base not in _VIRTUAL_CLASSES:
            virtual = type(f"VirtualDevice{base.__name__}", (_VirtualDeviceBatchNorm, base), {})
            _VIRTUAL_CLASSES[base], _VIRTUAL_BASES[virtual] = virtual, base
        module.__class__ = _VIRTUAL_CLASSES[base]
        module.virtual_devices = k
    return model


# --- probes ---------------------------------------------------------------------------------------

@torch.no_grad()
def embed(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """model(x) in eval mode, in batches, as fp32; the model's train/eval flags are restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return torch.cat([model(x[i:i + batch_size]).float()
                          for i in range(0, x.shape[0], batch_size)])
    finally:
        for m, training in modes.items():
            m.training = training


@torch.no_grad()
def knn_accuracy(train_emb: Tensor, train_labels: Tensor, test_emb: Tensor,
                 test_labels: Tensor, k: int = 20, weighted: bool = False) -> float:
    """Test accuracy of a k-nearest-neighbour classifier on cosine similarity: each test
    embedding takes the majority class of its k most similar training embeddings (votes weighted
    by similarity when `weighted`; ties go to the smaller class id)."""
    if not 1 <= k <= train_emb.shape[0]:
        raise ValueError(f"knn_accuracy: k must be in [1, {train_emb.shape[0]}], got {k}")
    train = F.normalize(train_emb.double(), dim=1)
    test = F.normalize(test_emb.double(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for i in range(0, test.shape[0], 1024):
        sim, idx = (test[i:i + 1024] @ train.t()).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float64, device=sim.device)
        votes.scatter_add_(1, train_labels[idx].long(), sim if weighted else torch.ones_like(sim))
        correct += int((votes.argmax(dim=1) == test_labels[i:i + 1024].long()).sum())
    return correct / test.shape[0]


@torch.no_grad()
def ridge_probe_accuracy(train_emb: Tensor, train_labels: Tensor, test_emb: Tensor,
                         test_labels: Tensor, l2: float = 1e-2) -> float:
    """Test accuracy of a closed-form linear probe: ridge regression (penalty `l2` times the
    number of training samples) from standardized embeddings plus a bias to one-hot labels, in
    float64; the prediction is the argmax."""
    mean = train_emb.double().mean(0)
    std = train_emb.double().std(0).clamp_min(1e-8)

    def features(e: Tensor) -> Tensor:
        z = (e.double() - mean) / std
        return torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)], 1)

    x = features(train_emb)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    y = F.one_hot(train_labels.long(), num_classes).double()
    penalty = l2 * x.shape[0] * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    penalty[-1, -1] = 0.0  # the bias is not penalized
    w = torch.linalg.solve(x.t() @ x + penalty, x.t() @ y)
    pred = (features(test_emb) @ w).argmax(dim=1)
    return (pred == test_labels.long()).double().mean().item()
