"""syncbn: synchronized BatchNorm that is exact on every backend, and a DDP trainer around it."""

from syncbn.batchnorm import GhostBatchNorm, SyncBatchNorm, bn_groups, convert_sync_batchnorm, revert_sync_batchnorm
from syncbn.join import join, joinable
from syncbn.precise import precise_bn

__all__ = ["GhostBatchNorm", "SyncBatchNorm", "bn_groups", "convert_sync_batchnorm", "join", "joinable", "precise_bn",
           "revert_sync_batchnorm"]
