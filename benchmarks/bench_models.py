"""Training steps of real models: torch's norm layers against `fastnorm.convert(model)`.

One step is forward, loss, backward and optimizer step. Per model the script prints and writes:
the number of modules `convert` swapped (from `fastnorm.convert_report`), the median step time
of torch and of fastnorm and fastnorm's speedup (torch ms / fastnorm ms), eager and under
`torch.compile(model)` (default mode; the same converted model), and a gradient check.

Models (`--models`, default all):
  resnet50  torchvision's ResNet-50 when installed, else a ResNet-like model built here
            (bottleneck blocks with BatchNorm2d, ResNet-50's layout at full size); channels_last.
  gn_stack  diffusers' UNet2DModel when installed, else a stack of residual blocks
            (GroupNorm(32, C) -> SiLU -> Conv2d 3x3, twice, plus the skip).
  llama     transformers' LlamaForCausalLM from a LlamaConfig (RMSNorm; no download).
  qwen2     transformers' Qwen2ForCausalLM from a Qwen2Config (RMSNorm family A, recognized by
            its forward's code, as Llama's).
  gemma     transformers' GemmaForCausalLM from a GemmaConfig (RMSNorm family B, 1 + w in fp32).
  vit       transformers' ViTForImageClassification from a ViTConfig (LayerNorm; no download).
  convnext  timm's convnext_tiny (timm's LayerNorm in the blocks; its channels-first LayerNorm2d
            in the stem, downsampling and head, run by fastnorm.layer_norm_2d); pretrained=False,
            no download.
  timm_vit  timm's vit_base_patch16_224 (timm's LayerNorm).
A model whose library is missing falls back (resnet50, gn_stack) or is skipped with the reason.
Each row also counts the norm-like modules `convert` left alone (`fastnorm.convert_report`).

Sizes: on CUDA ResNet-50 batch 128 at 224, the GN stack 8x320x64x64 with 8 blocks (the UNet:
8x4x64x64 latents, block widths 320/640/1280/1280), Llama, Qwen2 and Gemma 4 layers of hidden
2048 on 8x1024 tokens (vocabulary 32000), ViT-B/16 (transformers' and timm's) and ConvNeXt-T
batch 64 at 224. `--tiny` (the default on a CPU) shrinks every model so the
script runs in seconds (the ResNet is then the built-in one: torchvision's ResNet-50 has no
small configuration); its times mean nothing, it only proves the script runs.
Precision on CUDA: bf16 autocast (ResNet, GN stack, ViTs, ConvNeXt); the language models hold
bf16 parameters (no autocast), as HF language models are commonly trained, so their RMSNorms
read bf16 (under autocast the fp32 residual stream would make every RMSNorm input fp32). On a
CPU all is fp32.

Timing: `--warmup` steps, then `--steps` steps of torch and fastnorm alternating (a load change
on a shared machine hits both), each step timed with perf_counter between two device
synchronizations, so host overhead counts; the median is reported (every step's time is in the
JSON). On a CPU torch runs one thread (`--threads`; see its help). Compiled models are timed the
same way after their warm-up, whose first step (the compilation) is recorded separately
(indicative only: torch's model compiles first and pays Dynamo's and Inductor's one-off costs).
`--compile` is on by default on CUDA and off on a CPU (compiling four models on 2 cores takes
minutes); a compilation that fails is recorded in the row, not raised.

Gradient check: a randomly initialised deep network amplifies rounding, so comparing fastnorm's
bf16 gradients with torch's says nothing (torch's own differ from a float64 run by 130 % on
ResNet-50 under bf16 autocast). Instead each side's fp32 gradients (no autocast, TF32 off) are
compared with a float64 run of the same model (same weights, same input, torch's norms):
median over parameters of ||g - g64|| / ||g64||, for torch and for fastnorm. The fastnorm side
runs under `--backend` (default "auto" on CUDA: the Triton kernels; "reference" on a CPU, where
"auto" would call torch's own ops: fastnorm's op layer with its torch reference kernels).

    python benchmarks/bench_models.py [--models resnet50,llama] [--steps 20] [--warmup 5]
        [--tiny] [--compile | --no-compile] [--backend NAME] [--check-batch N] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.util
import json
import os
import re
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's fastnorm, not whichever one is installed; and the shared harness.
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _harness  # noqa: E402

import fastnorm  # noqa: E402

# fastnorm's recognizer (`fastnorm.convert` itself is the function): the float64 reference
# computes the library norms it recognizes in float64.
_recognizer = importlib.import_module("fastnorm.convert")

MODELS = ("resnet50", "gn_stack", "llama", "qwen2", "gemma", "vit", "convnext", "timm_vit")
Batch = tuple  # positional model inputs followed by the target


# --- built-in models (used where torchvision / diffusers are missing, and for --tiny) ----------

class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 -> 3x3 (stride) -> 1x1 convolutions, each followed by
    BatchNorm2d, ReLU after the first two and after the residual add."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNetLike(nn.Module):
    """torchvision's ResNet layout: 7x7 stem, four stages of Bottlenecks (widths `width` x 1, 2,
    4, 8), global average pool, linear classifier. layers=(3, 4, 6, 3), width=64 is ResNet-50."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 64,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, in_ch = [], width
        for i, n in enumerate(layers):
            planes = width * 2**i
            for j in range(n):
                stages.append(Bottleneck(in_ch, planes, 2 if j == 0 and i > 0 else 1))
                in_ch = planes * Bottleneck.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class GNBlock(nn.Module):
    """A diffusion UNet's residual block without the time embedding:
    x + conv(silu(gn(conv(silu(gn(x))))))."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class GNStack(nn.Module):
    """conv_in (latent channels -> C), `blocks` GNBlocks at C channels, then GroupNorm -> SiLU ->
    conv_out back to the latent channels, as a UNet's ends."""

    def __init__(self, in_channels: int = 4, channels: int = 320, blocks: int = 8,
                 groups: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.Sequential(*(GNBlock(channels, groups) for _ in range(blocks)))
        self.norm_out = nn.GroupNorm(groups, channels)
        self.conv_out = nn.Conv2d(channels, in_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


# --- the benchmark's cases -------------------------------------------------------------------

@dataclass
class Case:
    """One model to benchmark: how to build it (fp32, on the CPU, seeded by the caller), make a
    batch and compute the loss, and how it is trained on the device."""

    name: str
    source: str                     # what was built, for the table
    config: dict[str, Any]
    build: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], Batch]   # (batch size, CPU generator)
    loss: Callable[[nn.Module, Batch], Tensor]
    batch: int
    autocast: bool = False          # bf16 autocast on CUDA
    bf16_params: bool = False       # parameters in bf16 on CUDA (instead of autocast)
    channels_last: bool = False
    optimizer: str = "sgd"          # "sgd" (momentum 0.9) or "adamw"


