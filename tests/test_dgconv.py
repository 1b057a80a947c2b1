"""DGConv: reference fixtures, the mask against the Kronecker definition, deploy, folding, compat."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynaconv
from conftest import assert_close64, load_fixture
from dynaconv import GroupableConv2d, PermutedGroupConv2d
from dynaconv.compat import layer_from_reference, model_from_reference
from dynaconv.layers.dgconv import resource_constraint
from dynaconv.layers.dgconv.layer import binarise_gates, connectivity_mask, kronecker_order
from dynaconv.layers.dgconv.resource_constraint import ResourceConstraint, resource_constrained_loss
from dynaconv.models import GResNeXt, g_resnext50, g_resnext101

FIXTURES = ["c16_gates1010", "c32_gates00110_sort"]


def _fixture_loss(y: torch.Tensor, regulariser: torch.Tensor) -> torch.Tensor:
    return y.square().mean() + 1e-3 * regulariser  # the `loss` spelled out in the fixtures


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_reference_fixture(name):
    data = load_fixture("dgconv", f"{name}.pt")
    assert data["loss"] == "y.square().mean() + 1e-3 * u_regularizer"
    layer = layer_from_reference("dgconv", data["config"], data["state_dict"]).double()
    assert layer.impl == "auto" and layer.sort == data["config"]["sort"]
    x = data["x"].double()
    y = layer(x)
    regulariser = layer.active_connections()
    assert_close64(y, data["y"])
    assert regulariser.item() == data["u_regularizer"]
    assert layer.aux_loss().item() == data["u_regularizer"] / layer.in_channels**2
    _fixture_loss(y, regulariser).backward()
    assert_close64(layer.gate.grad, data["grad"]["gate"])
    assert_close64(layer.dense_weight.grad, data["grad"]["weight"])
    assert_close64(layer.deploy()(x), data["y"])
    with torch.no_grad():
        assert_close64(layer.eval()(x), data["y"])


def test_fixture_through_the_triton_kernel():
    """The fused kernel (Triton's interpreter on CPU) gives the reference values in float32."""
    pytest.importorskip("triton")
    data = load_fixture("dgconv", "c16_gates1010.pt")
    layer = layer_from_reference("dgconv", data["config"], data["state_dict"])
    layer.impl = "triton"
    if not dynaconv.kernels.triton_usable(layer.dense_weight):
        pytest.skip("the Triton interpreter is not active")
    y = layer(data["x"])
    _fixture_loss(y, layer.active_connections()).backward()
    tol = {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(y.double(), data["y"], **tol)
    torch.testing.assert_close(layer.gate.grad.double(), data["grad"]["gate"], **tol)
    torch.testing.assert_close(layer.dense_weight.grad.double(), data["grad"]["weight"], **tol)


def test_reference_constants_are_checked():
    data = load_fixture("dgconv", "c16_gates1010.pt")
    state = dict(data["state_dict"])
    state["I"] = torch.eye(2)
    with pytest.raises(ValueError, match="'I'"):
        layer_from_reference("dgconv", data["config"], state)
    with pytest.raises(ValueError, match="argument"):
        layer_from_reference("dgconv", {**data["config"], "groups": 2}, data["state_dict"])


# ------------------------------------------------------------------------------ the mask


def kronecker_mask(b: torch.Tensor) -> torch.Tensor:
    """The reference definition: a loop of Kronecker products of (1 - b) I + b ones."""
    mask = torch.ones(1, 1, dtype=b.dtype)
    for value in b:
        factor = (1 - value) * torch.eye(2, dtype=b.dtype) + value * torch.ones(2, 2, dtype=b.dtype)
        mask = torch.kron(mask, factor)
    return mask


gate_vectors = st.integers(1, 6).flatmap(
    lambda k: st.lists(st.sampled_from([-1.5, -0.25, 0.0, 0.3, 2.0]), min_size=k, max_size=k)
)


@given(gates=gate_vectors, sort=st.booleans(), seed=st.integers(0, 2**16))
def test_mask_equals_kronecker_product(gates, sort, seed):
    """Values and gate gradients, exactly-zero gates (b = 0.5) included."""
    gate = torch.tensor(gates, dtype=torch.float64, requires_grad=True)
    reference_gate = gate.detach().clone().requires_grad_(True)
    mask = connectivity_mask(kronecker_order(binarise_gates(gate), sort))
    expected = kronecker_mask(kronecker_order(binarise_gates(reference_gate), sort))
    torch.testing.assert_close(mask, expected, rtol=0, atol=0)
    upstream = torch.randn(
        mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    (mask * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(gate.grad, reference_gate.grad, rtol=1e-12, atol=1e-12)


def test_sorted_mask_is_contiguous_block_diagonal():
    layer = GroupableConv2d(32, 32, 1, sort=True)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.4, -0.1, 0.2, -0.6, 0.3]))
    mask = layer.mask().detach()
    assert layer.num_groups == 4
    assert torch.equal(mask, torch.block_diag(*[torch.ones(8, 8)] * 4))


def test_binarisation_compat_and_straight_through():
    gate = torch.tensor([-2.0, 0.0, 3e-9], requires_grad=True)
    b = binarise_gates(gate)
    assert b.tolist() == [0.0, 0.5, 1.0]
    (b * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert gate.grad.tolist() == [1.0, 2.0, 3.0]


def test_regulariser_counts_active_connections_and_aux_loss_is_their_fraction():
    layer = GroupableConv2d(64, 64, 3)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0]))
    count = layer.active_connections()
    assert count.item() == 2**9 == int((layer.mask() != 0).sum())
    count.backward()
    torch.testing.assert_close(layer.gate.grad, torch.full((6,), 2**9 * math.log(2)))
    layer.gate.grad = None
    fraction = layer.aux_loss()
    assert fraction.item() == 2**9 / 64**2
    fraction.backward()
    torch.testing.assert_close(layer.gate.grad, torch.full((6,), 2**9 / 64**2 * math.log(2)))
    assert dynaconv.aux_loss(nn.Sequential(layer, nn.ReLU())).item() == 2**9 / 64**2


