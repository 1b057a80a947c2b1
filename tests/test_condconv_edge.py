"""CondConv at the edge: a fixed-batch export where every layer is the kernel mixing and one
conv, onnxruntime's blocked kernels for the computed kernels (:mod:`dynaconv.onnxruntime_nchwc`)
and EfficientNet-CondConv's deployment with each BatchNorm folded into its conv."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynaconv
from dynaconv.layers import CondConv2d
from dynaconv.models.efficientnet_condconv import CondConvMBConv, fold_norm


def _conv_ops(program) -> list[str]:
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    return [op for op in ops if "convolution" in op or "conv2d" in op]


@pytest.mark.parametrize("batch", [1, 3])
def test_fixed_batch_1x1_layer_is_one_conv_with_its_shared_bias(batch):
    torch.manual_seed(0)
    layer = CondConv2d(8, 12, 1, num_experts=4, bias_per_expert=False, dtype=torch.float64)
    layer = layer.eval()
    x = torch.randn(batch, 8, 5, 6, dtype=torch.float64)
    program = torch.export.export(layer, (x,))
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert len(_conv_ops(program)) == 1
    assert not any("add" in op for op in ops), ops  # the bias is the conv's own
    xb = torch.randn(batch, 8, 5, 6, dtype=torch.float64)
    layer.impl = "loop"
    with torch.no_grad():
        torch.testing.assert_close(program.module()(xb), layer(xb), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# BatchNorm folded into EfficientNet-CondConv's convs


def _randomise_norms(module: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            shape = norm.running_mean.shape
            norm.running_mean.copy_(torch.randn(shape, generator=generator))
            norm.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            norm.weight.data.copy_(torch.randn(shape, generator=generator))
            norm.bias.data.copy_(torch.randn(shape, generator=generator))


@given(
    expand_ratio=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    kernel=st.sampled_from([3, 5]),
    experts=st.sampled_from([None, 1, 3]),
    padding=st.sampled_from(["symmetric", "same"]),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=15, deadline=None)
def test_deployed_block_folds_every_norm_and_equals_eval_in_float64(
    expand_ratio, stride, kernel, experts, padding, batch, seed
):
    torch.manual_seed(seed)
    block = CondConvMBConv(4, 6, kernel, stride, expand_ratio, experts, padding=padding)
    block = block.double().eval()
    _randomise_norms(block, seed)
    deployed = block.deploy()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(batch, 4, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), block(x), rtol=1e-10, atol=1e-12)
        if experts:  # the batch-folded form, which the fixed-batch export runs
            for layer in deployed.modules():
                if isinstance(layer, CondConv2d):
                    layer.impl = "batch_grouped"
            torch.testing.assert_close(deployed(x), block(x), rtol=1e-10, atol=1e-12)


def test_fold_norm_keeps_a_condconv_with_per_expert_biases_and_rejects_other_modules():
    layer = CondConv2d(4, 4, 1, num_experts=2, bias=True).eval()  # per-expert biases
    norm = nn.BatchNorm2d(4).eval()
    assert fold_norm(layer, norm) is None
    with pytest.raises(ValueError, match="conv must be"):
        fold_norm(nn.Linear(4, 4), norm)
    with pytest.raises(ValueError, match="norm must be"):
        fold_norm(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))


def test_deployed_network_has_no_batchnorm_in_its_blocks():
    torch.manual_seed(0)
    model = dynaconv.models.efficientnet_b0_condconv4(num_classes=10).eval()
    _randomise_norms(model, 1)
    deployed = dynaconv.deploy(model, input_shape=(2, 3, 64, 64))  # verifies the outputs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.blocks.modules())


# ------------------------------------------------------------------------------------------
# onnxruntime's blocked kernels for computed kernels


def _block() -> int:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dynaconv.onnxruntime_nchwc import nchwc_block_size

    block = nchwc_block_size()
    if block == 0:
        pytest.skip("onnxruntime has no NCHWc kernels on this CPU")
    return block


def _session(model):
    """A session of an ONNX file (path) or of a serialised model (bytes)."""
    import onnxruntime

    model = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])


def _run(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("batch", [1, 2])
def test_nchwc_rewrite_of_a_fixed_batch_export_equals_eager(tmp_path, batch):
    import onnx

    from dynaconv.onnxruntime_nchwc import NCHWC_DOMAIN, write_nchwc

    block = _block()
    torch.manual_seed(0)
    model = nn.Sequential(
        CondConv2d(32, 32, 3, padding=1, num_experts=4),  # groups 1
        nn.ReLU(),
        CondConv2d(32, 32, 5, padding=2, groups=32, num_experts=4),  # depthwise
        CondConv2d(32, 16, 1, num_experts=4, bias_per_expert=False),  # 1x1, shared bias
        CondConv2d(16, 8, 1, num_experts=4),  # 8 output channels: a block of 8 only
    ).eval()
    x = torch.randn(batch, 32, 9, 10)
    portable, rewritten = tmp_path / "fixed.onnx", tmp_path / "nchwc.onnx"
    torch.onnx.export(model, (x,), str(portable), dynamo=True, verbose=False)
    count = write_nchwc(portable, rewritten)
    # batch 1: every layer whose channels fill whole blocks; batch 2 folds the examples into
    # conv groups, which leaves the depthwise layer as the only one the blocked conv runs
    assert count == (3 + (block <= 8) if batch == 1 else 1)
    graph = onnx.load(str(rewritten)).graph
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert sum(node.domain == NCHWC_DOMAIN for node in convs) == count
    assert not any(node.op_type == "Transpose" for node in graph.node)  # banks reordered offline
    check = torch.randn(batch, 32, 9, 10)
    with torch.no_grad():
        expected = model(check)
    actual = _run(_session(rewritten), check)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual, _run(_session(portable), check), rtol=1e-5, atol=1e-6)


def test_nchwc_rewrite_reorders_a_kernel_that_is_a_graph_input():
    import numpy as np
    from onnx import TensorProto, helper

    from dynaconv.onnxruntime_nchwc import rewrite_computed_convs

    block = _block()
    channels = 2 * block
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["y"], group=channels, pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["y", "v"], ["z"]),
        ],
        "computed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 5]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [channels, 1, 3, 3]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [block, channels, 1, 1]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    rewritten, count = rewrite_computed_convs(model, block)
    assert count == 2
    assert [n.op_type for n in rewritten.graph.node].count("Transpose") == 2
    generator = np.random.default_rng(0)
    feed = {
        "x": generator.standard_normal((1, channels, 6, 5), dtype=np.float32),
        "w": generator.standard_normal((channels, 1, 3, 3), dtype=np.float32),
        "v": generator.standard_normal((block, channels, 1, 1), dtype=np.float32),
    }
    plain = _session(model.SerializeToString()).run(None, feed)[0]
    blocked = _session(rewritten.SerializeToString()).run(None, feed)[0]
    np.testing.assert_allclose(blocked, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [0, -16, True, 16.0])
def test_nchwc_rewrite_rejects_a_bad_block(block):
    pytest.importorskip("onnx")
    from onnx import helper

    from dynaconv.onnxruntime_nchwc import rewrite_computed_convs

    with pytest.raises(ValueError, match="block must be a positive int"):
        rewrite_computed_convs(helper.make_model(helper.make_graph([], "g", [], [])), block)
