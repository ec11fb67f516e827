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


class GroupNorm(nn.GroupNorm):
    """`torch.nn.GroupNorm` computed by fastnorm's kernels (see `fastnorm.group_norm`), with an
    optional fused activation: `GroupNorm(32, 320, activation="silu")` computes
    `silu(group_norm(x))` in one kernel. Same parameters and state_dict as torch's."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str | None = None) -> None:
        if activation not in (None, "silu"):
            raise ValueError(f"fastnorm.nn.GroupNorm: unknown activation {activation!r}; "
                             "expected None or 'silu'")
        # torch releases without GroupNorm(bias=...) still work when it is left at its default.
        extra = {} if bias else {"bias": False}
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **extra)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        # convert() swaps __class__ without running __init__: no attribute means no activation.
        return F_fast.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                                 activation=getattr(self, "activation", None))

    def extra_repr(self) -> str:
        activation = getattr(self, "activation", None)
        extra = f", activation={activation!r}" if activation is not None else ""
        return super().extra_repr() + extra


_SWAPS[nn.GroupNorm] = GroupNorm
__all__.append("GroupNorm")
