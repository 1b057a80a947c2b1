"""dynaconv.compat: safe checkpoint loading and the reference-name registries."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from dynaconv import DOConv2d, compat

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
