"""fastnorm.gns.track: the gradient noise scale measured from the norm layers' backward.

Each tracked fastnorm LayerNorm/RMSNorm/GroupNorm gets a small fp32 "sink" tensor [4] that its
forward passes to fastnorm::layer_norm_fwd_gns / group_norm_fwd_gns; that op's backward
(layer_norm_bwd_pe / group_norm_bwd_pe: per-example squared dW/dB norms from the same kernel
pass) returns the layer's sums as the sink's gradient,
which autograd accumulates in sink.grad. Everything stays in the autograd graph (no hooks, no
side effects), so torch.compile(fullgraph=True) keeps one graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

_ATTR = "_fastnorm_gns_sink"
REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class NormLayerGNSSums:
    """One measurement, the arguments of `GNSEstimator.update`: `small_sq_norm` is the mean over
    the examples of |g_i|^2 (a batch of 1), `big_sq_norm` the mean over backward calls (and
    ranks) of |G_B|^2, the squared norm of the batch's own mean gradient (a batch of
    `big_batch` examples: the per-rank micro-batch), over the tracked norm layers' weights and
    biases."""
    small_sq_norm: float
    big_sq_norm: float
    small_batch: int
    big_batch: int
    examples: int

    def as_update(self) -> dict[str, Any]:
        """Keyword arguments for GNSEstimator.update."""
        return dict(small_sq_norm=self.small_sq_norm, big_sq_norm=self.big_sq_norm,
                    small_batch=self.small_batch, big_batch=self.big_batch)


class NormLayerGNS:
    """The handle `fastnorm.gns.track` returns; see there."""

    def __init__(self, model: nn.Module, loss_reduction: str = "mean",
                 process_group: Optional[Any] = None) -> None:
        from . import nn as fnn

        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"fastnorm.gns.track: loss_reduction must be one of {REDUCTIONS}, "
                             f"got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.process_group = process_group
        self.layers = [m for m in model.modules()
                       if isinstance(m, (fnn.LayerNorm, fnn.RMSNorm, fnn.GroupNorm))
                       and any(p.requires_grad for p in m.parameters(recurse=False))]
        if not self.layers:
            raise ValueError("fastnorm.gns.track: the model has no fastnorm.nn.LayerNorm / "
                             "RMSNorm / GroupNorm with trainable parameters (convert it with "
                             "fastnorm.convert first)")
        for m in self.layers:
            if getattr(m, _ATTR, None) is not None:
                raise RuntimeError(f"fastnorm.gns.track: {type(m).__name__} is already tracked")
            device = next(m.parameters()).device
            setattr(m, _ATTR, torch.zeros(4, dtype=torch.float32, device=device,
                                          requires_grad=True))

    def _sinks(self) -> list[Tensor]:
        return [getattr(m, _ATTR) for m in self.layers]

    def zero_(self) -> None:
        """Forget what the backward calls since the last `measure` accumulated."""
        for s in self._sinks():
            s.grad = None

    def measure(self) -> NormLayerGNSSums:
        """The sums of the backward calls since the last measure / zero_ (then reset), reduced
        over the ranks with one all_reduce of 4 numbers when torch.distributed is initialized.
        Every tracked layer must have run forward and backward once per call (a layer used
        twice in one forward is counted as two layers: the cross term of its two
        contributions is missed)."""
        grads = [s.grad for s in self._sinks()]
        missing = [type(m).__name__ for m, g in zip(self.layers, grads) if g is None]
        if missing:
            raise RuntimeError(f"fastnorm.gns.track: {len(missing)} tracked layer(s) "
                               f"({missing[0]}, ...) had no backward since the last measure "
                               "(they must run with grad enabled and get a gradient)")
        total = torch.stack(grads).sum(0)
        per_example, batch = total[0], total[1]
        examples, calls = grads[0][2], grads[0][3]
        # Per-example contributions c_i and the batch gradient dW = sum c_i as the kernels see
        # them; the example's own gradient g_i and the batch's mean G depend on the loss:
        # "mean": g_i = B c_i, G = dW; "sum": g_i = c_i, G = dW / B (B examples per call).
        b = examples / calls
        if self.loss_reduction == "mean":
            small_sum, big_sum = per_example * b * b, batch
        else:
            small_sum, big_sum = per_example, batch / (b * b)
        packed = torch.stack([small_sum, big_sum, examples, calls]).double()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed, group=self.process_group)
        small_sum, big_sum, examples, calls = packed.tolist()
        self.zero_()
        return NormLayerGNSSums(small_sq_norm=small_sum / examples, big_sq_norm=big_sum / calls,
                                small_batch=1, big_batch=round(examples / calls),
                                examples=round(examples))

    def close(self) -> None:
        """Stop tracking: the layers run their plain backward again."""
        for m in self.layers:
            if _ATTR in vars(m):  # (the classes hold a None default)
                delattr(m, _ATTR)

    def __enter__(self) -> "NormLayerGNS":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