# ------------------------------------------------------------------------------ fused kernel


def _check_kernel_against_torch(layer: GroupableConv2d, x: torch.Tensor) -> None:
    outputs, grads = [], []
    for impl in ("torch", "triton"):
        layer.impl = impl
        layer.zero_grad()
        y = layer(x)
        (y.square().mean() + 1e-3 * layer.aux_loss()).backward()
        outputs.append(y)
        grads.append((layer.gate.grad.clone(), layer.dense_weight.grad.clone()))
    # The masked kernels are bit-identical, so on CPU the outputs and weight gradients are equal
    # (cuDNN may pick non-deterministic algorithms); the gate gradients are float32 sums over
    # the whole kernel in different orders.
    exact = {"rtol": 0, "atol": 0} if x.device.type == "cpu" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(outputs[1], outputs[0], **exact)
    torch.testing.assert_close(grads[1][1], grads[0][1], **exact)
    gate_scale = float(grads[0][0].abs().max())
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-3, atol=1e-4 * gate_scale)


@pytest.mark.parametrize(
    ("gates", "kernel", "sort"),
    [
        ([0.5, 0.0, -0.2, 0.1], 3, False),
        ([0.5, 0.0, -0.2, 0.1], 3, True),
        ([-0.3, 0.2, 0.0, 0.0, -0.1], 1, True),
        ([0.0, -0.4], (1, 3), False),
    ],
)
def test_triton_kernel_matches_torch_path_interpreted(gates, kernel, sort):
    pytest.importorskip("triton")
    if torch.cuda.is_available() or not dynaconv.kernels.interpreting():
        pytest.skip("interpreter check (the GPU test covers CUDA)")
    torch.manual_seed(1)
    channels = 2 ** len(gates)
    layer = GroupableConv2d(channels, channels, kernel, padding=1, sort=sort)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor(gates))
    _check_kernel_against_torch(layer, torch.randn(2, channels, 5, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("channels", [16, 128, 256])
def test_triton_kernel_matches_torch_path_cuda(sort, channels):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(2)
    layer = GroupableConv2d(channels, channels, 3, padding=1, sort=sort).cuda()
    k = layer.num_gates
    with torch.no_grad():
        layer.gate.copy_(torch.randn(k))
        layer.gate[k // 2] = 0.0  # an exactly-zero gate (b = 0.5)
    _check_kernel_against_torch(layer, torch.randn(4, channels, 8, 8, device="cuda"))
    layer.impl = "auto"
    assert layer._weight_form() == "triton"


@pytest.mark.gpu
def test_g_resnext_training_step_triton_matches_torch_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(3)
    model = _randomise(GResNeXt([1, 1, 1, 1], cardinality=4, width_per_group=4, num_classes=5))
    model = model.cuda().train()
    x = torch.randn(2, 3, 32, 32, device="cuda")
    grads = []
    for impl in ("torch", "auto"):
        for _, layer in dynaconv.dynaconv_layers(model):
            layer.impl = impl
        model.zero_grad()
        (model(x).square().mean() + 1e-9 * dynaconv.aux_loss(model)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        scale = float(grad.abs().max()) + 1e-12
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


# ------------------------------------------------------------------------------ deploy

deploy_configs = st.fixed_dictionaries(
    {
        "gates": gate_vectors,
        "kernel": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "stride": st.integers(1, 2),
        "dilation": st.integers(1, 2),
        "bias": st.booleans(),
        "sort": st.booleans(),
        "padding_mode": st.sampled_from(["zeros", "reflect", "circular"]),
        "seed": st.integers(0, 2**16),
    }
)


def _layer(cfg) -> GroupableConv2d:
    torch.manual_seed(cfg["seed"])
    channels = 2 ** len(cfg["gates"])
    kh, kw = cfg["kernel"]
    layer = GroupableConv2d(
        channels,
        channels,
        (kh, kw),
        stride=cfg["stride"],
        padding=(kh // 2 * cfg["dilation"], kw // 2 * cfg["dilation"]),
        dilation=cfg["dilation"],
        bias=cfg["bias"],
        padding_mode=cfg["padding_mode"],
        sort=cfg["sort"],
        dtype=torch.float64,
    )
    with torch.no_grad():
        layer.gate.copy_(torch.tensor(cfg["gates"]))
    return layer


@given(deploy_configs)
def test_deploy_is_exact(cfg):
    layer = _layer(cfg)
    x = torch.randn(2, layer.in_channels, 7, 6, dtype=torch.float64)
    deployed = layer.deploy()
    zeros = sum(g < 0 for g in cfg["gates"])
    conv = deployed.conv if isinstance(deployed, PermutedGroupConv2d) else deployed
    assert type(conv) is nn.Conv2d and conv.groups == 2**zeros == layer.num_groups
    if cfg["sort"]:
        assert type(deployed) is nn.Conv2d  # contiguous groups: no permutation
    torch.testing.assert_close(deployed(x), layer(x), rtol=1e-10, atol=1e-12)
    dense, active = layer.count_macs(x.shape, layer(x).shape)
    assert active * 2**zeros == dense


def test_deploy_unsorted_needs_permutation():
    layer = GroupableConv2d(16, 16, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.3, -0.2, 0.5, -0.1]))
    deployed = layer.deploy()
    assert isinstance(deployed, PermutedGroupConv2d) and deployed.conv.groups == 4
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(deployed(x), layer(x), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ networks


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random gates and BatchNorm statistics, so folding is tested on non-trivial values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GroupableConv2d):
                module.gate.copy_(torch.randn(module.gate.shape, generator=generator))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(
                    torch.randn(module.running_mean.shape, generator=generator)
                )
                module.running_var.copy_(
                    torch.rand(module.running_var.shape, generator=generator) + 0.5
                )
    return model


def _assert_folded(deployed: nn.Module) -> None:
    from torchvision.models.resnet import Bottleneck

    assert not any(isinstance(m, GroupableConv2d | PermutedGroupConv2d) for m in deployed.modules())
    for block in deployed.modules():
        if isinstance(block, Bottleneck):
            assert type(block.conv2) is nn.Conv2d


def test_folding_in_small_g_resnext_is_exact():
    model = _randomise(GResNeXt([1, 2, 1, 1], cardinality=4, width_per_group=4, num_classes=7))
    model = model.double().eval()
    groups = [layer.num_groups for _, layer in dynaconv.dynaconv_layers(model)]
    x = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    deployed = dynaconv.deploy(model, example_input=x)
    _assert_folded(deployed)
    assert [b.conv2.groups for b in deployed.bottlenecks()] == groups
    assert len(set(groups)) > 1  # layers learned different group counts
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-10, atol=1e-10)
    again = dynaconv.deploy(deployed, example_input=x)
    torch.testing.assert_close(again(x), model(x), rtol=1e-10, atol=1e-10)


def test_fold_bottlenecks_of_converted_torchvision_resnext():
    from torchvision.models.resnet import Bottleneck, ResNet

    from dynaconv.models import fold_bottlenecks

    torch.manual_seed(0)
    resnext = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=5, groups=4, width_per_group=4)
    model = _randomise(dynaconv.convert(resnext, "dgconv")).double().eval()
    x = torch.randn(1, 3, 24, 24, dtype=torch.float64)
    expected = model(x)
    deployed = dynaconv.deploy(fold_bottlenecks(model), example_input=x)
    _assert_folded(deployed)
    torch.testing.assert_close(deployed(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_folding_in_g_resnext50_is_exact():
    torch.manual_seed(0)
    model = _randomise(g_resnext50(num_classes=10)).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    deployed = dynaconv.deploy(model, example_input=x)
    _assert_folded(deployed)
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("build", "arch"), [(g_resnext50, "g_resnext50"), (g_resnext101, "g_resnext101")]
)
def test_parameter_counts_match_reference(build, arch):
    counts = load_fixture("dgconv", "counts.pt")["counts"][arch]
    with torch.device("meta"):
        model = build()
    gates = sum(layer.gate.numel() for _, layer in dynaconv.dynaconv_layers(model))
    assert sum(p.numel() for p in model.parameters()) == counts["params"]
    assert gates == counts["gate_params"]


def _reference_state_dict(model: GResNeXt) -> dict[str, torch.Tensor]:
    """``model``'s weights under the reference's key names (what its checkpoints hold)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("conv2.dense_weight"):
            prefix = key[: -len("dense_weight")]
            state[prefix + "conv.weight"] = value
            state[prefix + "D"] = torch.eye(2)
            state[prefix + "I"] = torch.ones(2, 2)
        else:
            state[key] = value
    return state


def test_g_resnext_from_reference_state_dict():
    with torch.device("meta"):
        model = g_resnext50(num_classes=10)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.02, 0.02, generator=generator)
    model = _randomise(model).eval()
    loaded = model_from_reference("g_resnext50", {}, _reference_state_dict(model)).eval()
    assert type(loaded) is GResNeXt
    assert loaded.fc.out_features == 10
    assert list(loaded.state_dict()) == list(model.state_dict())
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------ resource objective


def _toy(gates: list[list[float]]) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [
        GroupableConv2d(2 ** len(g), 2 ** len(g), 3, padding=1, stride=s)
        for g, s in zip(gates, (1, 2))
    ]
    with torch.no_grad():
        for layer, g in zip(layers, gates):
            layer.gate.copy_(torch.tensor(g))
    return nn.Sequential(layers[0], nn.Conv2d(8, 16, 1), layers[1])


def test_resource_cost_params_and_macs():
    model = _toy([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0, 1.0]])
    params = ResourceConstraint(model, 0.5, "params")
    assert params.dense == 8 * 8 * 9 + 16 * 16 * 9
    assert params.cost().item() == 2**5 * 9 + 2**6 * 9  # active connections x kernel
    macs = ResourceConstraint(model, 0.5, "macs", input_shape=(8, 10, 10))
    assert macs.dense == 8 * 8 * 9 * 100 + 16 * 16 * 9 * 25
    assert macs.cost().item() == 2**5 * 9 * 100 + 2**6 * 9 * 25


def test_resource_constrained_loss_scales_only_over_budget():
    model = _toy([[1.0, -1.0, 1.0], [-1.0, -1.0, 1.0, 1.0]])
    loss = torch.tensor(2.0)
    fraction = (2**5 * 9 + 2**6 * 9) / (8 * 8 * 9 + 16 * 16 * 9)
    assert resource_constrained_loss(loss, model, budget=fraction).item() == 2.0
    over = resource_constrained_loss(loss, model, budget=fraction / 4)
    torch.testing.assert_close(over, loss * 4**0.02)


def test_resource_constraint_gradient_reduces_cost():
    model = _toy([[1e-3, 2e-3, 3e-3], [1e-3, 2e-3, 3e-3, 4e-3]])
    constraint = ResourceConstraint(model, 0.1, "params")
    before = constraint.cost().item()
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if "gate" in n], lr=0.5)
    optimizer.zero_grad()
    constraint(torch.tensor(1.0)).backward()
    assert all(layer.gate.grad.gt(0).all() for layer in constraint.layers)  # over budget
    optimizer.step()
    assert constraint.cost().item() < before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": 0.5, "budget_type": "flops"}, "budget_type"),
        ({"budget": 0.5, "budget_type": "macs"}, "input_shape"),
        ({"budget": 0.5, "exponent": -1}, "exponent"),
    ],
)
def test_resource_constraint_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResourceConstraint(_toy([[1.0, 1.0, 1.0], [1.0] * 4]), **kwargs)
    with pytest.raises(ValueError, match="no GroupableConv2d"):
        ResourceConstraint(nn.Conv2d(4, 4, 3), 0.5)


# ------------------------------------------------------------------------------ contract


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((12, 12, 3), {}, "2\\^K"),
        ((16, 8, 3), {}, "in_channels == out_channels"),
        ((1, 1, 3), {}, "K >= 1"),
        ((16, 16, 3), {"groups": 2}, "groups"),
        ((16, 16, 3), {"sort": 1}, "sort"),
        ((16, 16, 3), {"impl": "cuda"}, "impl"),
        ((16, 16, 3), {"padding": "full"}, "padding"),
    ],
)
def test_bad_arguments_raise_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupableConv2d(*args, **kwargs)


def test_wrong_input_gives_clear_error():
    with pytest.raises(ValueError, match="16 input channels"):
        GroupableConv2d(16, 16, 3)(torch.randn(1, 8, 5, 5))


@pytest.mark.parametrize("groups", [1, 4])
def test_from_conv_starts_equal(groups):
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups, dtype=torch.float64)
    layer = GroupableConv2d.from_conv(conv, sort=groups == 1)
    assert layer.num_groups == groups
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    deployed = layer.deploy()
    assert type(deployed) is nn.Conv2d and deployed.groups == groups


def test_convert_skips_unfit_convs_with_reason():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 24, 1), nn.Conv2d(24, 24, 1)
    )
    _, report = dynaconv.convert(model, "dgconv", return_report=True)
    assert report.converted == ["1"]
    assert set(report.skipped) == {"0", "2", "3"} and "2^K" in report.skipped["3"]


def test_convert_digits_cnn_trains_and_deploys():
    model = dynaconv.convert(dynaconv.models.DigitsCNN(), "dgconv")
    assert len(list(dynaconv.dynaconv_layers(model))) == 4
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    constraint = ResourceConstraint(model, 0.5, two_sided=True)
    x, target = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target) + 1e-6 * dynaconv.aux_loss(model)
        constraint(loss).backward()
        optimizer.step()
    dynaconv.set_progress(model, 0.5)
    assert constraint.finalize().within_budget
    deployed = dynaconv.deploy(model, input_shape=(2, 1, 8, 8))
    assert not any(isinstance(m, GroupableConv2d) for m in deployed.modules())
    profile = dynaconv.profile(model, (1, 1, 8, 8))
    assert any("groups" in row.structure for row in profile.layers)


def test_state_dict_round_trip():
    layer = GroupableConv2d(16, 16, 3, padding=1, sort=True)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.2, -0.3, 0.0, -0.5]))
    state = layer.state_dict()
    assert set(state) == {"gate", "dense_weight", "bias"}
    clone = GroupableConv2d(16, 16, 3, padding=1, sort=True)
    clone.load_state_dict(state)
    x = torch.randn(1, 16, 5, 5)
    torch.testing.assert_close(clone(x), layer(x))


def test_eval_forward_follows_changes():
    # No cached kernel: every way of editing the weights is covered in test_layer_inputs.py.
    layer = GroupableConv2d(8, 8, 3, padding=1, dtype=torch.float64).eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(layer(x), first)
        layer.gate.neg_()  # an optimizer step or load_state_dict changes the gates in place
        second = layer(x)
    torch.testing.assert_close(second, layer.deploy()(x))
    assert not torch.allclose(first, second)


def test_compile_gradients_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        GroupableConv2d(8, 8, 3, padding=1), nn.ReLU(), GroupableConv2d(8, 8, 1, sort=True)
    )
    with torch.no_grad():
        model[0].gate.copy_(torch.tensor([0.5, -0.5, 0.0]))
        model[2].gate.copy_(torch.tensor([-0.5, 0.5, -0.1]))
    x = torch.randn(2, 8, 6, 6)

    def step(module: nn.Module) -> list[torch.Tensor]:
        model.zero_grad()
        y = module(x)
        (y.square().mean() + 1e-3 * dynaconv.aux_loss(model)).backward()
        return [y.detach(), *(p.grad.clone() for p in model.parameters())]

    eager = step(model)
    compiled = step(torch.compile(model, backend="aot_eager"))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def test_channels_last_autocast_and_export():
    torch.manual_seed(0)
    layer = GroupableConv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor([0.5, -0.5, 0.2, -0.1]))
    x = torch.randn(2, 16, 6, 6)
    expected = layer(x)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=5e-2, atol=5e-2)
    exported = torch.export.export(layer.eval(), (x,))
    torch.testing.assert_close(exported.module()(x), expected)


# ------------------------------------------------------------------------------ conversion margin


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_conversion_starts_from_the_convs_structure_with_a_margin(groups):
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=groups)
    layer = GroupableConv2d.from_conv(conv)
    zero_gates = groups.bit_length() - 1
    expected = [-0.1] * zero_gates + [0.1] * (4 - zero_gates)
    torch.testing.assert_close(layer.gate.detach(), torch.tensor(expected))
    paper = GroupableConv2d.from_conv(conv, gate_init=1e-8)
    assert paper.gate.detach().abs().max().item() == pytest.approx(1e-8)
    assert GroupableConv2d(16, 16, 3).gate.detach().abs().max().item() == pytest.approx(1e-8)


@pytest.mark.parametrize("gate_init", [0, -0.1, float("inf"), float("nan"), True, "0.1"])
def test_conversion_gate_init_must_be_positive_and_finite(gate_init):
    with pytest.raises(ValueError, match="gate_init"):
        GroupableConv2d.from_conv(nn.Conv2d(16, 16, 3), gate_init=gate_init)


@pytest.mark.parametrize(
    ("size", "batch", "lr"), [(32, 4, 0.01), pytest.param(64, 8, 0.1, marks=pytest.mark.slow)]
)
def test_one_readme_weighted_step_keeps_a_converted_resnet18s_structure(size, batch, lr):
    """The README loop (``CE + 1e-5 * aux_loss``), one SGD step (momentum 0.9).

    With the paper's 1e-8 gates the same step changes the structure (the old behaviour: 1
    group per layer became 2-128 groups), which is what the conversion margin prevents.
    """
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def one_step(gate_init: float) -> tuple[list[int], float, float]:
        torch.manual_seed(1)
        model = torchvision.models.resnet18(num_classes=10)
        model = dynaconv.convert(model, "dgconv", gate_init=gate_init)
        before = dynaconv.profile(model, (1, 3, 32, 32))["params_deployed"]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        ce = nn.functional.cross_entropy(model(x), y)
        aux = 1e-5 * dynaconv.aux_loss(model)
        assert aux.item() < 1e-3 * ce.item()  # the DGConv term is a fraction, not a count
        (ce + aux).backward()
        optimizer.step()
        groups = [layer.num_groups for _, layer in dynaconv.dynaconv_layers(model)]
        after = dynaconv.profile(model, (1, 3, 32, 32))["params_deployed"]
        return groups, before, after

    groups, before, after = one_step(0.1)
    assert len(groups) > 10 and set(groups) == {1}
    assert after == before
    groups_paper, _, after_paper = one_step(1e-8)
    assert set(groups_paper) != {1} and after_paper < before


# ------------------------------------------------------------------------------ budget promise


def _random_dgconv_model(channel_bits: list[int], kernels: list[int], seed: int) -> nn.Sequential:
    """DGConv layers of ``2^bits`` channels with random gates, joined by plain 1x1 convs; the
    second and later layers have stride 2 (different output sizes for the MAC budget)."""
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (bits, kernel) in enumerate(zip(channel_bits, kernels, strict=True)):
        if layers:
            layers.append(nn.Conv2d(2 ** channel_bits[index - 1], 2**bits, 1))
        stride = 1 if index == 0 else 2
        layer = GroupableConv2d(2**bits, 2**bits, kernel, stride=stride, padding=kernel // 2)
        with torch.no_grad():
            layer.gate.copy_(torch.randn(bits, generator=generator, dtype=torch.float64))
        layers.append(layer)
    return nn.Sequential(*layers)


def _achievable_costs(constraint: ResourceConstraint) -> list[float]:
    """Every total cost a gate pattern can reach (brute force over open-gate counts)."""
    options = [
        [scale * 2 ** (layer.num_gates + n) for n in range(layer.num_gates + 1)]
        for layer, scale in zip(constraint.layers, constraint.scales, strict=True)
    ]
    return sorted({float(sum(c)) for c in itertools.product(*options)})


budget_models = st.integers(1, 4).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(1, 5), min_size=n, max_size=n),
        st.lists(st.sampled_from([1, 3]), min_size=n, max_size=n),
    )
)


@given(
    model=budget_models,
    budget=st.floats(0.01, 1.0),
    budget_type=st.sampled_from(["params", "macs"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_finalize_reaches_the_closest_structure_at_or_under_the_budget(
    model, budget, budget_type, seed
):
    bits, kernels = model
    net = _random_dgconv_model(bits, kernels, seed)
    dgconvs = [m for m in net if isinstance(m, GroupableConv2d)]
    before = [layer.gate.detach().clone() for layer in dgconvs]
    constraint = ResourceConstraint(net, budget, budget_type, input_shape=(2 ** bits[0], 6, 6))
    report = constraint.finalize()
    cost = float(constraint.cost())
    assert cost == report.cost
    achievable = _achievable_costs(constraint)
    under = [c for c in achievable if c <= constraint.budget]
    if under:
        assert report.within_budget and cost == max(under)  # closest at or under the budget
    else:
        assert not report.within_budget and cost == min(achievable)  # the cheapest structure
    for layer, gates, open_count in zip(dgconvs, before, report.open_gates, strict=True):
        # the open gates are the highest-ranked ones; kept gates keep their value
        is_open = layer.gate.detach() > 0
        assert int(is_open.sum()) == open_count
        if 0 < open_count < layer.num_gates:
            assert gates[is_open].min() >= gates[~is_open].max()
        kept = is_open == (gates > 0)
        torch.testing.assert_close(layer.gate.detach()[kept], gates[kept].float())
        assert not layer.gate.requires_grad and bool((layer.gate != 0).all())


def test_finalize_among_equal_costs_flips_the_smallest_gates():
    net = _random_dgconv_model([2, 2], [1, 1], 0)
    first, second = net[0], net[2]
    with torch.no_grad():
        first.gate.copy_(torch.tensor([0.5, 0.4]))  # two open gates: 16 connections
        second.gate.copy_(torch.tensor([0.9, 0.01]))
    constraint = ResourceConstraint(net, 24 / 32)  # 16 + 8 or 8 + 16: equal cost
    report = constraint.finalize(freeze=False)
    assert report.open_gates == (2, 1) and report.flipped == 1
    assert second.gate.tolist() == pytest.approx([0.9, -0.01])
    assert first.gate.requires_grad


def test_finalize_reports_an_unreachable_budget(caplog):
    net = _random_dgconv_model([3], [3], 0)  # the cheapest structure keeps 1/8
    constraint = ResourceConstraint(net, 0.1)
    with caplog.at_level("WARNING", logger="dynaconv"):
        report = constraint.finalize()
    assert report.open_gates == (0,) and not report.within_budget
    assert report.fraction == pytest.approx(1 / 8)
    assert "not reachable" in caplog.text and "OVER" in str(report)


def test_closest_gate_counts_with_coarse_units_stays_under_the_budget(monkeypatch):
    costs = [[3 * 2**n for n in range(6)], [5 * 2**n for n in range(6)], [7, 14, 28, 56]]
    penalties = [[0.0] * len(c) for c in costs]
    best = max(s for s in map(sum, itertools.product(*costs)) if s <= 199)
    exact = resource_constraint.closest_gate_counts(costs, penalties, 199)
    assert sum(c[n] for c, n in zip(costs, exact, strict=True)) == best
    monkeypatch.setattr(resource_constraint, "MAX_SEARCH_UNITS", 10)
    coarse = resource_constraint.closest_gate_counts(costs, penalties, 199)
    assert sum(c[n] for c, n in zip(costs, coarse, strict=True)) <= 199
    with pytest.raises(ValueError, match="positive integers"):
        resource_constraint.closest_gate_counts([[1.5, 3]], [[0.0, 0.0]], 10)
    with pytest.raises(ValueError, match="one non-empty list per layer"):
        resource_constraint.closest_gate_counts([[1, 2]], [], 10)


def test_two_sided_constraint_pulls_the_cost_up_under_the_budget():
    model = _toy([[-1.0, -1.0, 1.0], [-1.0, -1.0, -1.0, 1.0]])
    fraction = float(ResourceConstraint(model, 1.0).cost()) / ResourceConstraint(model, 1.0).dense
    loss = torch.tensor(2.0)
    one_sided = ResourceConstraint(model, fraction * 4)
    two_sided = ResourceConstraint(model, fraction * 4, two_sided=True)
    assert one_sided(loss).item() == 2.0
    torch.testing.assert_close(two_sided(loss), loss * 4**0.02)
    two_sided(loss).backward()
    assert all(layer.gate.grad.lt(0).all() for layer in two_sided.layers)  # SGD raises the cost
    over = ResourceConstraint(model, fraction / 4, two_sided=True)
    torch.testing.assert_close(over(loss), loss * 4**0.02)
    at = ResourceConstraint(model, fraction, two_sided=True)
    assert at(loss).item() == 2.0
    at.finalize()
    assert at.finalized and at(loss) is loss
    with pytest.raises(ValueError, match="two_sided"):
        ResourceConstraint(model, 0.5, two_sided=1)
