"""LGC layer: schedule, masks, group lasso, deploy exactness, fused kernel, compat, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dynaconv
from conftest import assert_close64, load_fixture
from dynaconv import LearnedGroupConv2d, MacCount
from dynaconv.compat import layer_from_reference
from dynaconv.kernels import triton_available, triton_usable
from dynaconv.layers.lgc import kernels as lgc_kernels
from dynaconv.layers.lgc.deployed import GatherWorkspace, fold_pointwise, folded_pointwise
from dynaconv.layers.lgc.layer import CondensedGroupConv2d, condensation_stage, fold_batchnorm
from dynaconv.models import DigitsCNN
from dynaconv.spec import ConvSpec

FIXTURE = ("condensenet", "condensenet86_cifar10.pt")
LAYER = "features.denseblock_1.denselayer_5.conv_1"


def _layer(cin=16, cout=8, kernel=1, groups=4, factor=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return LearnedGroupConv2d(
        cin,
        cout,
        kernel,
        padding=kernel // 2,
        learned_groups=groups,
        condense_factor=factor,
        dtype=torch.float64,
        **kwargs,
    )


def _random_bn(channels: int, seed: int = 1) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    norm = nn.BatchNorm2d(channels, dtype=torch.float64).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        norm.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        norm.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        norm.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
    return norm


# ------------------------------------------------------------------------------------------
# schedule and masks


def test_stage_boundaries_follow_the_reference():
    # C = 4: stages begin at 1/6, 2/6, 3/6
    assert [condensation_stage(p, 4) for p in (0.0, 0.16, 1 / 6, 0.3, 2 / 6, 0.49, 0.5, 1.0)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert condensation_stage(1.0, 1) == 0
    assert condensation_stage(0.5, 2) == 1 and condensation_stage(0.49, 2) == 0


def _reference_drop(weight: torch.Tensor, mask: torch.Tensor, groups: int, delta: int):
    """Independent statement of one stage: per group drop the delta live columns of least
    importance sum_{o mod G = g, taps} |W * mask|."""
    mask = mask.clone()
    importance = (weight * mask[:, :, None, None]).abs().sum(dim=(2, 3))
    for g in range(groups):
        rows = [o for o in range(weight.shape[0]) if o % groups == g]
        column = importance[rows].sum(0)
        live = [j for j in range(weight.shape[1]) if bool(mask[g, j])]
        live.sort(key=lambda j: float(column[j]))
        for j in live[:delta]:
            mask[rows, j] = False
    return mask


@pytest.mark.parametrize("kernel", [1, 3])
def test_each_stage_drops_least_important_columns(kernel):
    layer = _layer(24, 12, kernel, groups=3, factor=4)
    mask = layer.mask.clone()
    for progress in (0.2, 0.4, 0.6):
        mask = _reference_drop(layer.dense_weight.detach(), mask, 3, 24 // 4)
        layer.set_progress(progress)
        assert torch.equal(layer.mask, mask)
    assert int(layer.stage) == 3
    assert layer.kept_per_group() == 24 // 4
    assert torch.equal(layer.mask, layer.mask[torch.arange(12) % 3])  # equal rows per group


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_jump_over_stages_drops_once_per_stage(factor):
    stepwise = _layer(32, 16, groups=4, factor=factor)
    jumped = copy.deepcopy(stepwise)
    for stage in range(1, factor):
        stepwise.set_progress(stage / (2 * (factor - 1)) + 1e-9)
    jumped.set_progress(1.0)
    assert torch.equal(jumped.mask, stepwise.mask)
    assert int(jumped.stage) == factor - 1
    assert jumped.kept_per_group() == 32 // factor
    jumped.set_progress(0.1)  # never grows back
    assert torch.equal(jumped.mask, stepwise.mask)


def test_forward_never_changes_state_and_dropout_only_in_training():
    layer = _layer(16, 8, dropout=0.5)
    layer.set_progress(0.3)
    state = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    layer.eval()
    assert_close64(layer(x), torch.nn.functional.conv2d(x, layer.weight, layer.bias))
    layer.train()
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.dropout(x, 0.5, True), layer.weight, layer.bias
    )
    assert_close64(y, expected)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weight_is_masked_dense_weight():
    layer = _layer(16, 8, 3)
    layer.set_progress(1.0)
    assert_close64(layer.weight, layer.dense_weight * layer.mask[:, :, None, None])
    assert layer.weight.shape == (8, 16, 3, 3)


# ------------------------------------------------------------------------------------------
# group lasso


@pytest.mark.parametrize("kernel", [1, 3])
def test_group_lasso_formula(kernel):
    layer = _layer(12, 6, kernel, groups=2, factor=3)
    layer.set_progress(0.3)  # one of two stages: some columns dropped
    weight = layer.dense_weight.detach()
    expected = 0.0
    for g in range(2):
        for j in range(12):
            if not bool(layer.mask[g, j]):
                continue
            total = sum(float(weight[o, j].pow(2).sum()) for o in range(6) if o % 2 == g)
            expected += math.sqrt(max(total, 1e-6))
    assert layer.aux_loss().item() == pytest.approx(expected, rel=1e-12)
    layer.aux_loss().backward()
    assert layer.dense_weight.grad is not None
    assert bool((layer.dense_weight.grad[~layer.mask] == 0).all())
    layer.set_progress(1.0)
    assert layer.aux_loss().item() == 0.0
    assert dynaconv.aux_loss(nn.Sequential(layer)).item() == 0.0


# ------------------------------------------------------------------------------------------
# deploy exactness

deploy_cases = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 2, 3, 4]),
        "factor": st.sampled_from([1, 2, 4]),
        "cin_units": st.integers(1, 3),
        "cout_units": st.integers(1, 3),
        "kernel": st.sampled_from([1, 3, (1, 3)]),
        "stride": st.integers(1, 2),
        "bias": st.booleans(),
        "progress": st.floats(0.0, 1.0),
        "seed": st.integers(0, 2**16),
    }
)


def _case_layer(case) -> LearnedGroupConv2d:
    cin = case["cin_units"] * case["factor"] * 2
    cout = case["cout_units"] * case["groups"]
    kernel = case["kernel"]
    padding = (0, 1) if kernel == (1, 3) else kernel // 2
    torch.manual_seed(case["seed"])
    layer = LearnedGroupConv2d(
        cin,
        cout,
        kernel,
        stride=case["stride"],
        padding=padding,
        bias=case["bias"],
        learned_groups=case["groups"],
        condense_factor=case["factor"],
        dtype=torch.float64,
    )
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_()
    layer.set_progress(case["progress"])
    return layer.eval()


@given(deploy_cases)
def test_deploy_is_exact(case):
    layer = _case_layer(case)
    x = torch.randn(2, layer.in_channels, 5, 6, dtype=torch.float64)
    deployed = layer.deploy().eval()
    assert isinstance(deployed, CondensedGroupConv2d)
    assert deployed.index.numel() == layer.learned_groups * layer.kept_per_group()
    assert_close64(deployed(x), layer(x))


@given(deploy_cases, st.booleans(), st.booleans(), st.sampled_from(["mixed", "positive", "zero"]))
def test_folded_bn_relu_around_the_index_layer_is_exact(case, interleave, post_relu, signs):
    layer = _case_layer(case)
    pre, post = _random_bn(layer.in_channels, 1), _random_bn(layer.out_channels, 2)
    with torch.no_grad():  # BN scale signs select the clamp form of the folded BN-ReLU
        if signs == "positive":
            pre.weight.abs_().add_(0.1)
        elif signs == "zero":
            pre.weight[::2] = 0.0
    x = torch.randn(2, layer.in_channels, 5, 6, dtype=torch.float64)
    expected = post(layer(torch.relu(pre(x))))
    if post_relu:
        expected = torch.relu(expected)
    fused = CondensedGroupConv2d.from_learned(layer, pre_norm=pre, pre_relu=True)
    scale, shift = fold_batchnorm(post)
    order = fused.output_source() if interleave else None
    if interleave:
        fused.set_output_post(scale, shift, post_relu, interleave=True)
        assert_close64(fused(x), expected)
    else:
        cout, groups = layer.out_channels, layer.learned_groups
        channel_at = (torch.arange(cout) % (cout // groups)) * groups + torch.arange(cout) // (
            cout // groups
        )
        fused.set_output_post(scale[channel_at], shift[channel_at], post_relu, interleave=False)
        assert_close64(fused(x), expected[:, channel_at])
        assert order is None


@given(
    deploy_cases,
    st.booleans(),
    st.sampled_from(["none", "affine", "relu"]),
    st.sampled_from(["mixed", "positive", "zero"]),
    st.sampled_from([1, 3]),
)
def test_folded_pointwise_form_equals_the_index_layer(case, interleave, post, signs, batch):
    """fold_pointwise / folded_pointwise (every affine in the kernel, one clamp) against the
    index layer's own PyTorch path, float64, eager and traced (torch.export)."""
    layer = _case_layer(case | {"kernel": 1, "stride": 1})
    if case["bias"]:
        with torch.no_grad():
            layer.bias.normal_()
    pre = _random_bn(layer.in_channels, 1)
    with torch.no_grad():
        if signs == "positive":
            pre.weight.abs_().add_(0.1)
        elif signs == "zero":
            pre.weight[::2] = 0.0
    fused = CondensedGroupConv2d.from_learned(layer, pre_norm=pre, pre_relu=signs != "zero")
    cout = layer.out_channels
    if post != "none":
        generator = torch.Generator().manual_seed(case["seed"])
        scale = torch.randn(cout, generator=generator, dtype=torch.float64)
        shift = torch.randn(cout, generator=generator, dtype=torch.float64)
        fused.set_output_post(scale, shift, post == "relu", interleave=interleave)
    else:
        fused.interleave = interleave
    folded = fold_pointwise(fused)
    x = torch.randn(batch, layer.in_channels + 3, 4, 5, dtype=torch.float64)  # extra channels
    expected = fused.forward_torch(x[:, : layer.in_channels])
    assert_close64(folded_pointwise(folded, x), expected)
    assert_close64(folded_pointwise(folded, x, GatherWorkspace()), expected)

    class Wrapper(nn.Module):
        def forward(self, v):
            return folded_pointwise(folded, v)

    exported = torch.export.export(Wrapper(), (x,))
    assert_close64(exported.module()(x), expected)


