"""Compatibility alias: SyncBatchNorm moved to `fastnorm.sync_batch_norm` (issue 9); this name
keeps `fastnorm.distributed.sync_batch_norm` and friends importable for existing code."""
from .sync_batch_norm import (_SyncBatchNormFunction, check_backend_device,  # noqa: F401
                              sync_batch_norm, sync_group)

__all__ = ["sync_batch_norm", "sync_group", "check_backend_device"]