def _upcast(t: Tensor) -> Tensor:
    """fp32 for bf16/fp16 logits (as HF's loss does), fp32 and fp64 unchanged: the float64
    reference run keeps float64 to the end."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _classify_loss(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(_upcast(model(x)), y)


def _resnet_case(tiny: bool) -> Case:
    if not tiny and importlib.util.find_spec("torchvision") is not None:
        import torchvision

        build: Callable[[], nn.Module] = lambda: torchvision.models.resnet50(weights=None)
        source, config = f"torchvision {torchvision.__version__} resnet50", {}
        batch, size, classes = 128, 224, 1000
    else:
        layers, width = ((1, 1, 1, 1), 8) if tiny else ((3, 4, 6, 3), 64)
        classes = 10 if tiny else 1000
        build = lambda: ResNetLike(layers, width, classes)
        source = "ResNetLike (built in; " + ("--tiny)" if tiny else "torchvision not installed)")
        config = {"layers": list(layers), "width": width}
        batch, size = (4, 32) if tiny else (128, 224)

    def make_batch(n: int, g: torch.Generator) -> Batch:
        return (torch.randn(n, 3, size, size, generator=g),
                torch.randint(0, classes, (n,), generator=g))
    return Case("resnet50", source, dict(config, image=size, classes=classes), build, make_batch,
                _classify_loss, batch, autocast=True, channels_last=True)


def _denoise_loss(model: nn.Module, batch: Batch) -> Tensor:
    x, noise = batch
    return F.mse_loss(_upcast(model(x)), noise)


def _unet_loss(model: nn.Module, batch: Batch) -> Tensor:
    x, timestep, noise = batch
    return F.mse_loss(_upcast(model(x, timestep).sample), noise)


def _gn_case(tiny: bool) -> Case:
    n, size = (2, 8) if tiny else (8, 64)
    missing = "diffusers not installed"
    diffusers = None
    if importlib.util.find_spec("diffusers") is not None:
        try:
            import diffusers
        except Exception as exc:  # noqa: BLE001 - a broken install falls back, with the reason
            missing = f"diffusers import failed: {_error_text(exc)}"
    if diffusers is not None:
        # UNet2DModel's default block types (the last three levels with attention).
        widths = (32, 64) if tiny else (320, 640, 1280, 1280)
        kw: dict[str, Any] = dict(sample_size=size, in_channels=4, out_channels=4,
                                  block_out_channels=widths,
                                  layers_per_block=1 if tiny else 2,
                                  norm_num_groups=8 if tiny else 32)
        if tiny:
            kw.update(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        build: Callable[[], nn.Module] = lambda: diffusers.UNet2DModel(**kw)
        source = f"diffusers {diffusers.__version__} UNet2DModel"
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}

        def make_batch(b: int, g: torch.Generator) -> Batch:
            return (torch.randn(b, 4, size, size, generator=g),
                    torch.randint(0, 1000, (b,), generator=g),
                    torch.randn(b, 4, size, size, generator=g))
        return Case("gn_stack", source, config, build, make_batch, _unet_loss, n, autocast=True)
    channels, blocks = (64, 2) if tiny else (320, 8)
    build = lambda: GNStack(4, channels, blocks, 32)
    source = f"GNStack (built in; {missing})"

    def make_batch(b: int, g: torch.Generator) -> Batch:
        return (torch.randn(b, 4, size, size, generator=g),
                torch.randn(b, 4, size, size, generator=g))
    return Case("gn_stack", source, {"channels": channels, "blocks": blocks, "groups": 32,
                                     "latent": [4, size, size]},
                build, make_batch, _denoise_loss, n, autocast=True)


_LM = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
       "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
       # (Gemma's own head_dim is 256 and vocabulary 256000: sized like the others here)
       "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 128})}


def _language_model_case(name: str, tiny: bool) -> Union[Case, str]:
    """A transformers causal LM from its config (no download): Llama, Qwen2 or Gemma."""
    if importlib.util.find_spec("transformers") is None:
        return "skipped: transformers is not installed"
    import transformers

    config_name, model_name, extra = _LM[name]
    kw: dict[str, Any] = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256) if tiny else
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=4, vocab_size=32000))
    if extra and not tiny:
        kw.update(extra)
    n, seq = (2, 32) if tiny else (8, 1024)
    cfg = getattr(transformers, config_name)(max_position_embeddings=seq, pad_token_id=0, **kw)

    def build() -> nn.Module:
        model = getattr(transformers, model_name)(cfg)
        if name == "gemma":  # Gemma's norm weights start at 0 (1 + w = 1): make w matter
            with torch.no_grad():
                for module in model.modules():
                    if type(module).__name__ == "GemmaRMSNorm":
                        module.weight.normal_(0.0, 0.5)
        return model

    def make_batch(b: int, g: torch.Generator) -> Batch:
        ids = torch.randint(0, cfg.vocab_size, (b, seq), generator=g)
        return ids, torch.randint(0, cfg.vocab_size, (b, seq), generator=g)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        # The loss outside the model: HF's own casts logits to fp32, even in the float64 run.
        ids, labels = batch
        logits = model(input_ids=ids).logits
        return F.cross_entropy(_upcast(logits).flatten(0, 1), labels.flatten())
    return Case(name, f"transformers {transformers.__version__} {model_name}",
                dict(kw, seq=seq), build, make_batch, loss, n, bf16_params=True,
                optimizer="adamw")


def _vit_case(tiny: bool) -> Union[Case, str]:
    if importlib.util.find_spec("transformers") is None:
        return "skipped: transformers is not installed"
    import transformers

    kw: dict[str, Any] = (
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=8, num_labels=10) if tiny else
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
             intermediate_size=3072, image_size=224, patch_size=16, num_labels=1000))
    cfg = transformers.ViTConfig(**kw)   # dropout 0 by default: the gradient check needs that

    def make_batch(b: int, g: torch.Generator) -> Batch:
        return (torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g),
                torch.randint(0, cfg.num_labels, (b,), generator=g))

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(_upcast(model(pixel_values=x).logits), y)
    return Case("vit", f"transformers {transformers.__version__} ViTForImageClassification",
                kw, lambda: transformers.ViTForImageClassification(cfg), make_batch, loss,
                2 if tiny else 64, autocast=True, optimizer="adamw")


def _timm_case(name: str, tiny: bool) -> Union[Case, str]:
    """timm's ConvNeXt-T or ViT-B/16 (pretrained=False); tiny: convnext_atto (with ConvNeXt-T's
    block layout) and vit_tiny at 32x32 on 10 classes."""
    if importlib.util.find_spec("timm") is None:
        return "skipped: timm is not installed"
    try:
        import timm
    except Exception as exc:  # noqa: BLE001 - e.g. a torchvision that does not match torch
        return f"skipped: timm import failed: {_error_text(exc)}"

    arch = {("convnext", False): "convnext_tiny", ("convnext", True): "convnext_atto",
            ("timm_vit", False): "vit_base_patch16_224",
            ("timm_vit", True): "vit_tiny_patch16_224"}[name, tiny]
    size, classes = (32, 10) if tiny else (224, 1000)
    kw: dict[str, Any] = dict(pretrained=False, num_classes=classes)
    if name == "timm_vit":
        kw["img_size"] = size
    elif tiny:  # (atto's default puts channels-first LayerNorm2d in the blocks too: not tiny's)
        kw["conv_mlp"] = False

    def make_batch(b: int, g: torch.Generator) -> Batch:
        return (torch.randn(b, 3, size, size, generator=g),
                torch.randint(0, classes, (b,), generator=g))
    return Case(name, f"timm {timm.__version__} {arch}", dict(arch=arch, image=size, **kw),
                lambda: timm.create_model(arch, **kw), make_batch, _classify_loss,
                2 if tiny else 64, autocast=True, optimizer="adamw")


_CASES: dict[str, Callable[[bool], Union[Case, str]]] = {
    "resnet50": _resnet_case, "gn_stack": _gn_case,
    "llama": lambda tiny: _language_model_case("llama", tiny),
    "qwen2": lambda tiny: _language_model_case("qwen2", tiny),
    "gemma": lambda tiny: _language_model_case("gemma", tiny),
    "vit": _vit_case,
    "convnext": lambda tiny: _timm_case("convnext", tiny),
    "timm_vit": lambda tiny: _timm_case("timm_vit", tiny)}


# --- one model's measurements ----------------------------------------------------------------

@dataclass
class Row:
    """One model's results; times in ms (median per step), speedup = torch ms / fastnorm ms.
    `compile_error` is the text of what failed there; `error` set means the model did not run
    (missing library, gradient check or an eager step failed): the table shows only that."""

    model: str
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    batch: int = 0
    precision: str = ""
    converted: int = 0
    left_alone: int = 0
    left_alone_why: dict[str, str] = field(default_factory=dict)   # class -> convert's reason
    eager_torch_ms: Optional[float] = None
    eager_fastnorm_ms: Optional[float] = None
    eager_speedup: Optional[float] = None
    compiled_torch_ms: Optional[float] = None
    compiled_fastnorm_ms: Optional[float] = None
    compiled_speedup: Optional[float] = None
    compile_torch_s: Optional[float] = None       # the first compiled step (the compilation)
    compile_fastnorm_s: Optional[float] = None
    compile_error: str = ""
    grad_err_torch: Optional[float] = None
    grad_err_fastnorm: Optional[float] = None
    grad_params: int = 0
    check_batch: int = 0
    error: str = ""
    step_ms: dict[str, list[float]] = field(default_factory=dict)   # every timed step, by side


def _error_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def _to(batch: Batch, device: torch.device, dtype: Optional[torch.dtype] = None,
        channels_last: bool = False) -> Batch:
    """The batch on `device`; floating tensors cast to `dtype` (if given), 4-D ones made
    channels_last (if asked)."""
    out = []
    for t in batch:
        t = t.to(device)
        if t.is_floating_point():
            if dtype is not None:
                t = t.to(dtype)
            if channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
        out.append(t)
    return tuple(out)


def _float64_forward(family: str, roles: dict[str, Any]) -> Optional[Callable]:
    """The computation of a recognized norm family in its input's dtype (the libraries' own code
    computes float64 input in fp32), or None for the families whose code keeps float64."""
    def role(module: nn.Module, name: str) -> Any:
        attr = roles.get(name)
        return attr if attr is None or isinstance(attr, float) else getattr(module, attr, None)

    def rms(module: nn.Module, x: Tensor) -> Tensor:
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + role(module, "eps"))
        w = role(module, "weight")
        if "with_scale" in roles and not role(module, "with_scale"):
            w = None
        if w is not None:
            y = y * ((1.0 + w) if family == "gemma" else w)
        b = role(module, "bias")
        return y if b is None else y + b

    def layer_norm(module: nn.Module, x: Tensor) -> Tensor:
        w, b = role(module, "weight"), role(module, "bias")
        shape = role(module, "normalized_shape") or (w.shape[-1],)
        return F.layer_norm(x, tuple(shape), w, b, float(role(module, "eps")))

    if family in ("llama", "gemma", "fp32_weight", "t5"):
        return rms
    return layer_norm if family == "fp32_layer_norm" else None


def _exact_float64(model: nn.Module) -> None:
    """The library norms that compute in fp32 whatever their input's dtype (transformers'
    RMSNorm families, fp32 LayerNorms) would put fp32 rounding into the float64 reference:
    compute them in the input's dtype. They are found as fastnorm.convert finds them."""
    for module in model.modules():
        match = _recognizer._class_match(type(module))
        if isinstance(match, str):
            continue
        forward = _float64_forward(match.form.family, match.roles)
        if forward is not None:
            module.forward = types.MethodType(forward, module)


