"""fastnorm.gns.track: norm-layer gradient noise scale sums against torch.func per-sample
gradients, eager and torch.compile(fullgraph=True), and GNSEstimator recovering a known
b_simple from them."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import fastnorm
from fastnorm.gns import GNSEstimator, track

from helpers import DEVICE


class Net(nn.Module):
    def __init__(self, n=12, rms=False):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.norm1 = fastnorm.nn.RMSNorm(n) if rms else fastnorm.nn.LayerNorm(n)
        self.norm2 = fastnorm.nn.LayerNorm(n, bias=False)

    def forward(self, x):
        return self.norm2(torch.tanh(self.norm1(self.lin(x))))


def _loss(out, target):
    return (out - target).square().mean()  # a mean over examples (and tokens)


def _want(model, x, target):
    """Mean over examples of |g_i|^2 and |G|^2 over the norm layers' parameters (vmap(grad))."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    norm_keys = [k for k in params if k.startswith("norm")]

    def loss_i(p, x_i, t_i):
        out = functional_call(model, p, (x_i[None],))
        return _loss(out, t_i[None])

    with fastnorm.use_backend("torch"):
        per = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, target)
    small = sum(per[k].flatten(1).square().sum(1) for k in norm_keys).mean()
    big = sum(per[k].mean(0).square().sum() for k in norm_keys)
    return small.item(), big.item()


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_track_matches_per_sample_grads(backend, rms, compiled):
    torch.manual_seed(0)
    model = Net(rms=rms).to(DEVICE)
    x = torch.randn(6, 5, 12, device=DEVICE)  # 6 examples of 5 tokens
    target = torch.randn(6, 5, 12, device=DEVICE)
    want_small, want_big = _want(model, x, target)
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    with track(model) as gns:
        for _ in range(2):  # measure() resets: the second step measures the same again
            model.zero_grad()
            _loss(run(x), target).backward()
            m = gns.measure()
            assert (m.small_batch, m.big_batch, m.examples) == (1, 6, 6)
            assert m.small_sq_norm == pytest.approx(want_small, rel=1e-4)
            assert m.big_sq_norm == pytest.approx(want_big, rel=1e-4)
        # The batch's gradient is what autograd accumulated in the parameters.
        grads = sum(p.grad.square().sum() for n_, p in model.named_parameters()
                    if n_.startswith("norm"))
        assert m.big_sq_norm == pytest.approx(grads.item(), rel=1e-5)
    assert "_fastnorm_gns_sink" not in vars(model.norm1)  # the instance sink is gone


def test_tracked_outputs_and_grads_bitwise_unchanged(triton_backend):
    torch.manual_seed(1)
    model = Net().to(DEVICE)
    x = torch.randn(4, 3, 12, device=DEVICE)
    results = []
    for on in (False, True):
        model.zero_grad()
        if on:
            gns = track(model)
        out = model(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
        if on:
            gns.close()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_track_errors():
    with pytest.raises(ValueError, match="no fastnorm.nn.LayerNorm"):
        track(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)))
    model = Net()
    with pytest.raises(ValueError, match="loss_reduction"):
        track(model, loss_reduction="max")
    with track(model) as gns:
        with pytest.raises(RuntimeError, match="already tracked"):
            track(model)
        with pytest.raises(RuntimeError, match="had no backward"):
            gns.measure()


def test_estimator_recovers_known_b_simple():
    """Per-example loss <y_i, t_i> of y = LayerNorm(x0) (the same x0 for every example), with
    targets t_i = m + s z_i: the bias gradient has mean m 1 and covariance s^2 I, the weight's
    x_hat * m and s^2 diag(x_hat^2), so b_simple = tr(Sigma) / |G|^2 = s^2 / m^2 = 16 exactly.
    Tolerance: 10 % after 300 steps of 32 examples (the per-step estimate is unbiased)."""
    torch.manual_seed(0)
    n, batch, m, s = 16, 32, 0.5, 2.0
    norm = fastnorm.nn.LayerNorm(n).to(DEVICE)
    x0 = torch.randn(n, device=DEVICE)
    est = GNSEstimator(memory_samples=1e12)  # ~ a plain average over all steps
    with fastnorm.use_backend("reference"), track(norm) as gns:
        for _ in range(300):
            t = m + s * torch.randn(batch, n, device=DEVICE)
            y = norm(x0.expand(batch, n))
            ((y * t).sum(1).mean()).backward()
            est.update(**gns.measure().as_update())
    assert est.b_simple == pytest.approx(s * s / (m * m), rel=0.10)


