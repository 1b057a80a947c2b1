"""CondConv: reference fixtures, exact execution forms, shared routing, lifecycle, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynaconv
from conftest import assert_close64, load_fixture
from dynaconv import CondConv2d, CondConvRouting, dispatch
from dynaconv.compat import layer_from_reference
from dynaconv.layers.condconv.layer import FORMS, condconv2d, rule

FIXTURE_NAMES = ["e4_c16_32", "e8_grouped2_stride2"]
TORCH_FORMS = [f for f in FORMS if f != "triton"]


def _reference_loop(layer: CondConv2d, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The seed document's per-example loop, written out independently of the layer's forms."""
    outputs = []
    for b in range(x.shape[0]):
        kernel = sum(r[b, e] * layer.weight[e] for e in range(layer.num_experts))
        if layer.bias is None:
            bias = None
        elif layer.bias_per_expert:
            bias = sum(r[b, e] * layer.bias[e] for e in range(layer.num_experts))
        else:
            bias = layer.bias
        conv = layer.spec.make_conv(dtype=x.dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            if bias is not None:
                conv.bias.copy_(bias)
        outputs.append(conv(x[b : b + 1]))
    return torch.cat(outputs)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@pytest.mark.parametrize("impl", TORCH_FORMS)
def test_matches_reference_fixture(name, impl):
    data = load_fixture("condconv", f"{name}.pt")
    layer = layer_from_reference("condconv", data["config"], data["state_dict"]).double().eval()
    layer.impl = impl
    x = data["x"].double()
    assert_close64(layer.routing_weights(x), data["routing_weights"])
    assert_close64(layer(x), data["y"])
    assert_close64(layer(x[:1]), data["y"][:1])  # batch 1
    assert_close64(layer(x[3:4]), data["y"][3:4])
    layer.train()  # routing dropout 0: training mode computes the same
    assert_close64(layer(x), data["y"])


def test_reference_bias_is_single_and_unmixed():
    data = load_fixture("condconv", "e4_c16_32.pt")
    layer = layer_from_reference("condconv", data["config"], data["state_dict"])
    assert not layer.bias_per_expert and layer.bias.shape == (32,)
    prefixed = {f"module.{k}": v for k, v in data["state_dict"].items()}
    assert layer_from_reference("condconv", data["config"], prefixed).bias is not None
    with pytest.raises(ValueError, match="unexpected key"):
        layer_from_reference("condconv", data["config"], {**data["state_dict"], "extra": 1})
    with pytest.raises(ValueError, match="unknown reference"):
        layer_from_reference("condconv", {**data["config"], "heads": 2}, data["state_dict"])


conv_configs = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 2, 3]),
        "cin_per_group": st.integers(1, 3),
        "cout_per_group": st.integers(1, 3),
        "kernel": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "dilation": st.integers(1, 2),
        "bias": st.booleans(),
        "bias_per_expert": st.booleans(),
        "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
        "same": st.booleans(),
        "experts": st.integers(1, 4),
        "batch": st.integers(1, 3),
        "size": st.tuples(st.integers(3, 7), st.integers(3, 7)),
        "seed": st.integers(0, 2**16),
    }
)


def _layer_and_input(cfg, dtype=torch.float64) -> tuple[CondConv2d, torch.Tensor]:
    kh, kw = cfg["kernel"]
    same = cfg["same"] and cfg["stride"] == (1, 1)
    torch.manual_seed(cfg["seed"])
    layer = CondConv2d(
        cfg["cin_per_group"] * cfg["groups"],
        cfg["cout_per_group"] * cfg["groups"],
        (kh, kw),
        stride=cfg["stride"],
        padding="same" if same else (kh // 2, kw // 2),
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        bias=cfg["bias"],
        padding_mode=cfg["padding_mode"],
        num_experts=cfg["experts"],
        bias_per_expert=cfg["bias_per_expert"],
        dtype=dtype,
    )
    x = torch.randn(cfg["batch"], layer.in_channels, *cfg["size"], dtype=dtype)
    return layer, x


@given(conv_configs)
def test_all_forms_equal_the_per_example_loop(cfg):
    layer, x = _layer_and_input(cfg)
    r = layer.routing_weights(x)
    expected = _reference_loop(layer, x, r)
    for impl in TORCH_FORMS:
        layer.impl = impl
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12, msg=impl)


