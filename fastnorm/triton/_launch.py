"""Triton launches without the JIT's per-call work.

`kernel[grid](*args, **meta)` runs Triton's `JITFunction.run` on every call: it binds the
arguments, specializes each one, builds a string cache key, checks globals and assembles launch
metadata (published: ~6-14 us of host time per launch, against ~3 us for the launch itself).
`launch(kernel, grid, *args, **meta)` does that once per *exact* argument key and afterwards
calls the cached `CompiledKernel`'s launcher directly.

The key is exact by construction rather than a copy of Triton's rules: every int argument by
value (Triton specializes ints on == 1, % 16 and their width), every tensor by (dtype, 16-byte
alignment of its data pointer) (what Triton specializes a pointer on), bools and None by value,
floats as "a float" (Triton never specializes a float on its value), every constexpr and launch
option by value, and the current device. Equal keys therefore mean equal Triton specializations,
so the cached binary is the one the JIT would pick; different ints that Triton would share a
binary for only cost one more JIT call, the first time they are seen. tests/test_host_path.py
checks the key against Triton's own specialization function.

The JIT path stays for the first call of a key, under the CPU interpreter, when a launch hook
is installed (profilers such as proton), and for Triton releases whose launcher calling
convention this module was not written for.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch
import triton

from .._backend import triton_interpreted

# CompiledKernel.run(gridX, gridY, gridZ, stream, function, packed_metadata, launch_metadata,
# enter_hook, exit_hook, *all_args) with every parameter, constexprs included, in signature
# order: the calling convention of the Triton release listed here (read from its source; the
# GPU machines run 3.6). Other releases keep the JIT path until checked.
_DIRECT_RELEASES = ("3.6",)
TRITON_RELEASE = ".".join(triton.__version__.split(".")[:2])  # "3.6"
# FASTNORM_TRITON_LAUNCH_CACHE=0 (read at import) keeps every launch on the JIT path.
_DIRECT = (not triton_interpreted() and torch.cuda.is_available()
           and TRITON_RELEASE in _DIRECT_RELEASES
           and os.environ.get("FASTNORM_TRITON_LAUNCH_CACHE", "1") != "0")

# Launches issued through `launch` (cached or not): the deterministic guard of the host path
# counts them per op call (tests/test_host_path.py).
launches = 0

_dry = False  # dry_run(): count launches, run nothing

_FLOAT = "<float>"
# The current CUDA device and its current stream, as Triton's own launcher reads them (the
# device must be current: callers with a tensor elsewhere make it current first).
_current_device = torch._C._cuda_getDevice if _DIRECT else None
_current_stream = torch._C._cuda_getCurrentRawStream if _DIRECT else None
_MAX_ENTRIES = 8192


class _Entry:
    __slots__ = ("run", "function", "packed_metadata", "tail")

    def __init__(self, compiled: Any, tail: tuple) -> None:
        self.run = compiled.run
        self.function = compiled.function
        self.packed_metadata = compiled.packed_metadata
        self.tail = tail


_cache: dict[tuple, _Entry] = {}


def _arg_key(args: tuple) -> tuple:
    # One expression (no call per argument): ints by value, tensors by (dtype, aligned),
    # floats as one marker, anything else (bool, None) with its type so True and 1 differ.
    return tuple([a if type(a) is int else
                  _FLOAT if type(a) is float else
                  (a.dtype, not a.data_ptr() & 15) if isinstance(a, torch.Tensor) else
                  (type(a), a) for a in args])


_runtime_knobs = triton.knobs.runtime if hasattr(triton, "knobs") else None


def _hooks_installed() -> bool:
    for hook in (_runtime_knobs.launch_enter_hook, _runtime_knobs.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _tail(kernel: Any, num_args: int, meta: dict) -> tuple:
    """The values of the parameters after the positional ones, in signature order: the
    constexprs from `meta`, else the parameter's default."""
    tail = []
    for param in kernel.params[num_args:]:
        name = param.name
        tail.append(meta[name] if name in meta else param.default)
    return tuple(tail)


def launch(kernel: Any, grid: tuple, *args: Any, **meta: Any) -> None:
    """`kernel[grid](*args, **meta)`, through the cached compiled kernel when one exists for
    this exact argument key. Positional `args` are the kernel's leading parameters; `meta`
    holds constexprs and launch options (num_warps, num_stages)."""
    launch_with(kernel, grid, args, meta, None)


def launch_with(kernel: Any, grid: tuple, args: tuple, meta: dict,
                meta_key: Optional[tuple]) -> None:
    """`launch` for hot paths: `meta` as a dict the caller keeps and `meta_key`, a hashable
    stand-in for it (e.g. its items, computed once with the cached plan; None: computed
    here)."""
    global launches
    launches += 1
    if _dry:
        return
    if not _DIRECT:
        kernel[grid](*args, **meta)
        return
    device = _current_device()
    key = (kernel, device, _arg_key(args), tuple(meta.items()) if meta_key is None else meta_key)
    entry = _cache.get(key)
    if entry is None or _hooks_installed():
        compiled = kernel[grid](*args, **meta)
        if hasattr(compiled, "result"):  # Triton's async-compile mode hands back a future
            compiled = compiled.result()
        if entry is None and compiled is not None:
            if len(_cache) >= _MAX_ENTRIES:  # shapes that never repeat: start over
                _cache.clear()
            _cache[key] = _Entry(compiled, _tail(kernel, len(args), meta))
        return
    n = len(grid)
    entry.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
              _current_stream(device), entry.function, entry.packed_metadata, None, None, None,
              *args, *entry.tail)


def clear_cache() -> None:
    """Forget every cached compiled-kernel handle (the next launch of each key takes the JIT
    path again)."""
    _cache.clear()


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Within the block, launches are counted but not run (outputs stay uninitialized): the
    host path's deterministic guard counts launches and torch ops of a call without executing
    interpreted kernels (tests/test_host_path.py)."""
    global _dry
    previous, _dry = _dry, True
    try:
        yield
    finally:
        _dry = previous
