"""timm interop: timm's EfficientNet-CondConv checkpoints load exactly, and
``dynaconv.convert`` works on timm models for every family.

**Loading.** timm's models are built with random weights (``pretrained=False``: nothing is downloaded),
given BatchNorm statistics by a training-mode pass (so that activations keep a sane scale and
the epsilon matters), converted, and compared with timm's own forward in float64. The input is
32 x 37: TensorFlow's SAME padding is asymmetric wherever a strided conv's input size is even
(every stride-2 conv along the height here, and the third along the width) and symmetric where
it is odd. Float64 depthwise convs take PyTorch's slow per-group path on CPU, so the default
run checks the two 4-expert B0 variants (native and TensorFlow) and the others are marked slow.

**Converting.** timm builds its convs with ``create_conv2d`` (plain ``nn.Conv2d`` with symmetric padding in the
native models, the ``Conv2dSame`` subclass for TensorFlow's padding in the ``tf_`` ones) and
normalises with ``BatchNormAct2d``. What converts: every plain ``nn.Conv2d`` the family can
represent; a subclass of ``nn.Conv2d`` with its own forward (``Conv2dSame``) is skipped, since a
layer built from its attributes would compute another function. Each family's own rules (DGC
and LGC: no grouped convs; DGC: output channels divisible by the heads; LGC: channels divisible
by the groups; DGConv: ``Cin == Cout == 2^K``) are reported per conv. At conversion, DO-Conv,
DGConv and LGC equal the original network exactly and CondConv up to rounding; DGC scales its
inputs by the saliency (not equal by design).

Random weights (``pretrained=False``), batch 2 at 32 x 32, one thread (the ``one_thread`` fixture):
the 25 cases take about 20 s.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynaconv
from dynaconv.compat.timm import (
    TIMM_MODELS,
    layer_from_timm,
    model_from_timm,
    state_dict_from_timm,
    timm_padding,
)
from dynaconv.demo import DEMO_METHODS
from dynaconv.layers import CondConv2d, SameConv2d
from dynaconv.models import EfficientNetCondConv

timm = pytest.importorskip(
    "timm", reason="timm is not installed (pip install timm): the timm interop tests need it"
)

EXACT = {"rtol": 1e-10, "atol": 1e-12}


pytestmark = pytest.mark.usefixtures("one_thread")


FAST = ("efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_4e")
INPUT_SHAPE = (1, 3, 32, 37)


@functools.cache
def _random_timm(name: str, seed: int = 0) -> nn.Module:
    """timm's model with random weights and BatchNorm statistics of a random batch, float64
    (cached: the tests only read it)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # timm's BatchNormAct2d included
                module.momentum = None  # running statistics = this pass's
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
        model.train()(torch.randn(8, 3, 64, 64))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # no channel blown up by a tiny variance
                module.running_var.clamp_(min=0.1)
    return model.double().eval()


def _input(seed: int = 1) -> torch.Tensor:
    return torch.randn(
        INPUT_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(TIMM_MODELS)],
)
def test_every_timm_variant_gives_the_same_logits(name):
    source = _random_timm(name)
    model = model_from_timm(name, source.state_dict())
    variant = TIMM_MODELS[name]
    assert isinstance(model, EfficientNetCondConv)
    assert model.stem[1].eps == variant.bn_eps
    assert isinstance(model.stem[0], SameConv2d) == (variant.padding == "same")
    strided = [m for m in model.modules() if isinstance(m, CondConv2d) and m.stride != (1, 1)]
    padding = "same" if name.startswith("tf_") else (2, 2)
    assert strided and all(m.padding == padding for m in strided)
    x = _input()
    with torch.no_grad():
        expected = source(x)
        assert expected.abs().max() < 1e3  # a sane scale, so that the tolerance means something
        torch.testing.assert_close(model(x), expected, **EXACT)
    # Built from the timm model itself: its eps and padding are read from it.
    from_module = model_from_timm(source)
    assert from_module.stem[1].eps == variant.bn_eps
    assert type(from_module.stem[0]) is type(model.stem[0])
    for key, value in model.state_dict().items():
        assert torch.equal(from_module.state_dict()[key], value), key


