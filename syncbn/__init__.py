"""syncbn: synchronized BatchNorm that is exact on every backend, and a DDP trainer around it."""

from syncbn.batchnorm import GhostBatchNorm, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["GhostBatchNorm", "SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]
