"""CondenseNet: the reference fixture (condensation, deploy, converted checkpoints), counts,
deployed structure (shuffle folding, buffers), export and the family's builders."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynaconv
from conftest import assert_close64, load_fixture
from dynaconv import LearnedGroupConv2d
from dynaconv.compat import model_from_reference
from dynaconv.layers.lgc import deployed as lgc_deployed
from dynaconv.layers.lgc.layer import CondensedGroupConv2d
from dynaconv.models import create_model
from dynaconv.models.condensenet import (
    GROUP_ROWS_MIN,
    ONNX_CHANNEL_BLOCK,
    CondensedDenseBlock,
    CondensedDenseLayer,
    CondenseNet,
    PrunedLinear,
    blocked_group_conv,
    blocked_group_conv_forward,
    condensenet_light,
    deploy_condensenet,
    padded_group_kernel,
)

FIXTURE = ("condensenet", "condensenet86_cifar10.pt")


@pytest.fixture(scope="module")
def fixture():
    return load_fixture(*FIXTURE)


@pytest.fixture(scope="module")
def condensed(fixture):
    """The fixture's network stepped through every progress point: (model, outputs, masks)."""
    model = model_from_reference("condensenet", fixture["config"], fixture["initial_state_dict"])
    model = model.double().eval()
    x = fixture["x"].double()
    lasso_stage0 = dynaconv.aux_loss(model).item()
    outputs, masks = {}, {}
    with torch.no_grad():
        for progress in fixture["progress_points"]:
            dynaconv.set_progress(model, progress)
            outputs[progress] = model(x)
            masks[progress] = {
                name: module.mask.clone()
                for name, module in model.named_modules()
                if isinstance(module, LearnedGroupConv2d)
            }
    return model, outputs, masks, lasso_stage0


def test_progress_points_reproduce_outputs_and_masks(fixture, condensed):
    _, outputs, masks, _ = condensed
    for progress in fixture["progress_points"]:
        assert_close64(outputs[progress], fixture["y_by_progress"][progress])
        expected = fixture["masks_by_progress"][progress]
        assert set(masks[progress]) == set(expected)
        for name, mask in expected.items():
            assert torch.equal(masks[progress][name], mask), (progress, name)


def test_group_lasso_before_and_after(fixture, condensed):
    model, _, _, lasso_stage0 = condensed
    assert lasso_stage0 == pytest.approx(fixture["lasso_stage0"], rel=1e-10)
    assert dynaconv.aux_loss(model).item() == fixture["lasso_final"] == 0.0


def test_exact_deploy_reproduces_y(fixture, condensed):
    model = condensed[0]
    x = fixture["x"].double()
    assert_close64(model(x), fixture["y"])
    deployed = dynaconv.deploy(model, example_input=x)
    assert_close64(deployed(x), fixture["y"])
    blocks = [m for m in deployed.modules() if isinstance(m, CondensedDenseBlock)]
    assert len(blocks) == 3
    layers = [m for m in deployed.modules() if isinstance(m, CondensedGroupConv2d)]
    assert len(layers) == 42
    # group_3x3 = 4: the shuffle would cross the 3x3 conv's groups, so it is kept
    assert all(layer.interleave and layer.out_scale is not None for layer in layers)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.features.denseblock_1.modules())


def test_classifier_pruning_reproduces_the_reference_conversion(fixture, condensed):
    model = condensed[0]
    x = fixture["x"].double()
    deployed = deploy_condensenet(model, prune_classifier=True)
    assert isinstance(deployed.classifier, PrunedLinear)
    assert_close64(deployed(x), fixture["y_converted"])
    state = deployed.state_dict()
    for key, index in fixture["converted_index"].items():
        assert torch.equal(state[key], index), key


