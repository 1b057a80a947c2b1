"""``dynaconv.convert`` on timm models, for every family.

timm builds its convs with ``create_conv2d`` (plain ``nn.Conv2d`` with symmetric padding in the
native models, the ``Conv2dSame`` subclass for TensorFlow's padding in the ``tf_`` ones) and
normalises with ``BatchNormAct2d``. What converts: every plain ``nn.Conv2d`` the family can
represent; a subclass of ``nn.Conv2d`` with its own forward (``Conv2dSame``) is skipped, since a
layer built from its attributes would compute another function. Each family's own rules (DGC
and LGC: no grouped convs; DGC: output channels divisible by the heads; LGC: channels divisible
by the groups; DGConv: ``Cin == Cout == 2^K``) are reported per conv. At conversion, DO-Conv,
DGConv and LGC equal the original network exactly and CondConv up to rounding; DGC scales its
inputs by the saliency (not equal by design).

Random weights (``pretrained=False``), batch 2 at 32 x 32, one thread (see ``_one_thread``):
the 25 cases take about 20 s.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import dynaconv
from dynaconv.demo import DEMO_METHODS

timm = pytest.importorskip(
    "timm", reason="timm is not installed (pip install timm): the timm interop tests need it"
)


@pytest.fixture(autouse=True)
def _one_thread():
    """These small networks run hundreds of tiny convs, each an OpenMP region: on a busy
    machine two threads wait on each other (10x slower measured), one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
