"""CONTRIBUTING.md's "Adding a family", tested: a toy family registered, converted to,
deployed, profiled and configured like the five built-in ones, then unregistered.

The toy layer below is the one CONTRIBUTING.md shows (a test checks that the two agree). It is
registered by a fixture, not at import, so that the generic tests parametrised over
``dynaconv.METHODS`` at collection never see it.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import dynaconv
from dynaconv import demo
from dynaconv.families import FAMILIES, register_family, unregister_family
from dynaconv.layers import DynaConv2d
from dynaconv.models import DigitsCNN
from dynaconv.train.config import ConfigError
from dynaconv.train.names import check_convert_options
from dynaconv.train.plots import plot_binary_structure, structure_plotter

NAME = "gainconv"
REGISTRATION = f'@register_family("{NAME}", demo_options={{"init_gain": 2.0}})'


class GainConv2d(DynaConv2d):
    """A conv whose kernel is ``gain[o] * direction[o]`` for each output channel ``o``: a
    trivially re-parameterised ``nn.Conv2d`` (weight normalisation without the norm).

    Args: those of ``nn.Conv2d``, plus ``init_gain``: the gains' initial value (finite, not 0).
    """

    title = "GainConv"

    def _init_family(self, device: Any, dtype: Any, *, init_gain: float = 1.0) -> None:
        if not isinstance(init_gain, int | float) or not math.isfinite(init_gain) or not init_gain:
            raise ValueError(f"init_gain must be a finite non-zero number, got {init_gain!r}")
        s = self.spec
        factory = {"device": device, "dtype": dtype}
        shape = (s.out_channels, s.in_channels // s.groups, *s.kernel_size)
        self.direction = nn.Parameter(torch.empty(shape, **factory))
        nn.init.kaiming_uniform_(self.direction, a=math.sqrt(5))
        self.gain = nn.Parameter(torch.full((s.out_channels,), float(init_gain), **factory))
        self.bias = nn.Parameter(torch.zeros(s.out_channels, **factory)) if s.bias else None

    @property
    def weight(self) -> Tensor:
        return self.gain[:, None, None, None] * self.direction

    def forward(self, x: Tensor) -> Tensor:
        return self.spec.conv2d(x, self.weight, self.bias)

    def deploy(self) -> nn.Conv2d:
        conv = self.spec.make_conv(device=self.gain.device, dtype=self.gain.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    @classmethod
    def _conversion(cls, conv: nn.Conv2d, *, init_gain: float = 1.0) -> dict[str, Any]:
        return {"init_gain": init_gain}

    def _copy_conv(self, conv: nn.Conv2d, options: dict[str, Any]) -> None:
        self.direction.copy_(conv.weight / self.gain[:, None, None, None])
        if conv.bias is not None:
            self.bias.copy_(conv.bias)


@contextmanager
def registered() -> Iterator[type[GainConv2d]]:
    """The toy family registered for the duration (the decorator of CONTRIBUTING.md, applied
    here rather than at import)."""
    register_family(NAME, demo_options={"init_gain": 2.0})(GainConv2d)
    try:
        yield GainConv2d
    finally:
        unregister_family(NAME)


@pytest.fixture
def family() -> Iterator[type[GainConv2d]]:
    with registered() as cls:
        yield cls


def _digits() -> DigitsCNN:
    torch.manual_seed(0)
    model = DigitsCNN(width=16).double().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def test_the_family_is_registered_like_the_built_in_ones(family):
    assert dynaconv.layer_class(NAME) is family is FAMILIES[NAME].layer
    assert family.method == NAME
    assert list(dynaconv.METHODS)[-1] == NAME
    assert dict(demo.DEMO_METHODS[NAME]) == {"init_gain": 2.0}
    assert demo.AUX_LOSS_WEIGHTS[NAME] == 0.0
    assert structure_plotter(NAME) is plot_binary_structure
    # nn.Conv2d's arguments, then the family's option; from_conv's options.
    parameters = list(inspect.signature(family).parameters)
    assert parameters[:3] == ["in_channels", "out_channels", "kernel_size"]
    assert parameters[-3:] == ["device", "dtype", "init_gain"]
    assert family.conversion_options() == ("init_gain",)
    with pytest.raises(ValueError, match="init_gain must be a finite non-zero number"):
        family(4, 4, 3, init_gain=0.0)


def test_convert_deploy_profile(family):
    plain = _digits()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    model, report = dynaconv.convert(plain, NAME, init_gain=2.0, return_report=True)
    assert len(report.converted) == 6 and not report.skipped
    layers = [m for m in model.modules() if isinstance(m, family)]
    assert len(layers) == 6
    assert all(bool((layer.gain == 2.0).all()) for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-12, atol=1e-12)
    deployed = dynaconv.deploy(model, example_input=x)  # verified against the model
    assert not any(isinstance(m, family) for m in deployed.modules())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), plain(x), rtol=1e-12, atol=1e-12)
    counts, plain_counts = (
        dynaconv.profile(model, (1, 1, 8, 8)),
        dynaconv.profile(plain, (1, 1, 8, 8)),
    )
    assert counts["macs"] == counts["macs_active"] == plain_counts["macs"]
    gains = sum(layer.gain.numel() for layer in layers)
    assert counts["params"] == plain_counts["params"] + gains
    assert counts["params_deployed"] == plain_counts["params"]


def test_configurations_name_the_family_and_its_options(family):
    check_convert_options(NAME, {"init_gain": 0.5})
    with pytest.raises(ConfigError, match=r"init_gainn is not an option of gainconv"):
        check_convert_options(NAME, {"init_gainn": 0.5})


def test_unregistered_after_use():
    with registered():
        assert NAME in dynaconv.METHODS
    assert NAME not in dynaconv.METHODS
    with pytest.raises(ValueError, match="method must be one of"):
        dynaconv.convert(nn.Conv2d(2, 2, 3), NAME)


def test_contributing_shows_this_family():
    """CONTRIBUTING.md's example is this file's layer, registered with the same decorator."""
    text = (Path(__file__).parents[1] / "CONTRIBUTING.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    shown = next(block for block in blocks if "class GainConv2d" in block)
    expected = REGISTRATION + "\n" + inspect.getsource(GainConv2d)
    assert expected in shown