@contextlib.contextmanager
def _fp32_matmuls() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (the fp32 gradients must be fp32's)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _backend_ctx(backend: Optional[str]) -> contextlib.AbstractContextManager:
    return fastnorm.use_backend(backend) if backend else contextlib.nullcontext()


def _gradients(model: nn.Module, case: Case, batch: Batch,
               backend: Optional[str] = None) -> dict[str, Tensor]:
    model.train()
    with _fp32_matmuls(), _backend_ctx(backend):
        case.loss(model, batch).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def grad_errors(case: Case, base: nn.Module, batch: Batch, device: torch.device,
                backend: str) -> tuple[float, float, int]:
    """Median over parameters of ||g - g64|| / ||g64|| for torch's and fastnorm's fp32
    gradients against a float64 run of the same model (torch's norms, same weights and
    input). Returns (torch error, fastnorm error, number of parameters compared)."""
    ref = copy.deepcopy(base).double()
    _exact_float64(ref)
    g64 = _gradients(ref, case, _to(batch, device, torch.float64, case.channels_last))
    del ref
    batch32 = _to(batch, device, torch.float32, case.channels_last)
    errs = []
    for converted in (False, True):
        model = copy.deepcopy(base)
        if converted:
            fastnorm.convert(model)
        grads = _gradients(model, case, batch32, backend if converted else None)
        errs.append({n: ((g.double() - g64[n]).norm() / g64[n].norm()).item()
                     for n, g in grads.items() if n in g64 and g64[n].norm() > 0})
        del model, grads
    if errs[0].keys() != errs[1].keys() or not errs[0]:
        raise RuntimeError("torch's and fastnorm's models have different gradients "
                           f"({len(errs[0])} vs {len(errs[1])} parameters)")
    return statistics.median(errs[0].values()), statistics.median(errs[1].values()), len(errs[0])


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, case: Case, batch: Batch,
                device: torch.device, backend: Optional[str]) -> None:
    optimizer.zero_grad(set_to_none=True)
    with _backend_ctx(backend), torch.autocast(device.type, torch.bfloat16,
                                               enabled=case.autocast and device.type == "cuda"):
        loss = case.loss(model, batch)
        loss.backward()
    optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict[str, Callable[[], None]], warmup: int, n: int, device: torch.device
               ) -> tuple[dict[str, list[float]], dict[str, float], dict[str, str]]:
    """The ms of each of `n` steps of each named step function, timed alternately after `warmup`
    steps each. Returns (ms per step, seconds of each first step, errors): a function that raises
    in its warm-up is dropped and its error returned, the others still timed."""
    first_s, errors, live = {}, {}, {}
    for name, step in steps.items():
        try:
            for i in range(warmup):
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                if i == 0:
                    first_s[name] = time.perf_counter() - start
            live[name] = step
        except Exception as exc:  # noqa: BLE001 - reported in the row
            errors[name] = _error_text(exc)
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(n):
        for name, step in live.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times, first_s, errors


