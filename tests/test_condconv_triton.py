"""CondConv's fused Triton kernel against the float64 per-example reference.

Without a GPU the kernel runs in Triton's interpreter (tiny shapes: it is slow there), where
``tl.dot`` is exact fp32, so float32 results are compared with float64 at fp32 tolerance.
With a GPU (``-m gpu``) the benchmark shapes run on CUDA, TF32 off and on.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaconv import CondConv2d
from dynaconv.kernels import triton_available, triton_usable
from dynaconv.layers.condconv import layer as condconv_layer
from dynaconv.layers.condconv.layer import condconv2d

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _reference(layer: CondConv2d, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return condconv2d(layer.spec, x.double(), layer.weight.double(), bias, r.double(), "loop")


def _triton(layer, x, r, premix):
    from dynaconv.layers.condconv.kernels import condconv_triton

    return condconv_triton(layer.spec, x, layer.weight, layer.bias, r, premix=premix)


kernel_configs = st.fixed_dictionaries(
    {
        "cin": st.integers(1, 20),
        "cout": st.integers(1, 20),
        "groups": st.sampled_from([1, 2]),
        "kernel": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "stride": st.integers(1, 2),
        "dilation": st.integers(1, 2),
        "padding_mode": st.sampled_from(["zeros", "zeros", "reflect"]),
        "bias": st.booleans(),
        "experts": st.integers(1, 4),
        "batch": st.integers(1, 2),
        "premix": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@given(kernel_configs)
@settings(max_examples=12)
def test_kernel_matches_reference(cfg):
    g = cfg["groups"]
    kh, kw = cfg["kernel"]
    torch.manual_seed(cfg["seed"])
    layer = CondConv2d(
        cfg["cin"] * g,
        cfg["cout"] * g,
        (kh, kw),
        stride=cfg["stride"],
        padding=(kh // 2, kw // 2),
        dilation=cfg["dilation"],
        groups=g,
        bias=cfg["bias"],
        padding_mode=cfg["padding_mode"],
        num_experts=cfg["experts"],
        device=DEVICE,
    )
    x = torch.randn(cfg["batch"], layer.in_channels, 6, 5, device=DEVICE)
    r = torch.rand(cfg["batch"], cfg["experts"], device=DEVICE)
    assert triton_usable(x)
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            y = _triton(layer, x, r, cfg["premix"])
    finally:
        torch.backends.cudnn.allow_tf32 = True
    torch.testing.assert_close(y.double(), _reference(layer, x, r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("blocks", "premix"),
    [
        ({"BLOCK_CO": 16, "BLOCK_P": 32, "BLOCK_K": 32, "UNROLL_E": True}, False),
        ({"BLOCK_CO": 32, "BLOCK_P": 16, "BLOCK_K": 16, "UNROLL_E": False}, True),
    ],
)
def test_kernel_block_variants(blocks, premix):
    """Other tile shapes and the unrolled expert loop (the autotuned configurations' code)."""
    from dynaconv.layers.condconv.kernels import _launch

    torch.manual_seed(3)
    layer = CondConv2d(
        21, 19, (3, 2), stride=(1, 2), padding=(1, 0), num_experts=3, device=DEVICE
    ).eval()
    x = torch.randn(1, 21, 5, 7, device=DEVICE)
    r = layer.routing_weights(x).detach()
    fc = layer.routing.fc
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            given_r = _launch(layer.spec, x, layer.weight, layer.bias, r, premix, blocks=blocks)
            routed = _launch(
                layer.spec, x, layer.weight, layer.bias, None, premix, (fc.weight, fc.bias), blocks
            )
    finally:
        torch.backends.cudnn.allow_tf32 = True
    expected = _reference(layer, x, r)
    torch.testing.assert_close(given_r.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed.double(), expected, rtol=1e-5, atol=1e-5)


def test_layer_impl_triton_forward_and_backward():
    torch.manual_seed(0)
    layer = CondConv2d(16, 16, 3, padding=1, num_experts=3, impl="triton", device=DEVICE)
    x = torch.randn(2, 16, 5, 5, device=DEVICE, requires_grad=True)
    torch.backends.cudnn.allow_tf32 = False
    try:
        y = layer(x)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    r = layer.routing_weights(x)
    torch.testing.assert_close(y.double(), _reference(layer, x, r), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    layer.impl = "loop"
    layer(x).backward(grad)
    expected = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("premix", "bias_per_expert"), [(False, True), (True, False)])
def test_layer_with_routing_in_the_kernel(premix, bias_per_expert):
    torch.manual_seed(2)
    layer = CondConv2d(
        17, 18, 3, padding=1, num_experts=5, bias_per_expert=bias_per_expert, device=DEVICE
    ).eval()
    x = torch.randn(3, 17, 5, 6, device=DEVICE)
    r = layer.routing_weights(x)
    assert layer._routing_in_kernel(x.detach()) is False  # parameters require grad
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            assert layer._routing_in_kernel(x)
            y = condconv_layer._run_triton(layer, x, None, premix=premix)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    expected = _reference_loop_with_bias(layer, x, r)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def _reference_loop_with_bias(layer, x, r):
    if layer.bias_per_expert or layer.bias is None:
        return _reference(layer, x, r)
    spec, w = layer.spec, layer.weight.double()
    y = condconv2d(spec, x.double(), w, None, r.double(), "loop")
    return y + layer.bias.double()[None, :, None, None]


def test_channels_last_input():
    torch.manual_seed(1)
    layer = CondConv2d(16, 16, 1, num_experts=2, device=DEVICE)
    x = torch.randn(2, 16, 4, 5, device=DEVICE).to(memory_format=torch.channels_last)
    r = torch.rand(2, 2, device=DEVICE)
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            y = _triton(layer, x, r, None)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    torch.testing.assert_close(y.double(), _reference(layer, x, r), rtol=1e-5, atol=1e-5)


def test_rejects_float64():
    layer = CondConv2d(4, 4, 1, num_experts=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="fp32"):
        _triton(layer, torch.randn(1, 4, 3, 3, dtype=torch.float64), torch.rand(1, 2), None)


BENCH_SHAPES = [(112, 672, 1, 14), (256, 256, 3, 14), (64, 64, 3, 56)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize(("cin", "cout", "k", "size"), BENCH_SHAPES)
@pytest.mark.parametrize("premix", [False, True])
@pytest.mark.parametrize("tf32", [False, True])
def test_gpu_kernel_on_benchmark_shapes(cin, cout, k, size, premix, tf32):
    torch.manual_seed(0)
    layer = CondConv2d(cin, cout, k, padding=k // 2, num_experts=8, device="cuda")
    x = torch.randn(8, cin, size, size, device="cuda")
    r = layer.routing_weights(x).detach()
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        with torch.no_grad():
            y = _triton(layer, x, r, premix)
    finally:
        torch.backends.cudnn.allow_tf32 = True
    expected = _reference(layer, x, r)
    tolerance = 2e-3 if tf32 else 1e-4
    torch.testing.assert_close(y.double(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_auto_picks_triton_and_half_precision():
    layer = CondConv2d(64, 64, 3, padding=1, num_experts=8, device="cuda").eval()
    x = torch.randn(4, 64, 14, 14, device="cuda")
    assert layer.inference_form(x) == "triton"
    with torch.no_grad():
        expected = _reference(layer, x, layer.routing_weights(x))
        with torch.autocast("cuda", dtype=torch.float16):
            low = layer(x)
        layer.impl = "triton"
        half = layer.half()(x.half())
    torch.testing.assert_close(low.double(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(half.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_gpu_measured_auto_choice_is_cached_and_exact():
    from dynaconv import dispatch
    from dynaconv.dispatch import clear_measured_choices, measured_choices

    clear_measured_choices()
    layer = CondConv2d(32, 48, 1, num_experts=8, device="cuda").eval()
    x = torch.randn(16, 32, 14, 14, device="cuda")
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), dispatch.measuring(True, after=0):
            y = layer(x)
            assert any(k[0] == "CondConv2d" and k[1][0] == layer.spec for k in measured_choices)
            again = layer(x)
    finally:
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cudnn.allow_tf32 = True
    expected = _reference(layer, x, layer.routing_weights(x))
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, y)
