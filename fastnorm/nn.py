"""Drop-in modules: subclasses of the torch.nn normalization layers that override `forward`
only, so constructor arguments, defaults, parameters and state_dict keys are torch's own.
`convert(model)` (fastnorm/convert.py) swaps a model's norm layers for these in place.

TorchScript: `torch.jit.script` works on these modules (and on models holding them), but a
scripted module computes with torch's own ops — TorchScript cannot call Triton kernels or
fastnorm's Python dispatch. Eager mode and torch.compile run fastnorm's kernels.

`bias=False` works on every supported torch: torch 2.12 added that keyword to BatchNorm*,
SyncBatchNorm and GroupNorm; on older releases these modules build torch's module and then drop
its bias, which gives what torch >= 2.12 builds (no `bias` Parameter, no "bias" state_dict key).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import functional as F_fast

__all__ = ["LayerNorm", "RMSNorm", "LayerNorm2d", "RMSNorm2d", "GroupNorm", "BatchNorm1d",
           "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert"]


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` computed by fastnorm's kernels (see `fastnorm.layer_norm`)."""

    # The noise-scale sink fastnorm.gns.track sets on a tracked instance; a class default keeps
    # the per-call lookup a plain attribute read (a missing one costs an exception in
    # nn.Module.__getattr__).
    _fastnorm_gns_sink = None

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: torch's op
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        sink = self._fastnorm_gns_sink  # set by fastnorm.gns.track
        if sink is not None and torch.is_grad_enabled():
            return F_fast._norm_with_gns(input, self.normalized_shape, self.weight, self.bias,
                                         self.eps, False, sink)
        return F_fast.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """`torch.nn.RMSNorm` computed by fastnorm's kernels (see `fastnorm.rms_norm`)."""

    _fastnorm_gns_sink = None  # (see LayerNorm)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: torch's op
            return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)
        sink = self._fastnorm_gns_sink  # set by fastnorm.gns.track
        if sink is not None and torch.is_grad_enabled():
            return F_fast._norm_with_gns(input, self.normalized_shape, self.weight, None,
                                         self.eps, True, sink)
        return F_fast.rms_norm(input, self.normalized_shape, self.weight, self.eps)


# --- channels-first LayerNorm / RMSNorm --------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels (dim 1) of an (N, C, *) input, as timm's and torchvision's
    `LayerNorm2d` (the same subclass of `torch.nn.LayerNorm`: parameters `weight` and `bias` of
    shape [C], the same state_dict keys, eps 1e-6 by default), computed by
    `fastnorm.layer_norm_2d` without the permutes' copies; the output keeps the input's memory
    format (NCHW or channels-last)."""

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine,
                         bias=bias, device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: torch's op
            return F.layer_norm(input.movedim(1, -1), self.normalized_shape, self.weight,
                                self.bias, self.eps).movedim(-1, 1)
        return F_fast.layer_norm_2d(input, self.weight, self.bias, self.eps)


class RMSNorm2d(nn.RMSNorm):
    """RMSNorm over the channels (dim 1) of an (N, C, *) input (`torch.nn.RMSNorm`'s
    parameters and state_dict: `weight` of shape [C]; eps None is torch's rule), computed by
    `fastnorm.rms_norm_2d`; the output keeps the input's memory format."""

    def __init__(self, num_channels: int, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(num_channels, eps=eps, elementwise_affine=elementwise_affine,
                         device=device, dtype=dtype)

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: torch's op
            return F.rms_norm(input.movedim(1, -1), self.normalized_shape, self.weight,
                              self.eps).movedim(-1, 1)
        return F_fast.rms_norm_2d(input, self.weight, self.eps)


# --- bias=False on torch < 2.12 ------------------------------------------------------------------

def _takes_bias(cls: type) -> bool:
    """Whether `cls.__init__` has a `bias` keyword (torch >= 2.12's BatchNorm*, SyncBatchNorm and
    GroupNorm; older releases have none and raise TypeError on it)."""
    return "bias" in inspect.signature(cls.__init__).parameters


# The torch bases whose __init__ these modules call, checked once at import.
_TAKES_BIAS = {base: _takes_bias(base) for base in
               (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm, nn.GroupNorm)}


def _bias_kwarg(base: type, bias: bool) -> dict[str, bool]:
    """The `bias` keyword for `base.__init__`: passed where torch takes it; otherwise nothing
    (the module is built with a bias, and `_drop_bias` removes it after construction)."""
    return {"bias": bias} if _TAKES_BIAS[base] else {}


def _drop_bias(module: nn.Module, bias: bool) -> None:
    """bias=False on a torch without the keyword: the bias becomes None, as torch >= 2.12 makes
    it (the kernels take bias=None; the state_dict has no "bias" key)."""
    if not bias and module.bias is not None:
        module.register_parameter("bias", None)


class _ResetWithoutBias:
    """reset_parameters() that also works on a module whose bias was dropped: torch < 2.12's
    resets zero `self.bias` unconditionally when affine, which fails on None."""

    def reset_parameters(self) -> None:
        if not (self.affine and self.bias is None):
            return super().reset_parameters()
        if isinstance(self, nn.modules.batchnorm._NormBase):
            self.reset_running_stats()
        nn.init.ones_(self.weight)


# --- BatchNorm -----------------------------------------------------------------------------------

def _batch_norm_args(module: nn.modules.batchnorm._BatchNorm
                     ) -> tuple[Optional[Tensor], Optional[Tensor], bool, Any]:
    """torch's _BatchNorm.forward bookkeeping: (running_mean, running_var, bn_training,
    exponential_average_factor). For momentum=None the factor 1/num_batches_tracked stays a
    tensor, so the cumulative average needs no host sync; it is float64 (torch computes it as a
    Python float), so float64 running statistics keep float64 precision."""
    factor: Any = 0.0 if module.momentum is None else module.momentum
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            factor = module.num_batches_tracked.to(torch.float64).reciprocal()
    bn_training = module.training or (module.running_mean is None and module.running_var is None)
    # Buffers are passed only when they are updated (training, tracked) or used (eval).
    use_buffers = not module.training or module.track_running_stats
    return (module.running_mean if use_buffers else None,
            module.running_var if use_buffers else None, bn_training, factor)


class _BatchNormForward(_ResetWithoutBias):
    """__init__ (torch's signature; `bias=` on every torch) and forward() shared by the
    BatchNorm{1,2,3}d subclasses (the input-rank check is torch's)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **_bias_kwarg(nn.modules.batchnorm._BatchNorm, bias))
        _drop_bias(self, bias)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: torch's op
            return self._scripted_forward(input)
        running_mean, running_var, bn_training, factor = _batch_norm_args(self)
        return F_fast.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                 bn_training, factor, self.eps)

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """_batch_norm_args + torch's F.batch_norm, in the subset TorchScript compiles."""
        factor = 0.0
        if self.momentum is not None:
            factor = self.momentum
        if self.training and self.track_running_stats:
            num_batches_tracked = self.num_batches_tracked
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if use_buffers else None,
                            self.running_var if use_buffers else None, self.weight, self.bias,
                            bn_training, factor, self.eps)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """`torch.nn.BatchNorm1d` computed by fastnorm's kernels (see `fastnorm.batch_norm`)."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """`torch.nn.BatchNorm2d` computed by fastnorm's kernels (see `fastnorm.batch_norm`)."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """`torch.nn.BatchNorm3d` computed by fastnorm's kernels (see `fastnorm.batch_norm`)."""


class SyncBatchNorm(_ResetWithoutBias, nn.SyncBatchNorm):
    """`torch.nn.SyncBatchNorm` with fastnorm's kernels and one collective per direction (see
    `fastnorm.sync_batch_norm.sync_batch_norm`). Unlike torch's, it also runs on CPU tensors with a
    gloo process group, and a synchronized step never synchronizes the host with the device
    (momentum=None included)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 process_group: Optional[Any] = None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group,
                         device, dtype, **_bias_kwarg(nn.SyncBatchNorm, bias))
        _drop_bias(self, bias)

    def forward(self, input: Tensor) -> Tensor:
        from . import sync_batch_norm as sbn

        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, bn_training, factor = _batch_norm_args(self)
        # Like torch: statistics are synchronized in training mode only.
        group = sbn.sync_group(self.process_group) if bn_training and self.training \
            else None
        if group is None:
            return F_fast.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                     bn_training, factor, self.eps)
        return sbn.sync_batch_norm(input, running_mean, running_var, self.weight,
                                           self.bias, factor, self.eps, group)


