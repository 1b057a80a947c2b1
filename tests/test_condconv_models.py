"""CondConv networks (EfficientNet-B0 CondConv) and export of CondConv models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

import dynaconv
from dynaconv import CondConv2d
from dynaconv.models import create_model
from dynaconv.models.efficientnet_condconv import (
    CondConvMBConv,
    efficientnet_b0_condconv4,
    efficientnet_b0_condconv8,
    efficientnet_b0_depth_condconv8,
    efficientnet_condconv,
)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("builder", "millions"),
    [
        (efficientnet_b0_condconv4, 13.3),
        (efficientnet_b0_condconv8, 24.0),
        (efficientnet_b0_depth_condconv8, 39.7),
    ],
)
def test_parameter_counts_match_the_paper(builder, millions):
    model = builder()
    assert round(_params(model) / 1e6, 1) == millions
    condconv = [m for m in model.modules() if isinstance(m, CondConv2d)]
    assert condconv and all(m.shared_routing for m in condconv)


def test_plain_b0_equals_torchvision_layout():
    from torchvision.models import efficientnet_b0

    assert _params(efficientnet_condconv(None)) == _params(efficientnet_b0()) == 5_288_548


def test_registry_and_small_forward():
    model = create_model("efficientnet_b0_condconv4", num_classes=7, dropout=0.1)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.1
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        one = model(x[1:])
    assert y.shape == (2, 7)
    torch.testing.assert_close(one, y[1:], rtol=1e-4, atol=1e-5)  # per-example routing
    with pytest.raises(ValueError, match="num_experts"):
        efficientnet_condconv(0)


def test_block_routing_is_shared_and_computed_on_the_block_input():
    torch.manual_seed(0)
    block = CondConvMBConv(8, 8, 3, 1, 2, num_experts=3).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    r = block.routing(x)
    h = block.act(block.expand_norm(block.expand(x, routing_weights=r)))
    h = block.act(block.depthwise_norm(block.depthwise(h, routing_weights=r)))
    h = block.project_norm(block.project(block.se(h), routing_weights=r))
    torch.testing.assert_close(block(x), h + x)
    for impl in ("loop", "expert_sum", "bmm"):
        for layer in (block.expand, block.depthwise, block.project):
            layer.impl = impl
        torch.testing.assert_close(block(x), h + x, rtol=1e-10, atol=1e-12)


def test_profile_counts_mixing_at_small_size():
    model = efficientnet_b0_condconv4()
    profile = dynaconv.profile(model, (1, 3, 64, 64), deployed=False)
    mixing = sum(m.weight.numel() for m in model.modules() if isinstance(m, CondConv2d))
    assert profile["macs_active"] - profile["macs"] == mixing


@pytest.mark.slow
@pytest.mark.parametrize(
    ("builder", "dense", "active"),
    [
        (lambda: efficientnet_condconv(None), 385.8, 385.8),
        (efficientnet_b0_condconv4, 385.8, 396.5),
        (efficientnet_b0_condconv8, 385.8, 407.2),
        (efficientnet_b0_depth_condconv8, 569.7, 606.1),
    ],
)
def test_profile_at_224(builder, dense, active):
    """Dense convention (conv + linear MACs); the paper's counter gives 391/402/413/614M."""
    profile = dynaconv.profile(builder(), (1, 3, 224, 224), deployed=False)
    assert round(profile["macs"] / 1e6, 1) == dense
    assert round(profile["macs_active"] / 1e6, 1) == active


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        CondConv2d(4, 8, 3, padding=1, groups=2, num_experts=3),
        nn.ReLU(),
        CondConv2d(8, 6, 1, stride=2, num_experts=3),
        CondConvMBConv(6, 6, 3, 1, 4, num_experts=3),
    ).eval()


@pytest.mark.parametrize("deployed", [False, True])
def test_torch_export_dynamic_batch(deployed):
    model = _small_model()
    if deployed:  # a form fixed to "batch_grouped" (no dynamic-batch export) is replaced
        model = dynaconv.deploy(model, input_shape=(2, 4, 8, 8))
        layers = [m for m in model.modules() if isinstance(m, CondConv2d)]
        assert layers and all(m.impl == "auto" for m in layers)  # the measured choices
        for layer in layers:
            layer.impl = "batch_grouped"
    exported = torch.export.export(
        model, (torch.randn(3, 4, 8, 8),), dynamic_shapes=({0: Dim("batch", max=1024)},)
    )
    for batch in (1, 5):
        x = torch.randn(batch, 4, 8, 8)
        torch.testing.assert_close(exported.module()(x), model(x))


def test_onnx_runs_in_onnxruntime_at_another_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _small_model()
    path = tmp_path / "condconv.onnx"
    torch.onnx.export(
        model,
        (torch.randn(3, 4, 8, 8),),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: Dim("batch")},),
        verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 6):
        x = torch.randn(batch, 4, 8, 8)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), model(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_network_auto_matches_float64_reference():
    torch.manual_seed(0)
    model = efficientnet_b0_condconv8(num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    reference = efficientnet_b0_condconv8(num_classes=10).eval()
    reference.load_state_dict(model.state_dict())
    for layer in reference.modules():
        if isinstance(layer, CondConv2d):
            layer.impl = "grouped"
    with torch.no_grad():
        expected = reference.double()(x.double())
        torch.backends.cudnn.allow_tf32 = False
        try:
            actual = model.cuda()(x.cuda())
        finally:
            torch.backends.cudnn.allow_tf32 = True
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=1e-3, atol=1e-3)


def test_tensorflow_padding_and_bn_eps_options():
    model = efficientnet_condconv(4, padding="same", bn_eps=1e-5)
    assert isinstance(model.stem[0], dynaconv.layers.SameConv2d) and model.stem[1].eps == 1e-5
    strided = [
        m for m in model.modules() if isinstance(m, nn.Conv2d | CondConv2d) and m.stride != (1, 1)
    ]
    assert len(strided) == 5 and all(m.padding == "same" for m in strided)
    plain = efficientnet_condconv(4)
    plain.load_state_dict(model.state_dict())  # the options do not change the state dict
    with pytest.raises(ValueError, match="padding must be one of"):
        efficientnet_condconv(4, padding="SAME")
    with pytest.raises(ValueError, match="bn_eps must be a positive number"):
        efficientnet_condconv(4, bn_eps=0)
