"""dynaconv.compat: safe checkpoint loading and the reference-name registries."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dynaconv
from conftest import load_fixture
from dynaconv import DOConv2d, compat
from dynaconv.layers.lgc.layer import CondensedGroupConv2d
from dynaconv.models.condensenet import CondenseNet, deploy_condensenet

unpickled_log: list[str] = []


def _record_unpickling(tag: str) -> str:
    unpickled_log.append(tag)
    return tag


class RunsCodeWhenLoaded:
    """Unpickling this calls ``_record_unpickling``: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_record_unpickling, ("ran",))


@dataclasses.dataclass
class TrainingArgs:
    arch: str = "condensenet"
    groups: int = 4


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    layer = DOConv2d(4, 6, 3, padding=1, bias=False)
    nn.init.normal_(layer.D)
    return layer.state_dict()


def _save(tmp_path: Path, obj, name: str = "checkpoint.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_bare_state_dict(tmp_path):
    state = _state_dict()
    found = compat.load_checkpoint(_save(tmp_path, state))
    _assert_same_tensors(found.state_dict, state)
    assert found.config == {} and found.extra == {}


def test_wrapped_data_parallel_checkpoint_with_args(tmp_path):
    state = _state_dict()
    args = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "padding": 1}
    checkpoint = {
        "epoch": 7,
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "args": args,
        "best_prec1": 93.5,
    }
    found = compat.load_checkpoint(str(_save(tmp_path, checkpoint)))
    _assert_same_tensors(found.state_dict, state)
    assert found.config == args
    assert found.extra == {"epoch": 7, "best_prec1": 93.5}
    # What the file holds builds the reference layer (its bias defaults to False) exactly.
    layer = compat.layer_from_reference("doconv", found.config, found.state_dict)
    original = DOConv2d(4, 6, 3, padding=1, bias=False)
    original.load_state_dict(state)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(layer(x), original(x))


@pytest.mark.parametrize("key", ["model", "model_state_dict", "net", "weights"])
def test_other_state_dict_keys(tmp_path, key):
    state = _state_dict()
    found = compat.load_checkpoint(_save(tmp_path, {key: state, "config": {"groups": 2}}))
    _assert_same_tensors(found.state_dict, state)
    assert found.config == {"groups": 2}


