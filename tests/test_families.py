"""The family registry: one registration per family, the tables derived from it."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

import dynaconv
from dynaconv import compat, demo
from dynaconv.families import (
    FAMILIES,
    Family,
    get_family,
    register_family,
    unregister_family,
)
from dynaconv.layers import ConversionSkipped, DynaConv2d, SameConv2d

PAPERS_ORDER = ["doconv", "condconv", "dgc", "dgconv", "lgc"]


def test_families_are_registered_in_the_papers_order_with_their_layers():
    assert list(FAMILIES) == PAPERS_ORDER
    for name, family in FAMILIES.items():
        assert family.name == name
        assert issubclass(family.layer, DynaConv2d)
        assert family.layer.method == name
        assert dynaconv.layer_class(name) is family.layer


def test_tables_are_read_only_views_of_the_registry():
    assert list(dynaconv.METHODS) == PAPERS_ORDER
    assert dict(dynaconv.METHODS) == {n: f.layer for n, f in FAMILIES.items()}
    assert dict(demo.DEMO_METHODS["dgc"]) == {"heads": 4, "gate_factor": 0.25, "squeeze_rate": 4}
    assert demo.AUX_LOSS_WEIGHTS["dgc"] == 1e-5
    assert demo.AUX_LOSS_WEIGHTS["doconv"] == 0.0
    with pytest.raises(TypeError):
        dynaconv.METHODS["x"] = nn.Conv2d  # type: ignore[index]
    with pytest.raises(TypeError):
        demo.DEMO_METHODS["condconv"]["num_experts"] = 2  # type: ignore[index]


def test_every_family_has_its_reference_loader_and_states_its_facts():
    for name in FAMILIES:
        assert callable(compat.LAYER_METHODS[name]), name
    assert [n for n, f in FAMILIES.items() if f.layer.static_kernel] == ["doconv", "dgconv", "lgc"]
    assert [n for n, f in FAMILIES.items() if f.layer.deploys_to_itself] == ["condconv"]


def test_structure_maps_are_the_layers_hook():
    dgconv = dynaconv.GroupableConv2d(8, 8, 1)
    with torch.no_grad():
        dgconv.gate.copy_(torch.tensor([1.0, -1.0, -1.0]))
    assert float(dgconv.structure_maps({})["learned groups"]) == 4.0
    condconv = dynaconv.CondConv2d(4, 4, 1, num_experts=3)
    routing = torch.tensor([[0.2, 0.4, 0.9], [0.4, 0.6, 0.1]])
    maps = condconv.structure_maps({"routing": routing, "other": torch.randn(2, 5)})
    torch.testing.assert_close(maps["mean routing weight per expert"], routing.mean(0))
    default = dynaconv.DOConv2d(4, 4, 3).structure_maps({})  # the 0/1-valued tensors
    assert "D_diag" in default and "W" not in default
    assert all(bool(((m == 0) | (m == 1)).all()) and m.dim() == 2 for m in default.values())


def test_registration_is_checked_and_reversible():
    with pytest.raises(ValueError, match="already registered"):
        register_family("doconv")(type("Again", (DynaConv2d,), {}))
    with pytest.raises(ValueError, match="layer must be a class"):
        Family("x", "DynaConv2d")  # type: ignore[arg-type]
    negative = type("Negative", (DynaConv2d,), {"example_aux_loss_weight": -1.0})
    with pytest.raises(ValueError, match=r"Negative\.example_aux_loss_weight must be >= 0"):
        register_family("negative")(negative)
    assert "negative" not in FAMILIES
    with pytest.raises(ValueError, match="method is 'other', registered as 'named'"):
        register_family("named")(type("Named", (DynaConv2d,), {"method": "other"}))
    assert "named" not in FAMILIES
    cls = register_family("temporary")(type("Temporary", (DynaConv2d,), {}))
    try:
        assert cls.method == "temporary"
        assert dynaconv.layer_class("temporary") is cls
        assert "temporary" in demo.DEMO_METHODS
    finally:
        assert unregister_family("temporary").layer is cls
    assert "temporary" not in dynaconv.METHODS
    with pytest.raises(ValueError, match="method must be one of"):
        get_family("temporary")


def test_importing_dynaconv_does_not_import_matplotlib():
    code = "import sys, dynaconv, dynaconv.train.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# The layer contract, written once in DynaConv2d

FAMILY_OPTIONS = {
    "doconv": {"D_mul": None},
    "condconv": {
        "num_experts": 8,
        "routing_dropout": 0.0,
        "impl": "auto",
        "shared_routing": False,
        "bias_per_expert": True,
    },
    "dgc": {
        "heads": 4,
        "squeeze_rate": 16,
        "gate_factor": 0.25,
        "impl": "auto",
        "saliency_mode": "reference",
        "hidden_width": None,
    },
    "dgconv": {"sort": False, "impl": "auto"},
    "lgc": {
        "learned_groups": 4,
        "condense_factor": None,
        "dropout": 0.0,
        "reference_lasso": False,
    },
}


def _shape(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("method", PAPERS_ORDER)
def test_signature_is_conv2d_then_the_family_options(method):
    signature = inspect.signature(dynaconv.layer_class(method))
    conv = _shape(inspect.signature(nn.Conv2d))
    assert _shape(signature)[: len(conv)] == conv
    options = list(signature.parameters.values())[len(conv) :]
    assert all(p.kind is p.KEYWORD_ONLY for p in options)
    assert {p.name: p.default for p in options} == FAMILY_OPTIONS[method]


def test_conv_arguments_stay_positional_and_options_reach_the_family():
    layer = dynaconv.DOConv2d(4, 6, 3, 2, 1, 1, 2, False, "reflect", None, torch.float64, D_mul=12)
    assert (layer.stride, layer.padding, layer.groups, layer.padding_mode) == (
        (2, 2),
        (1, 1),
        2,
        "reflect",
    )
    assert layer.bias is None and layer.W.dtype == torch.float64 and layer.D_mul == 12
    with pytest.raises(TypeError, match="D_mull"):
        dynaconv.DOConv2d(4, 6, 3, D_mull=12)
    # A class with its own __init__ keeps that signature; an instance's is its __call__'s.
    assert list(inspect.signature(ProgressLike).parameters) == ["channels"]
    assert "in_channels" not in inspect.signature(layer).parameters


class ProgressLike(DynaConv2d):
    def __init__(self, channels: int = 3) -> None:
        super().__init__(channels, channels, 1)


@pytest.mark.parametrize("method", PAPERS_ORDER)
def test_from_conv_common_checks(method):
    cls = dynaconv.layer_class(method)
    with pytest.raises(ValueError, match=rf"unknown {cls.title} option\(s\): \['bogus'\]"):
        cls.from_conv(nn.Conv2d(8, 8, 3), bogus=1)
    with pytest.raises(ConversionSkipped, match=r"SameConv2d is not a plain nn\.Conv2d"):
        cls.from_conv(SameConv2d(8, 8, 3, stride=2))
    grouped = nn.Conv2d(8, 8, 3, groups=2).double()
    if cls.conv_groups == "one":
        with pytest.raises(ConversionSkipped, match=rf"groups=2\); {cls.title} needs groups=1"):
            cls.from_conv(grouped, **demo.DEMO_METHODS[method])
        return
    layer = cls.from_conv(grouped.eval(), **demo.DEMO_METHODS[method])
    assert layer.groups == (1 if cls.conv_groups == "learn" else 2)
    assert not layer.training
    assert next(layer.parameters()).dtype == torch.float64
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    if method != "condconv":  # CondConv starts equal up to its expert noise's rounding
        torch.testing.assert_close(layer(x), grouped(x), rtol=1e-12, atol=1e-12)
    assert set(cls.conversion_options()) >= set(demo.DEMO_METHODS[method])


def test_from_conv_without_hooks_is_not_implemented():
    with pytest.raises(NotImplementedError, match=r"ProgressLike cannot be built from nn\.Conv2d"):
        ProgressLike.from_conv(nn.Conv2d(3, 3, 1))
