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


def _chain_graph(channels: int, batch: int, dtype):
    """A graph with every form that :func:`rewrite_computed_convs` keeps in the blocked layout:
    computed kernels (graph inputs), SiLU, an identity Reshape, squeeze-excite (ReduceMean
    with ``keepdims``, a constant conv, Sigmoid, a per-channel Mul), a residual Add, and a
    spatial mean without ``keepdims`` as a second output."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.DOUBLE if dtype == np.float64 else TensorProto.FLOAT
    c, squeezed = channels, 4
    generator = np.random.default_rng(1)
    initializers = [
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([batch, c, 6, 5], np.int64), "same"),
        numpy_helper.from_array(
            generator.standard_normal((squeezed, c, 1, 1)).astype(dtype), "se1"
        ),
        numpy_helper.from_array(
            generator.standard_normal((c, squeezed, 1, 1)).astype(dtype), "se2"
        ),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y1"]),
        helper.make_node("Sigmoid", ["y1"], ["a1"]),
        helper.make_node("Mul", ["y1", "a1"], ["s1"]),
        helper.make_node("Reshape", ["s1", "same"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y2"], group=c, pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["y2", "axes"], ["m"], keepdims=1),
        helper.make_node("Conv", ["m", "se1"], ["e1"]),
        helper.make_node("Relu", ["e1"], ["e2"]),
        helper.make_node("Conv", ["e2", "se2"], ["e3"]),
        helper.make_node("Sigmoid", ["e3"], ["g"]),
        helper.make_node("Mul", ["y2", "g"], ["z"]),
        helper.make_node("Conv", ["z", "w3"], ["y3"]),
        helper.make_node("Add", ["y3", "r1"], ["out"]),
        helper.make_node("ReduceMean", ["out", "axes"], ["pooled"], keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("x", elem, [batch, c, 6, 5]),
        helper.make_tensor_value_info("w1", elem, [c, c, 1, 1]),
        helper.make_tensor_value_info("w2", elem, [c, 1, 3, 3]),
        helper.make_tensor_value_info("w3", elem, [c, c, 1, 1]),
    ]
    outputs = [
        helper.make_tensor_value_info("out", elem, None),
        helper.make_tensor_value_info("pooled", elem, None),
    ]
    graph = helper.make_graph(nodes, "chain", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("batch", [1, 2])
def test_nchwc_chain_keeps_the_blocked_layout_and_equals_the_float64_graph(batch):
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    from dynaconv.onnxruntime_nchwc import NCHWC_DOMAIN, rewrite_computed_convs

    block = _block()
    channels = 2 * block
    model = _chain_graph(channels, batch, np.float32)
    chained, count = rewrite_computed_convs(model, block)
    unchained, count_unchained = rewrite_computed_convs(model, block, chain=False)
    assert count == count_unchained == 3
    ops = [(node.domain, node.op_type) for node in chained.graph.node]
    # one reorder into the blocked layout; out of it only the pooled tensors and the output
    assert ops.count((NCHWC_DOMAIN, "ReorderInput")) == 1
    assert ops.count((NCHWC_DOMAIN, "ReorderOutput")) == 3
    assert [o for o in ops if o[1] == "ReorderOutput"] == [(NCHWC_DOMAIN, "ReorderOutput")] * 3
    assert ops.count((NCHWC_DOMAIN, "GlobalAveragePool")) == 2
    assert ("", "ReduceMean") not in ops and ("", "Add") not in ops  # the Add: the conv's Sum
    convs = [n for n in chained.graph.node if n.domain == NCHWC_DOMAIN and n.op_type == "Conv"]
    assert sorted(len(conv.input) for conv in convs)[-1] == 4
    # the scale: a depthwise 1x1 conv at batch 1, a broadcast Mul per example otherwise
    assert len(convs) == 3 + (batch == 1)
    generator = np.random.default_rng(0)
    shapes = {
        "x": (batch, channels, 6, 5),
        "w1": (channels, channels, 1, 1),
        "w2": (channels, 1, 3, 3),
        "w3": (channels, channels, 1, 1),
    }
    feed64 = {name: generator.standard_normal(shape) for name, shape in shapes.items()}
    feed = {name: value.astype(np.float32) for name, value in feed64.items()}
    expected = ReferenceEvaluator(_chain_graph(channels, batch, np.float64)).run(None, feed64)
    for rewritten in (chained, unchained):
        actual = _session(rewritten.SerializeToString()).run(None, feed)
        for value, reference in zip(actual, expected, strict=True):
            assert value.shape == reference.shape
            np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2])
def test_nchwc_chain_of_condconv_blocks_equals_eager(tmp_path, batch):
    import onnx

    from dynaconv.onnxruntime_nchwc import NCHWC_DOMAIN, write_nchwc

    block = _block()
    torch.manual_seed(0)
    channels = 16 if block <= 16 else block
    model = nn.Sequential(
        CondConvMBConv(channels, channels, 3, 1, 2, 4),
        CondConvMBConv(channels, channels, 5, 1, 2, 4),
    ).eval()
    _randomise_norms(model, 3)
    model = nn.Sequential(*(layer.deploy() for layer in model)).eval()
    x = torch.randn(batch, channels, 8, 7)
    portable, chained, unchained = (tmp_path / f"{n}.onnx" for n in ("p", "c", "u"))
    torch.onnx.export(model, (x,), str(portable), dynamo=True, verbose=False)
    assert write_nchwc(portable, chained) == write_nchwc(portable, unchained, chain=False) > 0
    reorders = [
        sum(n.op_type == "ReorderInput" for n in onnx.load(str(path)).graph.node)
        for path in (chained, unchained)
    ]
    # batch 1: every conv of both blocks rewritten, one reorder into the blocked layout; batch
    # 2: only the depthwise convs (the examples folded into groups), reshaped between
    assert reorders == ([1, 6] if batch == 1 else [2, 2])
    check = torch.randn(batch, channels, 8, 7)
    with torch.no_grad():
        expected = model(check)
    for path in (chained, unchained):
        graph = onnx.load(str(path)).graph
        assert any(node.domain == NCHWC_DOMAIN for node in graph.node)
        torch.testing.assert_close(_run(_session(path), check), expected, rtol=1e-4, atol=1e-5)


def test_nchwc_chain_leaves_an_operator_that_only_plain_readers_need():
    import numpy as np
    from onnx import TensorProto, helper

    from dynaconv.onnxruntime_nchwc import rewrite_computed_convs

    block = _block()
    channels = block
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["y"]),
            helper.make_node("Sigmoid", ["x"], ["s"]),  # read plain only: stays plain
        ],
        "plain_reader",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 4, 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [channels, channels, 1, 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    rewritten, count = rewrite_computed_convs(model, block)
    assert count == 1
    ops = [(node.domain, node.op_type, list(node.input)) for node in rewritten.graph.node]
    assert ("", "Sigmoid", ["x"]) in ops
    assert [op[1] for op in ops].count("ReorderOutput") == 1
    generator = np.random.default_rng(2)
    feed = {
        "x": generator.standard_normal((1, channels, 4, 3), dtype=np.float32),
        "w": generator.standard_normal((channels, channels, 1, 1), dtype=np.float32),
    }
    expected = _session(model.SerializeToString()).run(None, feed)
    actual = _session(rewritten.SerializeToString()).run(None, feed)
    for value, reference in zip(actual, expected, strict=True):
        np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-5)
