"""BatchSizeController: bounds, quantization, hysteresis (threshold and cooldown), shrinking,
the LR factor of each coupling, state_dict."""
from __future__ import annotations

import math

import pytest

from fastnorm.train import BatchSizeController


def _ctl(**kw) -> BatchSizeController:
    args = dict(initial_batch=64, micro_batch=16, world_size=2, min_batch=32, max_batch=512,
                target_snr=1.0, threshold=0.1, cooldown=0)
    args.update(kw)
    return BatchSizeController(**args)


def test_target_clips_and_quantizes_to_world_times_micro():
    c = _ctl()                                   # unit = 2 x 16 = 32
    assert c.unit == 32
    assert c.target(100.0) == 96                 # nearest multiple of 32
    assert c.target(111.0) == 96 and c.target(113.0) == 128
    assert c.target(5.0) == 32                   # clipped at B_min
    assert c.target(1e6) == 512                  # clipped at B_max
    assert c.target(math.inf) == 512
    assert c.target(math.nan) == 64              # unknown: stay
    assert _ctl(target_snr=2.0).target(100.0) == 192


def test_bounds_rounded_inward_and_realized_as_micro_batches():
    c = _ctl(min_batch=40, max_batch=500)
    assert (c.min_batch, c.max_batch) == (64, 480)
    assert c.update(1, 1e6) and c.batch_size == 480
    assert (c.local_batch, c.accum_steps) == (240, 15)
    assert _ctl(world_size=1, min_batch=16, min_accum=2).min_batch == 32
    with pytest.raises(ValueError, match="no multiple"):
        _ctl(min_batch=100, max_batch=120)
    with pytest.raises(ValueError, match="initial batch"):
        _ctl(initial_batch=48)


def test_hysteresis_threshold_and_cooldown():
    c = _ctl(threshold=0.25, cooldown=5)
    assert not c.update(4, 1000.0)               # within the first cooldown steps
    assert c.update(5, 1000.0) and c.batch_size == 512 and c.last_change == 5
    assert not c.update(9, 64.0)                 # cooldown since the change at step 5
    assert c.update(10, 64.0) and c.batch_size == 64
    assert not c.update(20, 78.0)                # 78 quantizes to 64: no change
    assert c.update(20, 90.0) and c.batch_size == 96    # 96 is +50% > 25%


def test_threshold_exact():
    c = _ctl(initial_batch=320, threshold=0.1, cooldown=0)
    assert not c.update(1, 352.0)                # +32 = 10% of 320: not above the threshold
    assert c.batch_size == 320
    assert c.update(2, 384.0) and c.batch_size == 384   # +20%


def test_shrink_allowed_or_forbidden():
    c = _ctl(initial_batch=256)
    assert c.update(1, 64.0) and c.batch_size == 64
    c = _ctl(initial_batch=256, allow_shrink=False)
    assert not c.update(1, 64.0) and c.batch_size == 256
    assert c.update(2, 512.0) and c.batch_size == 512
    assert c.changes == 1


@pytest.mark.parametrize("scaling", ["adascale", "linear", "sqrt", "none"])
def test_lr_factor(scaling):
    c = _ctl(lr_scaling=scaling)                 # B0 = 64
    assert c.lr_factor(100.0) == 1.0             # at B0 every coupling gives 1
    c.update(1, 256.0)
    assert c.batch_size == 256
    b = 100.0
    expect = {"adascale": (1 + b / 64) / (1 + b / 256), "linear": 4.0, "sqrt": 2.0,
              "none": 1.0}[scaling]
    assert c.lr_factor(b) == expect


def test_adascale_gain_limits():
    c = _ctl()
    c.update(1, 512.0)
    assert c.lr_factor(0.0) == 1.0               # no noise: a larger batch does not help
    assert c.lr_factor(math.inf) == 8.0          # pure noise: linear scaling
    assert c.lr_factor(math.nan) == 1.0


def test_state_dict_round_trip():
    c = _ctl(cooldown=3)
    c.update(3, 300.0)
    d = _ctl(cooldown=3)
    d.load_state_dict(c.state_dict())
    assert (d.batch_size, d.last_change, d.changes) == (c.batch_size, 3, 1)
