"""Shared sample inputs per `fastnorm::` op: small argument tuples covering affine / no affine,
both (N, C, S) layouts, the activations, an empty batch and the shapes that break kernels
(prime rows, N not a power of two, N = 1). Saved statistics come from the reference forward, so
every backend's backward is fed the contract's tensors. Used by tests/test_ops.py on every
backend."""
from __future__ import annotations

from typing import Iterator

import torch

from fastnorm import reference as ref

ROWS = [(5, 33), (1, 7), (0, 16), (3, 1)]          # (M, N): prime M, odd N, empty, N = 1
CHANNELS = [(2, 6, 5), (3, 4, 1), (0, 6, 3)]       # (N, C, S): S = 1 and an empty batch
GROUPS = {6: 3, 4: 2}


def _t(*shape, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device)


def _channels_last(x):
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def sample_inputs(op: str, device, dtype=torch.float64) -> Iterator[tuple]:
    """Argument tuples for torch.ops.fastnorm.<op>."""
    kw = dict(device=device, dtype=dtype)
    if op in ("layer_norm_fwd", "layer_norm_bwd", "layer_norm_bwd_pe", "rms_norm_fwd",
              "rms_norm_bwd",
              "add_layer_norm_fwd", "add_layer_norm_bwd", "add_layer_norm_inplace"):
        for i, (m, n) in enumerate(ROWS):
            x = _t(m, n, seed=i, **kw)
            w, b = _t(n, seed=10 + i, **kw), _t(n, seed=20 + i, **kw)
            dy = _t(m, n, seed=30 + i, **kw)
            r = _t(m, n, seed=40 + i, **kw)
            affine = [(w, b), (None, None)] if i == 0 else [(w, b)]
            for w_, b_ in affine:
                if op == "layer_norm_fwd":
                    yield (x, w_, b_, 1e-5)
                elif op == "layer_norm_bwd":
                    _y, mean, rstd = ref.layer_norm_fwd(x, w_, b_, 1e-5)
                    yield (dy, x, w_, b_, mean, rstd)
                elif op == "layer_norm_bwd_pe":
                    _y, mean, rstd = ref.layer_norm_fwd(x, w_, b_, 1e-5)
                    yield (dy, x, w_, b_, mean, rstd, False, 1)
                    _y, rstd = ref.rms_norm_fwd(x, w_, 1e-6)
                    yield (dy, x, w_, None, rstd.new_empty(0), rstd, True, m if m > 0 else 1)
                elif op == "rms_norm_fwd":
                    yield (x, w_, 1e-6)
                elif op == "rms_norm_bwd":
                    _y, rstd = ref.rms_norm_fwd(x, w_, 1e-6)
                    yield (dy, x, w_, rstd)
                elif op == "add_layer_norm_fwd":
                    for is_rms in (False, True):
                        yield (x, r, w_, b_, 1e-5, is_rms, False, "none", True)
                    yield (x, None, w_, None, 1e-5, True, False, "llama", True)
                elif op == "add_layer_norm_bwd":
                    for is_rms, rounding in ((False, "none"), (True, "none"), (True, "t5")):
                        _y, h, mean, rstd = ref.add_layer_norm_fwd(x, r, w_, b_, 1e-5, is_rms,
                                                                   False, rounding, True)
                        yield (dy, r, h, w_, b_, mean, rstd, is_rms, rounding)
                else:
                    yield (x.clone(), r.clone(), w_, None, 1e-6, True)
    elif op.startswith(("layer_norm_2d", "rms_norm_2d")):
        for i, (n, c, s) in enumerate(CHANNELS):
            base = _t(n, c, s, seed=i, **kw)
            w, b = _t(c, seed=10 + i, **kw), _t(c, seed=20 + i, **kw)
            dy = _t(n, c, s, seed=30 + i, **kw)
            for x in (base, _channels_last(base)):
                for w_, b_ in ((w, b), (None, None)) if i == 0 else ((w, b),):
                    if op == "layer_norm_2d_fwd":
                        yield (x, w_, b_, 1e-6)
                    elif op == "layer_norm_2d_bwd":
                        _y, mean, rstd = ref.layer_norm_2d_fwd(x, w_, b_, 1e-6)
                        yield (dy, x, w_, b_, mean, rstd)
                    elif op == "rms_norm_2d_fwd":
                        yield (x, w_, 1e-6)
                    else:
                        _y, rstd = ref.rms_norm_2d_fwd(x, w_, 1e-6)
                        yield (dy, x, w_, rstd)
    elif op == "gns_sums":
        # What the per-example backwards return (norms in the statistics dtype, gradients in
        # the parameters'): both parameters, the weight alone, an empty batch.
        empty = torch.empty(0, **kw)
        for i, (e, c) in enumerate(((5, 7), (3, 1), (0, 4))):
            sq_w, sq_b = _t(e, seed=60 + i, **kw).abs(), _t(e, seed=70 + i, **kw).abs()
            dw, db = _t(c, seed=80 + i, **kw), _t(c, seed=90 + i, **kw)
            yield (sq_w, sq_b, dw, db, e)
            yield (sq_w, empty, dw, empty, e)
    elif op.startswith("group_norm"):
        for i, (n, c, s) in enumerate(CHANNELS):
            g = GROUPS[c]
            base = _t(n, c, s, seed=i, **kw)
            w, b = _t(c, seed=10 + i, **kw), _t(c, seed=20 + i, **kw)
            dy = _t(n, c, s, seed=30 + i, **kw)
            for x in (base, _channels_last(base)):
                for act, (w_, b_) in (("none", (w, b)), ("silu", (w, b)), ("none", (None, None))):
                    if op == "group_norm_fwd":
                        yield (x, w_, b_, g, 1e-5, act)
                    else:
                        _y, mean, rstd = ref.group_norm_fwd(x, w_, b_, g, 1e-5, act)
                        yield (dy, x, w_, b_, mean, rstd, g, act)
    else:
        for i, (n, c, s) in enumerate(CHANNELS):
            base = _t(n, c, s, seed=i, **kw)
            w, b = _t(c, seed=10 + i, **kw), _t(c, seed=20 + i, **kw)
            dy = _t(n, c, s, seed=30 + i, **kw)
            for x in (base, _channels_last(base)):
                mean, var = ref.batch_norm_stats(x)
                if x.numel() == 0:
                    mean, var = _t(c, seed=50, **kw), _t(c, seed=51, **kw).abs()
                sums = ref.batch_norm_backward_reduce(dy, x, mean, var, w, b, 1e-5, True)
                count = torch.full((1,), max(n * s, 1), dtype=mean.dtype, device=device)
                if op == "batch_norm_stats":
                    yield (x,)
                elif op in ("batch_norm_apply", "batch_norm_train_apply"):
                    yield (x, mean, var, w, b, 1e-5, True)
                    yield (x, mean, var, None, None, 1e-5, False)
                elif op == "batch_norm_backward_reduce":
                    yield (dy, x, mean, var, w, b, 1e-5, True)
                elif op == "batch_norm_backward_elemt":
                    yield (dy, x, mean, var, w, b, *sums, count, 1e-5, True)
                elif op == "batch_norm_fwd":
                    yield (x, w, b, 1e-5, True)
                    yield (x, None, None, 1e-5, False)
                elif op == "batch_norm_bwd":
                    yield (dy, x, w, b, mean, var, 1e-5, True, True)
                    yield (dy, x, None, None, mean, var, 1e-5, False, False)
                elif op == "batch_norm_stats_update" and n * s > 1:
                    yield (x, torch.zeros_like(mean), torch.ones_like(var), 0.1, None)
                    yield (x, torch.zeros_like(mean), torch.ones_like(var), 0.0,
                           torch.full((1,), 0.5, dtype=mean.dtype, device=device))
