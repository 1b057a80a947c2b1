"""DGC at a static batch of 1 on onnxruntime's blocked convolutions: the padded head-grouped
form exported under ``nchwc_export`` and the rewrite of its grouped conv
(:mod:`dynaconv.onnxruntime_nchwc`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynaconv
from conftest import assert_close64
from dynaconv import DynamicGroupConv2d
from dynaconv.layers.dgc.deployed import nchwc_export
from dynaconv.layers.dgc.functional import (
    block_rows,
    gate_dense,
    gather_width,
    head_blocked_conv,
    head_grouped_conv,
    kernel_rows,
    select_kept,
)


@given(
    block=st.sampled_from([2, 4]),
    blocks_out=st.integers(1, 2),
    heads=st.sampled_from([1, 2, 4]),
    cin=st.integers(5, 12),
    kernel=st.sampled_from([2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_head_blocked_conv_equals_the_masked_reference_float64(
    block, blocks_out, heads, cin, kernel, stride, padding, dilation, seed
):
    """The padded selection (channels of scale 0 up to a multiple of ``block``) and the kernel
    gathered from ``block_rows`` compute the masked reference's numbers."""
    torch.manual_seed(seed)
    cout = heads * block * blocks_out
    layer = DynamicGroupConv2d(
        cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, heads=heads
    ).double()
    layer.set_progress(1.0)
    layer.eval()
    kept = layer.kept_channels
    width = gather_width(kept, cin, block)
    if width % block:
        width = cin  # not a whole number of blocks: the form is not used (checked below)
    x = torch.randn(1, cin, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        g = layer.saliency(x)
        inactive = int(layer.inactive_channels)
        assert inactive == cin - kept
        expected = dynaconv.layers.dgc.functional.dense_masked_conv(
            x, layer.weight, gate_dense(g, layer.inactive_channels), layer.spec, heads
        )
        index, scale = select_kept(g, inactive, width)
        rows = block_rows(layer.weight, heads, block)
        if width % block == 0:
            actual = head_blocked_conv(x, rows, index, scale, layer.spec, heads)
            assert_close64(actual, expected, rtol=1e-12, atol=1e-13)
        portable = head_grouped_conv(
            x,
            kernel_rows(layer.weight, heads, layer.spec),
            *select_kept(g, inactive),
            layer.spec,
            heads,
        )
        assert_close64(portable, expected, rtol=1e-12, atol=1e-13)


def test_block_rows_layout():
    """Row ``i*Cin + c`` holds input channel ``c`` of head ``i``: output channel
    ``j*h + i`` (``j = blk*b + o``) at ``[blk, :, :, o]``."""
    heads, block, cin = 2, 4, 3
    weight = torch.randn(heads * block * 2, cin, 3, 3, dtype=torch.float64)
    rows = block_rows(weight, heads, block)
    assert rows.shape == (heads * cin, 2, 3, 3, block) and rows.is_contiguous()
    for i in range(heads):
        for c in range(cin):
            for j in range(weight.shape[0] // heads):
                assert torch.equal(
                    rows[i * cin + c, j // block, :, :, j % block], weight[j * heads + i, c]
                )


@pytest.mark.parametrize("block", [0, -16, True, 16.0])
def test_nchwc_export_rejects_a_bad_block(block):
    with pytest.raises(ValueError, match="block"):
        nchwc_export(block)


def _network() -> nn.Module:
    torch.manual_seed(0)
    network = nn.Sequential(
        DynamicGroupConv2d(32, 64, 3, padding=1, heads=4, gate_factor=0.45),
        nn.ReLU(),
        DynamicGroupConv2d(64, 64, 3, stride=2, padding=1, heads=4, gate_factor=0.45),
        nn.ReLU(),
        DynamicGroupConv2d(64, 32, 1, heads=2, gate_factor=0.5),  # 1x1: stays a product
    ).eval()
    dynaconv.set_progress(network, 1.0)
    return network


def test_traced_blocked_form_equals_eager_float64():
    """Traced under ``nchwc_export`` (torch.export), the batch-1 graph runs the padded form
    (and only inside the context) and equals the eager network in float64."""
    network = _network().double()
    deployed = dynaconv.deploy(network)
    x = torch.randn(1, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = network(x)
    with nchwc_export(16):
        program = torch.export.export(deployed, (x,))
    plain = torch.export.export(deployed, (x,))
    assert "permute" in str(program.graph) and str(program.graph) != str(plain.graph)
    check = torch.randn(1, 32, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close64(program.module()(x), expected, rtol=1e-12, atol=1e-13)
        assert_close64(program.module()(check), network(check), rtol=1e-12, atol=1e-13)


def test_blocked_export_runs_grouped_convs_blocked_in_onnxruntime(tmp_path):
    """``nchwc_export`` then ``write_nchwc``: each 3x3 DGC layer's gathered grouped conv runs
    onnxruntime's blocked conv, its kernel one Transpose of the gathered rows (the two
    reorderings composed), equal to eager; the portable file written under ``nchwc_export``
    is a plain graph, equal to eager too."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from dynaconv.onnxruntime_nchwc import NCHWC_DOMAIN, nchwc_block_size, write_nchwc

    block = nchwc_block_size()
    if block == 0:
        pytest.skip("onnxruntime has no NCHWc kernels on this CPU")
    network = _network()
    deployed = dynaconv.deploy(network)
    x = torch.randn(1, 32, 32, 32)
    portable, rewritten = tmp_path / "b1.onnx", tmp_path / "b1.nchwc.onnx"
    with nchwc_export(block):
        torch.onnx.export(deployed, (x,), str(portable), dynamo=True, verbose=False)
    assert write_nchwc(portable, rewritten, block) == 2
    graph = onnx.load(str(rewritten)).graph
    convs = [n for n in graph.node if n.op_type == "Conv" and n.domain == NCHWC_DOMAIN]
    assert [next(a.i for a in n.attribute if a.name == "group") for n in convs] == [4, 4]
    assert not any(n.op_type == "ConvTranspose" for n in graph.node)
    producers = {out: n for n in graph.node for out in n.output}
    for conv in convs:  # kernel = Reshape(Transpose(Mul or Gather)): one reordering copy
        reshape = producers[conv.input[1]]
        assert reshape.op_type == "Reshape"
        transpose = producers[reshape.input[0]]
        assert transpose.op_type == "Transpose"
        assert producers[transpose.input[0]].op_type in ("Gather", "Mul", "Reshape")
    check = torch.randn(1, 32, 32, 32)
    with torch.no_grad():
        expected = network.double()(check.double()).float()
    for path in (portable, rewritten):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (actual,) = session.run(None, {session.get_inputs()[0].name: check.numpy()})
        torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("source_is_blocked", [False, True])
def test_nchwc_rewrite_of_a_grouped_conv_whose_kernel_is_a_transpose(source_is_blocked):
    """A grouped conv whose kernel is ``Reshape(Transpose(source))`` runs blocked with the two
    permutations composed into one ``Transpose`` (none when ``source`` is in the blocked
    layout already), equal to the plain graph; a grouped conv with any other computed kernel
    is left as it is."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from dynaconv.onnxruntime_nchwc import NCHWC_DOMAIN, rewrite_computed_convs

    block, groups, blocks_in, blocks_out = 16, 2, 2, 1
    cin, cout = groups * blocks_in * block, groups * blocks_out * block
    # source dims: blocked (g, Ob, Ib, kh, kw, bi, bo) or rows (g, Ib, bi, Ob, kh, kw, bo)
    if source_is_blocked:
        source = [groups, blocks_out, blocks_in, 3, 3, block, block]
        perm = [0, 1, 6, 2, 5, 3, 4]
    else:
        source = [groups, blocks_in, block, blocks_out, 3, 3, block]
        perm = [0, 3, 6, 1, 2, 4, 5]
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["s"], ["t"], perm=perm),
            helper.make_node("Reshape", ["t", "shape"], ["w"]),
            helper.make_node("Conv", ["x", "w"], ["y"], group=groups, pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["y", "v"], ["z"], group=groups),  # computed, not a transpose
        ],
        "grouped",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 6, 5]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, source),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [cout, cout // groups, 1, 1]),
        ],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([cout, cin // groups, 3, 3]), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    rewritten, count = rewrite_computed_convs(model, block)
    assert count == 1
    ops = [(n.domain, n.op_type) for n in rewritten.graph.node]
    assert ops.count((NCHWC_DOMAIN, "Conv")) == 1 and ops.count(("", "Conv")) == 1
    assert ops.count(("", "Transpose")) == (0 if source_is_blocked else 1)
    pytest.importorskip("onnxruntime")
    if _block_size() != block:
        pytest.skip("onnxruntime's NCHWc block on this CPU is not 16")
    import onnxruntime

    generator = np.random.default_rng(0)
    feed = {
        "x": generator.standard_normal((1, cin, 6, 5), dtype=np.float32),
        "s": generator.standard_normal(source, dtype=np.float32),
        "v": generator.standard_normal((cout, cout // groups, 1, 1), dtype=np.float32),
    }

    def run(proto):
        session = onnxruntime.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return session.run(None, feed)[0]

    f64 = {name: torch.from_numpy(value).double() for name, value in feed.items()}
    kernel = f64["s"].permute(perm).reshape(cout, cin // groups, 3, 3)
    hidden = torch.nn.functional.conv2d(f64["x"], kernel, padding=1, groups=groups)
    expected = torch.nn.functional.conv2d(hidden, f64["v"], groups=groups)
    for proto in (rewritten, model):
        actual = torch.from_numpy(run(proto)).double()
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def _block_size() -> int:
    from dynaconv.onnxruntime_nchwc import nchwc_block_size

    return nchwc_block_size()


def test_cli_export_rewrites_a_dgc_network_exported_under_nchwc_export(tmp_path):
    """``export --onnxruntime-nchwc`` rewrites, for a deployed DGC network, a second export
    made under ``nchwc_export`` (no transposed convs: the padded blocked form); a network
    without DGC layers keeps ``model.onnx`` as the source."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from dynaconv.cli.commands import _export_onnx, _nchwc_source

    if _block_size() == 0:
        pytest.skip("onnxruntime has no NCHWc kernels on this CPU")
    deployed = dynaconv.deploy(_network())
    x = torch.randn(1, 32, 32, 32)
    portable = tmp_path / "model.onnx"
    _export_onnx(deployed, x, portable, 18, None)
    source = _nchwc_source(deployed, x, portable, 18, None)
    assert source != portable and source.parent == portable.parent
    ops = {node.op_type for node in onnx.load(str(source)).graph.node}
    assert "ConvTranspose" not in ops
    assert "ConvTranspose" in {node.op_type for node in onnx.load(str(portable)).graph.node}
    plain = nn.Sequential(nn.Conv2d(32, 16, 3)).eval()
    assert _nchwc_source(plain, x, portable, 18, None) == portable


def test_nchwc_export_leaves_a_dynamic_batch_export_as_it_was():
    """Under ``nchwc_export`` a dynamic-batch export runs the batch-independent masked form
    (the padded form is for a static batch of 1) and equals eager."""
    network = _network()
    deployed = dynaconv.deploy(network)
    batch = torch.export.Dim("batch", min=1, max=8)
    x = torch.randn(2, 32, 16, 16)
    with nchwc_export(16):
        program = torch.export.export(deployed, (x,), dynamic_shapes=({0: batch},))
    check = torch.randn(3, 32, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(check), network(check), rtol=1e-5, atol=1e-5)