def _optimizer(case: Case, model: nn.Module) -> torch.optim.Optimizer:
    # Small steps: dozens of them on random data must not drive the weights to inf.
    if case.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-5)
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def build_model(case: Case, device: torch.device) -> nn.Module:
    """The case's model in fp32 on `device` (channels_last if the case is), with weights that
    depend only on the seed: built on the CPU, then moved."""
    torch.manual_seed(0)
    model = case.build().to(device)
    return model.to(memory_format=torch.channels_last) if case.channels_last else model


def _check_batch(args: argparse.Namespace, case: Case) -> int:
    """The gradient check's batch size (0: no check). At full sizes the float64 run is capped at
    32 examples by default, which keeps its memory and time small next to the timed steps."""
    if args.check_batch is None:
        return case.batch if args.tiny else min(case.batch, 32)
    return case.batch if args.check_batch == 0 else max(args.check_batch, 0)


def bench_model(case: Case, args: argparse.Namespace, device: torch.device) -> Row:
    """Everything for one model: conversion count, gradient check, eager and compiled times."""
    row = Row(case.name, case.source, case.config, case.batch)
    cuda = device.type == "cuda"
    row.precision = ("bf16 parameters" if case.bf16_params and cuda else
                     "bf16 autocast" if case.autocast and cuda else "fp32")
    row.precision += ", channels_last" if case.channels_last else ""
    base = build_model(case, device)
    gen = torch.Generator().manual_seed(1)

    row.check_batch = _check_batch(args, case)
    if row.check_batch:
        check_batch = case.make_batch(row.check_batch, gen)
        try:
            row.grad_err_torch, row.grad_err_fastnorm, row.grad_params = grad_errors(
                case, base, check_batch, device, args.backend)
        except Exception as exc:
            raise RuntimeError(f"gradient check: {_error_text(exc)}") from exc

    dtype = torch.bfloat16 if case.bf16_params and cuda else None
    ref_model = copy.deepcopy(base).to(dtype) if dtype else copy.deepcopy(base)
    fast_model = fastnorm.convert(copy.deepcopy(ref_model))
    del base
    report = fastnorm.convert_report(fast_model)
    row.converted, row.left_alone = len(report.converted), len(report.left_alone)
    row.left_alone_why = {cls: why for _name, cls, why in report.left_alone}
    batch = _to(case.make_batch(case.batch, gen), device, dtype, case.channels_last)
    opts = {"torch": _optimizer(case, ref_model), "fastnorm": _optimizer(case, fast_model)}
    models = {"torch": ref_model, "fastnorm": fast_model}

    def steps_of(forward_models: dict[str, nn.Module]) -> dict[str, Callable[[], None]]:
        return {side: (lambda side=side: _train_step(
                    forward_models[side], opts[side], case, batch, device,
                    args.backend if side == "fastnorm" else None))
                for side in ("torch", "fastnorm")}

    times, _, errors = time_steps(steps_of(models), args.warmup, args.steps, device)
    row.step_ms.update({f"eager_{side}": t for side, t in times.items()})
    ms = {side: statistics.median(t) for side, t in times.items()}
    row.eager_torch_ms, row.eager_fastnorm_ms = ms.get("torch"), ms.get("fastnorm")
    if errors:   # the row keeps what did run (JSON); the table shows the error
        row.error = "eager " + "; ".join(f"{k}: {v}" for k, v in errors.items())
        return row
    row.eager_speedup = ms["torch"] / ms["fastnorm"]

    if args.compile:
        try:
            compiled = {side: torch.compile(m) for side, m in models.items()}
        except Exception as exc:  # noqa: BLE001 - e.g. Dynamo unsupported on this Python
            row.compile_error = _error_text(exc)
            return row
        times, first_s, errors = time_steps(steps_of(compiled), args.warmup, args.steps, device)
        row.step_ms.update({f"compiled_{side}": t for side, t in times.items()})
        ms = {side: statistics.median(t) for side, t in times.items()}
        row.compiled_torch_ms, row.compiled_fastnorm_ms = ms.get("torch"), ms.get("fastnorm")
        row.compile_torch_s, row.compile_fastnorm_s = first_s.get("torch"), first_s.get("fastnorm")
        if len(ms) == 2:
            row.compiled_speedup = ms["torch"] / ms["fastnorm"]
        row.compile_error = "; ".join(f"{k}: {v}" for k, v in errors.items())
        torch._dynamo.reset()
    return row


