"""Checkpoint trust: no file given to the command line ever runs code.

Each attack is a file that loads fine with ``weights_only=True`` (or is safetensors / YAML), so
only the *names* it holds could run code: ``model.name`` as an import string (in a checkpoint's
configuration, in a training safetensors file's metadata, in a deploy folder's config.yaml),
``loss.resource.helper`` (an import string in older versions), a pickled callable, and a
``.pt2`` (``torch.export.load`` unpickles). Every command that reads such a file must answer
with one line on stderr and exit status 2, and the payload's marker file must not exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import TINY_RUN
from dynaconv.cli import main
from dynaconv.train.checkpoint import FORMAT, VERSION
from dynaconv.train.config import ConfigError, config_from_text, resolve_config
from dynaconv.train.names import known_model, model_builder

EVIL_MODULE = "dynaconv_evil_payload"

# capsys is read (and so reset) after every command; tmp_path_factory gives each example its
# own folder. Each example runs every command (a fraction of a second each), hence fewer
# examples than the unit-level registry test, plus the canonical attacks always.
fixtures_reused = settings(
    max_examples=8,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CANONICAL = [
    ("subprocess:getoutput", "subprocess", "cmd"),
    ("os:system", "os", "command"),
    (f"{EVIL_MODULE}:build", EVIL_MODULE, "path"),
]


def canonical_attacks(test):
    for attack in CANONICAL:
        test = example(attack=attack)(test)
    return test


@pytest.fixture(scope="module")
def attack_dir(tmp_path_factory) -> Path:
    """A folder on ``sys.path`` holding a module whose import (or builder) writes a marker."""
    folder = tmp_path_factory.mktemp("attack")
    marker = folder / "marker"
    (folder / f"{EVIL_MODULE}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "def build(path=None, **kwargs):\n"
        f"    Path({str(marker)!r}).write_text('called')\n"
    )
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(EVIL_MODULE, None)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny finished run (digits, 2 iterations) and a deploy folder of it."""
    out = tmp_path_factory.mktemp("trust") / "run"
    code = main(
        [
            "train",
            "--recipe",
            "digits-small",
            "--max-iters",
            "2",
            "--out",
            str(out),
            *TINY_RUN,
        ]
    )
    assert code == 0
    assert main(["deploy", str(out / "best.pt"), "--out", str(out / "deployed")]) == 0
    return out


# --------------------------------------------------------------------------------------------
# the attacks

#: (module, callable, keyword) of payloads; the keyword's value makes them write the marker.
TARGETS = [
    ("os", "system", "command"),
    ("posix", "system", "command"),
    ("subprocess", "getoutput", "cmd"),
    (EVIL_MODULE, "build", "path"),
]


@st.composite
def import_strings(draw) -> tuple[str, str, str]:
    """Spellings of an import string: ``module:callable``, dotted, padded, called, ..."""
    module, attr, keyword = draw(st.sampled_from(TARGETS))
    separator = draw(st.sampled_from([":", ".", "::", " : ", ":\t"]))
    before = draw(st.sampled_from(["", " ", "\t", "\n", "./"]))
    after = draw(st.sampled_from(["", " ", "()", "\n"]))
    return f"{before}{module}{separator}{attr}{after}", module, keyword


def _payload_value(module: str, marker: Path) -> str:
    return str(marker) if module == EVIL_MODULE else f"touch {marker}"


def _evil_config(config_text: str, name: str, module: str, keyword: str, marker: Path) -> str:
    config = yaml.safe_load(config_text)
    config["model"]["name"] = name
    config["model"]["kwargs"] = {keyword: _payload_value(module, marker)}
    return yaml.safe_dump(config, sort_keys=False)


def _evil_helper_config(config_text: str, helper: str) -> str:
    config = yaml.safe_load(config_text)
    config["loss"]["resource"]["enabled"] = True
    config["loss"]["resource"]["helper"] = helper
    return yaml.safe_dump(config, sort_keys=False)


