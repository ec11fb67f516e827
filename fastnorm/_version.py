"""The one version string: fastnorm.__version__ and setup.py both read it; and the oldest torch
fastnorm runs on (setup.py's requirement, the README's install line and the import check)."""
__version__ = "0.1.0"
# torch 2.7 added torch.library.register_autocast, which the op layer calls at import; the
# other torch APIs fastnorm uses are older (custom_op/register_fake/register_autograd and
# nn.RMSNorm: 2.4).
MIN_TORCH = "2.7"
