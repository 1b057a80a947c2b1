"""The generic name -> object registry and the network registry built on it."""

from __future__ import annotations

import inspect

import pytest
import torch

import dynaconv.models
from dynaconv.models import create_model, get_model_builder, list_models, register_model
from dynaconv.registry import Registry


def test_register_by_function_name_and_by_given_name():
    registry: Registry = Registry("widget")

    @registry.register
    def small(width: int = 2) -> int:
        return width

    @registry.register("large")
    def build_large() -> int:
        return 99

    assert registry.get("small") is small and small() == 2  # the decorator returns it unchanged
    assert registry.get("large") is build_large
    assert "small" in registry and "build_large" not in registry and 3 not in registry
    assert list(registry) == ["small", "large"]  # registration order
    assert registry.names() == ["large", "small"]  # sorted
    assert registry.names("sm*") == ["small"]
    assert len(registry) == 2
    assert dict(registry.view) == {"small": small, "large": build_large}


def test_unknown_name_lists_the_registered_ones():
    registry: Registry = Registry("widget")
    registry.add("b", 2)
    registry.add("a", 1)
    with pytest.raises(ValueError, match=r"unknown widget 'c'; registered: a, b"):
        registry.get("c")
    with pytest.raises(ValueError, match="unknown widget"):
        registry.get(["not", "hashable"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered: none"):
        Registry("widget").get("a")


def test_duplicate_and_malformed_names_are_refused():
    registry: Registry = Registry("widget")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.add("a", 2)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(len)
    assert registry.get("a") == 1  # the first registration stands
    for bad in ("", " a", 3):
        with pytest.raises(ValueError, match="widget name must be a non-empty string"):
            registry.add(bad, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="register a widget"):
        registry.register(42)


def test_the_view_is_read_only_and_live():
    registry: Registry = Registry("widget")
    view = registry.view
    registry.add("a", 1)
    assert view["a"] == 1
    with pytest.raises(TypeError):
        view["b"] = 2  # type: ignore[index]


def test_every_network_registers_itself_with_its_builder():
    names = list_models()
    assert names == sorted(names)
    assert set(names) == {
        "digits_cnn",
        *(f"condensenet{depth}" for depth in (50, 74, 86, 98, 110, 122, 182)),
        "condensenet74_imagenet_g4",
        "condensenet74_imagenet_g8",
        "condensenet_light",
        "dydensenet86",
        "dydensenet74_imagenet",
        "dyresnet18",
        "g_resnext50",
        "g_resnext101",
        "efficientnet_b0_condconv4",
        "efficientnet_b0_condconv8",
        "efficientnet_b0_depth_condconv8",
    }
    assert list_models("condensenet74*") == [
        "condensenet74",
        "condensenet74_imagenet_g4",
        "condensenet74_imagenet_g8",
    ]
    for name in names:
        builder = get_model_builder(name)
        assert builder.__name__ == name
        assert getattr(dynaconv.models, name) is builder
        assert dynaconv.models.MODELS[name] is builder
        assert inspect.getmodule(builder).__name__.startswith("dynaconv.models.")
    assert set(dynaconv.models.MODELS) == set(names)
    with pytest.raises(TypeError):
        dynaconv.models.MODELS["x"] = len  # type: ignore[index]


def test_create_model_builds_by_name_and_refuses_unknown_names():
    torch.manual_seed(0)
    model = create_model("digits_cnn", num_classes=7, width=8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 7)
    with pytest.raises(ValueError, match=r"unknown model 'nope'; registered: .*digits_cnn"):
        create_model("nope")
    with pytest.raises(ValueError, match="unknown model"):
        get_model_builder("nope")


def test_a_second_registration_of_a_network_name_is_refused():
    with pytest.raises(ValueError, match="model 'digits_cnn' is already registered"):

        @register_model
        def digits_cnn() -> None:  # pragma: no cover - never registered
            return None

    assert get_model_builder("digits_cnn").__module__ == "dynaconv.models.digits"


def test_remove_unregisters_and_names_the_entries_when_unknown():
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    registry.add("b", 2)
    assert registry.remove("a") == 1
    assert list(registry) == ["b"] and "a" not in registry.view
    with pytest.raises(ValueError, match="unknown thing 'a'; registered: b"):
        registry.remove("a")
    registry.add("a", 3)  # the name is free again
    assert registry.get("a") == 3