def test_loading_without_tensorflow_padding_is_not_exact():
    """The check can fail: the TF checkpoint with symmetric padding gives other logits."""
    name = "tf_efficientnet_cc_b0_4e"
    source = _random_timm(name)
    wrong = EfficientNetCondConv(4, bn_eps=1e-3, padding="symmetric").double().eval()
    wrong.load_state_dict(state_dict_from_timm(source.state_dict(), wrong.state_dict()))
    x = _input()
    with torch.no_grad():
        assert (wrong(x) - source(x)).abs().max() > 1e-3


def test_names_with_tags_and_errors():
    torch.manual_seed(0)
    state = timm.create_model("efficientnet_cc_b0_4e", pretrained=False).state_dict()
    model = model_from_timm("timm/efficientnet_cc_b0_4e.untrained", state)
    assert model.stem[1].eps == 1e-5 and not model.training
    with pytest.raises(ValueError, match="timm model name must be one of"):
        model_from_timm("efficientnet_b0", state)
    with pytest.raises(ValueError, match="does not fit"):  # 4 experts, B0 depth: not B1-8e
        model_from_timm("efficientnet_cc_b1_8e", state)
    with pytest.raises(ValueError, match="set by the timm checkpoint"):
        model_from_timm("efficientnet_cc_b0_4e", state, bn_eps=1e-3)
    with pytest.raises(ValueError, match="state dict is needed"):
        model_from_timm("efficientnet_cc_b0_4e")
    broken = dict(state)
    broken["blocks.4.0.conv_dw.weight"] = broken["blocks.4.0.conv_dw.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"blocks\.8\.depthwise\.weight"):
        model_from_timm("efficientnet_cc_b0_4e", broken)
    extra = {**state, "blocks.0.0.extra.weight": state["bn1.weight"]}
    with pytest.raises(ValueError, match="unexpected key"):
        model_from_timm("efficientnet_cc_b0_4e", extra)


# --------------------------------------------------------------------------- one layer

layer_configs = st.fixed_dictionaries(
    {
        "cin_per_group": st.integers(1, 4),
        "cout_per_group": st.integers(1, 4),
        "groups": st.integers(1, 3),
        "kernel": st.sampled_from([1, 2, 3, 5, (3, 1), (2, 4)]),
        "stride": st.sampled_from([1, 2, 3, (2, 1)]),
        "dilation": st.sampled_from([1, 2]),
        "padding": st.sampled_from(["", "same", "valid", 1, (0, 2)]),
        "bias": st.booleans(),
        "experts": st.integers(1, 5),
        "batch": st.integers(1, 3),
        "size": st.tuples(st.integers(9, 13), st.integers(9, 13)),  # > the dilated kernel
        "seed": st.integers(0, 2**16),
    }
)


@given(cfg=layer_configs)
@settings(max_examples=60)
def test_a_timm_condconv_layer_loads_exactly(cfg):
    from timm.layers import CondConv2d as TimmCondConv2d

    torch.manual_seed(cfg["seed"])
    config = {
        "in_channels": cfg["cin_per_group"] * cfg["groups"],
        "out_channels": cfg["cout_per_group"] * cfg["groups"],
        "kernel_size": cfg["kernel"],
        "stride": cfg["stride"],
        "padding": cfg["padding"],
        "dilation": cfg["dilation"],
        "groups": cfg["groups"],
        "bias": cfg["bias"],
        "num_experts": cfg["experts"],
    }
    source = TimmCondConv2d(**config, dtype=torch.float64)
    x = torch.randn(cfg["batch"], config["in_channels"], *cfg["size"], dtype=torch.float64)
    r = torch.rand(cfg["batch"], cfg["experts"], dtype=torch.float64)
    expected = source(x, r)
    for layer in (layer_from_timm(source), layer_from_timm(config, source.state_dict())):
        assert layer.shared_routing
        torch.testing.assert_close(layer(x, routing_weights=r), expected, **EXACT)


def test_timm_padding_rules():
    assert timm_padding("", 3, 2) == (1, 1)
    assert timm_padding("", 4, 1) == (1, 1)  # ((s - 1) + d (k - 1)) // 2, not k // 2
    assert timm_padding("", (5, 1), (2, 1), 2) == (4, 0)
    assert timm_padding("SAME", 3, 2) == "same"
    assert timm_padding("valid", 3) == (0, 0)
    assert timm_padding(2, 3) == (2, 2)
    with pytest.raises(ValueError, match="timm padding"):
        timm_padding("full", 3)


def test_layer_errors():
    config = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "num_experts": 2}
    weight = torch.randn(2, 6 * 4 * 9)
    with pytest.raises(ValueError, match="state dict is needed"):
        layer_from_timm(config)
    with pytest.raises(ValueError, match="unknown timm CondConv2d argument"):
        layer_from_timm({**config, "experts": 2}, {"weight": weight})
    with pytest.raises(ValueError, match=r"must have shape \(num_experts"):
        layer_from_timm(config, {"weight": weight[:, :-1]})
    with pytest.raises(ValueError, match="bias"):
        layer_from_timm(config, {"weight": weight, "bias": torch.randn(2, 6)})
    with pytest.raises(ValueError, match="not a timm CondConv2d"):
        layer_from_timm(nn.Conv2d(4, 6, 3))


