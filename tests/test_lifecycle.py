"""The model-level lifecycle: convert, set_progress, aux_loss, deploy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

import dynaconv
from dynaconv import DOConv2d
from dynaconv.layers import ConversionSkipped, Deployable, DynaConv2d
from dynaconv.models import DigitsCNN


def _digits(seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    return DigitsCNN()


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


ALL_CONVS = [f"features.{i}" for i in (0, 3, 6, 9, 12, 15)]


# --------------------------------------------------------------------------------------------
# Test-only layers


class ProgressProbe(DynaConv2d):
    """A 1x1 conv layer recording its progress in a buffer, with a known aux loss."""

    method = "probe"

    def __init__(self, channels: int = 3) -> None:
        super().__init__(channels, channels, 1)
        self.weight_param = nn.Parameter(torch.randn(channels, channels, 1, 1))
        self.register_buffer("progress", torch.tensor(-1.0))

    def set_progress(self, progress: float) -> None:
        super().set_progress(progress)
        self.progress.fill_(progress)

    def aux_loss(self) -> Tensor:
        return self.weight_param.square().sum()

    def forward(self, x: Tensor) -> Tensor:
        return self.spec.conv2d(x, self.weight_param, None)

    def deploy(self) -> nn.Module:
        conv = self.spec.make_conv(groups=1)
        conv.bias = None
        with torch.no_grad():
            conv.weight.copy_(self.weight_param)
        return conv


class Holder(DynaConv2d):
    """A dynaconv layer that keeps an nn.Conv2d inside (convert must leave it alone)."""

    def __init__(self) -> None:
        super().__init__(3, 3, 1)
        self.inner = nn.Conv2d(3, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)

    def deploy(self) -> nn.Module:
        return self.inner


class OffByOne(Deployable, nn.Module):
    """A deliberately broken deployment: the deployed module adds 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def deploy(self) -> nn.Module:
        broken = nn.Sequential(self.conv)
        broken.register_forward_hook(lambda module, inputs, output: output + 1)
        return broken


class TupleOutput(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.body = module

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y = self.body(x)
        return y, {"pooled": y.mean((2, 3))}


class NotPlainConv(nn.Conv2d):
    pass


# --------------------------------------------------------------------------------------------
# convert


def test_convert_all_and_report():
    model, report = dynaconv.convert(_digits(), "doconv", return_report=True)
    assert report.method == "doconv"
    assert report.converted == ALL_CONVS
    assert report.skipped == {}
    assert all(isinstance(model.get_submodule(n), DOConv2d) for n in ALL_CONVS)
    assert "6 converted, 0 skipped" in str(report)


def test_convert_include_glob_and_list():
    model, report = dynaconv.convert(
        _digits(), "doconv", include="features.[06]", return_report=True
    )
    assert report.converted == ["features.0", "features.6"]
    assert report.skipped == {
        n: "not matched by include" for n in ALL_CONVS if n not in report.converted
    }
    assert _conv_names(model) == ["features.3", "features.9", "features.12", "features.15"]
    _, report = dynaconv.convert(
        _digits(), "doconv", include=["features.3", "features.1*"], return_report=True
    )
    assert report.converted == ["features.3", "features.12", "features.15"]


def test_convert_exclude_glob_and_predicates():
    _, report = dynaconv.convert(_digits(), "doconv", exclude="features.0", return_report=True)
    assert report.skipped == {"features.0": "matched by exclude"}
    assert report.converted == ALL_CONVS[1:]

    def is_3x3(name: str, module: nn.Module) -> bool:
        return module.kernel_size == (3, 3)

    _, report = dynaconv.convert(_digits(), "doconv", include=is_3x3, return_report=True)
    assert report.converted == ["features.0", "features.6", "features.12"]
    _, report = dynaconv.convert(
        _digits(),
        "doconv",
        include=is_3x3,
        exclude=lambda name, module: module.stride != (1, 1),
        return_report=True,
    )
    assert report.converted == ["features.0", "features.6"]
    assert report.skipped["features.12"] == "matched by exclude"
    assert report.skipped["features.3"] == "not matched by include"


def test_convert_reports_what_the_family_skips():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), NotPlainConv(4, 4, 1))
    converted, report = dynaconv.convert(model, "doconv", return_report=True)
    assert report.converted == ["0"]
    assert report.skipped == {"1": "NotPlainConv is not a plain nn.Conv2d"}
    assert "skipped 1: NotPlainConv is not a plain nn.Conv2d" in str(report)
    assert type(converted[1]) is NotPlainConv


