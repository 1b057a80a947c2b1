"""CondConv kxk layers export at the eager layer's cost: the ``"taps"`` form.

Traced, compiled or exported, a kxk CondConv used to run ``"expert_sum"`` (one conv to
``E * Cout`` channels: E times the MACs). It now runs ``"taps"``: the conv's MACs, only static
slices and batched matmuls, so a dynamic batch exports. Its equality with the per-example loop
over hypothesis shapes is in ``test_condconv.py`` (every form of ``FORMS``) and, with
TensorFlow's padding, in ``test_same_padding.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim
from torch.utils.flop_counter import FlopCounterMode

import dynaconv
from dynaconv.layers import CondConv2d
from dynaconv.layers.condconv.layer import export_form


def test_export_form_rules():
    for layer, form in [
        (CondConv2d(8, 8, 1), "bmm"),
        (CondConv2d(8, 8, 3, groups=2), "taps"),
        (CondConv2d(8, 8, 5, groups=8), "expert_sum"),  # depthwise
    ]:
        assert export_form(layer.spec, layer.weight) == form


def _layer(cin=16, cout=24, k=3, groups=1, experts=8, **kwargs) -> CondConv2d:
    torch.manual_seed(0)
    return CondConv2d(cin, cout, k, padding=k // 2, groups=groups, num_experts=experts, **kwargs)


def _flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("deployed", [False, True])
def test_exported_kxk_layer_does_the_eager_layers_macs(deployed):
    layer = _layer(bias=False).eval()
    if deployed:
        layer = layer.deploy()  # impl fixed to a batch-dependent form: replaced when exporting
    x = torch.randn(3, 16, 10, 9)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: Dim("batch", max=512)},))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("convolution" in op or "conv2d" in op for op in ops), ops
    exported = program.module()
    profile = dynaconv.profile(layer, tuple(x.shape), deployed=False)
    # FLOPs = 2 x (conv + routing + kernel mixing): profile's active MACs, not E x the conv.
    assert _flops(exported, x) == 2 * profile["macs_active"]
    expert_sum = _layer(bias=False, impl="expert_sum").eval()
    assert _flops(expert_sum, x) > 4 * _flops(exported, x)
    for batch in (1, 7):
        xb = torch.randn(batch, 16, 10, 9)
        with torch.no_grad():
            torch.testing.assert_close(exported(xb), layer(xb), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@given(
    cin_per_group=st.integers(1, 4),
    cout_per_group=st.integers(1, 4),
    groups=st.integers(1, 3),
    kernel=st.tuples(st.integers(2, 4), st.integers(1, 3)),
    stride=st.integers(1, 2),
    batch=st.integers(1, 4),
)
@settings(max_examples=10)
def test_exported_taps_equals_the_loop_in_float64(
    cin_per_group, cout_per_group, groups, kernel, stride, batch
):
    torch.manual_seed(0)
    layer = CondConv2d(
        cin_per_group * groups,
        cout_per_group * groups,
        kernel,
        stride,
        "same",
        groups=groups,
        num_experts=3,
        dtype=torch.float64,
    ).eval()
    x = torch.randn(2, layer.in_channels, 7, 8, dtype=torch.float64)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: Dim("batch", max=64)},))
    xb = torch.randn(batch, layer.in_channels, 7, 8, dtype=torch.float64)
    layer.impl = "loop"
    with torch.no_grad():
        torch.testing.assert_close(program.module()(xb), layer(xb), rtol=1e-10, atol=1e-12)


def test_onnx_export_runs_in_onnxruntime_at_another_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = nn.Sequential(_layer(16, 24, 3), nn.ReLU(), _layer(24, 24, 3, groups=3)).eval()
    path = tmp_path / "taps.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 16, 12, 11),),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: Dim("batch")},),
        verbose=False,
    )
    assert "Conv" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 16, 12, 11)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-5)


def test_compiled_layer_matches_eager():
    layer = _layer(8, 8, 3, experts=4).eval()
    x = torch.randn(3, 8, 9, 9)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# a fixed batch (the edge case): the kernel mixing and one convolution


def _conv_ops(program) -> list[str]:
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    return [op for op in ops if "convolution" in op or "conv2d" in op]


@pytest.mark.parametrize("groups", [1, 2, 16])  # 16: depthwise
@pytest.mark.parametrize("batch", [1, 3])
def test_fixed_batch_export_mixes_kernels_then_runs_one_conv(groups, batch):
    torch.manual_seed(0)
    layer = CondConv2d(16, 16, 3, padding=1, groups=groups, num_experts=4, dtype=torch.float64)
    layer = layer.eval()
    x = torch.randn(batch, 16, 7, 6, dtype=torch.float64)
    program = torch.export.export(layer, (x,))  # no dynamic batch: fixed at `batch`
    assert len(_conv_ops(program)) == 1
    pair = torch.randn(2, 16, 7, 6, dtype=torch.float64)  # batch 1 would specialise the Dim
    dynamic = torch.export.export(layer, (pair,), dynamic_shapes=({0: Dim("batch", max=64)},))
    assert len(_conv_ops(dynamic)) == (1 if groups == 16 else 0)  # expert_sum / taps
    xb = torch.randn(batch, 16, 7, 6, dtype=torch.float64)
    layer.impl = "loop"  # the reference form
    with torch.no_grad():
        torch.testing.assert_close(program.module()(xb), layer(xb), rtol=1e-10, atol=1e-12)


def test_fixed_batch_onnx_export_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = nn.Sequential(
        _layer(16, 24, 3), nn.ReLU(), _layer(24, 24, 5, groups=24), _layer(24, 8, 1)
    ).eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(model, (torch.randn(1, 16, 12, 11),), str(path), dynamo=True, verbose=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 3  # every layer: the kernel mixing (MatMul) and one Conv
    assert ops.count("MatMul") == 6  # per layer: mixing the kernels, mixing the biases
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 16, 12, 11)
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-5)