def _reference_converted_state(initial, converted_index, groups=4):
    """The reference's converted checkpoint, written out from its conversion rules: per LGC,
    the kept inputs group by group, the BN gathered, conv row k + g*d_out = dense row g + k*G;
    the classifier's kept columns."""
    state = {k: v for k, v in initial.items() if ".conv_1." not in k and "classifier" not in k}
    for key, index in converted_index.items():
        layer = key[: -len(".index")]
        if layer == "classifier":
            state["classifier.index"] = index
            state["classifier.linear.weight"] = initial["classifier.weight"][:, index]
            state["classifier.linear.bias"] = initial["classifier.bias"]
            continue
        dense = initial[f"{layer}.conv.weight"]
        cout, kept = dense.shape[0], index.numel() // groups
        d_out = cout // groups
        conv = torch.empty(cout, kept, 1, 1, dtype=dense.dtype)
        for g in range(groups):
            for k in range(d_out):
                conv[k + g * d_out] = dense[g + k * groups, index[g * kept : (g + 1) * kept]]
        state[f"{layer}.conv.weight"] = conv
        state[f"{layer}.index"] = index
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"{layer}.norm.{name}"] = initial[f"{layer}.norm.{name}"][index]
        state[f"{layer}.norm.num_batches_tracked"] = initial[f"{layer}.norm.num_batches_tracked"]
    return state


def test_converted_checkpoint_loads(fixture):
    state = _reference_converted_state(fixture["initial_state_dict"], fixture["converted_index"])
    # BN folds at load time, in the checkpoint's dtype: load float64 weights for float64 checks
    state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    deployed = model_from_reference("condensenet", fixture["config"], state)
    assert_close64(deployed(fixture["x"].double()), fixture["y_converted"])
    with pytest.raises(ValueError, match="does not match"):
        model_from_reference("condensenet", fixture["config"] | {"stages": [14, 14, 13]}, state)


def test_training_checkpoint_with_reference_buffers_resumes(fixture, condensed):
    _, _, masks, _ = condensed
    state = dict(fixture["initial_state_dict"])
    for name, mask in masks[0.4].items():
        dropped = int((~mask[0]).sum())
        state[f"{name}._mask"] = mask[:, :, None, None].float()
        state[f"{name}._stage"] = torch.full((1,), 2.0)
        state[f"{name}._count"] = torch.full((1,), float(dropped))
    model = model_from_reference("condensenet", fixture["config"], state).double().eval()
    x = fixture["x"].double()
    assert_close64(model(x), fixture["y_by_progress"][0.4])
    dynaconv.set_progress(model, 1.0)
    assert_close64(model(x), fixture["y"])


def test_jumping_to_the_end_equals_stepping(fixture, condensed):
    stepped = condensed[0]
    jumped = model_from_reference("condensenet", fixture["config"], fixture["initial_state_dict"])
    dynaconv.set_progress(jumped.double(), 1.0)
    for (name, a), b in zip(
        ((n, m) for n, m in stepped.named_modules() if isinstance(m, LearnedGroupConv2d)),
        (m for m in jumped.modules() if isinstance(m, LearnedGroupConv2d)),
    ):
        assert torch.equal(a.mask, b.mask), name


def test_state_dict_round_trip(condensed):
    model = condensed[0]
    clone = create_model("condensenet86").double()
    clone.load_state_dict(model.state_dict())
    for a, b in zip(model.modules(), clone.modules()):
        if isinstance(a, LearnedGroupConv2d):
            assert torch.equal(a.mask, b.mask) and int(a.stage) == int(b.stage) == 3


# ------------------------------------------------------------------------------------------
# counts (the reference counter, measure_model)


def test_reference_counts_condensenet86(fixture, condensed):
    training = create_model("condensenet86")
    counts = dynaconv.profile(training, (1, 3, 32, 32), convention="reference")
    assert counts["macs"] == fixture["measure_model"]["flops"] == 65816394
    assert counts["params"] == fixture["measure_model"]["params"] == 520202
    converted = deploy_condensenet(condensed[0], prune_classifier=True)
    counts = dynaconv.profile(converted, (1, 3, 32, 32), convention="reference", deployed=False)
    assert counts["macs"] == fixture["measure_model_converted"]["flops"]
    assert counts["params"] == fixture["measure_model_converted"]["params"]


