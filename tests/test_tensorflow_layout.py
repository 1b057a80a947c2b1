"""The official TensorFlow CondConv layout loads into CondConv2d.

The reference is TensorFlow's math written out in numpy, float64, in TensorFlow's own layout
(NHWC activations, HWIO kernels flattened per expert): routing on the average-pooled input,
per-example mixed kernel and bias, SAME/VALID padding, a sum over kernel taps.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dynaconv.compat.tensorflow import condconv_from_tensorflow, routing_from_tensorflow


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _tf_pads(size: int, kernel: int, stride: int, dilation: int, padding: str) -> tuple[int, int]:
    if padding == "valid":
        return 0, 0
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def tf_condconv(x, kernel, bias, r, kernel_size, stride, dilation, padding, depthwise):
    """TensorFlow's CondConv2D / DepthwiseCondConv2D forward on NHWC ``x``, per example."""
    batch, height, width, cin = x.shape
    kh, kw = kernel_size
    mixed = r @ kernel  # (B, kh * kw * Cin * Cout-or-m)
    (top, bottom), (left, right) = (
        _tf_pads(height, kh, stride, dilation, padding),
        _tf_pads(width, kw, stride, dilation, padding),
    )
    outputs = []
    for b in range(batch):
        k = mixed[b].reshape(kh, kw, cin, -1)
        xp = np.pad(x[b], ((top, bottom), (left, right), (0, 0)))
        out_h = (xp.shape[0] - dilation * (kh - 1) - 1) // stride + 1
        out_w = (xp.shape[1] - dilation * (kw - 1) - 1) // stride + 1
        y = 0.0
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dilation, i * dilation + stride * (out_h - 1) + 1, stride)
                cols = slice(j * dilation, j * dilation + stride * (out_w - 1) + 1, stride)
                patch = xp[rows, cols, :]  # (out_h, out_w, Cin)
                if depthwise:  # output channel c * m + q reads input channel c
                    y = y + (patch[..., :, None] * k[i, j]).reshape(out_h, out_w, -1)
                else:
                    y = y + patch @ k[i, j]
        if bias is not None:
            y = y + r[b] @ bias
        outputs.append(y)
    return np.stack(outputs)


configs = st.fixed_dictionaries(
    {
        "cin": st.integers(1, 4),
        "cout_or_multiplier": st.integers(1, 3),
        "depthwise": st.booleans(),
        "kernel": st.tuples(st.integers(1, 4), st.integers(1, 4)),
        "stride": st.integers(1, 3),
        "dilation": st.integers(1, 2),
        "padding": st.sampled_from(["same", "valid", "SAME"]),
        "bias": st.booleans(),
        "own_routing": st.booleans(),
        "experts": st.integers(1, 4),
        "batch": st.integers(1, 3),
        "size": st.tuples(st.integers(7, 11), st.integers(7, 11)),
        "seed": st.integers(0, 2**16),
    }
)


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@given(cfg=configs)
@settings(max_examples=60)
def test_tensorflow_condconv_layout_loads_exactly(cfg):
    assume(cfg["stride"] == 1 or cfg["dilation"] == 1)  # TensorFlow refuses both > 1
    rng = np.random.default_rng(cfg["seed"])
    kh, kw = cfg["kernel"]
    cin, experts, per_input = cfg["cin"], cfg["experts"], cfg["cout_or_multiplier"]
    cout = cin * per_input if cfg["depthwise"] else per_input
    kernel = rng.standard_normal((experts, kh * kw * cin * per_input))
    bias = rng.standard_normal((experts, cout)) if cfg["bias"] else None
    routing_kernel, routing_bias = rng.standard_normal((cin, experts)), rng.standard_normal(experts)
    x = rng.standard_normal((cfg["batch"], *cfg["size"], cin))  # NHWC
    r = _sigmoid(x.mean(axis=(1, 2)) @ routing_kernel + routing_bias)
    mode = cfg["padding"].lower()
    expected = tf_condconv(
        x, kernel, bias, r, (kh, kw), cfg["stride"], cfg["dilation"], mode, cfg["depthwise"]
    )
    routing = {"routing_kernel": routing_kernel, "routing_bias": routing_bias}
    layer = condconv_from_tensorflow(
        kernel,
        in_channels=cin,
        kernel_size=(kh, kw),
        strides=cfg["stride"],
        padding=cfg["padding"],
        dilation_rate=cfg["dilation"],
        depthwise=cfg["depthwise"],
        condconv_bias=bias,
        **(routing if cfg["own_routing"] else {}),
    )
    assert layer.weight.dtype == torch.float64 and layer.out_channels == cout
    x_nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        if cfg["own_routing"]:
            y = layer(x_nchw)
        else:
            shared = routing_from_tensorflow(routing_kernel, routing_bias)
            y = layer(x_nchw, routing_weights=shared(x_nchw))
    actual = y.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


def test_errors_name_the_variable():
    kernel = np.zeros((2, 3 * 3 * 4 * 5))
    with pytest.raises(ValueError, match="condconv_kernel must have shape"):
        condconv_from_tensorflow(kernel, in_channels=7, kernel_size=3)
    with pytest.raises(ValueError, match="condconv_bias must have shape"):
        condconv_from_tensorflow(
            kernel, in_channels=4, kernel_size=3, condconv_bias=np.zeros((2, 4))
        )
    with pytest.raises(ValueError, match="padding must be TensorFlow's"):
        condconv_from_tensorflow(kernel, in_channels=4, kernel_size=3, padding="causal")
    with pytest.raises(ValueError, match="routing_kernel must have shape"):
        condconv_from_tensorflow(
            kernel,
            in_channels=4,
            kernel_size=3,
            routing_kernel=np.zeros((5, 2)),
            routing_bias=np.zeros(2),
        )
    with pytest.raises(ValueError, match="both routing_kernel and routing_bias"):
        condconv_from_tensorflow(
            kernel, in_channels=4, kernel_size=3, routing_kernel=np.zeros((4, 2))
        )
    with pytest.raises(ValueError, match="kernel_size"):
        condconv_from_tensorflow(kernel, in_channels=4, kernel_size=0)
