"""csrc/ops.cpp, the torch-facing binding of the CUDA C++ kernels, checked without compiling it:
every private op `fastnorm_C::<op>` it defines has the public `fastnorm::<op>` schema character
for character (the router calls one in place of the other), it implements every op it defines
for CUDA only, it never defines or implements the public `fastnorm` library (that would collide
with, or silently shadow, the Python definitions), and each op it lacks is one the router sends
to Triton. On a GPU with fastnorm._C built, the private ops also pass opcheck."""
import re
from pathlib import Path

import pytest
import torch

import fastnorm
from fastnorm.ops import _router

OPS_CPP = re.sub(r"//[^\n]*", "",  # code only, not comments
                 (Path(__file__).resolve().parent.parent / "csrc" / "ops.cpp").read_text())
DEFS = dict(re.findall(r'm\.def\("(\w+)(\(.*?\) -> .*?)"\);', OPS_CPP))
IMPLS = re.findall(r'm\.impl\("(\w+)", &\w+\);', OPS_CPP)
# What the kernels in csrc/ do not implement (the router runs Triton for these).
NOT_IN_CUDA = {"add_layer_norm_fwd", "add_layer_norm_bwd", "add_layer_norm_inplace",
               "batch_norm_stats_update", "gns_sums", "layer_norm_2d_fwd", "layer_norm_2d_bwd",
               "rms_norm_2d_fwd", "rms_norm_2d_bwd"}


def test_private_schemas_equal_the_public_ones():
    assert DEFS, "no m.def(...) found in csrc/ops.cpp"
    for op, signature in DEFS.items():
        public = str(getattr(torch.ops.fastnorm, op).default._schema)
        assert f"fastnorm_C::{op}{signature}" == public.replace("fastnorm::", "fastnorm_C::", 1)


def test_every_op_is_defined_or_left_to_triton():
    assert set(DEFS) == set(_router.OPS) - NOT_IN_CUDA
    assert sorted(IMPLS) == sorted(DEFS)


def test_only_the_private_library_for_cuda():
    assert re.findall(r"TORCH_LIBRARY(?:_IMPL)?\((\w+)", OPS_CPP) == ["fastnorm_C", "fastnorm_C"]
    assert "TORCH_LIBRARY_IMPL(fastnorm_C, CUDA" in OPS_CPP


@pytest.mark.skipif("cuda" not in fastnorm.available_backends(),
                    reason="needs fastnorm._C built and a GPU")
def test_private_ops_opcheck_on_gpu():
    from sample_inputs import sample_inputs

    for op in DEFS:
        for args in sample_inputs(op, torch.device("cuda"), torch.float32):
            torch.library.opcheck(getattr(torch.ops.fastnorm_C, op).default, args)


def test_private_ops_get_the_public_fakes():
    """fastnorm.cuda registers each private op's fake as the public op's (so torch.compile and
    opcheck can trace a private op). Checked on a stand-in private library with the public
    schema where fastnorm._C is not loaded; on a GPU with it built, opcheck above covers it."""
    from fastnorm import cuda
    from torch._subclasses.fake_tensor import FakeTensorMode

    if hasattr(torch.ops, "fastnorm_C") and hasattr(torch.ops.fastnorm_C, "layer_norm_fwd"):
        pytest.skip("the real fastnorm._C is loaded: test_private_ops_opcheck_on_gpu covers it")
    lib = torch.library.Library("fastnorm_C", "DEF")
    try:
        schema = str(torch.ops.fastnorm.layer_norm_fwd.default._schema)
        lib.define(schema.split("::", 1)[1])
        cuda._register_fakes()
        with FakeTensorMode():
            x = torch.empty(6, 32, dtype=torch.bfloat16)
            y, mean, rstd = torch.ops.fastnorm_C.layer_norm_fwd(x, None, None, 1e-5)
            assert y.shape == (6, 32) and y.dtype == torch.bfloat16
            assert mean.shape == rstd.shape == (6,) and rstd.dtype == torch.float32
            with pytest.raises(RuntimeError, match="expected x to be 2-D"):
                torch.ops.fastnorm_C.layer_norm_fwd(torch.empty(2, 3, 4), None, None, 1e-5)
    finally:
        lib._destroy()
