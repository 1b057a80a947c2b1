"""``padding="same"`` at stride > 1: TensorFlow's SAME, in every family, deployed and exported.

The reference is written here from TensorFlow's definition (output ``ceil(n / s)``, total
padding ``max((ceil(n / s) - 1) s + d (k - 1) + 1 - n, 0)``, the smaller half before), then an
explicit ``F.pad`` and a conv with padding 0, in float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.export import Dim

import dynaconv
from dynaconv.demo import DEMO_METHODS
from dynaconv.layers import CondConv2d, ConvSpec, DynamicGroupConv2d, SameConv2d
from dynaconv.layers.dgc.layer import gate_dense
from dynaconv.padding import same_padding


def tf_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one dimension, as its documentation states it."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def tf_pad(x: Tensor, kernel, stride, dilation) -> Tensor:
    top, bottom = tf_pads(x.shape[2], kernel[0], stride[0], dilation[0])
    left, right = tf_pads(x.shape[3], kernel[1], stride[1], dilation[1])
    return F.pad(x, (left, right, top, bottom))


@given(
    size=st.integers(1, 64),
    kernel=st.integers(1, 7),
    stride=st.integers(1, 4),
    dilation=st.integers(1, 3),
)
@settings(max_examples=300)
def test_same_padding_is_tensorflows(size, kernel, stride, dilation):
    before, after = same_padding(size, kernel, stride, dilation)
    assert (before, after) == tf_pads(size, kernel, stride, dilation)
    spec = ConvSpec.create(1, 1, kernel, stride, "same", dilation)
    assert spec.output_size(size, size) == (math.ceil(size / stride),) * 2


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_stride_one_is_torchs_same_and_static():
    spec = ConvSpec.create(2, 2, (4, 3), 1, "same", (1, 2))
    assert not spec.dynamic_padding
    assert spec.explicit_padding() == (2, 2, 1, 2)  # nn.Conv2d puts the odd one after
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    conv = nn.Conv2d(2, 2, (4, 3), padding="same", dilation=(1, 2), dtype=torch.float64)
    torch.testing.assert_close(spec.conv2d(x, conv.weight, conv.bias), conv(x))


def test_dynamic_padding_needs_the_input_size():
    spec = ConvSpec.create(2, 2, 3, 2, "same")
    assert spec.dynamic_padding and spec.pads_explicitly
    with pytest.raises(ValueError, match="height and width"):
        spec.explicit_padding()
    assert spec.explicit_padding(224, 225) == (1, 1, 0, 1)


geometry = st.fixed_dictionaries(
    {
        "kernel": st.tuples(st.integers(1, 5), st.integers(1, 5)),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "size": st.tuples(st.integers(4, 11), st.integers(4, 11)),
        "batch": st.integers(1, 3),
        "seed": st.integers(0, 2**16),
    }
)


@given(geometry, st.integers(1, 3), st.booleans())
def test_same_conv2d_equals_pad_then_conv(cfg, groups, bias):
    torch.manual_seed(cfg["seed"])
    conv = SameConv2d(
        2 * groups,
        3 * groups,
        cfg["kernel"],
        cfg["stride"],
        cfg["dilation"],
        groups,
        bias,
        dtype=torch.float64,
    )
    x = torch.randn(cfg["batch"], 2 * groups, *cfg["size"], dtype=torch.float64)
    padded = tf_pad(x, cfg["kernel"], cfg["stride"], cfg["dilation"])
    expected = F.conv2d(padded, conv.weight, conv.bias, cfg["stride"], 0, cfg["dilation"], groups)
    torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)
    assert conv.padding == "same" and set(conv.state_dict()) == set(
        nn.Conv2d(2, 3, 1, bias=bias).state_dict()
    )


# --------------------------------------------------------------------------- every family


def _build(method: str, cfg: dict, padding, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layer = dynaconv.layer_class(method)(
        8,
        8,
        cfg["kernel"],
        cfg["stride"],
        padding,
        cfg["dilation"],
        dtype=torch.float64,
        **DEMO_METHODS[method],
    )
    dynaconv.set_progress(layer, 0.8)
    return layer


def _perturbed(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return layer


def _dgc_reference(layer: DynamicGroupConv2d, x: Tensor, cfg) -> Tensor:
    """DGC from its definition: gate with the saliency of ``x``, each head convolves its
    gated copy (padded explicitly), outputs interleaved."""
    gated = gate_dense(layer.saliency(x), layer.inactive_channels)
    heads, outputs = layer.heads, []
    for head in range(heads):
        copy_ = tf_pad(
            x * gated[:, head, :, None, None], cfg["kernel"], cfg["stride"], cfg["dilation"]
        )
        outputs.append(
            F.conv2d(copy_, layer.weight[head::heads], None, cfg["stride"], 0, cfg["dilation"])
        )
    out = torch.stack(outputs, 2).flatten(1, 2)  # channel j * h + i from head i
    return out if layer.bias is None else out + layer.bias[:, None, None]


@pytest.mark.parametrize("method", sorted(dynaconv.METHODS))
@given(cfg=geometry)
@settings(max_examples=10)
def test_every_family_pads_like_tensorflow(method, cfg):
    layer = _perturbed(_build(method, cfg, "same", cfg["seed"])).eval()
    x = torch.randn(cfg["batch"], 8, *cfg["size"], dtype=torch.float64)
    padded = tf_pad(x, cfg["kernel"], cfg["stride"], cfg["dilation"])
    with torch.no_grad():
        if method == "dgc":
            expected = _dgc_reference(layer, x, cfg)
            impls = ["dense", "sparse", "grouped"]
        else:  # the same layer without padding, on the explicitly padded input
            valid = _build(method, cfg, 0, cfg["seed"]).eval()
            valid.load_state_dict(layer.state_dict())
            if method == "condconv":
                r = layer.routing_weights(x)  # the routing sees the unpadded input
                expected = valid(padded, routing_weights=r)
            else:
                expected = valid(padded)
            impls = ["loop", "grouped", "expert_sum", "bmm", "taps"] if method == "condconv" else []
        assert_equal = dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer(x), expected, **assert_equal)
        for impl in impls:
            layer.impl = impl
            torch.testing.assert_close(layer(x), expected, **assert_equal, msg=impl)
        deployed = dynaconv.deploy(layer, example_input=x)
        torch.testing.assert_close(deployed(x), expected, **assert_equal)


def test_condconv_triton_kernel_pads_like_tensorflow():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = CondConv2d(16, 16, 3, 2, "same", num_experts=3).eval()
    x = torch.randn(2, 16, 7, 8)
    if not dynaconv.kernels.triton_usable(x):
        pytest.skip("Triton cannot run on CPU tensors here (no interpreter)")
    with torch.no_grad():
        expected = CondConv2d(16, 16, 3, 2, 0, num_experts=3)
        expected.load_state_dict(layer.state_dict())
        reference = expected(
            tf_pad(x, (3, 3), (2, 2), (1, 1)), routing_weights=layer.routing_weights(x)
        )
        layer.impl = "triton"
        torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-5)


def test_training_step_through_same_padding():
    layer = _build("condconv", {"kernel": 3, "stride": 2, "dilation": 1}, "same", 0).train()
    x = torch.randn(2, 8, 9, 8, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- export


class _TwoStrided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = SameConv2d(3, 8, 3, 2)
        self.mixed = CondConv2d(8, 8, 5, 2, "same", groups=8, num_experts=3)

    def forward(self, x: Tensor) -> Tensor:
        return self.mixed(torch.relu(self.stem(x)))


def test_torch_export_keeps_the_padding_dynamic():
    model = _TwoStrided().eval()
    shapes = {
        "x": {0: Dim("batch", max=64), 2: Dim("h", min=8, max=64), 3: Dim("w", min=8, max=64)}
    }
    program = torch.export.export(model, (torch.randn(2, 3, 16, 17),), dynamic_shapes=shapes)
    for shape in [(1, 3, 16, 16), (3, 3, 17, 15), (2, 3, 9, 22)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_with_dynamic_size_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _TwoStrided().eval()
    path = tmp_path / "same.onnx"
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 16, 17),),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: Dim("batch"), 2: Dim("h", min=8), 3: Dim("w", min=8)},),
        verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 16, 16), (3, 3, 17, 15)]:
        x = torch.randn(shape)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-5, atol=1e-5)


def test_deepcopy_and_state_dict_of_same_conv():
    conv = SameConv2d(3, 4, 3, 2)
    clone = copy.deepcopy(conv)
    plain = nn.Conv2d(3, 4, 3, 2)
    plain.load_state_dict(clone.state_dict())
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(clone(x), plain(F.pad(x, (0, 1, 0, 1))))
