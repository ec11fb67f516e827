"""Shared test helpers: one tolerance table, comparison against a float64 reference, and a free
port for the multi-process tests."""
from __future__ import annotations

import socket

import torch

# Absolute/relative slack per dtype, added on top of "2x torch's own error" (see assert_close_ref).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# The device every kernel test runs on: CUDA where present (compiled kernels), else the CPU
# (Triton's interpreter, switched on by conftest.py). Also the `device` fixture's value.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close_ref(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor | None = None,
                     name: str = "output") -> None:
    """Our result vs a float64 reference: max error at most 2x torch's own error at the same
    dtype (when given) plus the dtype's tolerance (the flash-attention rule)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    tol = TOLERANCES[out.dtype]
    if out.numel() == 0:
        return
    ours = (out.double() - ref64).abs()
    slack = tol["atol"] + tol["rtol"] * ref64.abs()
    if torch_out is not None:
        slack = slack + 2 * (torch_out.double() - ref64).abs().max()
    bad = ~(ours <= slack) & ~(out.double().isnan() & ref64.isnan())
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name} ({out.dtype}): {int(bad.sum())} of {out.numel()} elements off; max error "
            f"{ours[~ref64.isnan()].max().item():.3e}; first at {idx}: got "
            f"{out[tuple(idx)].item()!r}, reference {ref64[tuple(idx)].item()!r}")



# Results of fp32 sums whose order differs between machines (the CPU's reduction order and
# vector width, the number of ranks) are compared with a float64 reference under a bound that
# follows the numbers: the rounding error of a sum is a few eps times the sum of the |terms| it
# adds, whatever the order. ROUNDING_FACTOR covers the depth of torch's cascade sums (log2 of
# the term count: 10 for 1024 terms) and the error the terms themselves bring from the steps
# before (a few eps per layer they went through).
ROUNDING_FACTOR = 32


def assert_within_rounding(out: torch.Tensor, ref64: torch.Tensor, terms: torch.Tensor,
                           name: str = "output", factor: float = ROUNDING_FACTOR) -> None:
    """|out - ref64| <= factor * eps(out.dtype) * terms, elementwise. `ref64` is the float64
    result and `terms` (float64, broadcastable to it) bounds the sum of the |terms| each element
    of `out` was computed from. An element that is a sum of cancelling terms (a gradient that is
    0 in exact arithmetic) gets the slack its terms call for, and no element gets a slack taken
    from the machine the test was written on."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    terms = terms.expand_as(ref64)
    bound = factor * torch.finfo(out.dtype).eps * terms
    err = (out.double() - ref64).abs()
    bad = ~(err <= bound)
    if bad.any():
        ratio = torch.where(bad, err / bound, 0.0)
        idx = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ref64.shape))
        raise AssertionError(
            f"{name} ({out.dtype}): {int(bad.sum())} of {out.numel()} elements beyond "
            f"{factor} eps * sum|terms|; worst at {list(idx)}: got {out[idx].item()!r}, "
            f"reference {ref64[idx].item()!r}, sum|terms| {terms[idx].item():.3e} "
            f"({ratio[idx].item():.2f}x the bound)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
