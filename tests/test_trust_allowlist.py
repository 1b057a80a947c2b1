"""Trust, second round: model arguments are an allowlist, configurations are bounded.

* A configuration may set only the architecture arguments listed for its model
  (:mod:`dynaconv.train.names`): torchvision's legacy ``pretrained: true`` with a pickle planted
  in the hub cache, timm's ``pretrained_cfg`` / ``checkpoint_path``, any flag nobody listed, is
  one line and exit status 2, from a recipe, ``--set``, a checkpoint, a training safetensors
  file or a deploy folder, and the planted payload never runs.
* A configuration's YAML is bounded before it is expanded (:data:`YAML_LIMITS`): an alias
  bomb, a list nested 600 deep, an oversized file are one short line and exit status 2.
"""

from __future__ import annotations

import builtins
import pickle
import tracemalloc
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY_RUN
from dynaconv.cli import main
from dynaconv.train.checkpoint import atomic_save, load_checkpoint
from dynaconv.train.config import YAML_LIMITS, ConfigError, parse_yaml, resolve_config
from dynaconv.train.names import (
    TORCHVISION_KWARGS,
    allow_model_kwargs,
    allowed_model_kwargs,
    check_model_kwargs,
)

#: The file torchvision's legacy ``resnet18(pretrained=True)`` reads from the hub cache.
RESNET18_CACHE = Path("hub") / "checkpoints" / "resnet18-f37072fd.pth"


class _PlantedPickle:
    """Unpickles as a call that writes ``marker`` (what a planted hub-cache file holds)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.fixture
def planted_hub(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME whose resnet18 weights are a pickle that writes a marker; the marker."""
    home = tmp_path / "torch-home"
    (home / RESNET18_CACHE).parent.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    (home / RESNET18_CACHE).write_bytes(pickle.dumps(_PlantedPickle(marker)))
    monkeypatch.setenv("TORCH_HOME", str(home))
    return marker


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny finished run (digits, 2 iterations) and a deploy folder of it."""
    out = tmp_path_factory.mktemp("allowlist") / "run"
    assert (
        main(
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
        == 0
    )
    assert main(["deploy", str(out / "best.pt"), "--out", str(out / "deployed")]) == 0
    return out


def _one_line_exit_2(argv: list[str], capsys, names: str, limit: int = 500) -> str:
    """``argv`` exits 2 with one line of at most ``limit`` characters naming ``names``."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err[:500])
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[:500]
    assert len(err) < limit, err[:limit]
    assert names in err, err
    return err


def _doctored_config(run: Path, **model: object) -> str:
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"].update(model)
    config["data"]["channels"] = 3
    return yaml.safe_dump(config, sort_keys=False)


def _doctor_checkpoint(run: Path, path: Path, config_text: str) -> None:
    payload = load_checkpoint(run / "best.pt")
    payload["config"] = config_text
    atomic_save(payload, path)  # with fresh digests: only the configuration is doctored


def _doctor_weights(run: Path, path: Path, config_text: str) -> None:
    tensors = load_file(str(run / "model.safetensors"))
    save_file(tensors, str(path), {"format": "dynaconv-train-weights", "config": config_text})


def _commands(path: Path, out: Path) -> list[list[str]]:
    commands = [
        ["eval", str(path)],
        ["deploy", str(path), "--out", str(out / "deployed")],
        ["profile", str(path)],
        ["export", str(path), "--out", str(out / "exported")],
    ]
    if path.suffix == ".pt":
        commands.append(["train", "--resume", str(path), "--out", str(out / "resumed")])
    return commands


# --------------------------------------------------------------------------------------------
# the bar: torchvision pretrained with a planted hub pickle, an import string, an alias bomb

PRETRAINED = {"name": "resnet18", "kwargs": {"pretrained": True, "num_classes": 1000}}


def test_planted_hub_pickle_is_reached_by_nothing_from_a_recipe_or_set(
    planted_hub, tmp_path, capsys
):
    recipe = tmp_path / "pretrained.yaml"
    recipe.write_text(yaml.safe_dump({"model": PRETRAINED, "data": {"channels": 3}}))
    out = ["--out", str(tmp_path / "run"), "--max-iters", "1"]
    _one_line_exit_2(["train", "--recipe", str(recipe), *out], capsys, "model.kwargs.pretrained")
    _one_line_exit_2(
        ["train", "--model", "resnet18", "--set", "model.kwargs.pretrained=true", *out],
        capsys,
        "model.kwargs.pretrained",
    )
    _one_line_exit_2(
        ["profile", "--model", "resnet18", "--set", "model.kwargs.pretrained=true"],
        capsys,
        "model.kwargs.pretrained",
    )
    assert not planted_hub.exists()
    assert not (tmp_path / "run").exists()


