"""torch.library custom ops (`fastnorm::<op>_fwd`, `fastnorm::<op>_bwd`), one file per op
family: schema, fake (meta) implementation for torch.compile, and autograd registration.

Ops take the canonical view of their family (LayerNorm/RMSNorm: 2-D rows x features; GroupNorm and
BatchNorm: (N, C, S) in NCHW or channels-last strides); the
functional layer reshapes before calling them, so ranks stay fixed under torch.compile.
"""
from . import layer_norm  # noqa: F401  (registers fastnorm::layer_norm_* and rms_norm_*)
from . import group_norm  # noqa: F401  (registers fastnorm::group_norm_*)
from . import batch_norm  # noqa: F401  (registers fastnorm::batch_norm_*)
