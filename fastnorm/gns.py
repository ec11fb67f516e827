"""Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

For a loss whose per-sample gradients have mean G and covariance Sigma, the squared norm of a
batch-of-B mean gradient has expectation

    E |G_B|^2 = |G|^2 + tr(Sigma) / B.

Two measured squared norms, one at a small batch B_s and one at a big batch B_b, therefore give
unbiased per-step estimates of |G|^2 and of S = tr(Sigma):

    |G|^2 ~ (B_b |G_b|^2 - B_s |G_s|^2) / (B_b - B_s)
    S     ~ (|G_s|^2 - |G_b|^2) / (1 / B_s - 1 / B_b)

and the "simple" noise scale b_simple = S / |G|^2 is the batch size at which the gradient's
noise equals its signal. Single-step estimates are very noisy and |G|^2 is often negative, so
the two are averaged *separately* (an average of the per-step ratio is biased: it came out 2-3x
too high on a problem with a known answer) and clamped only when read.

GNSEstimator is pure math on Python floats: no torch.distributed, no tensors held. Where the two
norms come from (a DDP communication hook, micro-batch gradients, norm layers) is the caller's
business; `track(model)` is one source: the per-example gradient norms of the model's fastnorm
LayerNorm/RMSNorm/GroupNorm weights and biases, from their backward kernels.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["GNSEstimator", "track"]

# The smallest |G|^2 reported: keeps b_simple finite when the signal estimate is <= 0.
_TINY = 1e-30


class GNSEstimator:
    """Exponential moving averages of |G|^2 and tr(Sigma), bias-corrected, from pairs of squared
    gradient norms measured at two batch sizes.

    Args:
        memory_samples: time constant of the averages in *samples*: an update made from a big
            batch of B samples keeps exp(-B / memory_samples) of the old average, so the
            averages forget at the same rate per sample whatever the batch size.

    Example::

        est = GNSEstimator(memory_samples=10_000)
        est.update(small_sq_norm=4.1, big_sq_norm=1.3, small_batch=32, big_batch=256)
        est.grad_sq, est.trace_sigma, est.b_simple
    """

    def __init__(self, memory_samples: float = 10_000.0) -> None:
        if not memory_samples > 0:
            raise ValueError(f"GNSEstimator: memory_samples must be > 0, got {memory_samples}")
        self.memory_samples = float(memory_samples)
        self._grad_sq = 0.0      # EMA numerators (not yet bias-corrected)
        self._trace_sigma = 0.0
        self._weight = 0.0       # sum of the EMA weights: the bias correction
        self.updates = 0         # accepted updates
        self.skipped = 0         # non-finite updates ignored (e.g. an overflowed AMP step)
        self.samples = 0         # samples behind the accepted updates

    def update(self, small_sq_norm: float, big_sq_norm: float, small_batch: int,
               big_batch: int) -> bool:
        """Add one step's measurement: |G_small|^2 of a mean gradient over `small_batch`
        samples and |G_big|^2 over `big_batch` samples (already unscaled, before clipping).
        Returns False (and changes nothing but `skipped`) when a norm is not finite."""
        if not 0 < small_batch < big_batch:
            raise ValueError("GNSEstimator.update: need 0 < small_batch < big_batch, got "
                             f"small_batch={small_batch}, big_batch={big_batch}")
        small, big = float(small_sq_norm), float(big_sq_norm)
        if not (math.isfinite(small) and math.isfinite(big)):
            self.skipped += 1
            return False
        b_s, b_b = float(small_batch), float(big_batch)
        grad_sq = (b_b * big - b_s * small) / (b_b - b_s)
        trace_sigma = (small - big) / (1.0 / b_s - 1.0 / b_b)
        keep = math.exp(-b_b / self.memory_samples)
        self._grad_sq = keep * self._grad_sq + (1.0 - keep) * grad_sq
        self._trace_sigma = keep * self._trace_sigma + (1.0 - keep) * trace_sigma
        self._weight = keep * self._weight + (1.0 - keep)
        self.updates += 1
        self.samples += int(big_batch)
        return True

    @property
    def ready(self) -> bool:
        """True once at least one update was accepted."""
        return self.updates > 0

    @property
    def measured(self) -> bool:
        """True once the |G|^2 average is positive, i.e. grad_sq and b_simple are estimates.
        Before that (no update yet, or early steps whose noise outweighs the signal: the unbiased
        |G|^2 estimate can average to <= 0) grad_sq reads as the clamp and b_simple as
        tr(Sigma) / 1e-30, which the batch-size controller takes as "very large" but which is
        no measurement to report."""
        return self.ready and self._grad_sq / self._weight > _TINY

    @property
    def grad_sq(self) -> float:
        """|G|^2, clamped to a tiny positive number; nan before the first update."""
        if not self.ready:
            return math.nan
        return max(self._grad_sq / self._weight, _TINY)

    @property
    def trace_sigma(self) -> float:
        """tr(Sigma), the per-sample gradient variance summed over parameters, clamped at 0;
        nan before the first update."""
        if not self.ready:
            return math.nan
        return max(self._trace_sigma / self._weight, 0.0)

    @property
    def b_simple(self) -> float:
        """tr(Sigma) / |G|^2, the simple noise scale (a batch size); nan before the first
        update."""
        return self.trace_sigma / self.grad_sq if self.ready else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"memory_samples": self.memory_samples, "grad_sq": self._grad_sq,
                "trace_sigma": self._trace_sigma, "weight": self._weight,
                "updates": self.updates, "skipped": self.skipped, "samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory_samples = float(state["memory_samples"])
        self._grad_sq = float(state["grad_sq"])
        self._trace_sigma = float(state["trace_sigma"])
        self._weight = float(state["weight"])
        self.updates = int(state["updates"])
        self.skipped = int(state["skipped"])
        self.samples = int(state["samples"])

    def __repr__(self) -> str:
        return (f"GNSEstimator(grad_sq={self.grad_sq:.4g}, trace_sigma={self.trace_sigma:.4g}, "
                f"b_simple={self.b_simple:.4g}, updates={self.updates})")


def track(model: Any, loss_reduction: str = "mean", process_group: Any = None) -> Any:
    """Measure the gradient noise scale of `model`'s fastnorm LayerNorm / RMSNorm / GroupNorm
    layers (those with trainable parameters) from their backward kernels: per-example squared
    gradient norms of their weights and biases come out of the same pass
    (fastnorm::layer_norm_bwd_pe / group_norm_bwd_pe). An example is the leading batch index of
    the layer's input. Returns a handle (a context manager; `close()` / leaving the block
    stops tracking):

        with fastnorm.gns.track(model) as gns:
            loss = loss_fn(model(x), target)        # loss_reduction="mean": mean over examples
            loss.backward()
            m = gns.measure()                       # after each backward; resets
            estimator.update(**m.as_update())       # small batch 1, big batch B

    `measure()` gives the mean over examples of |g_i|^2 (small_batch=1) and |G_B|^2 of the
    batch's own mean gradient (big_batch = examples per backward call), summed over the tracked
    parameters, reduced over ranks with one all_reduce of 4 numbers when torch.distributed is
    initialized (`process_group`). `loss_reduction`: "mean" if the loss is the mean over the
    batch's examples (or tokens), "sum" if it is their sum; any other scaling of the loss (e.g.
    1/accumulation steps) must be undone by the caller. Works under torch.compile (the sums are
    the gradient of a small per-layer tensor, in the graph). Triton: rows of any length (every
    LayerNorm/RMSNorm backward path has the per-example mode) and GroupNorm in both layouts.
    BatchNorm is not tracked (its per-example gradients are coupled through the batch
    statistics). The layers run fastnorm's kernels whatever backend is selected ("torch"
    included).
    """
    from ._norm_gns import NormLayerGNS

    return NormLayerGNS(model, loss_reduction, process_group)