@pytest.mark.parametrize("is_rms", [False, True])
def test_opcheck_layer_norm_fwd_gns(backend, is_rms):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=g).to(DEVICE, torch.float64).requires_grad_()
    w = torch.randn(7, generator=g).to(DEVICE, torch.float64).requires_grad_()
    b = None if is_rms else torch.randn(7, generator=g).to(DEVICE, torch.float64).requires_grad_()
    sink = torch.zeros(4, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.fastnorm.layer_norm_fwd_gns.default,
                          (x, w, b, sink, 1e-5, is_rms, 3))


def _rank_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    b = 3 + rank  # uneven batches
    return torch.randn(b, 2, 12, generator=g), torch.randn(b, 2, 12, generator=g)


def _gns_worker(rank, world_size, port):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = Net()
        with fastnorm.use_backend("reference"), track(model) as gns:
            x, t = _rank_data(rank)
            _loss(model(x), t).backward()
            m = gns.measure()
        # Expected: the mean of |g_i|^2 over every rank's examples, the mean of |G_r|^2 over
        # the ranks (each rank's own batch gradient).
        wants = [_want(model, *_rank_data(r)) for r in range(world_size)]
        counts = [_rank_data(r)[0].shape[0] for r in range(world_size)]
        small = sum(w[0] * c for w, c in zip(wants, counts)) / sum(counts)
        big = sum(w[1] for w in wants) / world_size
        assert m.examples == sum(counts)
        assert m.small_sq_norm == pytest.approx(small, rel=1e-4)
        assert m.big_sq_norm == pytest.approx(big, rel=1e-4)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_track_reduces_over_two_ranks(monkeypatch):
    import os
    import socket

    import torch.multiprocessing as mp

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gns_worker, args=(2, port), nprocs=2, join=True)


class ConvNet(nn.Module):
    """GroupNorm (with SiLU, and without bias) and LayerNorm in one model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm_gn = fastnorm.nn.GroupNorm(3, 6, activation="silu")
        self.norm_gn2 = fastnorm.nn.GroupNorm(2, 6, bias=False)
        self.norm_ln = fastnorm.nn.LayerNorm(5)

    def forward(self, x):
        return self.norm_ln(self.norm_gn2(self.norm_gn(self.conv(x))))


@pytest.mark.parametrize("compiled,channels_last", [(False, False), (False, True), (True, False)])
def test_track_group_norm_matches_per_sample_grads(backend, compiled, channels_last):
    torch.manual_seed(0)
    model = ConvNet().to(DEVICE)
    x = torch.randn(4, 3, 4, 5, device=DEVICE)
    target = torch.randn(4, 6, 4, 5, device=DEVICE)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    want_small, want_big = _want(model, x, target)
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    with track(model) as gns:
        assert len(gns.layers) == 3
        model.zero_grad()
        _loss(run(x), target).backward()
        m = gns.measure()
    assert (m.small_batch, m.big_batch, m.examples) == (1, 4, 4)
    assert m.small_sq_norm == pytest.approx(want_small, rel=1e-4)
    assert m.big_sq_norm == pytest.approx(want_big, rel=1e-4)


def test_track_group_norm_bitwise_unchanged_and_not_batch_norm(triton_backend):
    torch.manual_seed(1)
    model = nn.Sequential(ConvNet(), fastnorm.nn.BatchNorm2d(6)).to(DEVICE)
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    results = []
    for on in (False, True):
        model.zero_grad()
        if on:
            gns = track(model)
            assert not any(isinstance(m, nn.BatchNorm2d) for m in gns.layers)
        out = model(x)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
        if on:
            gns.close()
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_opcheck_group_norm_fwd_gns_and_bad_sink(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g).to(DEVICE, torch.float64)
    w = torch.randn(4, generator=g).to(DEVICE, torch.float64).requires_grad_()
    b = torch.randn(4, generator=g).to(DEVICE, torch.float64).requires_grad_()
    sink = torch.zeros(4, device=DEVICE, requires_grad=True)
    for xs in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
        for act in ("none", "silu"):
            torch.library.opcheck(torch.ops.fastnorm.group_norm_fwd_gns.default,
                                  (xs.clone().requires_grad_(), w, b, sink, 2, 1e-5, act))
    with pytest.raises(RuntimeError, match="sink"):
        torch.ops.fastnorm.group_norm_fwd_gns(x, w, b, torch.zeros(3, device=DEVICE), 2, 1e-5,
                                              "none")
