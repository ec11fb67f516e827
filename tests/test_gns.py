"""GNSEstimator: recovers the noise scale of a least-squares problem whose |G|^2 and tr(Sigma)
are known in closed form; EMA bookkeeping, clamping, non-finite skipping, state_dict."""
from __future__ import annotations

import math

import pytest
import torch

from fastnorm.gns import GNSEstimator


def _least_squares(d: int = 20, noise: float = 0.5, seed: int = 0):
    """loss_i(w) = (x_i.w - y_i)^2 / 2 with x ~ N(0, I_d), y = x.w* + noise * eps. At w with
    delta = w - w*: per-sample gradient g_i = x_i (x_i.delta - noise eps_i), G = delta and
    Sigma = (|delta|^2 + noise^2) I + delta delta^T (Gaussian fourth moments), so
    |G|^2 = |delta|^2 and tr(Sigma) = d (|delta|^2 + noise^2) + |delta|^2."""
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    grad_sq = delta.square().sum().item()
    trace_sigma = d * (grad_sq + noise ** 2) + grad_sq

    def batch_grads(n: int) -> torch.Tensor:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        return x * (x @ delta - noise * eps)[:, None]          # (n, d) per-sample gradients
    return batch_grads, grad_sq, trace_sigma


def test_recovers_b_simple_on_least_squares():
    batch_grads, grad_sq, trace_sigma = _least_squares()
    est = GNSEstimator(memory_samples=1e9)     # ~ plain averages over the whole run
    small, big = 8, 64
    for _ in range(3000):
        g = batch_grads(big)
        # The small batch is a part of the big one, as on a rank or a micro-batch.
        est.update(g[:small].mean(0).square().sum().item(), g.mean(0).square().sum().item(),
                   small, big)
    true_b = trace_sigma / grad_sq
    assert est.b_simple == pytest.approx(true_b, rel=0.10)
    assert est.grad_sq == pytest.approx(grad_sq, rel=0.10)
    assert est.trace_sigma == pytest.approx(trace_sigma, rel=0.10)


def test_ratio_of_averages_not_average_of_ratios():
    """One exact step gives back |G|^2 and S from noiseless norms (E|G_B|^2 = |G|^2 + S/B)."""
    est = GNSEstimator()
    g2, s = 2.0, 300.0
    assert est.update(g2 + s / 4, g2 + s / 32, 4, 32)
    assert est.grad_sq == pytest.approx(g2)
    assert est.trace_sigma == pytest.approx(s)
    assert est.b_simple == pytest.approx(s / g2)


def test_decay_is_per_sample_and_bias_corrected():
    est = GNSEstimator(memory_samples=100.0)
    est.update(1.0 + 10 / 2, 1.0 + 10 / 4, 2, 4)   # |G|^2 = 1, S = 10
    est.update(3.0 + 10 / 50, 3.0 + 10 / 100, 50, 100)  # |G|^2 = 3, S = 10
    keep = math.exp(-100 / 100.0)                 # decay of the second (100-sample) update
    w = keep * (1 - math.exp(-4 / 100.0)) + (1 - keep)
    expect = (keep * (1 - math.exp(-4 / 100.0)) * 1.0 + (1 - keep) * 3.0) / w
    assert est.grad_sq == pytest.approx(expect)
    assert est.trace_sigma == pytest.approx(10.0)
    assert est.samples == 104 and est.updates == 2


def test_clamped_only_when_read_and_nan_before_first_update():
    est = GNSEstimator()
    assert math.isnan(est.b_simple) and not est.ready and not est.measured
    est.update(1.0, 2.0, 4, 32)        # the big norm exceeds the small one: S < 0, |G|^2 > 0
    assert est.trace_sigma == 0.0 and est.b_simple == 0.0 and est.measured
    raw = est.state_dict()["trace_sigma"]
    assert raw < 0                     # stored unclamped: later updates can average it out
    est.update(100.0, 1.0, 4, 32)      # |G|^2 per step < 0, clamped to tiny when read
    assert est.grad_sq > 0 and math.isfinite(est.b_simple)


def test_measured_only_once_the_grad_sq_average_is_positive():
    """A first step whose |G|^2 estimate is <= 0 leaves b_simple = tr(Sigma) / 1e-30: the
    controller reads it as "very large", but it is not measured (the trainer logs null)."""
    est = GNSEstimator()
    est.update(8.0, 1.0, 4, 32)        # |G|^2 = (32 * 1 - 4 * 8) / 28 = 0
    assert est.ready and not est.measured and est.b_simple > 1e30
    est.update(2.0, 1.0, 4, 32)        # a positive estimate brings the average above 0
    assert est.measured and 0 < est.b_simple < 100


def test_non_finite_is_skipped_and_state_dict_round_trips():
    est = GNSEstimator(memory_samples=500.0)
    est.update(5.0, 2.0, 8, 64)
    assert not est.update(float("inf"), 2.0, 8, 64)
    assert not est.update(5.0, float("nan"), 8, 64)
    assert est.skipped == 2 and est.updates == 1
    other = GNSEstimator()
    other.load_state_dict(est.state_dict())
    assert other.state_dict() == est.state_dict()
    assert other.b_simple == est.b_simple


def test_bad_arguments():
    with pytest.raises(ValueError, match="small_batch < big_batch"):
        GNSEstimator().update(1.0, 1.0, 8, 8)
    with pytest.raises(ValueError, match="memory_samples"):
        GNSEstimator(memory_samples=0)
