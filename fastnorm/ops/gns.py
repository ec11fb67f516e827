"""The noise-scale sums of the norm layers' per-example backward.

fastnorm::gns_sums(dweight_sq, dbias_sq, dweight, dbias, examples) -> sums

sums (fp32 [4]) = [sum(dweight_sq) + sum(dbias_sq), |dweight|^2 + |dbias|^2, examples, 1]: the
gradient of the `sink` of fastnorm::layer_norm_fwd_gns / group_norm_fwd_gns, from the outputs
of layer_norm_bwd_pe / group_norm_bwd_pe (per-example squared norms in the statistics dtype,
the batch's dweight / dbias; any of them empty where the parameter is absent). Sums in fp32
(fp64 when the norms are fp64), rounded once. Triton: one launch of one program (fixed-order
sums, no atomics; the count is written by the kernel, not copied from the host).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks
from ._router import kernel


def _check(dweight_sq: Tensor, dbias_sq: Tensor, dweight: Tensor, dbias: Tensor,
           examples: int) -> None:
    op = "gns_sums"
    for what, t in (("dweight_sq", dweight_sq), ("dbias_sq", dbias_sq), ("dweight", dweight),
                    ("dbias", dbias)):
        _checks.check(t.dim() == 1 and t.is_floating_point(), op,
                      f"expected {what} to be a 1-D floating-point tensor, got {t.dim()}-D "
                      f"{t.dtype}")
        _checks.check(t.device == dweight_sq.device, op,
                      f"expected {what} on {dweight_sq.device}, got {t.device}")
    _checks.check(examples >= 0, op, f"expected examples >= 0, got {examples}")


def _gns_sums(dweight_sq, dbias_sq, dweight, dbias, examples):
    return kernel("gns_sums", dweight_sq)(dweight_sq, dbias_sq, dweight, dbias, examples)


@torch.library.custom_op("fastnorm::gns_sums", mutates_args=())
def gns_sums(dweight_sq: Tensor, dbias_sq: Tensor, dweight: Tensor, dbias: Tensor,
             examples: int) -> Tensor:
    _check(dweight_sq, dbias_sq, dweight, dbias, examples)
    return _gns_sums(dweight_sq, dbias_sq, dweight, dbias, examples)


@gns_sums.register_fake
def _(dweight_sq, dbias_sq, dweight, dbias, examples):
    _check(dweight_sq, dbias_sq, dweight, dbias, examples)
    return dweight_sq.new_empty(4, dtype=torch.float32)


def sink_grad(eager_route: bool, dweight_sq: Tensor, dbias_sq: Tensor, dweight: Tensor,
              dbias: Tensor, examples: int) -> Tensor:
    """gns_sums from a noise-scale backward: the implementation on the eager route (no
    dispatcher), else the registered op (what torch.compile traces)."""
    return (_gns_sums if eager_route else gns_sums)(dweight_sq, dbias_sq, dweight, dbias,
                                                     examples)
