"""The family registry: one registration per family, the tables derived from it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

import dynaconv
from dynaconv import compat, demo
from dynaconv.families import (
    FAMILIES,
    STRUCTURE_PLOT_KINDS,
    Family,
    get_family,
    register_family,
    unregister_family,
)
from dynaconv.layers import DynaConv2d
from dynaconv.train import plots

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


def test_every_family_has_its_reference_loader_and_plot_kind():
    for name, family in FAMILIES.items():
        assert family.reference_loader is compat.LAYER_METHODS[name]
        assert family.structure_plot in STRUCTURE_PLOT_KINDS
    assert set(plots.PLOTTERS_BY_KIND) == set(STRUCTURE_PLOT_KINDS)
    assert plots.structure_plotter("dgconv") is plots.plot_dgconv_groups
    assert plots.structure_plotter("condconv") is plots.plot_condconv_routing
    assert plots.structure_plotter("unregistered") is plots.plot_binary_structure


def test_registration_is_checked_and_reversible():
    with pytest.raises(ValueError, match="already registered"):
        register_family("doconv")(type("Again", (DynaConv2d,), {}))
    with pytest.raises(ValueError, match="structure_plot must be one of"):
        Family("x", DynaConv2d, structure_plot="pie")
    with pytest.raises(ValueError, match="aux_loss_weight must be a number >= 0"):
        Family("x", DynaConv2d, aux_loss_weight=-1.0)
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