def test_truncated_file_gives_a_clear_value_error(tmp_path):
    path = _save(tmp_path, _state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot be read as a weights-only checkpoint") as info:
        compat.load_checkpoint(path)
    assert "truncated" in str(info.value) and str(path) in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot be read"):
        compat.load_checkpoint(garbage)


@pytest.mark.parametrize(
    "payload",
    [
        RunsCodeWhenLoaded(),
        argparse.Namespace(arch="condensenet", groups=4),
        TrainingArgs(),
    ],
    ids=["reduce", "namespace", "dataclass"],
)
def test_pickled_objects_are_refused_without_running_code(tmp_path, payload):
    path = _save(tmp_path, {"state_dict": _state_dict(), "args": payload})
    unpickled_log.clear()
    with pytest.raises(ValueError, match="pickled objects that would run code"):
        compat.load_checkpoint(path)
    assert unpickled_log == []
    torch.load(path, weights_only=False)  # the file really does run code when trusted
    assert unpickled_log == (["ran"] if isinstance(payload, RunsCodeWhenLoaded) else [])


def test_unknown_layouts_say_what_was_found(tmp_path):
    path = _save(tmp_path, {"epoch": 3, "weights_v2": [1, 2], "note": "x"})
    with pytest.raises(ValueError, match="unknown checkpoint layout") as info:
        compat.load_checkpoint(path)
    message = str(info.value)
    assert "'epoch': int" in message and "'weights_v2': list" in message
    assert "state_dict" in message  # and what it expected
    with pytest.raises(ValueError, match="expected a dict, found list"):
        compat.load_checkpoint(_save(tmp_path, [torch.zeros(2)], "list.pth"))
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        compat.load_checkpoint(_save(tmp_path, {}, "empty.pth"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        compat.load_checkpoint(tmp_path / "missing.pth")


def test_strip_prefix_only_when_every_key_has_it():
    a, b = torch.zeros(1), torch.ones(1)
    assert compat.strip_prefix({"module.a": a, "module.b": b}) == {"a": a, "b": b}
    assert compat.strip_prefix({"module.a": a, "b": b}) == {"module.a": a, "b": b}
    assert compat.strip_prefix({}) == {}


def test_unknown_names_raise_value_error():
    with pytest.raises(ValueError, match="method must be one of"):
        compat.layer_from_reference("do_conv", {}, {})
    with pytest.raises(ValueError, match="architecture must be one of"):
        compat.model_from_reference("resnet50", {}, {})
    with pytest.raises(ValueError, match="not a reference DOConv2d state dict"):
        compat.layer_from_reference(
            "doconv",
            {"in_channels": 4, "out_channels": 4, "kernel_size": 3},
            {"weight": torch.zeros(4, 4, 3, 3)},
        )
    with pytest.raises(ValueError, match="unknown reference DOConv2d argument"):
        compat.layer_from_reference("doconv", {"in_channels": 4, "kernel": 3}, _state_dict())


def test_registries_name_the_issue_methods_and_architectures():
    assert set(compat.LAYER_METHODS) == {"doconv", "condconv", "dgc", "dgconv", "lgc"}
    assert set(compat.ARCHITECTURES) == {
        "condensenet",
        "dydensenet",
        "dyresnet18",
        "g_resnext50",
        "g_resnext101",
    }


def test_a_family_s_layer_loader_lives_in_its_folder():
    for method, loader in compat.LAYER_METHODS.items():
        assert loader.__module__ == f"dynaconv.layers.{method}.reference", (method, loader)
    for arch, loader in compat.ARCHITECTURES.items():
        assert loader.__module__.startswith("dynaconv.compat."), (arch, loader.__module__)


# ------------------------------------------------------------------------------ key checks


def _lgc_reference_state(cin: int = 16, cout: int = 8) -> dict[str, torch.Tensor]:
    """A reference ``LearnedGroupConv`` state dict (its BN, its conv, no condensation yet)."""
    torch.manual_seed(0)
    return {
        "norm.weight": torch.rand(cin) + 0.5,
        "norm.bias": torch.randn(cin),
        "norm.running_mean": torch.randn(cin),
        "norm.running_var": torch.rand(cin) + 0.5,
        "norm.num_batches_tracked": torch.tensor(3),
        "conv.weight": torch.randn(cout, cin, 1, 1),
    }


LGC_CONFIG = {"in_channels": 16, "out_channels": 8, "kernel_size": 1, "groups": 4}


def _family_case(family: str) -> tuple[dict, dict[str, torch.Tensor], set[str]]:
    """``(config, reference state dict, keys that must be there)`` of one layer family."""
    if family == "lgc":
        required = {"conv.weight", "norm.weight", "norm.bias", "norm.running_mean"}
        return LGC_CONFIG, _lgc_reference_state(), required | {"norm.running_var"}
    name, required = {
        "doconv": ("conv3x3_bias.pt", {"W", "D", "bias"}),
        "condconv": ("e4_c16_32.pt", {"weight", "bias", "_routing_fn.fc.weight"}),
        "dgconv": ("c32_gates00110_sort.pt", {"gate", "conv.weight", "conv.bias"}),
    }[family]
    data = load_fixture(family, name)
    return data["config"], data["state_dict"], required


@pytest.mark.parametrize("family", ["doconv", "condconv", "dgconv", "lgc"])
def test_layer_loaders_name_missing_and_unexpected_keys(family):
    config, state, required = _family_case(family)
    compat.layer_from_reference(family, config, state)  # the complete state dict loads
    for key in sorted(required):
        incomplete = {k: v for k, v in state.items() if k != key}
        incomplete_config = config
        if family != "lgc" and key.endswith("bias"):  # else the config follows the state dict
            incomplete_config = {**config, "bias": True}
        with pytest.raises(ValueError, match=rf"missing key\(s\) \[{key!r}\]"):
            compat.layer_from_reference(family, incomplete_config, incomplete)
    extra = {**state, "headconv_0.fc1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['headconv_0.fc1.weight'\]"):
        compat.layer_from_reference(family, config, extra)
    both = {**{k: v for k, v in state.items() if k != sorted(required)[0]}, "extra": torch.ones(1)}
    with pytest.raises(ValueError, match=r"missing key\(s\) .*unexpected key\(s\) \['extra'\]"):
        compat.layer_from_reference(family, config, both)


def test_key_check_message_says_what_was_expected():
    from dynaconv.reference import check_state_keys

    check_state_keys({"a": 1, "c": 2}, {"a"}, {"b", "c"}, layout="reference X")
    with pytest.raises(ValueError) as info:
        check_state_keys({"a": 1, "z": 2}, {"a", "b"}, {"c"}, layout="reference X")
    assert str(info.value) == (
        "reference X state dict does not fit: missing key(s) ['b'], unexpected key(s) ['z'] "
        "(expected the keys ['a', 'b'] and optionally ['c'])"
    )


# ------------------------------------------------------------------------------ DO-Conv bias


@pytest.mark.parametrize("name", ["conv3x3_bias", "conv1x1", "grouped_stride2_dmul12"])
def test_doconv_config_without_bias_uses_the_reference_default(name):
    # The reference DOConv2d defaults to bias=True: its checkpoints have a bias entry even
    # when the stored arguments do not mention bias.
    data = load_fixture("doconv", f"{name}.pt")
    assert data["config"]["bias"] is True and "bias" in data["state_dict"]
    config = {k: v for k, v in data["config"].items() if k != "bias"}
    layer = compat.layer_from_reference("doconv", config, data["state_dict"]).double()
    assert layer.bias is not None
    torch.testing.assert_close(
        layer(data["x"].double()), data["y"], rtol=1e-7, atol=1e-9, check_dtype=False
    )


def test_doconv_bias_contradicting_the_state_dict_is_refused():
    with_bias = load_fixture("doconv", "conv3x3_bias.pt")
    without_bias = load_fixture("doconv", "depthwise.pt")
    config = {k: v for k, v in without_bias["config"].items() if k != "bias"}
    assert compat.layer_from_reference("doconv", config, without_bias["state_dict"]).bias is None
    with pytest.raises(ValueError, match=r"missing key\(s\) \['bias'\]"):
        compat.layer_from_reference("doconv", {**config, "bias": True}, without_bias["state_dict"])
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['bias'\]"):
        compat.layer_from_reference(
            "doconv", {**with_bias["config"], "bias": False}, with_bias["state_dict"]
        )


# ------------------------------------------------------------------------------ LGC state


def _condensed_reference_state(stage: int, factor: int = 4) -> dict[str, torch.Tensor]:
    """The reference layer after ``stage`` stages (``_mask``, ``_stage``, ``_count``)."""
    config = {**LGC_CONFIG, "condense_factor": factor}
    native = compat.layer_from_reference("lgc", config, _lgc_reference_state()).conv
    native.set_progress(stage / (2 * (factor - 1)))
    assert int(native.stage) == stage
    state = _lgc_reference_state()
    state["_mask"] = native.mask[:, :, None, None].float()
    state["_stage"] = torch.full((1,), float(stage))
    state["_count"] = torch.full((1,), float(stage * 16 // factor))
    return state


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"_stage": torch.full((1,), 4.0)}, "_stage"),  # beyond C - 1 = 3
        ({"_stage": torch.full((1,), -1.0)}, "_stage"),
        ({"_stage": torch.full((1,), 1.5)}, "_stage"),
        ({"_stage": torch.full((1,), 2.0), "_count": torch.full((1,), 4.0)}, "_stage"),
        ({"_mask": "flip a row inside a group"}, "_mask"),
        ({"_mask": "halve"}, "_mask"),
    ],
)
def test_lgc_loader_refuses_impossible_reference_states(change, key):
    state = _condensed_reference_state(1)
    compat.layer_from_reference("lgc", LGC_CONFIG, state)  # as saved, it loads
    for name, value in change.items():
        if value == "flip a row inside a group":
            mask = state["_mask"].clone()
            mask[4, :, 0, 0] = mask[0, :, 0, 0].roll(1)  # row 4 is group 0's second row
            value = mask
        elif value == "halve":
            value = state["_mask"] * 0.5
        state[name] = value
    with pytest.raises(ValueError, match=key):
        compat.layer_from_reference("lgc", LGC_CONFIG, state)


def _reference_condensenet_state(model) -> dict[str, torch.Tensor]:
    """A native CondenseNet's state dict in the reference's key names and buffer layouts."""
    from dynaconv import LearnedGroupConv2d

    state = {}
    lgc = {f"{n}." for n, m in model.named_modules() if isinstance(m, LearnedGroupConv2d)}
    for key, value in model.state_dict().items():
        prefix = next((p for p in lgc if key.startswith(p)), None)
        if prefix is not None:
            name = key[len(prefix) :]
            if name == "dense_weight":
                state[f"{prefix}conv.weight"] = value
            elif name == "mask":
                state[f"{prefix}_mask"] = value[:, :, None, None].float()
                dropped = int((~value[0]).sum())
                state[f"{prefix}_count"] = torch.full((1,), float(dropped))
            else:
                state[f"{prefix}_stage"] = value.reshape(1).float()
            continue
        key = key.replace(".norm_1.", ".conv_1.norm.").replace(".norm_2.", ".conv_2.norm.")
        state[key.replace(".conv_2.weight", ".conv_2.conv.weight")] = value
    return state


CONDENSENET_CONFIG = {
    "stages": [2, 2],
    "growth": [4, 4],
    "bottleneck": 4,
    "group_1x1": 4,
    "group_3x3": 4,
    "condense_factor": 4,
    "data": "cifar10",
    "num_classes": 10,
}


def _small_reference_condensenet(progress: float):
    from dynaconv.compat.lgc import _network_from_config

    torch.manual_seed(0)
    native = _network_from_config(CONDENSENET_CONFIG)
    dynaconv.set_progress(native, progress)
    return native, _reference_condensenet_state(native)


def test_condensenet_loader_refuses_an_impossible_stage():
    native, state = _small_reference_condensenet(0.2)
    loaded = compat.model_from_reference("condensenet", CONDENSENET_CONFIG, state)
    for (name, a), b in zip(loaded.state_dict().items(), native.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    key = "features.denseblock_2.denselayer_1.conv_1._stage"
    for stage in (3.0, 7.0):  # inconsistent with the mask, beyond C - 1
        with pytest.raises(ValueError, match=key):
            compat.model_from_reference(
                "condensenet", CONDENSENET_CONFIG, {**state, key: torch.full((1,), stage)}
            )


def test_converted_condensenet_refuses_an_index_outside_the_input():
    native, _ = _small_reference_condensenet(1.0)
    deployed = deploy_condensenet(native, fold_shuffle=False)
    layer = "features.denseblock_1.denselayer_2.conv_1"
    module = deployed.get_submodule(layer)
    state = {}
    for key, value in native.state_dict().items():
        if ".conv_1." in key or ".norm_1." in key:
            continue
        key = key.replace(".norm_2.", ".conv_2.norm.")
        state[key.replace(".conv_2.weight", ".conv_2.conv.weight")] = value
    for name, lgc in deployed.named_modules():
        if isinstance(lgc, CondensedGroupConv2d):
            norm = native.get_submodule(name.rpartition(".")[0]).norm_1
            state[f"{name}.index"] = lgc.index
            state[f"{name}.conv.weight"] = lgc.weight
            for k, v in norm.state_dict().items():
                state[f"{name}.norm.{k}"] = v[lgc.index] if v.dim() else v
    compat.model_from_reference("condensenet", CONDENSENET_CONFIG, state)  # as converted
    bad = module.index.clone()
    bad[0] = module.in_channels
    with pytest.raises(ValueError, match=f"{layer}.index entries must lie in"):
        compat.model_from_reference(
            "condensenet", CONDENSENET_CONFIG, {**state, f"{layer}.index": bad}
        )


# ------------------------------------------------------------------------------ group lasso


def _reference_lasso(layer) -> float:
    """The reference's ``lasso_loss`` written out: zero from stage G - 1, else the sum over
    every column of every group of ``sqrt(max(sum of the group's squared weights, 1e-6))``."""
    groups = layer.learned_groups
    if int(layer.stage) >= groups - 1:
        return 0.0
    weight = (layer.dense_weight * layer.mask[:, :, None, None]).detach()
    total = 0.0
    for g in range(groups):
        for j in range(layer.in_channels):
            column = weight[g::groups, j].pow(2).sum().item()
            total += math.sqrt(max(column, 1e-6))
    return total


@given(
    groups=st.sampled_from([1, 2, 4]),
    factor=st.sampled_from([1, 2, 4, 8]),
    progress=st.sampled_from([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0]),
)
def test_reference_lasso_matches_the_reference_when_factor_differs_from_groups(
    groups, factor, progress
):
    from dynaconv import LearnedGroupConv2d

    torch.manual_seed(0)
    layer = LearnedGroupConv2d(
        16,
        8,
        1,
        learned_groups=groups,
        condense_factor=factor,
        reference_lasso=True,
        dtype=torch.float64,
    )
    layer.set_progress(progress)
    assert layer.aux_loss().item() == pytest.approx(_reference_lasso(layer), rel=1e-12)
    native = copy.deepcopy(layer)
    native.reference_lasso = False
    if int(layer.stage) >= layer.num_stages:  # ours: zero once condensation is complete
        assert native.aux_loss().item() == 0.0
    elif factor == groups:  # equal gradients (the values differ by the dropped columns)
        layer.aux_loss().backward()
        native.aux_loss().backward()
        torch.testing.assert_close(native.dense_weight.grad, layer.dense_weight.grad)


@pytest.mark.parametrize(("groups", "factor"), [(2, 4), (4, 2)])
def test_compat_networks_use_the_reference_lasso(groups, factor):
    from dynaconv import LearnedGroupConv2d

    layer = compat.layer_from_reference("lgc", LGC_CONFIG, _lgc_reference_state())
    assert layer.conv.reference_lasso
    _, state = _small_reference_condensenet(0.0)
    config = {**CONDENSENET_CONFIG, "group_1x1": groups, "condense_factor": factor}
    model = compat.model_from_reference("condensenet", config, state)
    layers = [m for m in model.modules() if isinstance(m, LearnedGroupConv2d)]
    assert layers and all(m.reference_lasso for m in layers)
    native = CondenseNet([2, 2], [4, 4], group_1x1=groups, condense_factor=factor)
    native.load_state_dict(model.state_dict())
    stage = min(groups, factor) - 1  # G - 1 when C > G; C - 1 (the end) when C < G
    for network in (model, native):
        dynaconv.set_progress(network, stage / (2 * (factor - 1)))
        assert all(int(m.stage) == stage for m in network.modules() if hasattr(m, "stage"))
    if factor > groups:  # the reference stops the lasso before condensation ends
        assert dynaconv.aux_loss(model).item() == 0.0 < dynaconv.aux_loss(native).item()
    else:  # and never stops it when C < G
        assert dynaconv.aux_loss(native).item() == 0.0 < dynaconv.aux_loss(model).item()
