"""DO-Conv: reference fixtures, deploy exactness, eval forward, errors, convert."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dynaconv
from conftest import assert_close64, load_fixture
from dynaconv import DOConv2d
from dynaconv.compat import layer_from_reference

FIXTURE_NAMES = ["conv1x1", "conv3x3_bias", "depthwise", "grouped_stride2_dmul12", "rect3x5"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_matches_reference_fixture(name):
    data = load_fixture("doconv", f"{name}.pt")
    layer = layer_from_reference("doconv", data["config"], data["state_dict"]).double().eval()
    x = data["x"].double()
    assert_close64(layer(x), data["y"])
    assert_close64(layer.weight, data["fused_weight"])
    deployed = layer.deploy()
    assert type(deployed) is nn.Conv2d
    assert_close64(deployed(x), data["y"])
    layer.train()
    assert_close64(layer(x), data["y"])


def test_reference_prefix_and_bias_default():
    data = load_fixture("doconv", "depthwise.pt")
    prefixed = {f"module.{k}": v for k, v in data["state_dict"].items()}
    layer = layer_from_reference("doconv", data["config"], prefixed)
    assert layer.bias is None


conv_configs = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 2, 4]),
        "cin_per_group": st.integers(1, 3),
        "cout_per_group": st.integers(1, 3),
        "kernel": st.tuples(st.integers(1, 4), st.integers(1, 4)),
        "stride": st.integers(1, 2),
        "dilation": st.integers(1, 2),
        "extra_dmul": st.integers(0, 5),
        "bias": st.booleans(),
        "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
        "same": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def _layer_from(cfg) -> DOConv2d:
    kh, kw = cfg["kernel"]
    same = cfg["same"] and cfg["stride"] == 1
    d_mul = None if kh * kw == 1 else kh * kw + cfg["extra_dmul"]
    torch.manual_seed(cfg["seed"])
    layer = DOConv2d(
        cfg["cin_per_group"] * cfg["groups"],
        cfg["cout_per_group"] * cfg["groups"],
        (kh, kw),
        stride=cfg["stride"],
        padding="same" if same else (kh // 2, kw // 2),
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        bias=cfg["bias"],
        padding_mode=cfg["padding_mode"],
        D_mul=d_mul,
        dtype=torch.float64,
    )
    if layer.D is not None:
        with torch.no_grad():
            layer.D.normal_()  # a trained D: not the zero initialisation
    return layer


@given(conv_configs)
def test_deploy_is_exact(cfg):
    layer = _layer_from(cfg)
    x = torch.randn(2, layer.in_channels, 9, 8, dtype=torch.float64)
    deployed = layer.deploy()
    assert isinstance(deployed, nn.Conv2d) and deployed.groups == layer.groups
    torch.testing.assert_close(deployed(x), layer(x), rtol=1e-10, atol=1e-12)


@given(conv_configs)
def test_equals_reference_einsum(cfg):
    """The effective kernel follows the formula of docs/methods.md (reference grouped indexing)."""
    layer = _layer_from(cfg)
    cout, cin, g = layer.out_channels, layer.in_channels, layer.groups
    kh, kw = layer.kernel_size
    if layer.D is None:
        expected = layer.W.reshape(cout, cin // g, kh, kw)
    else:
        d = layer.D + layer.D_diag
        w = layer.W.reshape(cout // g, cin, layer.D_mul)
        k = torch.zeros(cout // g, cin, kh * kw, dtype=torch.float64)
        for o in range(cout // g):
            for i in range(cin):
                k[o, i] = d[i] @ w[o, i]
        expected = k.reshape(cout, cin // g, kh, kw)
    torch.testing.assert_close(layer.weight, expected, rtol=1e-12, atol=1e-12)


@given(conv_configs)
def test_from_conv_starts_equal(cfg):
    reference = _layer_from(cfg).deploy()
    with torch.no_grad():
        reference.weight.normal_()
    layer = DOConv2d.from_conv(reference, D_mul=None)
    x = torch.randn(2, reference.in_channels, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-10, atol=1e-12)


def test_eval_forward_follows_weight_changes():
    # No cached kernel: every way of editing the weights is covered in test_layer_inputs.py.
    layer = DOConv2d(4, 6, 3, padding=1, dtype=torch.float64).eval()
    with torch.no_grad():
        layer.D.normal_()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(layer(x), first)
        layer.D.add_(0.5)  # an optimizer step or load_state_dict changes weights in place
        second = layer(x)
    torch.testing.assert_close(second, layer.deploy()(x))
    assert not torch.allclose(first, second)


def test_kernel_cached_in_inference_mode_serves_input_gradients():
    layer = DOConv2d(4, 6, 3, padding=1, dtype=torch.float64).eval().requires_grad_(False)
    with torch.no_grad():
        layer.D.normal_()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.inference_mode():
        layer(x)  # caches the fused kernel
    x.requires_grad_(True)
    layer(x).square().sum().backward()  # frozen weights, gradient w.r.t. the input
    deployed = layer.deploy().requires_grad_(False)
    x_ref = x.detach().requires_grad_(True)
    deployed(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_eval_mode_with_grad_still_trains():
    layer = DOConv2d(4, 6, 3, padding=1).eval()
    layer(torch.randn(2, 4, 8, 8)).square().sum().backward()
    assert layer.D.grad is not None and layer.D.grad.abs().sum() > 0
    assert layer.W.grad is not None


def test_state_dict_round_trip():
    layer = DOConv2d(4, 8, 3, padding=1, D_mul=11)
    with torch.no_grad():
        layer.D.normal_()
    state = layer.state_dict()
    assert set(state) == {"W", "D", "bias"}  # D_diag is a constant, not saved
    clone = DOConv2d(4, 8, 3, padding=1, D_mul=11)
    clone.load_state_dict(state)
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(clone(x), layer(x))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 3, "D_mul": 8}, "D_mul"),
        ({"kernel_size": 1, "D_mul": 4}, "D_mul"),
        ({"kernel_size": 3, "groups": 3}, "divisible by groups"),
        ({"kernel_size": 3, "padding_mode": "mirror"}, "padding_mode"),
        ({"kernel_size": 3, "stride": 2, "padding": "same"}, "same"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": 3, "padding": "full"}, "padding"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DOConv2d(4, 8, **kwargs)


def test_wrong_input_gives_clear_error():
    layer = DOConv2d(4, 8, 3)
    with pytest.raises(ValueError, match="4 input channels"):
        layer(torch.randn(1, 5, 8, 8))


def test_compile_matches_eager():
    model = dynaconv.convert(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)), "doconv"
    )
    for layer in model.modules():
        if isinstance(layer, DOConv2d):
            nn.init.normal_(layer.D)
    x = torch.randn(2, 3, 10, 10)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@given(conv_configs)
def test_kernel_gradients_match_einsum(cfg):
    """The one-node kernel composition has the einsum's gradients (custom backward)."""
    layer = _layer_from(cfg)
    if layer.D is None:
        return
    g = layer.groups
    w_view = layer.W.reshape(layer.out_channels // g, layer.in_channels, layer.D_mul)
    reference = torch.einsum("ims,ois->oim", layer.D + layer.D_diag, w_view).reshape(
        layer.weight.shape
    )
    upstream = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, (layer.W, layer.D), upstream)
    actual = torch.autograd.grad(layer.weight, (layer.W, layer.D), upstream)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
