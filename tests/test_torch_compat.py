"""The oldest supported torch, tested on the installed one.

torch 2.12 added the `bias` keyword to nn.BatchNorm*, nn.SyncBatchNorm and nn.GroupNorm; torch
2.11 (the GPU machines' release) raises TypeError on it. CI installs one torch (a CPU wheel; an
older one would be a multi-GB CUDA wheel), so the fixture below puts torch 2.11's constructors
and reset_parameters on the installed classes and re-runs fastnorm.nn's import-time detection:
module construction, convert(sync_batchnorm=True) and state_dict round trips then run the code
path a torch 2.11 user gets. The import check for a torch older than MIN_TORCH runs in a child
process whose torch lacks the API that check looks for.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init
from torch.nn.modules import batchnorm as _bn

import fastnorm
import fastnorm.nn as fnn
from fastnorm._version import MIN_TORCH

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NORM_BASE_INIT = _bn._NormBase.__init__
_GROUP_NORM_INIT = nn.GroupNorm.__init__


# torch 2.11's signatures: every argument of today's except the keyword-only `bias`.
def _old_batch_norm_init(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                         track_running_stats=True, device=None, dtype=None):
    _NORM_BASE_INIT(self, num_features, eps, momentum, affine, track_running_stats, device,
                    dtype)


def _old_sync_batch_norm_init(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                              track_running_stats=True, process_group=None, device=None,
                              dtype=None):
    _old_batch_norm_init(self, num_features, eps, momentum, affine, track_running_stats, device,
                         dtype)
    self.process_group = process_group


def _old_group_norm_init(self, num_groups, num_channels, eps=1e-5, affine=True, device=None,
                         dtype=None):
    _GROUP_NORM_INIT(self, num_groups, num_channels, eps, affine, device, dtype)


# torch 2.11's resets zero the bias whenever affine (it always had one).
def _old_norm_base_reset(self):
    self.reset_running_stats()
    if self.affine:
        init.ones_(self.weight)
        init.zeros_(self.bias)


def _old_group_norm_reset(self):
    if self.affine:
        init.ones_(self.weight)
        init.zeros_(self.bias)


@pytest.fixture
def torch_2_11(monkeypatch):
    """torch.nn's BatchNorm*, SyncBatchNorm and GroupNorm as torch 2.11 defines them, with
    fastnorm.nn's detection re-run on them."""
    monkeypatch.setattr(_bn._BatchNorm, "__init__", _old_batch_norm_init)
    monkeypatch.setattr(nn.SyncBatchNorm, "__init__", _old_sync_batch_norm_init)
    monkeypatch.setattr(nn.GroupNorm, "__init__", _old_group_norm_init)
    monkeypatch.setattr(_bn._NormBase, "reset_parameters", _old_norm_base_reset)
    monkeypatch.setattr(nn.GroupNorm, "reset_parameters", _old_group_norm_reset)
    monkeypatch.setattr(fnn, "_TAKES_BIAS", {base: fnn._takes_bias(base)
                                             for base in fnn._TAKES_BIAS})
    assert not any(fnn._TAKES_BIAS.values())
    for make in (lambda: nn.BatchNorm2d(3, bias=True), lambda: nn.SyncBatchNorm(3, bias=True),
                 lambda: nn.GroupNorm(1, 3, bias=True)):
        with pytest.raises(TypeError, match="bias"):  # as torch 2.11 does
            make()


def test_detection_matches_what_the_installed_torch_accepts():
    """The import-time detection says "takes bias" exactly where torch's constructor accepts it
    (then fastnorm passes it on; the fixture above checks the other side)."""
    makers = {_bn._BatchNorm: lambda: nn.BatchNorm2d(3, bias=False),
              nn.SyncBatchNorm: lambda: nn.SyncBatchNorm(3, bias=False),
              nn.GroupNorm: lambda: nn.GroupNorm(1, 3, bias=False)}
    assert set(makers) == set(fnn._TAKES_BIAS)
    for base, make in makers.items():
        try:
            accepted = make().bias is None
        except TypeError:
            accepted = False
        assert fnn._TAKES_BIAS[base] == accepted, base


_MODULES = {
    "BatchNorm1d": (lambda **kw: fnn.BatchNorm1d(4, **kw), (6, 4)),
    "BatchNorm2d": (lambda **kw: fnn.BatchNorm2d(4, momentum=None, **kw), (3, 4, 2, 3)),
    "BatchNorm3d": (lambda **kw: fnn.BatchNorm3d(4, **kw), (2, 4, 2, 2, 3)),
    "SyncBatchNorm": (lambda **kw: fnn.SyncBatchNorm(4, **kw), (3, 4, 5)),
    "GroupNorm": (lambda **kw: fnn.GroupNorm(2, 4, activation="silu", **kw), (3, 4, 5)),
}