def test_convert_copy_leaves_original_untouched():
    original = _digits()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    converted = dynaconv.convert(original, "doconv")
    assert converted is not original
    assert _conv_names(original) == ALL_CONVS
    assert original.state_dict().keys() == before.keys()
    assert all(torch.equal(original.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        converted.features[0].W.add_(1.0)  # no storage shared with the original
    assert all(torch.equal(original.state_dict()[k], v) for k, v in before.items())


def test_convert_inplace_modifies_the_model():
    model = _digits()
    result = dynaconv.convert(model, "doconv", inplace=True)
    assert result is model
    assert _conv_names(model) == []
    assert isinstance(model.features[6], DOConv2d)


def test_convert_starts_equal_and_keeps_training_mode():
    model = _digits().eval()
    x = torch.randn(3, 1, 8, 8)
    converted = dynaconv.convert(model, "doconv")
    assert not any(m.training for m in converted.modules())
    torch.testing.assert_close(converted(x), model(x))


def test_convert_bare_conv_shared_conv_and_nested_conv():
    conv = nn.Conv2d(3, 5, 3, padding=1)
    layer = dynaconv.convert(conv, "doconv")
    assert isinstance(layer, DOConv2d)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), conv(x))

    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted, report = dynaconv.convert(model, "doconv", return_report=True)
    assert report.converted == ["0", "2"]
    assert converted[0] is converted[2] and isinstance(converted[0], DOConv2d)

    holder_model = nn.Sequential(Holder(), nn.Conv2d(3, 3, 1))
    converted, report = dynaconv.convert(holder_model, "doconv", return_report=True)
    assert report.converted == ["1"]
    assert type(converted[0].inner) is nn.Conv2d


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "doconvv"}, "method must be one of"),
        ({"method": "doconv", "include": 3}, "include must be"),
        ({"method": "doconv", "exclude": ["features.0", 1]}, "exclude must be"),
        ({"method": "doconv", "D_mull": 9}, "unknown DO-Conv option"),
        ({"method": "doconv", "D_mul": 4}, "D_mul"),
    ],
)
def test_convert_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dynaconv.convert(_digits(), **kwargs)


# --------------------------------------------------------------------------------------------
# set_progress and aux_loss


@pytest.mark.parametrize("bad", [-0.01, 1.01, math.nan, math.inf, "0.5", None, True, [0.5]])
def test_set_progress_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="progress must be a number in \\[0, 1\\]"):
        dynaconv.set_progress(nn.Sequential(ProgressProbe()), bad)
    with pytest.raises(ValueError, match="progress"):
        ProgressProbe().set_progress(bad)


@pytest.mark.parametrize("value", [0, 1, 0.25, np.float32(0.5), np.float64(0.75)])
def test_set_progress_reaches_every_layer(value):
    model = nn.Sequential(ProgressProbe(), nn.Sequential(nn.ReLU(), ProgressProbe()))
    dynaconv.set_progress(model, value)
    assert model[0].progress.item() == pytest.approx(float(value))
    assert model[1][1].progress.item() == pytest.approx(float(value))
    layer = ProgressProbe()
    dynaconv.set_progress(layer, value)  # a layer passed directly
    assert layer.progress.item() == pytest.approx(float(value))
    assert "progress" in layer.state_dict()  # schedule state is saved with the model


def test_aux_loss_sums_layers_and_backpropagates():
    model = nn.Sequential(ProgressProbe(), nn.ReLU(), ProgressProbe(), nn.Conv2d(3, 3, 1))
    total = dynaconv.aux_loss(model)
    expected = model[0].weight_param.square().sum() + model[2].weight_param.square().sum()
    assert total.dim() == 0
    torch.testing.assert_close(total, expected)
    total.backward()
    torch.testing.assert_close(model[0].weight_param.grad, 2 * model[0].weight_param)
    assert dynaconv.aux_loss(model[0]).item() == pytest.approx(
        expected.item() - model[2].aux_loss().item()
    )


def test_aux_loss_is_a_zero_tensor_without_layers():
    for model in (nn.Linear(2, 2).double(), nn.ReLU(), _digits()):
        total = dynaconv.aux_loss(model)
        assert isinstance(total, Tensor) and total.dim() == 0 and total.item() == 0.0
    doconv = dynaconv.convert(_digits(), "doconv")  # DO-Conv has no regulariser
    assert dynaconv.aux_loss(doconv).item() == 0.0


# --------------------------------------------------------------------------------------------
# deploy


def _trained_doconv(seed: int = 0) -> nn.Module:
    model = dynaconv.convert(_digits(seed), "doconv")
    for _, layer in dynaconv.dynaconv_layers(model):
        if layer.D is not None:
            nn.init.normal_(layer.D, std=0.1)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))  # non-trivial BatchNorm statistics
    return model


def test_deploy_leaves_original_untouched_and_restores_modes():
    model = _trained_doconv()
    model.features[1].eval()  # a mixed mode (e.g. a frozen BatchNorm) must survive
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    deployed = dynaconv.deploy(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert sum(isinstance(m, DOConv2d) for m in model.modules()) == 6
    assert not any(isinstance(m, DynaConv2d) for m in deployed.modules())
    assert not any(m.training for m in deployed.modules())
    x = torch.randn(5, 1, 8, 8)
    model.eval()
    torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-6)