@given(conv_configs)
@settings(max_examples=10)
def test_gradients_equal_across_forms(cfg):
    layer, x = _layer_and_input(cfg)
    x.requires_grad_(True)
    grads = {}
    for impl in TORCH_FORMS:
        layer.impl = impl
        layer.zero_grad()
        x.grad = None
        layer(x).sin().sum().backward()
        grads[impl] = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    for impl in TORCH_FORMS[1:]:
        for a, b in zip(grads["loop"], grads[impl]):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=impl)


def test_routing_is_sigmoid_of_linear_of_pooled_input():
    routing = CondConvRouting(6, 4, dropout=0.5).double().eval()
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    expected = torch.sigmoid(x.mean((2, 3)) @ routing.fc.weight.T + routing.fc.bias)
    assert_close64(routing(x), expected)
    routing.train()
    torch.manual_seed(0)
    dropped = routing(x)
    assert not torch.allclose(dropped, expected)  # dropout on the pooled vector in training


def test_shared_routing_block():
    torch.manual_seed(0)
    routing = CondConvRouting(4, 3).double()
    first = CondConv2d(4, 8, 1, num_experts=3, shared_routing=True, dtype=torch.float64)
    second = CondConv2d(8, 8, 3, padding=1, groups=8, num_experts=3, shared_routing=True)
    second = second.double()
    assert first.routing is None and "routing.fc.weight" not in first.state_dict()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    r = routing(x)
    h = first(x, routing_weights=r)
    y = second(h, routing_weights=r)
    assert_close64(h, _reference_loop(first, x, r))
    assert_close64(y, _reference_loop(second, h, r))
    with pytest.raises(ValueError, match="shared_routing"):
        first(x)
    with pytest.raises(ValueError, match="routing_weights must have shape"):
        first(x, routing_weights=r[:, :2])


def test_routing_weights_override_own_routing():
    layer = CondConv2d(4, 5, 3, padding=1, num_experts=2, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    r = torch.rand(2, 2, dtype=torch.float64)
    assert_close64(layer(x, routing_weights=r), _reference_loop(layer, x, r))


def test_mixed_kernels():
    layer = CondConv2d(4, 6, 3, groups=2, num_experts=3, dtype=torch.float64)
    r = torch.rand(5, 3, dtype=torch.float64)
    kernels = layer.mixed_kernels(r)
    assert kernels.shape == (5, 6, 2, 3, 3)
    assert_close64(kernels[2], sum(r[2, e] * layer.weight[e] for e in range(3)))


def test_from_conv_starts_equal_and_experts_differ():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, dtype=torch.float64)
    layer = CondConv2d.from_conv(conv, num_experts=4)
    x = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(layer.weight[0], layer.weight[1])  # symmetry broken
    noiseless = CondConv2d.from_conv(conv, num_experts=1, expert_noise=0.0)
    torch.testing.assert_close(noiseless(x), conv(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="expert_noise"):
        CondConv2d.from_conv(conv, expert_noise=-1.0)
    with pytest.raises(ValueError, match="unknown CondConv option"):
        CondConv2d.from_conv(conv, heads=2)


def test_convert_resnet_starts_equal_and_trains():
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    resnet = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10).double().eval()
    model, report = dynaconv.convert(resnet, "condconv", num_experts=2, return_report=True)
    assert len(report.converted) == 12 and not report.skipped
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(model(x), resnet(x), rtol=1e-8, atol=1e-10)
    model.train()
    model(torch.cat([x, -x])).sum().backward()
    layer = model.layer1[0].conv1
    assert layer.routing.fc.weight.grad.abs().sum() > 0 and layer.weight.grad.abs().sum() > 0


