"""Helpers shared by the custom-op files."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


def torch_grads(fn: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]],
                needs: Sequence[bool], dy: Tensor) -> tuple[Optional[Tensor], ...]:
    """Double backward: the gradients of `fn(*inputs)` (torch's own op) for the inputs in
    `needs`, built with create_graph so they are differentiable again.

    The backward of every op calls this instead of its kernel when autograd records the backward
    itself (`torch.is_grad_enabled()` there means create_graph=True: double backward, hessians);
    a plain backward, eager or compiled, runs the kernel.
    """
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    with torch.enable_grad():
        out = fn(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need and t is not None else None for t, need in zip(inputs, needs))


def torch_autocasts(aten_op: str) -> bool:
    """Does this torch's CUDA autocast cast `aten::<aten_op>` (to float32: the norms are on its
    float32 list)? Read from the dispatcher, not assumed: rms_norm joined the list in a later
    release than layer_norm and group_norm."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{aten_op}", "AutocastCUDA")


def register_fp32_autocast(op, aten_op: str) -> None:
    """Autocast as torch's for layer_norm / rms_norm / group_norm: where torch's CUDA autocast
    runs `aten_op` in float32 (float16/bfloat16 inputs and parameters cast up, float64 left
    alone, float32 returned), so does the fastnorm op; where it does not, neither does the op.
    CPU autocast leaves torch's norms alone, so fastnorm's too.
    (The cast is a separate pass over x; reading low precision and writing fp32 inside the kernel
    would save it.)"""
    if torch_autocasts(aten_op):
        torch.library.register_autocast(op, "cuda", torch.float32)


# --- the eager fast path -------------------------------------------------------------------------
# A registered op costs tens of microseconds of host time per call (dispatcher, Python kernels
# for autograd and autocast, then the implementation); torch's own norm ops cost ~10. So the
# functional layer calls each op's implementation directly, inside a plain autograd.Function,
# whenever nothing can observe the difference: not while torch.compile / export traces (they
# need the registered op and its fake), not under a dispatch mode, a torch-function mode or
# jit tracing, and only for plain tensors (a subclass such as a FakeTensor or a DTensor gets
# the registered op, which dispatches on it). Autocast is applied by the entry itself, as the
# op's registration would. Everything else goes through torch.ops.fastnorm.*, so compile,
# opcheck, modes and subclasses see one op set.

_has_torch_function = torch._C._has_torch_function
_dispatch_modes = torch._C._len_torch_dispatch_stack
_tracing_state = torch._C._get_tracing_state
_is_compiling = torch.compiler.is_compiling
_PLAIN = (Tensor, torch.nn.Parameter)
_REDUCED = (torch.float16, torch.bfloat16)


def eager(tensors: tuple) -> bool:
    """May a call with these tensor arguments (None allowed) skip the dispatcher?"""
    # is_compiling first: Dynamo folds it to True and never traces the C queries after it.
    if _is_compiling() or _dispatch_modes() or _tracing_state() is not None \
            or _has_torch_function(tensors):
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def needs_grad(tensors: tuple) -> bool:
    """Will autograd record a call with these tensor arguments?"""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def cuda_autocast_fp32(x: Tensor, applies: bool = True) -> bool:
    """Does CUDA autocast cast a call on x up to float32 (`applies`: torch autocasts the op,
    see `torch_autocasts`)?"""
    return applies and x.is_cuda and torch.is_autocast_enabled("cuda")


def to_fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    """What CUDA autocast's float32 policy makes of an argument: float16/bfloat16 -> float32
    (recorded by autograd, so gradients flow back in the original dtype)."""
    return t.float() if t is not None and t.dtype in _REDUCED else t


_set_grad_enabled = torch._C._set_grad_enabled