# ------------------------------------------------------------------------------ convert
MODELS = ("mobilenetv3_small_050", "resnet10t", "efficientnet_b0", "convnext_atto", "regnetx_002")

#: What each family may skip in a network of plain convs, and why (the report's words).
ALLOWED_SKIPS = {
    "condconv": None,
    "doconv": None,
    "dgc": r"grouped conv \(groups=\d+\); DGC needs groups=1|not divisible by heads=\d+",
    "dgconv": r"DGConv needs in_channels == out_channels == 2\^K",
    "lgc": r"grouped conv \(groups=\d+\)|do not divide into learned_groups=\d+",
}
EXACT_AT_CONVERSION = {"doconv", "dgconv", "lgc"}
EQUAL_UP_TO_ROUNDING = {"condconv"}


def _cases():
    for model in MODELS:
        for method in sorted(dynaconv.METHODS):
            yield pytest.param(model, method, id=f"{model}-{method}")


def _conv_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize(("name", "method"), list(_cases()))
def test_convert_a_timm_model(name, method):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    converted, report = dynaconv.convert(model, method, return_report=True, **DEMO_METHODS[method])
    # Every conv is accounted for: converted, or skipped with a reason this family gives.
    assert set(report.converted) | set(report.skipped) == _conv_names(model)
    assert not set(report.converted) & set(report.skipped)
    allowed = ALLOWED_SKIPS[method]
    for conv, why in report.skipped.items():
        assert allowed is not None and re.search(allowed, why), f"{conv}: {why}"
        assert f"skipped {conv}: {why}" in str(report)
    if allowed is None:
        assert not report.skipped
    layers = dict(dynaconv.dynaconv_layers(converted))
    assert sorted(layers) == sorted(report.converted)
    # Inference.
    with torch.no_grad():
        y = converted.eval()(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    scale = reference.abs().max().item()
    if method in EXACT_AT_CONVERSION:
        torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-6 * scale)
    elif method in EQUAL_UP_TO_ROUNDING:
        torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-5 * scale)
    # One training step's forward and backward.
    converted.train()
    dynaconv.set_progress(converted, 0.5)
    out = converted(x)
    loss = out.square().mean() + dynaconv.aux_loss(converted)
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    grads = [p.grad for p in converted.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_tensorflow_padded_convs_are_reported_not_converted():
    """timm's ``Conv2dSame`` (TensorFlow padding, a subclass with its own forward) is skipped
    with the reason; the plain convs around it are converted and the network still runs."""
    torch.manual_seed(0)
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=10)
    same = {n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"}
    assert same  # the stem and the strided depthwise convs
    converted, report = dynaconv.convert(model, "doconv", return_report=True)
    assert set(report.skipped) == same
    assert all(why == "Conv2dSame is not a plain nn.Conv2d" for why in report.skipped.values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-6, atol=1e-7)
