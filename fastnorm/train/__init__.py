"""fastnorm.train: a thin torchrun/DDP trainer whose global batch size follows the gradient
noise scale. Run it with `python -m fastnorm.train` (or under torchrun); see README.md.

Modules: config (TrainConfig, flags), dist (process group, the GNS communication hook), data
(digits, DistributedBatchSampler), model (SmallCNN), controller (BatchSizeController),
checkpoint, report (progress, metrics.jsonl, plots), loop (train), sampler
(StratifiedBatchSampler: --stratify/--imbalance/--importance-weights) and simclr (--task simclr,
--virtual-devices)."""
from ..gns import GNSEstimator
from .config import ConfigError, TrainConfig, parse_args
from .controller import BatchSizeController
from .data import DistributedBatchSampler, make_batch_sampler
from .dist import GNSHook
from .loop import train
from .sampler import StratifiedBatchSampler

__all__ = ["TrainConfig", "ConfigError", "parse_args", "BatchSizeController", "GNSEstimator",
           "GNSHook", "DistributedBatchSampler", "StratifiedBatchSampler", "make_batch_sampler",
           "train"]