def test_fold_pointwise_refuses_a_kxk_layer():
    deployed = CondensedGroupConv2d.from_learned(_layer(8, 4, kernel=3))
    with pytest.raises(ValueError, match="1x1"):
        fold_pointwise(deployed)


def test_identity_gather_skips_the_copy():
    layer = _layer(8, 4, groups=1, factor=1)
    deployed = layer.deploy()
    assert deployed._identity_gather
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    assert_close64(deployed(x), layer(x))


# ------------------------------------------------------------------------------------------
# fused Triton kernel (interpreter on CPU, tiny shapes)

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@needs_triton
@pytest.mark.parametrize(
    "groups,cin,cout,pre,post,interleave,bias",
    [
        (4, 32, 16, True, True, True, False),
        (2, 24, 40, True, False, False, True),
        (1, 16, 20, False, True, True, False),
    ],
)
def test_triton_kernel_matches_torch_path(groups, cin, cout, pre, post, interleave, bias):
    if torch.cuda.is_available():
        pytest.skip("interpreter check; the CUDA check is test_triton_kernel_on_gpu")
    torch.manual_seed(0)
    layer = LearnedGroupConv2d(cin, cout, 1, bias=bias, learned_groups=groups)
    if bias:
        with torch.no_grad():
            layer.bias.normal_()
    layer.set_progress(0.3)
    norm = _random_bn(cin).float() if pre else None
    fused = CondensedGroupConv2d.from_learned(layer, pre_norm=norm, pre_relu=pre, impl="triton")
    if post:
        fused.set_output_post(torch.randn(cout), torch.randn(cout), True, interleave=interleave)
    else:
        fused.interleave = interleave
    reference = copy.deepcopy(fused)
    reference.impl = "torch"
    buffer = torch.randn(3, cin + 5, 3, 5)
    x = buffer[:, :cin]  # a channel slice of a larger buffer, read in place
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-4)