def _write_checkpoint(run: Path, path: Path, config_text: str) -> None:
    payload = torch.load(run / "best.pt", weights_only=True)
    payload["config"] = config_text
    torch.save(payload, path)


def _write_weights(run: Path, path: Path, config_text: str) -> None:
    tensors = load_file(str(run / "model.safetensors"))
    metadata = {"format": "dynaconv-train-weights", "config": config_text}
    save_file(tensors, str(path), metadata=metadata)


def _commands(path: Path, out: Path) -> list[list[str]]:
    """Every command that reads ``path`` (train --resume only reads checkpoints)."""
    commands = [
        ["eval", str(path)],
        ["deploy", str(path), "--out", str(out / "deployed")],
        ["profile", str(path)],
        ["export", str(path), "--out", str(out / "exported")],
    ]
    if path.suffix == ".pt":
        commands.append(["train", "--resume", str(path), "--out", str(out / "resumed")])
    return commands


def _refused(argv: list[str], capsys, marker: Path, names: str) -> None:
    """``argv`` exits 2 with one line naming ``names``, and the marker does not exist."""
    code = main(argv)
    err = capsys.readouterr().err
    assert not marker.exists(), f"{argv} ran the payload"
    assert code == 2, (argv, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert names in err, err


# --------------------------------------------------------------------------------------------
# model.name: a checkpoint, a training safetensors, a deploy folder's config.yaml


@fixtures_reused
@canonical_attacks
@given(attack=import_strings())
def test_import_string_model_name_in_a_checkpoint_runs_nothing(
    run, attack_dir, tmp_path_factory, capsys, attack
):
    name, module, keyword = attack
    marker = attack_dir / "marker"
    work = tmp_path_factory.mktemp("evil-pt")
    evil = work / "evil.pt"
    _write_checkpoint(
        run, evil, _evil_config((run / "config.yaml").read_text(), name, module, keyword, marker)
    )
    for argv in _commands(evil, work):
        _refused(argv, capsys, marker, "model.name")
    assert not (work / "resumed").exists() and not (work / "exported" / "model.pt2").exists()


@fixtures_reused
@canonical_attacks
@given(attack=import_strings())
def test_import_string_model_name_in_safetensors_metadata_runs_nothing(
    run, attack_dir, tmp_path_factory, capsys, attack
):
    name, module, keyword = attack
    marker = attack_dir / "marker"
    work = tmp_path_factory.mktemp("evil-st")
    evil = work / "model.safetensors"
    _write_weights(
        run, evil, _evil_config((run / "config.yaml").read_text(), name, module, keyword, marker)
    )
    for argv in _commands(evil, work):
        _refused(argv, capsys, marker, "model.name")


@fixtures_reused
@canonical_attacks
@given(attack=import_strings())
def test_import_string_in_a_deploy_folder_config_runs_nothing(
    run, attack_dir, tmp_path_factory, capsys, attack
):
    name, module, keyword = attack
    marker = attack_dir / "marker"
    folder = tmp_path_factory.mktemp("evil-deploy")
    for item in (run / "deployed").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    text = _evil_config((folder / "config.yaml").read_text(), name, module, keyword, marker)
    (folder / "config.yaml").write_text(text)
    _refused(["eval", str(folder)], capsys, marker, "model.name")


# --------------------------------------------------------------------------------------------
# loss.resource.helper


@fixtures_reused
@canonical_attacks
@given(attack=import_strings())
def test_resource_helper_import_string_runs_nothing(
    run, attack_dir, tmp_path_factory, capsys, attack
):
    name, _module, _keyword = attack
    marker = attack_dir / "marker"
    work = tmp_path_factory.mktemp("evil-helper")
    text = _evil_helper_config((run / "config.yaml").read_text(), name)
    evil = work / "evil.pt"
    _write_checkpoint(run, evil, text)
    _write_weights(run, work / "evil.safetensors", text)
    for path in (evil, work / "evil.safetensors"):
        for argv in _commands(path, work):
            _refused(argv, capsys, marker, "loss.resource.helper")


def test_legacy_resource_helper_value_is_accepted_and_dropped(run, tmp_path, capsys):
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["loss"]["resource"]["helper"] = "dynaconv.layers.dgconv:ResourceConstraint"
    legacy = tmp_path / "legacy.pt"
    _write_checkpoint(run, legacy, yaml.safe_dump(config))
    assert main(["eval", str(legacy)]) == 0
    capsys.readouterr()
    parsed = config_from_text(yaml.safe_dump(config), "legacy")
    assert "helper" not in parsed["loss"]["resource"]
    with pytest.raises(ConfigError, match=r"loss\.resource\.helper"):
        resolve_config(None, overrides=["loss.resource.helper=os:system"])


# --------------------------------------------------------------------------------------------
# pickles and .pt2


class _Payload:
    """Pickles as a call of ``os.system`` (what a classic malicious checkpoint holds)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_callable_in_a_checkpoint_runs_nothing(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "config": _Payload(marker)}, evil)
    for argv in _commands(evil, tmp_path):
        _refused(argv, capsys, marker, "evil.pt")


@pytest.fixture
def export_load_spy(monkeypatch, tmp_path):
    """Records calls of ``torch.export.load`` (which unpickles) and writes a marker."""
    marker = tmp_path / "export-load-called"
    original = torch.export.load

    def spy(*args, **kwargs):
        marker.write_text("called")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.export, "load", spy)
    return marker


def test_pt2_is_loaded_only_with_the_unsafe_flag(run, capsys, export_load_spy):
    program = run / "deployed" / "deployed.pt2"
    for argv in (
        ["eval", str(program)],
        ["deploy", str(program), "--out", str(run / "again")],
        ["profile", str(program)],
        ["export", str(program), "--out", str(run / "again")],
        ["train", "--resume", str(program)],
    ):
        _refused(argv, capsys, export_load_spy, "pt2")
    # the deploy folder is evaluated by rebuilding it from config.yaml and safetensors
    assert main(["eval", str(run / "deployed")]) == 0
    assert not export_load_spy.exists()
    rebuilt = yaml.safe_load(capsys.readouterr().out)
    assert main(["eval", "--unsafe-load-pt2", str(program)]) == 0
    assert export_load_spy.exists()
    loaded = yaml.safe_load(capsys.readouterr().out)
    assert loaded["examples"] == rebuilt["examples"] == 32
    assert loaded["accuracy"] == pytest.approx(rebuilt["accuracy"], abs=1 / 32)


# --------------------------------------------------------------------------------------------
# the registry itself


@canonical_attacks
@given(attack=import_strings())
def test_model_builder_resolves_registries_only(attack_dir, attack):
    name, _module, _keyword = attack
    with pytest.raises(ConfigError, match=r"model\.name"):
        model_builder(name)
    assert not known_model(name)
    assert EVIL_MODULE not in sys.modules
    assert not (attack_dir / "marker").exists()


def test_registry_names_resolve_and_weight_loading_kwargs_are_refused():
    assert known_model("digits_cnn") and known_model("resnet18")
    timm = pytest.importorskip("timm")
    assert known_model("resnet10t") == ("resnet10t" in timm.list_models())
    for overrides, key in (
        (["model.name=resnet18", "model.kwargs.weights=DEFAULT"], "model.kwargs.weights"),
        (["model.name=resnet10t", "model.kwargs.pretrained=true"], "model.kwargs.pretrained"),
        (
            ["model.name=resnet10t", "model.kwargs.checkpoint_path=/tmp/x.pth"],
            "model.kwargs.checkpoint_path",
        ),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve_config(None, overrides=overrides)