@pytest.mark.parametrize(
    "name,builder,size",
    [
        ("condensenet_imagenet_g4c4", "condensenet74_imagenet_g4", 224),
        ("condensenet_imagenet_g8c8", "condensenet74_imagenet_g8", 224),
        pytest.param("condensenet182_cifar10", "condensenet182", 32, marks=pytest.mark.slow),
    ],
)
@pytest.mark.usefixtures("one_thread")
def test_reference_counts_training_and_converted(name, builder, size):
    # Counts read the layers' masks (data), so the model is built and run for real, not on
    # the meta device or with fake tensors; one thread keeps the 224px forwards cheap on a
    # busy machine.
    expected = load_fixture("condensenet", "counts.pt")["counts"][name]
    model = create_model(builder)
    counts = dynaconv.profile(model, (1, 3, size, size), convention="reference", deployed=False)
    assert counts["macs"] == expected["measure_model"]["flops"]
    assert counts["params"] == expected["measure_model"]["params"]
    dynaconv.set_progress(model, 1.0)
    converted = deploy_condensenet(model, prune_classifier=True)
    counts = dynaconv.profile(converted, (1, 3, size, size), convention="reference", deployed=False)
    assert counts["macs"] == expected["measure_model_converted"]["flops"]
    assert counts["params"] == expected["measure_model_converted"]["params"]


# ------------------------------------------------------------------------------------------
# deployed structure on small networks


def _small(**kwargs) -> CondenseNet:
    torch.manual_seed(0)
    model = CondenseNet([2, 2], [8, 8], **kwargs).double()
    for module in model.modules():  # trained-looking BN statistics
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_shuffle_folds_into_dense_3x3_conv(progress):
    model = _small(group_3x3=1)
    dynaconv.set_progress(model, progress)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for fold in (True, False):
        deployed = deploy_condensenet(model, fold_shuffle=fold)
        layers = [m for m in deployed.modules() if isinstance(m, CondensedGroupConv2d)]
        assert all(layer.interleave is not fold for layer in layers)
        assert_close64(deployed(x), model(x))


