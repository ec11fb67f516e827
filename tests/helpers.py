"""Shared test helpers: one tolerance table, and comparison against a float64 reference."""
from __future__ import annotations

import torch

# Absolute/relative slack per dtype, added on top of "2x torch's own error" (see assert_close_ref).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


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