class GroupNorm(_ResetWithoutBias, nn.GroupNorm):
    """`torch.nn.GroupNorm` computed by fastnorm's kernels (see `fastnorm.group_norm`), with an
    optional fused activation: `GroupNorm(32, 320, activation="silu")` computes
    `silu(group_norm(x))` in one kernel. Same parameters and state_dict as torch's."""

    # A class-level default: convert() swaps __class__ without running __init__. A TorchScript
    # constant, so a scripted module keeps its activation.
    __constants__ = [*nn.GroupNorm.__constants__, "activation"]
    activation = None
    _fastnorm_gns_sink = None  # (see LayerNorm)

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, device=None, dtype=None, *, bias: bool = True,
                 activation: str | None = None) -> None:
        if activation not in (None, "silu"):
            raise ValueError(f"fastnorm.nn.GroupNorm: unknown activation {activation!r}; "
                             "expected None or 'silu'")
        super().__init__(num_groups, num_channels, eps, affine, device, dtype,
                         **_bias_kwarg(nn.GroupNorm, bias))
        _drop_bias(self, bias)
        self.activation = activation

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only: torch's ops
            y = F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
            activation = self.activation
            if activation is not None:  # (nested: TorchScript skips it for a None constant)
                if activation == "silu":
                    y = F.silu(y)
            return y
        sink = self._fastnorm_gns_sink  # set by fastnorm.gns.track
        if sink is not None and torch.is_grad_enabled():
            return F_fast._group_norm_with_gns(input, self.num_groups, self.weight, self.bias,
                                               self.eps, self.activation, sink)
        return F_fast.group_norm(input, self.num_groups, self.weight, self.bias, self.eps,
                                 activation=self.activation)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation is not None else ""
        return super().extra_repr() + extra



def _fastnorm_name(self) -> str:
    return "fastnorm." + type(self).__name__


# repr shows a module is fastnorm's: "fastnorm.LayerNorm((64,), eps=1e-05, ...)".
for _cls in (LayerNorm, RMSNorm, LayerNorm2d, RMSNorm2d, GroupNorm, BatchNorm1d, BatchNorm2d,
             BatchNorm3d, SyncBatchNorm):
    _cls._get_name = _fastnorm_name

from .convert import convert  # noqa: E402  (re-export: fastnorm.nn.convert; needs the classes)
