"""convert_sync_batchnorm and revert_sync_batchnorm: what they swap, what they keep, what they refuse."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

from syncbn import GhostBatchNorm, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm


def test_convert_and_revert_keep_parameters_buffers_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3)),
        nn.BatchNorm3d(3, affine=False, momentum=None),
    )
    model[1].eval()
    before = {name: t for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    inputs = [torch.randn(4, 3), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 2, 2, 2)]
    layers = [model[0], model[1][0], model[1][1], model[2]]
    expected = [layer(x) for layer, x in zip(layers, inputs[:2])]

    converted = convert_sync_batchnorm(model)
    layers = [converted[0], converted[1][0], converted[1][1], converted[2]]
    assert all(type(layer) is SyncBatchNorm for layer in layers)
    assert [layer.training for layer in layers] == [True, False, False, True]
    assert (layers[2].momentum, layers[3].affine, layers[3].momentum) == (0.1, False, None)
    after = dict(itertools.chain(converted.named_parameters(), converted.named_buffers()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert torch.equal(layers[1](inputs[1]), expected[1])
    for layer, x in zip(layers, inputs):
        layer(x)

    reverted = revert_sync_batchnorm(converted)
    assert [type(m) for m in (reverted[0], reverted[1][0], reverted[1][1], reverted[2])] == [
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm3d]
    restored = dict(itertools.chain(reverted.named_parameters(), reverted.named_buffers()))
    assert all(restored[k] is before[k] for k in before)
    reverted[0].eval()
    layers[0].eval()
    x = torch.randn(4, 3)
    assert torch.equal(reverted[0](x), layers[0](x))


def test_convert_hands_the_process_group_to_every_layer_and_leaves_ghost_batchnorm_alone():
    group = object()  # stands for a ProcessGroup: convert only passes it on
    ghost = GhostBatchNorm(3, slices=2)
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(nn.BatchNorm2d(3)), ghost), group)
    assert [model[0].process_group, model[1][0].process_group] == [group, group]
    assert model[2] is ghost, "GhostBatchNorm emulates per-rank BN on purpose"
    reverted = revert_sync_batchnorm(model)
    assert [type(m) for m in (reverted[0], reverted[1][0], reverted[2])] == [nn.BatchNorm1d, nn.BatchNorm2d, GhostBatchNorm]


def test_revert_needs_a_known_shape():
    with pytest.raises(ValueError, match="run one forward pass first"):
        revert_sync_batchnorm(SyncBatchNorm(3))
    saw_6d = SyncBatchNorm(3)
    saw_6d(torch.randn(2, 3, 2, 1, 1, 2))
    with pytest.raises(ValueError, match="^no plain torch BatchNorm takes the 6D input this SyncBatchNorm last saw$"):
        revert_sync_batchnorm(saw_6d)
