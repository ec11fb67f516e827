"""The one schema table: every `fastnorm::` op, defined once with torch.library (schema, fake
with argument checks, autograd, autocast), one file per op family. Nothing here imports
Triton: the ops register wherever torch does.

Which kernels run a call is decided inside the op body by the router (_router.py): on CPU the
torch reference (fastnorm/reference.py) or Triton under the interpreter, on CUDA Triton or the
CUDA C++ kernels of fastnorm._C (private ops `fastnorm_C::*` with the same schemas).

Ops take the canonical view of their family (LayerNorm/RMSNorm: 2-D rows x features; GroupNorm,
BatchNorm and the channels-first LayerNorm2d/RMSNorm2d: (N, C, S) in NCHW or channels-last
strides; fastnorm/_layout.py); the functional
layer reshapes before calling them, so ranks stay fixed under torch.compile.
"""
from . import gns  # noqa: F401  (registers fastnorm::gns_sums)
from . import layer_norm  # noqa: F401  (registers fastnorm::layer_norm_*, rms_norm_*, add_*)
from . import group_norm  # noqa: F401  (registers fastnorm::group_norm_*)
from . import batch_norm  # noqa: F401  (registers fastnorm::batch_norm_*)
from . import layer_norm_2d  # noqa: F401  (registers fastnorm::layer_norm_2d_*, rms_norm_2d_*)