def test_deploy_detects_a_wrong_deployment():
    model = nn.Sequential(OffByOne(), nn.Flatten())
    with pytest.raises(dynaconv.DeployVerificationError, match="differs from the original"):
        dynaconv.deploy(model)
    deployed = dynaconv.deploy(model, verify=False)  # verification can be turned off
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(deployed(x), model(x) + 1)


def test_deploy_verifies_tuple_and_dict_outputs():
    dynaconv.deploy(TupleOutput(_trained_doconv().features), input_shape=(2, 1, 8, 8))
    with pytest.raises(dynaconv.DeployVerificationError, match="output 0"):
        dynaconv.deploy(TupleOutput(OffByOne()), input_shape=(1, 2, 4, 4))


def test_deploy_uses_the_given_example_input_or_shape():
    model = _trained_doconv()
    seen: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))

    def shapes_seen_by(**kwargs) -> set[tuple[int, ...]]:
        seen.clear()
        dynaconv.deploy(model, **kwargs)  # the hook runs on the model and on its deployed copy
        return set(seen)

    assert shapes_seen_by(input_shape=(3, 1, 7, 9)) == {(3, 1, 7, 9)}
    example = torch.randn(4, 1, 8, 8)
    assert shapes_seen_by(example_input=example) == {(4, 1, 8, 8)}
    assert shapes_seen_by() == {(2, 1, 32, 32)}  # inferred from the first conv
    dynaconv.deploy(nn.Sequential(nn.Linear(5, 3)))
    with pytest.raises(ValueError, match="not both"):
        dynaconv.deploy(model, example_input=example, input_shape=(4, 1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        dynaconv.deploy(model, input_shape=(0, 1, 8, 8))
    with pytest.raises(ValueError, match="example_input or input_shape"):
        dynaconv.deploy(nn.Sequential(nn.ReLU()))


def test_deploy_verification_uses_the_model_dtype():
    model = _trained_doconv().double()
    dtypes = []
    model.register_forward_pre_hook(lambda module, args: dtypes.append(args[0].dtype))
    deployed = dynaconv.deploy(model, input_shape=(2, 1, 8, 8))
    assert set(dtypes) == {torch.float64}  # the hook runs on both models
    assert next(deployed.parameters()).dtype == torch.float64


def test_resnet18_doconv_converted_trained_deployed():
    """The issue's end-to-end check on a torchvision model (float64, tight tolerance)."""
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10).double()
    model, report = dynaconv.convert(original, "doconv", return_report=True)
    assert len(report.converted) == 20 and not report.skipped
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    original.eval(), model.eval()
    torch.testing.assert_close(model(x), original(x), rtol=1e-10, atol=1e-12)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    targets = torch.randint(0, 10, (4,))
    for _ in range(2):  # float64 DO-Conv on CPU: each step composes 20 kernels (~1 s)
        loss = nn.functional.cross_entropy(model(torch.randn_like(x)), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model.layer1[0].conv1.D.abs().max() > 0  # the over-parameterisation was trained

    deployed = dynaconv.deploy(model, example_input=x)
    kinds = {type(m) for m in deployed.modules()}
    assert nn.Conv2d in kinds and not any(issubclass(k, DynaConv2d) for k in kinds)
    assert sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == 20
    model.eval()
    x2 = torch.randn(3, 3, 24, 40, dtype=torch.float64)
    torch.testing.assert_close(deployed(x2), model(x2), rtol=1e-10, atol=1e-12)


def test_layer_class_and_conversion_skipped_are_exported():
    assert dynaconv.layer_class("doconv") is DOConv2d
    with pytest.raises(ValueError, match="method must be one of"):
        dynaconv.layer_class("nope")
    assert issubclass(ConversionSkipped, Exception)


@pytest.mark.parametrize("method", list(dynaconv.METHODS))
def test_one_readme_aux_weight_suits_every_family(method):
    """``CE + 1e-5 * aux_loss`` (the README's loop) on a converted ResNet-18: the weighted
    regulariser is at most a tenth of the cross-entropy for every family (a count, such as
    DGConv's 1,048,576 active connections before it became a fraction, made it 10.5)."""
    torch.manual_seed(1)
    model = dynaconv.convert(torchvision.models.resnet18(num_classes=10), method, exclude="conv1")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 7, 3, 2])
    ce = nn.functional.cross_entropy(model(x), y)  # a training forward (DGC's lasso needs one)
    weighted = 1e-5 * dynaconv.aux_loss(model)
    assert 0 <= weighted.item() <= 0.1 * ce.item()
    layers = [layer for _, layer in dynaconv.dynaconv_layers(model)]
    if method == "dgconv":
        assert dynaconv.aux_loss(model).item() == len(layers)  # every layer keeps all of them