def test_digits_demo_lifecycle():
    model = dynaconv.convert(dynaconv.models.DigitsCNN(), "condconv", num_experts=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for step in range(2):
        dynaconv.set_progress(model, step / 2)
        loss = nn.functional.cross_entropy(model(x), labels) + dynaconv.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(dynaconv.aux_loss(model)) == 0.0
    deployed = dynaconv.deploy(model, example_input=x)
    layers = [m for m in deployed.modules() if isinstance(m, CondConv2d)]
    assert layers and all(not m.training for m in layers)


def test_deploy_fixes_the_form_and_stays_dynamic():
    layer = CondConv2d(4, 6, 3, padding=1, num_experts=3, dtype=torch.float64)
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    deployed = layer.deploy()
    assert type(deployed) is CondConv2d and not deployed.training
    assert deployed.impl == "auto"  # the layer's measured choices, shared per shape
    assert deployed.inference_form(x) == layer.inference_form(x)
    with dispatch.measuring(False):
        assert layer.inference_form(x) == "loop"  # the rule: CPU inference, 3x3
        assert CondConv2d(4, 6, 1).inference_form(x[:, :, :1]) == "bmm"
        depthwise = CondConv2d(4, 4, 3, groups=4)
        assert depthwise.inference_form(x) == "batch_grouped"
    layer.eval()
    assert_close64(deployed(x), layer(x))
    exportable = layer.deploy(impl="expert_sum")
    assert exportable.impl == "expert_sum"
    assert_close64(exportable(x), layer(x))
    assert layer.impl == "auto"  # the original is untouched


def test_eval_forward_keeps_state():
    layer = CondConv2d(4, 6, 3, num_experts=3, routing_dropout=0.2).eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        layer(torch.randn(2, 4, 6, 6))
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_aux_loss_is_zero_and_set_progress_checks():
    layer = CondConv2d(4, 6, 3)
    assert layer.aux_loss().item() == 0.0
    layer.set_progress(0.5)
    with pytest.raises(ValueError, match="progress"):
        layer.set_progress(2.0)


def test_state_dict_round_trip():
    layer = CondConv2d(4, 8, 3, padding=1, num_experts=5)
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "routing.fc.weight", "routing.fc.bias"}
    assert state["weight"].shape == (5, 8, 4, 3, 3) and state["bias"].shape == (5, 8)
    clone = CondConv2d(4, 8, 3, padding=1, num_experts=5)
    clone.load_state_dict(state)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(clone(x), layer(x))


def test_count_macs_includes_mixing():
    layer = CondConv2d(8, 16, 3, padding=1, groups=2, num_experts=4)
    dense, active = layer.count_macs((2, 8, 5, 5), (2, 16, 5, 5))
    conv = 2 * 16 * 4 * 9 * 25
    routing = 2 * 8 * 4
    assert dense == conv + routing
    assert active == dense + 2 * 4 * (16 * 4 * 9)
    shared = CondConv2d(8, 16, 3, padding=1, groups=2, num_experts=4, shared_routing=True)
    assert shared.count_macs((2, 8, 5, 5), (2, 16, 5, 5)) == (conv, conv + 2 * 4 * 16 * 4 * 9)
    profile = dynaconv.profile(nn.Sequential(layer), (2, 8, 5, 5))
    assert (profile["macs"], profile["macs_active"]) == (dense, active)
    assert (
        profile["params"]
        == profile["params_deployed"]
        == sum(p.numel() for p in layer.parameters())
    )


def test_rule_without_measuring():
    spec = CondConv2d(16, 16, 3).spec
    cpu, f32 = torch.device("cpu"), torch.float32
    assert rule(spec, cpu, f32, train=False)[0] == "loop"  # CPU inference, kxk
    assert rule(spec, cpu, f32, train=True)[0] == "batch_grouped"
    assert rule(CondConv2d(16, 16, 1).spec, cpu, f32, train=False)[0] == "bmm"
    assert rule(CondConv2d(16, 16, 1).spec, cpu, f32, train=True)[0] == "bmm"
    assert rule(CondConv2d(16, 16, 3, groups=16).spec, cpu, f32, train=False)[0] == "batch_grouped"
    assert set(rule(spec, cpu, f32, train=False)) == set(FORMS) - {"triton"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 2.0}, "num_experts"),
        ({"num_experts": True}, "num_experts"),
        ({"routing_dropout": 1.0}, "routing_dropout"),
        ({"routing_dropout": -0.1}, "routing_dropout"),
        ({"impl": "fast"}, "impl"),
        ({"shared_routing": 1}, "shared_routing"),
        ({"bias_per_expert": "no"}, "bias_per_expert"),
        ({"groups": 3}, "divisible by groups"),
        ({"padding": "full"}, "padding"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CondConv2d(4, 8, 3, **kwargs)


def test_wrong_input_gives_clear_error():
    layer = CondConv2d(4, 8, 3)
    with pytest.raises(ValueError, match="4 input channels"):
        layer(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="impl"):
        condconv2d(layer.spec, torch.randn(1, 4, 5, 5), layer.weight, None, torch.rand(1, 8), "x")


def test_compile_matches_eager():
    model = nn.Sequential(
        CondConv2d(3, 8, 3, padding=1, num_experts=3), nn.ReLU(), CondConv2d(8, 4, 1, num_experts=3)
    )
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channels_last_and_autocast():
    layer = CondConv2d(4, 6, 3, padding=1, num_experts=3)
    x = torch.randn(2, 4, 6, 6)
    expected = layer(x)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    torch.testing.assert_close(low.float(), expected, rtol=5e-2, atol=5e-2)
