"""CONTRIBUTING.md's "Adding a family", tested: the toy family's folder, written from the page,
imported as a package (which registers it), converted to, deployed, profiled and configured
like the five built-in ones, then unregistered.

The family is imported by a fixture, not at collection, so that the generic tests parametrised
over ``dynaconv.METHODS`` at collection never see it.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import dynaconv
from dynaconv import demo
from dynaconv.families import FAMILIES, unregister_family
from dynaconv.layers import DynaConv2d
from dynaconv.models import DigitsCNN
from dynaconv.train.config import ConfigError
from dynaconv.train.names import check_convert_options

NAME = "gainconv"
CONTRIBUTING = Path(__file__).parents[1] / "CONTRIBUTING.md"


def _family_files() -> dict[str, str]:
    """The page's code blocks that start with ``# gainconv/<file>``: file -> text."""
    blocks = re.findall(r"```python\n(.*?)```", CONTRIBUTING.read_text(), flags=re.S)
    files = {}
    for block in blocks:
        first, _, rest = block.partition("\n")
        if first.startswith(f"# {NAME}/"):
            files[first[2:].strip()] = rest
    return files


@contextmanager
def registered() -> Iterator[type[DynaConv2d]]:
    """The page's folder written to a temporary directory and imported for the duration."""
    with tempfile.TemporaryDirectory() as root:
        for relative, text in _family_files().items():
            path = Path(root) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        sys.path.insert(0, root)
        try:
            package = importlib.import_module(NAME)
            yield package.GainConv2d
        finally:
            sys.path.remove(root)
            for module in [m for m in sys.modules if m == NAME or m.startswith(f"{NAME}.")]:
                del sys.modules[module]
            if NAME in FAMILIES:
                unregister_family(NAME)


@pytest.fixture
def family() -> Iterator[type[DynaConv2d]]:
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
    assert family.static_kernel and not family.deploys_to_itself
    layer = family(4, 4, 3, init_gain=3.0)
    torch.testing.assert_close(
        layer.structure_maps({})["gain per output channel"], 3.0 * torch.ones(4)
    )
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


def test_the_page_shows_a_whole_folder():
    assert sorted(_family_files()) == [f"{NAME}/__init__.py", f"{NAME}/layer.py"]
    with registered() as cls:
        assert cls.__module__ == f"{NAME}.layer"
        assert "class GainConv2d" in inspect.getsource(cls)
