"""The dense-network blocks shared by CondenseNet and DyDenseNet (models/_blocks.py).

The networks built from them are checked number for number against the reference code in
tests/test_condensenet.py and tests/test_dgc.py; these tests pin the blocks' own contract.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dynaconv.models import _blocks, condensenet, dydensenet
from dynaconv.models._blocks import DenseLayer, dense_features, init_dense_weights


def _plain_dense_layer(in_channels: int, growth: int) -> DenseLayer:
    return DenseLayer(in_channels, growth, nn.Conv2d(in_channels, 4 * growth, 1, bias=False), 2)


def test_dense_features_names_and_channels():
    torch.manual_seed(0)
    features, channels = dense_features([2, 3], [4, 8], 2, _plain_dense_layer)
    assert channels == 2 * 4 + 2 * 4 + 3 * 8
    names = [name for name, _ in features.named_children()]
    assert names == ["init_conv", "denseblock_1", "transition_1", "denseblock_2"]
    assert [n for n, _ in features.denseblock_2.named_children()] == [
        "denselayer_1",
        "denselayer_2",
        "denselayer_3",
    ]
    assert features.denseblock_2.denselayer_3.norm_1.num_features == 8 + 8 + 2 * 8
    out = features(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, channels, 4, 4)  # stem stride 2, one 2x2 pooling transition


def test_a_transition_sets_the_channels_of_the_next_block():
    def halving(channels: int) -> tuple[nn.Module, int]:
        return nn.Conv2d(channels, channels // 2, 1), channels // 2

    features, channels = dense_features([1, 1], [4, 4], 1, _plain_dense_layer, halving)
    assert features.transition_1.in_channels == 12 and features.transition_1.out_channels == 6
    assert features.denseblock_2.denselayer_1.norm_1.num_features == 6
    assert channels == 10


def test_init_dense_weights_is_the_reference_init():
    class SelfInit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def reset_parameters(self) -> None:
            self.calls += 1

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(64, 256, 3), nn.BatchNorm2d(256), SelfInit(), nn.Linear(256, 10)
    )
    nn.init.uniform_(model[1].weight)
    nn.init.uniform_(model[1].bias)
    init_dense_weights(model, self_initialised=(SelfInit,))
    std = model[0].weight.std().item()
    assert math.isclose(std, math.sqrt(2.0 / (3 * 3 * 256)), rel_tol=0.02)
    assert abs(model[0].weight.mean().item()) < 0.05 * std
    assert torch.equal(model[1].weight, torch.ones(256))
    assert torch.equal(model[1].bias, torch.zeros(256))
    assert model[2].calls == 1
    assert torch.equal(model[3].bias, torch.zeros(10))


def test_both_dense_networks_share_the_dense_layer():
    assert condensenet.DenseLayer is dydensenet.DenseLayer is _blocks.DenseLayer
    assert issubclass(condensenet.CondenseLayer, DenseLayer)
    assert issubclass(dydensenet.DyDenseLayer, DenseLayer)