def test_planted_hub_pickle_is_reached_by_nothing_from_a_file(run, planted_hub, tmp_path, capsys):
    text = _doctored_config(run, **PRETRAINED)
    _doctor_checkpoint(run, tmp_path / "evil.pt", text)
    _doctor_weights(run, tmp_path / "evil.safetensors", text)
    for path in (tmp_path / "evil.pt", tmp_path / "evil.safetensors"):
        for argv in _commands(path, tmp_path):
            _one_line_exit_2(argv, capsys, "model.kwargs.pretrained")
    folder = tmp_path / "deploy-folder"
    folder.mkdir()
    for item in (run / "deployed").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / "config.yaml").write_text(text)
    _one_line_exit_2(["eval", str(folder)], capsys, "model.kwargs.pretrained")
    assert not planted_hub.exists()
    assert not (tmp_path / "resumed").exists() and not (tmp_path / "exported").exists()


def test_the_planted_pickle_would_run_if_torchvision_were_asked(planted_hub):
    """The vector is real: the same call with the legacy flag unpickles the planted file."""
    with pytest.raises(Exception):  # noqa: B017 - the payload returns no state dict
        torchvision.models.resnet18(pretrained=True)
    assert planted_hub.exists()


def test_import_string_in_a_recipe_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "marker"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(
        yaml.safe_dump({"model": {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}})
    )
    argv = ["train", "--recipe", str(recipe), "--out", str(tmp_path / "r")]
    _one_line_exit_2(argv, capsys, "model.name", limit=1000)
    assert not marker.exists()


