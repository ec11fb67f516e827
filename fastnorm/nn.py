"""Drop-in modules: subclasses of the torch.nn normalization layers that override `forward`
only, so constructor arguments, defaults, parameters and state_dict keys are torch's own.
`convert(model)` swaps a model's torch.nn norm layers for these in place."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F_fast

__all__ = ["LayerNorm", "RMSNorm", "convert"]


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` computed by fastnorm's kernels (see `fastnorm.layer_norm`)."""

    def forward(self, input: Tensor) -> Tensor:
        return F_fast.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` computed by fastnorm's kernels (see `fastnorm.rms_norm`)."""

    def forward(self, input: Tensor) -> Tensor:
        return F_fast.rms_norm(input, self.normalized_shape, self.weight, self.eps)


# torch.nn class -> fastnorm class. Exact type match: a user's own subclass of nn.LayerNorm may
# override forward, so it is left alone.
_SWAPS: dict[type, type] = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm}


def convert(module: nn.Module) -> nn.Module:
    """Swap every `torch.nn.LayerNorm` / `torch.nn.RMSNorm` in `module` (itself included) for
    the fastnorm one, in place, and return `module`. Idempotent.

    The layers keep their identity: only their class changes, so Parameter objects, buffers,
    hooks and optimizer state stay as they were (the fastnorm classes add no state)."""
    for sub in module.modules():
        new_cls = _SWAPS.get(type(sub))
        if new_cls is not None:
            sub.__class__ = new_cls
    return module