def test_condensenet_light_deploys_exactly():
    torch.manual_seed(0)
    model = condensenet_light(stages=(2, 2, 2), growth=(8, 8, 8)).double().eval()
    transitions = [n for n, m in model.named_modules() if n.endswith("transition_1.conv")]
    assert transitions and isinstance(model.get_submodule(transitions[0]), LearnedGroupConv2d)
    dynaconv.set_progress(model, 1.0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    deployed = dynaconv.deploy(model, example_input=x)
    assert_close64(deployed(x), model(x))
    assert isinstance(deployed.features.transition_1.conv, CondensedGroupConv2d)


def test_torch_export_of_the_deployed_model():
    model = _small()
    dynaconv.set_progress(model, 1.0)
    deployed = deploy_condensenet(model, prune_classifier=True, impl="torch")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    # the head pools 8x8; 16x16 input after one transition is 8x8
    exported = torch.export.export(deployed, (x,))
    assert_close64(exported.module()(x), deployed(x))


def _module_path(deployed: nn.Module) -> nn.Module:
    """``deployed`` with a forward hook on every dense layer: the blocks then run the layers'
    own forwards (the index layer's module path), not the folded form."""
    reference = copy.deepcopy(deployed)
    for module in reference.modules():
        if isinstance(module, CondensedDenseLayer):
            module.register_forward_hook(lambda *args: None)
    return reference


@pytest.mark.parametrize("group_3x3", [1, 4])
@pytest.mark.parametrize("batch", [1, 3])
def test_folded_dense_blocks_equal_the_layers_own_path(group_3x3, batch):
    model = _small(group_3x3=group_3x3)
    dynaconv.set_progress(model, 1.0)
    deployed = deploy_condensenet(model)
    x = torch.randn(batch, 3, 16, 16, dtype=torch.float64)
    assert_close64(deployed(x), _module_path(deployed)(x))
    assert_close64(deployed(x), model(x))


@pytest.mark.parametrize(
    ("groups", "per_in", "per_out", "rows", "kernel"),
    [(4, 8, 2, 4, 3), (2, 3, 1, 4, 3), (8, 2, 3, 8, 1), (3, 5, 2, 5, 5)],
)
def test_padded_group_kernel_computes_the_grouped_conv(groups, per_in, per_out, rows, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(
        groups * per_in, groups * per_out, kernel, padding=kernel // 2, groups=groups, bias=False
    ).double()
    padded = padded_group_kernel(conv, rows)
    assert padded.shape == (groups * rows, per_in, kernel, kernel)
    x = torch.randn(2, groups * per_in, 9, 7, dtype=torch.float64)
    y = nn.functional.conv2d(x, padded, None, 1, kernel // 2, 1, groups)
    y = y.view(2, groups, rows, 9, 7)
    assert_close64(y[:, :, :per_out].reshape(2, groups * per_out, 9, 7), conv(x))
    assert torch.count_nonzero(y[:, :, per_out:]) == 0
    assert padded_group_kernel(conv, per_out) is None  # already that many rows per group


def test_padded_group_kernel_applies_only_to_grouped_unbiased_zero_padded_convs():
    assert padded_group_kernel(nn.Conv2d(32, 8, 3, padding=1), 4) is None  # not grouped
    assert padded_group_kernel(nn.Conv2d(32, 8, 3, padding=1, groups=4), 4) is None  # bias
    reflect = nn.Conv2d(32, 8, 3, padding=1, groups=4, bias=False, padding_mode="reflect")
    assert padded_group_kernel(reflect, 4) is None


@pytest.mark.parametrize("batch", [1, 3])
def test_padded_3x3_convs_equal_the_grouped_conv(batch):
    """_small's 3x3 convs have 2 outputs per group: the block runs them padded."""
    model = _small()
    dynaconv.set_progress(model, 1.0)
    deployed = deploy_condensenet(model)
    layers = [m for m in deployed.modules() if isinstance(m, CondensedDenseLayer)]
    assert all(
        layer._padded_conv_2.shape[0] == GROUP_ROWS_MIN * layer.conv_2.groups for layer in layers
    )
    x = torch.randn(batch, 3, 16, 16, dtype=torch.float64)
    assert_close64(deployed(x), _module_path(deployed)(x))
    conv = layers[0].conv_2
    with torch.no_grad():
        conv.weight.mul_(-0.5)  # written in place: the next eager forward pads it anew
    assert_close64(deployed(x), _module_path(deployed)(x))
    replacement = copy.deepcopy(layers[1].conv_2)
    with torch.no_grad():
        replacement.weight.normal_()
    layers[1].conv_2 = replacement  # replaced: likewise
    assert_close64(deployed(x), _module_path(deployed)(x))


@pytest.mark.parametrize(
    ("groups", "per_in", "per_out", "kernel", "stride"),
    [(4, 8, 2, 3, 1), (4, 16, 4, 3, 1), (4, 32, 8, 3, 2), (3, 5, 2, 3, 1), (2, 3, 7, 1, 2)],
)
@pytest.mark.parametrize("kind", ["dense", "padded", "depthwise"])
def test_blocked_group_conv_forms_compute_the_grouped_conv(
    groups, per_in, per_out, kernel, stride, kind
):
    torch.manual_seed(0)
    conv = nn.Conv2d(
        groups * per_in,
        groups * per_out,
        kernel,
        stride=stride,
        padding=kernel // 2,
        groups=groups,
        bias=False,
    ).double()
    form = blocked_group_conv(conv, kind=kind)
    assert form.kind == kind
    block = ONNX_CHANNEL_BLOCK
    if kind == "padded":  # channels per group padded to the block
        assert form.weight.shape[0] % (groups * block) == 0 and form.weight.shape[1] % block == 0
    else:  # dense: whole input; depthwise: one channel per (output, input) pair, padded
        assert form.weight.shape[0 if kind == "depthwise" else 1] % block == 0
    x = torch.randn(2, groups * per_in, 9, 7, dtype=torch.float64)
    assert_close64(blocked_group_conv_forward(form, conv, x), conv(x))
    # with the input's channels gathered first (the folded channel shuffle)
    source = torch.randperm(groups * per_in)
    assert_close64(blocked_group_conv_forward(form.reading(source), conv, x), conv(x[:, source]))


def test_blocked_group_conv_choice_and_refusals():
    """CondenseNet-86's three 3x3 shapes each take a blocked form (cheapest by the cost
    model); convs already blocked, depthwise, ungrouped, biased or reflect-padded keep theirs."""
    kinds = [
        blocked_group_conv(nn.Conv2d(4 * per_in, 4 * per_in // 4, 3, groups=4, bias=False)).kind
        for per_in in (8, 16, 32)
    ]
    assert kinds == ["depthwise", "dense", "padded"]
    block = ONNX_CHANNEL_BLOCK
    assert blocked_group_conv(nn.Conv2d(4 * block, 4 * block, 3, groups=4, bias=False)) is None
    assert blocked_group_conv(nn.Conv2d(8, 8, 3, groups=8, bias=False), kind="dense") is None
    assert blocked_group_conv(nn.Conv2d(32, 8, 3, bias=False), kind="dense") is None
    assert blocked_group_conv(nn.Conv2d(32, 8, 3, groups=4), kind="dense") is None
    reflect = nn.Conv2d(32, 8, 3, groups=4, bias=False, padding=1, padding_mode="reflect")
    assert blocked_group_conv(reflect, kind="dense") is None
    conv = nn.Conv2d(32, 8, 3, groups=4, bias=False)
    with pytest.raises(ValueError, match="block"):
        blocked_group_conv(conv, 0)
    with pytest.raises(ValueError, match="kind"):
        blocked_group_conv(conv, kind="winograd")


@pytest.mark.parametrize("kind", ["dense", "padded", "depthwise"])
@pytest.mark.parametrize("batch", [1, 3])
def test_blocked_export_form_equals_the_traced_form(monkeypatch, kind, batch):
    """The dense blocks' ONNX form (3x3 convs in their blocked forms, the shuffle folded into
    them) against the eager folded form, float64, each blocked form forced in turn."""
    from dynaconv.models import condensenet

    def forced(conv, block=ONNX_CHANNEL_BLOCK, **_):
        return blocked_group_conv(conv, block, kind=kind)

    monkeypatch.setattr(condensenet, "blocked_group_conv", forced)
    model = _small()
    dynaconv.set_progress(model, 1.0)
    deployed = deploy_condensenet(model)
    layers = [m for m in deployed.modules() if isinstance(m, CondensedDenseLayer)]
    assert all(layer._blocked.kind == kind for layer in layers)
    blocks = [m for m in deployed.modules() if isinstance(m, CondensedDenseBlock)]
    for block in blocks:
        inputs = torch.randn(batch, block.in_channels, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            assert_close64(block._forward_traced(inputs, blocked=True), block(inputs))


def test_deployed_checkpoint_keeps_its_layout(tmp_path):
    """The folded and padded tensors are derived, not saved: a deployed state dict written
    with safetensors holds the layout deployed folders always had and loads into another
    deployed network, which then computes the saved one."""
    safetensors = pytest.importorskip("safetensors.torch")
    model, other = _small(), _small()
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(1.5)
    for network in (model, other):
        dynaconv.set_progress(network, 1.0)
    deployed, target = deploy_condensenet(model), deploy_condensenet(other)
    state = deployed.state_dict()
    assert not [key for key in state if "_folded" in key or "_padded" in key]
    layer = "features.denseblock_1.denselayer_1."
    assert {key[len(layer) :] for key in state if key.startswith(layer)} == {
        "conv_1.index",
        "conv_1.weight",
        "conv_1.in_scale",
        "conv_1.in_shift",
        "conv_1.out_scale",
        "conv_1.out_shift",
        "conv_2.weight",
    }
    path = tmp_path / "deployed.safetensors"
    safetensors.save_file({key: value.contiguous() for key, value in state.items()}, path)
    target.load_state_dict(safetensors.load_file(path))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_close64(target(x), deployed(x))


def test_folded_gather_workspace_path(monkeypatch):
    monkeypatch.setattr(lgc_deployed, "WORKSPACE_MIN_NUMEL", 0)
    model = _small()
    dynaconv.set_progress(model, 1.0)
    deployed = deploy_condensenet(model)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_close64(deployed(x), model(x))
    assert_close64(deployed(x[:1]), model(x[:1]))  # the buffer is reused at another size
    x.requires_grad_(True)  # a gradient through the deployed model: no shared buffer then
    deployed(x).sum().backward()
    expected = torch.autograd.grad(model(x).sum(), x)[0]
    assert_close64(x.grad, expected)


def test_folded_form_follows_loaded_and_edited_weights():
    first, second = _small(), _small()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    for model in (first, second):
        dynaconv.set_progress(model, 1.0)
    deployed, target = deploy_condensenet(first), deploy_condensenet(second)
    deployed.load_state_dict(target.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    # traced straight after loading (no eager forward to notice the change)
    exported = torch.export.export(deployed, (x,))
    assert_close64(exported.module()(x), second(x))
    assert_close64(deployed(x), second(x))
    conv = deployed.features.denseblock_1.denselayer_1.conv_1
    with torch.no_grad():
        conv.weight.mul_(2.0)  # written in place: the next eager forward re-folds
    assert_close64(deployed(x), _module_path(deployed)(x))
    assert_close64(
        deployed.float()(x.float()), _module_path(deployed)(x.float()), rtol=1e-4, atol=1e-5
    )


def test_onnx_graph_of_the_deployed_condensenet(tmp_path):
    """Per dense layer the exported graph holds two Gathers (the kept channels; the channel
    shuffle with the depthwise form's repeated inputs), one Max (the folded BN-ReLU), the 1x1
    conv, the 3x3 conv in its blocked form (2 outputs per group: depthwise and 1x1 convs) and
    the concatenation; no scatter (in-place buffer writes), no BatchNorm, no Transpose."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = _small().float()
    dynaconv.set_progress(model, 1.0)
    deployed = deploy_condensenet(model)
    path = tmp_path / "condensenet.onnx"
    torch.onnx.export(
        deployed,
        (torch.randn(2, 3, 16, 16),),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    layers = [m for m in deployed.modules() if isinstance(m, CondensedDenseLayer)]
    assert [layer._blocked.kind for layer in layers] == ["depthwise"] * 4
    assert ops.count("Gather") == 2 * len(layers) and ops.count("Max") == len(layers)
    assert "Transpose" not in ops
    assert ops.count("Conv") == 1 + 3 * len(layers) and ops.count("Concat") == len(layers)
    assert ops.count("BatchNormalization") == 1  # the head's (before pooling)
    assert "ScatterND" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), deployed(x), rtol=1e-4, atol=1e-5)


def test_builders():
    counts = {50: 8, 74: 12, 86: 14, 98: 16, 110: 18, 122: 20}
    for depth, per_block in counts.items():
        model = create_model(f"condensenet{depth}")
        layers = [m for m in model.modules() if isinstance(m, LearnedGroupConv2d)]
        assert len(layers) == 3 * per_block
        assert model.classifier.out_features == 10
    g8 = create_model("condensenet74_imagenet_g8", num_classes=7)
    lgc = next(m for m in g8.modules() if isinstance(m, LearnedGroupConv2d))
    assert lgc.learned_groups == lgc.condense_factor == 8
    assert g8.features.init_conv.stride == (2, 2) and g8.classifier.out_features == 7
    with pytest.raises(ValueError, match="stages and growth"):
        CondenseNet([2, 2], [8])


def test_training_step_and_dropout():
    model = _small(dropout=0.1).train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    loss = model(x).square().mean() + 1e-5 * dynaconv.aux_loss(model)
    loss.backward()
    lgc = next(m for m in model.modules() if isinstance(m, LearnedGroupConv2d))
    assert lgc.dense_weight.grad is not None and lgc.dropout == 0.1
    assert copy.deepcopy(model).eval()(x).shape == (4, 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deployed_condensenet86_on_gpu(fixture, condensed):
    model = copy.deepcopy(condensed[0]).cuda()
    x = fixture["x"].double().cuda()
    deployed = deploy_condensenet(model.float())
    y = deployed(x.float())
    expected = fixture["y"].cuda()
    assert float((y.double() - expected).abs().max() / expected.abs().max()) < 1e-2
    compiled = torch.compile(deployed)
    assert float((compiled(x.float()).double() - expected).abs().max()) < 1e-2 * float(
        expected.abs().max()
    )


def test_executorch_program_of_the_deployed_condensenet(tmp_path):
    """In ExecuTorch with XNNPACK every conv of the folded form is delegated (a kernel read
    through a view or a lifted constant would fall back to the portable conv, ~30x slower);
    only the channel gathers run outside XNNPACK."""
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from dynaconv.cli.commands import run_pte, write_pte

    model = _small().float()
    dynaconv.set_progress(model, 1.0)
    deployed = deploy_condensenet(model)
    x = torch.randn(1, 3, 16, 16)
    lowered = to_edge_transform_and_lower(
        torch.export.export(deployed, (x,)), partitioner=[XnnpackPartitioner()]
    )
    outside = {
        str(node.target).split(":")[0]
        for node in lowered.exported_program().graph.nodes
        if node.op == "call_function" and "delegate" not in str(node.target)
    }
    assert not any("convolution" in op for op in outside), outside
    path = write_pte(deployed, x, tmp_path / "condensenet.pte")
    with torch.no_grad():
        torch.testing.assert_close(run_pte(path, x), deployed(x), rtol=1e-4, atol=1e-5)