@needs_triton
def test_triton_kernel_takes_tensors_and_a_spec():
    """The kernel's entry point reads no module: the tensors and the spec (here drawn at
    random, not from a deployed layer) give the gather + BN-ReLU + grouped conv, reordered."""
    if torch.cuda.is_available():
        pytest.skip("interpreter check; the CUDA check is test_triton_kernel_on_gpu")
    torch.manual_seed(3)
    groups, kept, cin, cout = 2, 3, 7, 4
    index = torch.randint(0, cin, (groups * kept,))
    weight, bias = torch.randn(cout, kept, 1, 1), torch.randn(cout)
    in_scale, in_shift = torch.rand(groups * kept) + 0.5, torch.randn(groups * kept)
    out_scale, out_shift = torch.randn(cout), torch.randn(cout)
    spec = ConvSpec.create(groups * kept, cout, 1, groups=groups)
    x = torch.randn(2, cin, 3, 4)
    assert lgc_kernels.supports(spec, weight, x) == triton_usable(x)
    y = lgc_kernels.condensed_conv(
        spec,
        x,
        index,
        weight,
        bias,
        groups=groups,
        interleave=True,
        pre=lgc_kernels.ChannelAffine(in_scale, in_shift, True),
        post=lgc_kernels.ChannelAffine(out_scale, out_shift, True),
    )
    gathered = torch.relu(x[:, index] * in_scale[:, None, None] + in_shift[:, None, None])
    grouped = F.conv2d(gathered, weight, bias, groups=groups)  # group-major: g * 2 + n
    interleaved = (
        grouped.view(2, groups, cout // groups, 3, 4).transpose(1, 2).reshape(2, cout, 3, 4)
    )
    expected = torch.relu(interleaved * out_scale[:, None, None] + out_shift[:, None, None])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_triton_kernel_refuses_a_spec_it_does_not_compute():
    spec = ConvSpec.create(4, 4, 3, padding=1, groups=2)
    assert not lgc_kernels.supports(spec, torch.randn(4, 2, 3, 3), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"1x1, stride-1, unpadded conv, got kernel_size=\(3, 3\)"):
        lgc_kernels.condensed_conv(
            spec, torch.randn(1, 4, 5, 5), torch.arange(4), torch.randn(4, 2, 3, 3),
            groups=2, interleave=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [
        ({"index": torch.arange(8).double()}, "index must hold integer channel indices"),
        ({"index": torch.arange(1, 9)}, r"index entries must lie in \[0, in_channels\) = \[0, 8\)"),
        ({"learned_groups": 0}, "learned_groups must be a positive int, got 0"),
        ({"in_channels": True}, "in_channels must be a positive int, got True"),
    ],
)
def test_deployed_constructor_refuses_bad_arguments(change, message):
    arguments = {
        "in_channels": 8,
        "spec": ConvSpec.create(8, 4, 1, groups=2),
        "index": torch.arange(8),
        "weight": torch.randn(4, 4, 1, 1),
        "learned_groups": 2,
    }
    with pytest.raises(ValueError, match=message):
        CondensedGroupConv2d(**(arguments | change))


def test_impl_triton_refuses_what_it_cannot_run():
    layer = _layer(8, 4, kernel=3)
    deployed = CondensedGroupConv2d.from_learned(layer, impl="triton")
    with pytest.raises(ValueError, match=r"impl='triton' cannot run this call: .*1x1"):
        deployed(torch.randn(1, 8, 4, 4, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_on_gpu():
    torch.manual_seed(0)
    layer = LearnedGroupConv2d(512, 128, 1, bias=False, learned_groups=4).cuda().double()
    layer.set_progress(1.0)
    pre, post = _random_bn(512).cuda(), _random_bn(128, 2).cuda()
    x = torch.randn(8, 512, 14, 14, device="cuda", dtype=torch.float64)
    expected = torch.relu(post(layer(torch.relu(pre(x)))))
    fused = CondensedGroupConv2d.from_learned(
        layer.float(), pre_norm=pre.float(), pre_relu=True, impl="triton"
    )
    fused.set_output_post(*fold_batchnorm(post.float()), True)
    y = fused(x.float())
    scale = expected.abs().max()
    assert float((y.double() - expected).abs().max() / scale) < 5e-3
    assert lgc_kernels.supports(fused.spec, fused.weight, x.float())
    exported = torch.export.export(fused, (x.float(),))  # the kernel is one custom op node
    torch.testing.assert_close(exported.module()(x.float()), y)
    compiled = torch.compile(fused)
    torch.testing.assert_close(compiled(x.float()), y)


# ------------------------------------------------------------------------------------------
# state, conversion, counts, errors


def test_state_dict_round_trip_keeps_masks_and_stage():
    layer = _layer(16, 8)
    layer.set_progress(0.4)
    state = layer.state_dict()
    assert state["mask"].dtype == torch.bool and int(state["stage"]) == 2
    fresh = _layer(16, 8, seed=5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.mask, layer.mask) and int(fresh.stage) == 2
    layer.set_progress(1.0)
    fresh.set_progress(1.0)
    assert torch.equal(fresh.mask, layer.mask)


def test_reference_layer_with_and_without_buffers():
    data = load_fixture(*FIXTURE)
    prefix = f"{LAYER}."
    state = {
        k[len(prefix) :]: v for k, v in data["initial_state_dict"].items() if k.startswith(prefix)
    }
    cin = state["conv.weight"].shape[1]
    config = {
        "in_channels": cin,
        "out_channels": 32,
        "kernel_size": 1,
        "groups": 4,
        "condense_factor": 4,
        "dropout_rate": 0.0,
    }
    module = layer_from_reference("lgc", config, state).double().eval()
    assert bool(module.conv.mask.all()) and int(module.conv.stage) == 0
    module.conv.set_progress(0.6)
    assert torch.equal(module.conv.mask, data["masks_by_progress"][0.6][LAYER])
    # a checkpoint saved at progress 0.2 (stage 1), with the reference buffers
    mask = data["masks_by_progress"][0.2][LAYER]
    saved = dict(state)
    saved["_mask"] = mask[:, :, None, None].float()
    saved["_stage"] = torch.ones(1)
    saved["_count"] = torch.full((1,), float(cin // 4))
    resumed = layer_from_reference("lgc", config, saved).double().eval()
    assert torch.equal(resumed.conv.mask, mask) and int(resumed.conv.stage) == 1
    resumed.conv.set_progress(0.6)
    assert torch.equal(resumed.conv.mask, data["masks_by_progress"][0.6][LAYER])
    x = torch.randn(2, cin, 4, 4, dtype=torch.float64)
    reference = torch.nn.functional.conv2d(
        torch.relu(module.norm(x)),
        state["conv.weight"].double() * resumed.conv.mask[..., None, None],
    )
    assert_close64(resumed(x), reference)
    saved["_count"] = torch.zeros(1)
    with pytest.raises(ValueError, match="_count"):
        layer_from_reference("lgc", config, saved)


def test_convert_digits_cnn_trains_condenses_and_deploys():
    torch.manual_seed(0)
    model = DigitsCNN().double()
    converted, report = dynaconv.convert(model, "lgc", learned_groups=4, return_report=True)
    assert "features.0" in report.skipped and len(report.converted) == 5
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    model.eval()
    converted.eval()
    assert_close64(converted(x), model(x))  # mask all ones: starts equal
    converted.train()
    loss = converted(x).square().mean() + 1e-4 * dynaconv.aux_loss(converted)
    loss.backward()
    dynaconv.set_progress(converted, 1.0)
    deployed = dynaconv.deploy(converted, example_input=x)
    assert_close64(deployed(x), converted.eval()(x))
    layers = [m for m in converted.modules() if isinstance(m, LearnedGroupConv2d)]
    assert all(layer.kept_per_group() == layer.in_channels // 4 for layer in layers)


def test_counts_and_structure():
    layer = _layer(16, 8, kernel=3)
    assert layer.count_macs((1, 16, 5, 5), (1, 8, 5, 5)) == (16 * 8 * 9 * 25,) * 2
    layer.set_progress(1.0)
    dense, active = layer.count_macs((1, 16, 5, 5), (1, 8, 5, 5))
    assert active * 4 == dense
    reference = layer.count_macs((1, 16, 5, 5), (1, 8, 5, 5), convention="reference")
    assert reference == MacCount(dense // 4, dense // 4)
    assert layer.count_params("reference") == 16 * 8 * 9 // 4 + 8
    assert layer.count_params() == 16 * 8 * 9 + 8
    assert "stage 3/3" in layer.structure() and "4/16" in layer.structure()
    profile = dynaconv.profile(nn.Sequential(layer), (1, 16, 5, 5))
    assert profile["macs_active"] == active


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"groups": 2}, "groups must be 1"),
        ({"learned_groups": 3}, "out_channels"),
        ({"condense_factor": 3}, "in_channels"),
        ({"learned_groups": 0}, "learned_groups"),
        ({"dropout": 1.0}, "dropout"),
        ({"condense_factor": True}, "condense_factor"),
    ],
)
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LearnedGroupConv2d(16, 8, 1, **kwargs)


def test_invalid_progress_and_impl():
    layer = _layer()
    with pytest.raises(ValueError, match="progress"):
        layer.set_progress(1.5)
    with pytest.raises(ValueError, match="impl"):
        CondensedGroupConv2d.from_learned(layer, impl="cuda")
    with pytest.raises(ValueError, match="expects 16 input channels"):
        layer.deploy()(torch.randn(1, 15, 2, 2, dtype=torch.float64))