# --- output --------------------------------------------------------------------------------

def _fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: list[Row]) -> str:
    """Markdown: per model the converted and left-alone counts, torch and fastnorm ms side by
    side with the speedup, eager then compiled, and the two gradient errors."""
    header = ["model", "converted", "left alone", "eager torch ms", "eager fastnorm ms",
              "eager speedup", "compiled torch ms", "compiled fastnorm ms", "compiled speedup",
              "grad err torch", "grad err fastnorm"]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.error} |" + " |" * (len(header) - 2))
            continue
        missing = "error" if r.compile_error else "-"
        compiled = [missing if r.compiled_torch_ms is None else _fmt(r.compiled_torch_ms, ".4g"),
                    missing if r.compiled_fastnorm_ms is None
                    else _fmt(r.compiled_fastnorm_ms, ".4g"),
                    _fmt(r.compiled_speedup, ".2f", "x")]
        lines.append("| " + " | ".join([
            r.model, str(r.converted), str(r.left_alone), _fmt(r.eager_torch_ms, ".4g"),
            _fmt(r.eager_fastnorm_ms, ".4g"), _fmt(r.eager_speedup, ".2f", "x"), *compiled,
            _fmt(r.grad_err_torch, ".3g"), _fmt(r.grad_err_fastnorm, ".3g")]) + " |")
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_results(rows: list[Row], meta: dict[str, Any], out_dir: str) -> tuple[str, str]:
    """Writes models-<device>-<date>.md (header, table, per-model details) and .json (meta +
    rows) under `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    device = "cpu" if meta["device"].startswith("CPU") else _slug(meta["device"])
    stem = os.path.join(out_dir, f"models-{device}-{meta['date'][:19].replace(':', '')}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in rows]}, f, indent=1)
    details = [f"- {r.model}: {r.source}, batch {r.batch}, {r.precision}, "
               f"config {json.dumps(r.config)}; {r.left_alone} norm-like module(s) left alone"
               + "".join(f" ({cls}: {why})" for cls, why in r.left_alone_why.items()) + "; "
               f"gradient check on batch {r.check_batch} over {r.grad_params} parameters"
               + (f"; first compiled step (the compilation) torch {r.compile_torch_s:.1f} s, "
                  f"fastnorm {r.compile_fastnorm_s:.1f} s"
                  if r.compile_torch_s is not None and r.compile_fastnorm_s is not None else "")
               + (f"; compile error: {r.compile_error}" if r.compile_error else "")
               for r in rows if not r.error]
    with open(stem + ".md", "w") as f:
        f.write(f"{_header(meta)}\n\n{format_table(rows)}\n\n" + "\n".join(details) + "\n")
    return stem + ".md", stem + ".json"


def _header(meta: dict[str, Any]) -> str:
    compiled = "torch.compile default mode" if meta["compile"] else "compile skipped"
    return (f"# bench_models on {meta['device']}, {meta['date']}; torch {meta['torch']}, "
            f"triton {meta['triton']}; fastnorm backend {meta['backend']!r}; "
            f"{'tiny' if meta['tiny'] else 'full'} sizes; median of {meta['steps']} steps after "
            f"{meta['warmup']} warm-up; {compiled}. speedup = torch ms / fastnorm ms. "
            "grad err: median over parameters of ||g - g64|| / ||g64||, fp32 vs a float64 run.")


def _versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {}
    for name in ("triton", "transformers", "torchvision", "diffusers"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent (or broken) library: recorded as None
            out[name] = None
    return out


def _backend_note(backend: str, device: torch.device) -> str:
    if device.type == "cpu" and backend in ("auto", "torch"):
        return (f"{backend!r} runs torch's own ops for CPU tensors: fastnorm's side is torch's "
                "(use --backend reference to run fastnorm's op layer)")
    if backend == "reference":
        return "fastnorm's op layer with its torch reference kernels (no Triton, no C++)"
    if backend == "auto":
        return "fastnorm's router: Triton kernels for CUDA tensors"
    return f"fastnorm's {backend} kernels"


def parse_args(argv: Optional[list[str]], device: torch.device) -> argparse.Namespace:
    cpu = device.type == "cpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (median)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps per side first (>= 1: the first compiles or allocates)")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=cpu,
                   help="tiny model configs (default on a CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=not cpu,
                   help="also time torch.compile(model) (default on CUDA, off on a CPU)")
    p.add_argument("--backend", default="reference" if cpu else "auto",
                   choices=fastnorm._backend.BACKENDS,
                   help="fastnorm backend for the fastnorm side (default 'auto' on CUDA, "
                        "'reference' on a CPU where 'auto' would call torch)")
    p.add_argument("--check-batch", type=int, default=None,
                   help="batch of the gradient check (default: the model's batch, capped at "
                        "32 at full sizes; 0: the model's batch; -1: no gradient check)")
    p.add_argument("--threads", type=int, default=1 if cpu else None,
                   help="torch intra-op threads (default 1 on a CPU: on a shared 2-core machine "
                        "two threads made steps 10-100x slower, unevenly between the sides)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="folder for models-<device>-<date>.{md,json}")
    args = p.parse_args(argv)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown model(s) {sorted(unknown)}; choose from {','.join(MODELS)}")
    if args.steps < 1 or args.warmup < 1:
        p.error("--steps and --warmup must be >= 1")
    if args.backend != "auto" and args.backend not in fastnorm.available_backends():
        hint = ("; on a CPU the Triton kernels need TRITON_INTERPRET=1 in the environment "
                "(the interpreter: slow)" if args.backend == "triton" and cpu else "")
        p.error(f"fastnorm backend {args.backend!r} is not available here "
                f"(available: {fastnorm.available_backends()}){hint}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = parse_args(argv, device)
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()   # no init / attention-backend notices
    meta = {"device": _harness.device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, **_versions(),
            "backend": args.backend, "backend_note": _backend_note(args.backend, device),
            "tiny": args.tiny, "steps": args.steps, "warmup": args.warmup,
            "compile": args.compile, "check_batch": args.check_batch,
            "threads": args.threads or torch.get_num_threads(),
            "timer": "perf_counter between device synchronizations, median per step"}
    print(f"# {meta['device']}; fastnorm backend {args.backend!r}: {meta['backend_note']}",
          flush=True)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        rows = [_run_model(name, args, device) for name in args.models.split(",")]
    finally:
        torch.set_num_threads(threads)   # main() also runs inside the test process
    md, js = write_results(rows, meta, args.out)
    print(_header(meta))
    print(format_table(rows))
    print(f"wrote {md} and {js}")
    return 0


def _run_model(name: str, args: argparse.Namespace, device: torch.device) -> Row:
    """One model's row, printed when done; a missing library or any failure becomes the row's
    error, never an exception."""
    case: Union[Case, str, None] = None
    try:
        case = _CASES[name](args.tiny)
        row = Row(name, error=case) if isinstance(case, str) else bench_model(case, args, device)
    except Exception as exc:  # noqa: BLE001 - one model failing must not hide the rest
        row = Row(name, error=_error_text(exc))
        if isinstance(case, Case):
            row.source, row.config, row.batch = case.source, case.config, case.batch
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(_summary(row), flush=True)
    return row


def _summary(r: Row) -> str:
    if r.error:
        return f"{r.model}: {r.error}"
    text = (f"{r.model} ({r.source}, batch {r.batch}, {r.precision}): converted {r.converted}; "
            f"eager torch {_fmt(r.eager_torch_ms, '.4g')} ms, fastnorm "
            f"{_fmt(r.eager_fastnorm_ms, '.4g')} ms, speedup {_fmt(r.eager_speedup, '.2f', 'x')}")
    if r.compile_error:
        text += f"; compile error: {r.compile_error}"
    elif r.compiled_speedup is not None:
        text += (f"; compiled torch {r.compiled_torch_ms:.4g} ms, fastnorm "
                 f"{r.compiled_fastnorm_ms:.4g} ms, speedup {r.compiled_speedup:.2f}x")
    if r.grad_err_torch is not None:
        text += (f"; grad err vs float64: torch {r.grad_err_torch:.3g}, fastnorm "
                 f"{r.grad_err_fastnorm:.3g} ({r.grad_params} params)")
    return text


if __name__ == "__main__":
    sys.exit(main())
