"""The trainer's configuration: one dataclass, defaults < JSON file (--config) < --key value.

Every field is a flag: `--max-batch-size 512` sets `max_batch_size`. Values are parsed to the
field's type and checked; a mistake names the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = ["TrainConfig", "ConfigError", "parse_args", "load_config"]


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message says which key and why."""


def _f(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """All trainer settings. Batch sizes are global (summed over ranks) unless said otherwise."""
    task: str = _f("classify", "classify: a CNN on the 8x8 digits; simclr: contrastive "
                               "pretraining of it (two views, NT-Xent, negatives from all ranks)",
                   ("classify", "simclr"))
    out_dir: str = _f("", "run directory (default runs/<timestamp>)")
    max_steps: int = _f(1200, "run length in scale-invariant steps (optimizer steps at the "
                             "initial batch size; a step at a larger batch counts its LR gain)")
    batch_size: int = _f(32, "initial global batch size B0")
    micro_batch: int = _f(0, "per-rank micro-batch; a step accumulates local_batch/micro_batch "
                             "(0: 16; --task simclr: the whole per-rank batch, batch / world)")
    min_batch_size: int = _f(0, "smallest global batch the controller may choose (0: batch_size)")
    max_batch_size: int = _f(512, "largest global batch the controller may choose")
    adaptive_batch: str = _f("auto", "gns: batch follows target_snr * b_simple; off: fixed; "
                                     "auto: gns (--task simclr: off)", ("auto", "gns", "off"))
    gns_source: str = _f("model", "where the controller's noise scale comes from: model (the "
                                  "whole model's gradient: the DDP all-reduce on several ranks, "
                                  ">= 2 micro-batches on one process) or norm-layers (per-example "
                                  "gradients of the norm layers from their backward kernels, "
                                  "fastnorm.gns.track; --norm ln or gn; one process needs no "
                                  "micro-batches)", ("model", "norm-layers"))
    target_snr: float = _f(1.0, "target batch = target_snr * b_simple")
    gns_memory: float = _f(8000.0, "time constant of the noise-scale averages, in samples")
    batch_threshold: float = _f(0.25, "no batch change below this relative difference")
    batch_cooldown: int = _f(10, "optimizer steps between two batch changes")
    allow_shrink: bool = _f(True, "let the controller shrink the batch as well as grow it")
    lr: float = _f(0.1, "learning rate at the initial batch size")
    lr_scaling: str = _f("adascale", "how the LR follows the batch: AdaScale gain, B/B0, "
                                     "sqrt(B/B0) or not at all",
                         ("adascale", "linear", "sqrt", "none"))
    optimizer: str = _f("sgd", "sgd (momentum, nesterov) or adamw", ("sgd", "adamw"))
    momentum: float = _f(0.9, "SGD momentum / AdamW beta1")
    weight_decay: float = _f(5e-4, "weight decay")
    warmup_steps: float = _f(15.0, "linear LR warm-up, scale-invariant steps")
    min_lr_ratio: float = _f(0.02, "cosine decay ends at lr * min_lr_ratio")
    grad_clip: float = _f(0.0, "clip the global gradient norm (0: off); after the GNS norms")
    norm: str = _f("bn", "norm layer: bn (per-rank stats), syncbn (stats over all ranks), "
                         "gn, ln", ("bn", "syncbn", "gn", "ln"))
    width: int = _f(32, "CNN width (channels of the first block)")
    sampler: str = _f("random", "batch sampler (--stratify switches to fixed-count "
                                "stratified batches)", ("random",))
    stratify: str = _f("", "fixed count per global batch of listed classes, e.g. 3:4,8:4")
    stratify_scope: str = _f("global", "--stratify counts per global batch or per rank batch",
                             ("global", "local"))
    imbalance: str = _f("", "subsample training classes to these prevalences, e.g. 3:0.05")
    importance_weights: str = _f("off", "weight the loss by population / batch class share "
                                        "(unbiased under --stratify)", ("on", "off"))
    virtual_devices: int = _f(1, "split each BatchNorm batch into K groups with their own "
                                 "statistics (per-device BN on K simulated devices; --norm bn)")
    temperature: float = _f(0.5, "simclr: NT-Xent temperature")
    embed_dim: int = _f(32, "simclr: output (projection) dimension")
    leak_every: int = _f(25, "simclr: leak gap on a fixed held-out batch every N steps "
                             "(0: only at the end)")
    eval_every: int = _f(50, "test-set evaluation every N optimizer steps (0: only at the end)")
    log_every: int = _f(25, "plain progress line every N steps when stdout is not a terminal")
    ckpt_every: int = _f(100, "checkpoint every N optimizer steps (0: only at the end)")
    resume: str = _f("", "auto (latest checkpoint, fresh start if none) or a run dir / file")
    seed: int = _f(0, "seed of the model init, data split and batch order")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    threads: int = _f(0, "torch CPU threads per process (0: 1 on CPU, torch's default on CUDA; "
                         "intra-op threads cost more than they gain on this small model)")
    dist_backend: str = _f("auto", "process-group backend: auto (nccl on CUDA, else gloo)",
                           ("auto", "gloo", "nccl"))
    amp: str = _f("auto", "autocast: auto (bf16 on CUDA, off on CPU), bf16, fp16 (with a "
                          "GradScaler), off", ("auto", "bf16", "fp16", "off"))
    plots: bool = _f(True, "write PNG plots and report.md at the end")

    def __post_init__(self) -> None:
        # Defaults that follow the task. simclr's loss couples all samples of a step: it cannot
        # be accumulated over micro-batches, so it takes the whole per-rank batch (known once
        # the world size is: validate_world) and a fixed batch. Explicit values are kept and
        # checked by validate / validate_world.
        if self.adaptive_batch == "auto":
            self.adaptive_batch = "off" if self.task == "simclr" else "gns"
        if self.micro_batch == 0 and self.task != "simclr":
            self.micro_batch = 16

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """World-size-independent checks; raises ConfigError naming the key."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"{_flag(f.name)}: expected one of {list(choices)}, "
                                  f"got {value!r}")
        positive = ("max_steps", "batch_size", "max_batch_size", "target_snr",
                    "gns_memory", "lr", "width", "virtual_devices", "temperature", "embed_dim")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{_flag(name)}: must be > 0, got {getattr(self, name)}")
        non_negative = ("micro_batch", "min_batch_size", "batch_threshold", "batch_cooldown",
                        "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip",
                        "eval_every", "log_every", "threads", "ckpt_every", "momentum",
                        "leak_every")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)}: must be >= 0, got {getattr(self, name)}")
        lo = self.min_batch_size or self.batch_size
        if lo > self.max_batch_size:
            raise ConfigError(f"contradictory bounds: min batch {lo} (--min-batch-size, or "
                              f"--batch-size when it is 0) > --max-batch-size "
                              f"{self.max_batch_size}")
        if not lo <= self.batch_size <= self.max_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} is outside [--min-batch-size "
                              f"{lo}, --max-batch-size {self.max_batch_size}]")
        if self.micro_batch and self.batch_size % self.micro_batch:
            raise ConfigError(f"--micro-batch {self.micro_batch} does not divide --batch-size "
                              f"{self.batch_size}")
        if self.momentum >= 1:
            raise ConfigError(f"--momentum: must be < 1, got {self.momentum}")
        if not self.device == "auto" and not self.device.split(":")[0] in ("cpu", "cuda"):
            raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got "
                              f"{self.device!r}")
        self._validate_tasks()
        return self

    def class_maps(self) -> tuple[dict[int, int], dict[int, float]]:
        """(--stratify counts, --imbalance prevalences), parsed; ConfigError on bad syntax."""
        from .sampler import parse_class_map
        try:
            return (parse_class_map(self.stratify, int, flag="--stratify"),
                    parse_class_map(self.imbalance, float, flag="--imbalance"))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _validate_tasks(self) -> None:
        counts, prevalence = self.class_maps()
        for c, n in counts.items():
            if n < 1:
                raise ConfigError(f"--stratify: count of class {c} must be >= 1, got {n}")
        if prevalence and not (all(p > 0 for p in prevalence.values())
                               and sum(prevalence.values()) < 1):
            raise ConfigError(f"--imbalance: prevalences must be > 0 and sum below 1, got "
                              f"{prevalence}")
        if self.importance_weights == "on" and not counts:
            raise ConfigError("--importance-weights on needs --stratify (with random batches "
                              "every weight is 1)")
        if self.virtual_devices > 1 and self.norm != "bn":
            raise ConfigError(f"--virtual-devices {self.virtual_devices} splits per-device "
                              f"BatchNorm statistics and needs --norm bn (got --norm "
                              f"{self.norm}, which it would not change)")
        if self.gns_source == "norm-layers":
            if self.adaptive_batch != "gns":
                raise ConfigError("--gns-source norm-layers drives the batch-size controller: "
                                  "it needs --adaptive-batch gns (got --adaptive-batch "
                                  f"{self.adaptive_batch})")
            if self.norm not in ("ln", "gn"):
                raise ConfigError(f"--gns-source norm-layers measures the noise scale in "
                                  f"LayerNorm / GroupNorm layers: use --norm ln or gn (got "
                                  f"--norm {self.norm}; BatchNorm couples the examples of a "
                                  f"batch, so it has no per-example gradient)")
            if 0 < self.micro_batch < 2:
                raise ConfigError("--gns-source norm-layers compares one example with the "
                                  "micro-batch: --micro-batch must be >= 2 (got "
                                  f"{self.micro_batch})")
        if self.task == "simclr":
            if counts or prevalence or self.importance_weights == "on":
                raise ConfigError("--stratify, --imbalance and --importance-weights apply to "
                                  "--task classify, not simclr")
            if self.adaptive_batch != "off":
                raise ConfigError("--task simclr needs --adaptive-batch off (its default): its "
                                  "negatives do not split into micro-batches, so the batch "
                                  "cannot be accumulated and the one-process noise-scale "
                                  "estimate is unavailable")
        elif self.micro_batch % self.virtual_devices:
            raise ConfigError(f"--virtual-devices {self.virtual_devices} must divide "
                              f"--micro-batch {self.micro_batch} (each forward is split)")

    def validate_world(self, world: int) -> None:
        """Checks that depend on the number of ranks; sets simclr's default micro-batch."""
        if self.micro_batch == 0:   # --task simclr without --micro-batch: one per rank and step
            if self.batch_size % world:
                raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of the "
                                  f"world size {world} (--task simclr: batch / world per rank)")
            self.micro_batch = self.batch_size // world
        unit = world * self.micro_batch
        if self.batch_size % unit:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of world size "
                              f"x micro-batch = {world} x {self.micro_batch} = {unit}")
        lo = self.min_batch_size or self.batch_size
        if -(-lo // unit) * unit > self.max_batch_size:
            raise ConfigError(f"no multiple of world size x micro-batch = {unit} lies in "
                              f"[{lo}, {self.max_batch_size}] (--min-batch-size, "
                              "--max-batch-size)")
        if (world == 1 and self.adaptive_batch == "gns" and self.gns_source == "model"
                and self.batch_size < 2 * self.micro_batch):
            raise ConfigError("one process measures the noise scale from at least 2 micro-"
                              f"batches per step: --batch-size {self.batch_size} needs "
                              f"--micro-batch <= {self.batch_size // 2} (got {self.micro_batch})"
                              ", or --gns-source norm-layers, or --adaptive-batch off")
        local = self.batch_size // world
        if self.task == "simclr":
            if self.micro_batch != local:
                raise ConfigError(f"--task simclr takes one micro-batch per step (no "
                                  f"accumulation: the loss couples all samples): set "
                                  f"--micro-batch to --batch-size / world = "
                                  f"{self.batch_size} / {world} = {local}, or leave it out "
                                  f"(got {self.micro_batch})")
            if local % self.virtual_devices:
                raise ConfigError(f"--virtual-devices {self.virtual_devices} must divide the "
                                  f"images per rank ({local}), so every virtual device holds "
                                  f"both views of its images")
        counts, _ = self.class_maps()
        if counts:
            need = sum(counts.values()) * (world if self.stratify_scope == "local" else 1)
            if self.stratify_scope == "local" and sum(counts.values()) >= lo // world:
                raise ConfigError(f"--stratify counts sum to {sum(counts.values())} per rank "
                                  f"(--stratify-scope local), which leaves no other sample in "
                                  f"a rank batch of {lo // world} (smallest global batch {lo} "
                                  f"/ {world} ranks): raise --min-batch-size/--batch-size")
            if need >= lo:
                raise ConfigError(f"--stratify counts take {need} samples of every global "
                                  f"batch, which leaves no other sample in the smallest batch "
                                  f"{lo} (--min-batch-size, or --batch-size when it is 0)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _convert(name: str, value: Any, from_json: bool = False) -> Any:
    """Parse `value` (a string from the command line, or a JSON value, which must already have
    the field's type; an int is accepted for a float) to the field's type."""
    if name not in _FIELDS:
        close = difflib.get_close_matches(name, _FIELDS, n=1)
        hint = f" (did you mean {_flag(close[0])}?)" if close else ""
        raise ConfigError(f"unknown config key {name!r}{hint}; see --help")
    typ = _TYPES[name]
    bad = ConfigError(f"{_flag(name)}: expected {typ.__name__}, got {value!r}")
    if from_json:
        ok = (isinstance(value, typ) and not (typ is int and isinstance(value, bool))) or (
            typ is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{_flag(name)}: expected {typ.__name__}, got {value!r} "
                              f"({type(value).__name__}) in the config file")
        return typ(value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise bad
    if typ is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise bad
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad from None
    if typ is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if not isinstance(value, str):
        raise bad
    return value


def load_config(path: str) -> dict[str, Any]:
    """A JSON object of config keys (as written to a run's config.json)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config: {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path!r} must hold a JSON object of config keys")
    return data


def parse_args(argv: Sequence[str]) -> TrainConfig:
    """`--key value` / `--key=value` pairs (and `--config FILE`) into a validated TrainConfig."""
    pairs: list[tuple[str, str]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg}: missing value")
            value = argv[i + 1]
            i += 1
        pairs.append((key.replace("-", "_"), value))
        i += 1
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key == "config":
            for k, v in load_config(value).items():
                values[k] = _convert(k, v, from_json=True)
    for key, value in pairs:
        if key != "config":
            values[key] = _convert(key, value)
    return TrainConfig(**values).validate()


def help_text() -> str:
    lines = ["usage: python -m fastnorm.train [--config FILE.json] [--key value ...]",
             "   or: torchrun --standalone --nproc_per_node=K -m fastnorm.train [...]", "",
             "Trains a small CNN on scikit-learn's 8x8 digits with DDP, the global batch size "
             "following the gradient noise scale.", "", "options (default in brackets):"]
    for f in dataclasses.fields(TrainConfig):
        choices = f.metadata.get("choices")
        extra = f" {{{','.join(choices)}}}" if choices else ""
        lines.append(f"  {_flag(f.name):18s} {f.metadata['help']}{extra} [{f.default!r}]")
    return "\n".join(lines)