def viewed_call(fn: Callable, view: Callable[[Tensor], Tensor], input: Tensor, *args) -> Tensor:
    """`fn(view(input), *args)`'s output (the first, when fn returns a tuple) in the input's
    shape: the views of `autograd_function(..., view=)` for a call that records no node (no
    gradient needed, or the registered op under compile, modes and subclasses)."""
    x = view(input)
    out = fn(x, *args)
    y = out[0] if type(out) is tuple else out
    return y if x is input else y.view_as(input)


def autograd_function(name: str, impl: Callable, setup_context: Callable,
                      backward: Callable, view: Optional[Callable[[Tensor], Tensor]] = None,
                      grad_view: Optional[Callable[[Tensor], Tensor]] = None) -> Callable:
    """The apply of an autograd.Function whose forward is `impl` (an op's implementation) and
    whose setup_context/backward are the ones registered on the op: the eager route and the op
    share one autograd formula. Gradients of unused outputs (statistics) arrive as None.

    With `view` (the caller's input -> the op's canonical view, e.g. `channel_view`), the
    Function takes the caller's input as its first argument and returns only the output (the
    first one, when impl returns a tuple: the statistics stay saved for backward, never
    outputs) in the input's shape; `grad_view` (default `view`) brings the output's gradient to
    the view's shape. The reshapes then happen inside this one autograd node instead of as two
    view nodes around it, and the node has one output instead of three: each costs the host
    microseconds per forward + backward.

    The returned callable is the C-level apply: the Python `Function.apply` wrapper binds
    default arguments with inspect and unwraps functorch wrappers, which the eager route never
    needs (torch.func transforms run torch's ops, see fastnorm._backend.transformed)."""

    def forward(ctx, *args):
        ctx.set_materialize_grads(False)
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    grad_view = grad_view or view

    def forward_viewed(ctx, input, *args):
        ctx.set_materialize_grads(False)
        # The view is made with grad mode on, so the saved view stays connected to `input` for a
        # create_graph backward (double backward differentiates through it); the plain backward
        # never runs its node. (No try/finally: if the view raises, apply's own guard restores
        # the caller's grad mode.)
        _set_grad_enabled(True)
        x = view(input)
        _set_grad_enabled(False)
        out = impl(x, *args)
        setup_context(ctx, (x, *args), out)
        y, extra = (out[0], (None,) * (len(out) - 1)) if type(out) is tuple else (out, ())
        if x is input:
            ctx.viewed = None, extra
            return y
        ctx.viewed = tuple(input.shape), extra
        # A detached alias, not a view: a Function output that is a view of a tensor made in its
        # forward refuses in-place ops (nn.ReLU(inplace=True) after a norm).
        return y.view_as(input).detach()

    def backward_viewed(ctx, dy):
        shape, extra = ctx.viewed
        if shape is None:
            return backward(ctx, dy, *extra)
        grads = backward(ctx, None if dy is None else grad_view(dy), *extra)
        dx = grads[0]
        # (unpacked ints: a tuple or torch.Size argument costs the host more)
        return grads if dx is None else (dx.reshape(*shape), *grads[1:])

    body = {"forward": staticmethod(forward), "backward": staticmethod(backward)} \
        if view is None else \
        {"forward": staticmethod(forward_viewed), "backward": staticmethod(backward_viewed)}
    return c_apply(type(name, (torch.autograd.Function,), body))


def c_apply(fn: type) -> Callable:
    """The C-level apply of an autograd.Function class (see `autograd_function`)."""
    apply = vars(torch._C._FunctionBase).get("apply")  # the classmethod descriptor, unbound
    return apply.__get__(None, fn) if apply is not None else fn.apply


_increment_version = torch._C._increment_version


def bump_versions(*tensors: Tensor) -> None:
    """What the dispatcher does for an op that mutates its arguments: bump their version
    counters, so autograd notices a saved tensor changed in place. One C call for all of them
    (`torch.autograd.graph.increment_version` wraps it per tensor); inference tensors, which
    have no counter, are skipped by torch."""
    _increment_version(tensors)