def alias_bomb(levels: int = 8, width: int = 9, size: int = 410) -> str:
    """A recipe of ``levels`` levels of ``width`` aliases each (``width ** levels`` values
    once expanded), padded with a comment to ``size`` bytes."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * width) + "]")
    text = "\n".join(lines) + "\n"
    padding = size - len(text.encode()) - 2
    assert padding >= 0
    return text + "#" + "x" * (padding) + "\n"


def test_the_410_byte_alias_bomb_is_one_short_line(tmp_path, capsys):
    bomb = alias_bomb()
    assert len(bomb.encode()) == 410
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(bomb)
    tracemalloc.start()
    try:
        err = _one_line_exit_2(
            ["train", "--recipe", str(recipe), "--out", str(tmp_path / "r")], capsys, "bomb.yaml"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "alias" in err
    assert peak < 20e6, peak
    assert not (tmp_path / "r").exists()


def test_an_alias_bomb_under_the_alias_limit_is_refused_by_its_expanded_size():
    bomb = alias_bomb(levels=6, width=9, size=300)  # 45 aliases, 9**6 values
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_yaml(bomb, "bomb")


def test_aliases_within_the_limits_still_work():
    text = "base: &b {lr: 0.1}\noptim: *b\nlist: [*b, *b]\n"
    assert parse_yaml(text, "ok") == {
        "base": {"lr": 0.1},
        "optim": {"lr": 0.1},
        "list": [{"lr": 0.1}, {"lr": 0.1}],
    }


DEEP = "[" * 600 + "]" * 600


def test_a_list_nested_600_deep_is_one_line(tmp_path, capsys, run):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text(f"data:\n  augment: {DEEP}\n")
    out = ["--out", str(tmp_path / "r")]
    _one_line_exit_2(["train", "--recipe", str(recipe), *out], capsys, "nested deeper")
    _one_line_exit_2(["train", "--set", f"data.augment={DEEP}", *out], capsys, "nested deeper")
    _doctor_checkpoint(run, tmp_path / "deep.pt", f"name: {DEEP}\n")
    _one_line_exit_2(["eval", str(tmp_path / "deep.pt")], capsys, "nested deeper")


def test_bombs_in_checkpoints_safetensors_and_deploy_folders_are_one_line(run, tmp_path, capsys):
    bomb = alias_bomb(levels=6, width=9, size=1500)
    _doctor_checkpoint(run, tmp_path / "bomb.pt", bomb)
    _doctor_weights(run, tmp_path / "bomb.safetensors", bomb)
    for path in (tmp_path / "bomb.pt", tmp_path / "bomb.safetensors"):
        for argv in _commands(path, tmp_path):
            _one_line_exit_2(argv, capsys, "expands to more than")
    folder = tmp_path / "deploy-folder"
    folder.mkdir()
    for item in (run / "deployed").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / "config.yaml").write_text(bomb)
    _one_line_exit_2(["eval", str(folder)], capsys, "expands to more than")


def test_an_oversized_configuration_is_refused_before_it_is_read(tmp_path, capsys, run):
    big = "name: run\n" + "# padding\n" * (YAML_LIMITS["bytes"] // 10 + 1)
    recipe = tmp_path / "big.yaml"
    recipe.write_text(big)
    _one_line_exit_2(["train", "--recipe", str(recipe)], capsys, "bytes")
    _doctor_checkpoint(run, tmp_path / "big.pt", big)
    _one_line_exit_2(["eval", str(tmp_path / "big.pt")], capsys, "bytes")


def test_error_messages_quote_a_short_prefix_of_a_long_value():
    long_value = "x" * 100_000
    with pytest.raises(ConfigError) as caught:
        resolve_config(None, overrides=[f"optim.lr={long_value}"])
    assert len(str(caught.value)) < 300


# --------------------------------------------------------------------------------------------
# the allowlists


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("resnet18", "pretrained"),
        ("resnet18", "weights"),
        ("resnet18", "progress"),
        ("resnet18", "norm_layer"),
        ("vgg11", "pretrained"),
        ("mobilenet_v3_small", "pretrained_backbone"),
        ("digits_cnn", "pretrained"),
        ("condensenet86", "pretrained"),
        ("condensenet86", "checkpoint_path"),
    ],
)
def test_keys_outside_the_allowlist_are_refused(name, key):
    with pytest.raises(ConfigError, match=rf"model\.kwargs\.{key} is not an allowed argument"):
        check_model_kwargs(name, {key: True})


TIMM_REFUSED = [
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "cache_dir",
    "features_only",
]


@pytest.mark.parametrize("key", TIMM_REFUSED)
def test_timm_weight_and_file_arguments_are_refused(key):
    timm = pytest.importorskip("timm")
    name = "resnet10t" if "resnet10t" in timm.list_models() else timm.list_models()[0]
    with pytest.raises(ConfigError, match=rf"model\.kwargs\.{key} is not an allowed argument"):
        check_model_kwargs(name, {key: "x"})
    check_model_kwargs(name, {"num_classes": 10, "drop_rate": 0.1})


def test_dynaconv_builders_declare_their_arguments():
    assert allowed_model_kwargs("digits_cnn") == {"num_classes", "width"}
    # condensenet86(**kwargs) forwards to CondenseNet: its named arguments are declared
    assert {"group_1x1", "condense_factor", "dropout"} <= allowed_model_kwargs("condensenet86")
    check_model_kwargs("condensenet86", {"group_1x1": 4})


#: A value for each listed torchvision argument that builds the default architecture.
NEUTRAL = {
    "num_classes": 10,
    "dropout": 0.0,
    "stochastic_depth_prob": 0.0,
    "layer_scale": 1e-6,
    "bn_size": 4,
    "drop_rate": 0.0,
    "memory_efficient": False,
    "aux_logits": False,
    "transform_input": False,
    "init_weights": True,
    "dropout_aux": 0.7,
    "width_mult": 1.0,
    "round_nearest": 8,
    "reduced_tail": False,
    "dilated": False,
    "zero_init_residual": False,
    "groups": 1,
    "width_per_group": 64,
    "replace_stride_with_dilation": [False, False, False],
    "image_size": 224,
    "attention_dropout": 0.0,
}


def test_every_listed_torchvision_argument_builds():
    """Each family's listed arguments are accepted by its first builder (built on the meta
    device where it can be: no memory; never with weights)."""
    families: dict[str, str] = {}
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        module = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
        families.setdefault(module, name)
    assert set(TORCHVISION_KWARGS) - {"*"} <= set(families)
    from dynaconv.train.names import model_builder

    for family, name in families.items():
        kwargs = {key: NEUTRAL[key] for key in allowed_model_kwargs(name)}
        check_model_kwargs(name, kwargs)
        try:
            with torch.device("meta"):
                model = model_builder(name)(**kwargs)
        except NotImplementedError:  # an initialisation that reads values: build it for real
            model = model_builder(name)(**kwargs)
        assert isinstance(model, torch.nn.Module), family


def test_allow_model_kwargs_extends_the_allowlist(monkeypatch):
    monkeypatch.setitem(TORCHVISION_KWARGS, "resnet", set(TORCHVISION_KWARGS["resnet"]))
    with pytest.raises(ConfigError):
        check_model_kwargs("resnet18", {"norm_layer": None})
    allow_model_kwargs("torchvision", "resnet", "norm_layer")
    check_model_kwargs("resnet18", {"norm_layer": None})
    with pytest.raises(ValueError, match="registry"):
        allow_model_kwargs("dynaconv", "x", "y")