def _torch_output(module, x):
    """What the module computes, by torch's functional ops (bias None where it has none)."""
    if isinstance(module, nn.GroupNorm):
        return F.silu(F.group_norm(x, 2, module.weight, module.bias, module.eps))
    return F.batch_norm(x, None, None, module.weight, module.bias, True, 0.0, module.eps)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(_MODULES))
def test_modules_take_bias_on_torch_without_the_keyword(torch_2_11, name, bias):
    make, shape = _MODULES[name]
    module = make(bias=bias)
    with_bias = make()
    assert (module.bias is not None) == bias
    expected_keys = [k for k in with_bias.state_dict() if bias or k != "bias"]
    assert list(module.state_dict()) == expected_keys
    with torch.no_grad():
        module.weight.normal_()
    if module.bias is not None:
        with torch.no_grad():
            module.bias.normal_()
    x = torch.randn(*shape)
    with fastnorm.use_backend("reference"):  # fastnorm's op layer, bias None included
        torch.testing.assert_close(module(x), _torch_output(module, x))
    # torch 2.11's reset would zero a None bias; fastnorm's resets what the module has.
    module.reset_parameters()
    assert torch.equal(module.weight, torch.ones(4))
    if bias:
        assert torch.equal(module.bias, torch.zeros(4))
    if isinstance(module, nn.modules.batchnorm._NormBase):
        assert int(module.num_batches_tracked) == 0


def test_convert_sync_batchnorm_on_torch_without_the_keyword(torch_2_11):
    with_bias, without = nn.BatchNorm2d(3), fnn.BatchNorm1d(4, bias=False)
    model = nn.Sequential(with_bias, nn.Sequential(without))
    keys = list(model.state_dict())
    fastnorm.convert(model, sync_batchnorm=True)
    first, second = model[0], model[1][0]
    assert type(first) is fnn.SyncBatchNorm and type(second) is fnn.SyncBatchNorm
    assert first.weight is with_bias.weight and first.bias is with_bias.bias
    assert second.weight is without.weight and second.bias is None
    assert second.running_mean is without.running_mean
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", ["BatchNorm2d", "GroupNorm"])
def test_state_dict_round_trip_on_torch_without_the_keyword(torch_2_11, name):
    """A checkpoint of a bias-free module (as torch >= 2.12 writes it: no "bias" key) loads into
    fastnorm's module on torch 2.11 and comes back unchanged; with a bias, fastnorm's and torch's
    modules exchange state_dicts both ways."""
    make, _ = _MODULES[name]
    torch_cls = nn.GroupNorm if name == "GroupNorm" else nn.BatchNorm2d
    torch_args = (2, 4) if name == "GroupNorm" else (4,)
    source = make(bias=False)
    with torch.no_grad():
        source.weight.normal_()
    checkpoint = {k: v.clone() for k, v in source.state_dict().items()}
    assert "bias" not in checkpoint
    loaded = make(bias=False)
    loaded.load_state_dict(checkpoint)
    for key, value in checkpoint.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match='Missing key.*"bias"'):
        make().load_state_dict(checkpoint)  # a module with a bias needs one, as in torch

    theirs = torch_cls(*torch_args)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = make()
    ours.load_state_dict(theirs.state_dict())
    back = torch_cls(*torch_args)
    back.load_state_dict(ours.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_import_on_a_torch_without_register_autocast_names_the_oldest_torch():
    """torch < 2.7 lacks torch.library.register_autocast, which the op layer calls at import:
    importing fastnorm then says which torch it needs, instead of an AttributeError."""
    code = ("import torch.library\n"
            "del torch.library.register_autocast\n"
            "import fastnorm\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode != 0
    assert f"ImportError: fastnorm needs torch >= {MIN_TORCH}" in run.stderr, run.stderr


def test_oldest_torch_is_stated_where_users_read_it():
    """setup.py reads MIN_TORCH from fastnorm/_version.py; the README's install line says it."""
    with open(os.path.join(_ROOT, "README.md")) as f:
        assert f"needs torch >= {MIN_TORCH} " in f.read()
    with open(os.path.join(_ROOT, "setup.py")) as f:
        assert "f\"torch>={_version('MIN_TORCH')}\"" in f.read()
