"""Configuration: precedence, recipes, validation, and bad input on the command line (one line
naming the key or the file, exit status 2, no traceback, and nothing done before the error)."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import TINY_RUN
from dynaconv.cli import main
from dynaconv.train import config as config_module
from dynaconv.train.checkpoint import atomic_save, load_checkpoint
from dynaconv.train.config import (
    CHOICES,
    DEFAULTS,
    FLAGS,
    NULLABLE_TYPES,
    RULES,
    SWITCHES,
    ConfigError,
    OptimConfig,
    RunConfig,
    list_recipes,
    load_recipe,
    resolve_config,
)
from dynaconv.train.data import DataError, build_datasets
from dynaconv.train.engine import known_model

PAPER_RECIPES = {
    "condensenet86-cifar10",
    "condensenet86-cifar100",
    "condensenet182-cifar10",
    "condensenet182-cifar100",
    "condensenet74-imagenet-g4",
    "condensenet74-imagenet-g8",
    "dydensenet86-cifar10",
    "dyresnet18-imagenet",
    "g-resnext50-imagenet",
    "efficientnet-b0-condconv8-imagenet",
    "doconv-resnet18-imagenet",
}


# --------------------------------------------------------------------------------------------
# configuration


def test_precedence_defaults_recipe_flags_set():
    config = resolve_config(
        "digits-small",
        flags={"optim.lr": 0.2, "train.epochs": 7},
        overrides=["optim.lr=0.05", "data.augment=[hflip]", "model.kwargs.width=8"],
    )
    assert config["optim"]["lr"] == 0.05  # --set beats the flag
    assert config["train"]["epochs"] == 7  # the flag beats the recipe (5)
    assert config["data"]["batch_size"] == 32  # the recipe beats the default (64)
    assert config["optim"]["min_lr"] == DEFAULTS["optim"]["min_lr"]
    assert config["data"]["augment"] == ["hflip"]
    assert config["model"]["kwargs"] == {"width": 8}
    assert config["name"] == "digits-small"


def test_every_option_is_declared_once_in_the_typed_config():
    """DEFAULTS, the flags, choices, ranges and nullable types are generated from the
    dataclasses; a validated configuration reads as typed attributes."""
    assert RunConfig().to_dict() == DEFAULTS
    options = dict(config_module._options())
    assert set(RULES) | set(CHOICES) | set(NULLABLE_TYPES) <= set(options)
    for flag, (dotted, kind, text) in {
        **FLAGS,
        **{k: (d, bool, t) for k, (d, t) in SWITCHES.items()},
    }.items():
        assert options[dotted].metadata["flag" if kind is not bool else "switch"] == flag
        assert text == options[dotted].metadata["help"] and text
    config = resolve_config("digits-small", overrides=["optim.lr=0.05", "data.augment=[hflip]"])
    typed = RunConfig.from_dict(config)
    assert isinstance(typed.optim, OptimConfig) and typed.optim.lr == 0.05
    assert typed.train.epochs == 5 and typed.data.augment == ["hflip"]
    assert typed.loss.resource.budget_type == "params"
    assert typed.to_dict() == config
    typed.data.augment.append("random_crop")  # a copy: the dict is not changed
    assert config["data"]["augment"] == ["hflip"]
    bad = {**config, "optim": {**config["optim"], "lr": -1.0}}
    with pytest.raises(ConfigError, match=r"optim\.lr must be positive"):
        RunConfig.from_dict(bad)


def test_convert_section_created_by_overrides():
    config = resolve_config(
        None, overrides=["model.convert.method=doconv", "model.convert.options.D_mul=12"]
    )
    assert config["model"]["convert"] == {"method": "doconv", "options": {"D_mul": 12}}
    assert resolve_config(None, overrides=["model.convert=null"])["model"]["convert"] is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "optim.lrr"),
        ("optimizer.lr=0.1", "optimizer"),
        ("optim.lr=fast", "optim.lr must be of type float"),
        ("train.amp=fp8", "train.amp must be one of"),
        ("data.augment=[mixup]", "data.augment"),
        ("model.convert.method=nosuch", "model.convert.method"),
        ("train.epochs=0", "train.epochs must be positive"),
        ("optim.lr", "section.key=value"),
        ("data.batch_size=true", "data.batch_size must be of type int"),
    ],
)
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        resolve_config(None, overrides=[override])


def test_unknown_recipe_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="digits-small"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(bad))


def test_recipes_all_parse_and_reference_known_models_and_datasets():
    names = set(list_recipes())
    assert PAPER_RECIPES | {"digits-small", "fashion-mnist-small"} <= names
    for name in names:
        config = resolve_config(name)
        assert known_model(config["model"]["name"]), (name, config["model"]["name"])
        assert config["data"]["dataset"] in CHOICES["data.dataset"]
    assert resolve_config("g-resnext50-imagenet")["loss"]["resource"]["enabled"] is True
    assert resolve_config("doconv-resnet18-imagenet")["model"]["convert"]["method"] == "doconv"
    assert resolve_config("condensenet182-cifar100")["train"]["epochs"] == 600


def test_print_config_through_the_cli(capsys):
    assert main(["train", "--recipe", "digits-small", "--lr", "0.3", "--print-config"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.3
    assert printed["model"]["name"] == "digits_cnn"


def test_cli_rejects_bad_config_with_exit_code_2(capsys):
    assert main(["train", "--set", "optim.nope=1"]) == 2
    assert "optim.nope" in capsys.readouterr().err


cli_settings = settings(
    max_examples=15,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("dynaconv "), err
    return err


def _refused(argv: list[str], capsys, *names: str) -> str:
    code = main(argv)
    err = _one_line_error(capsys)
    assert code == 2, (argv, err)
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny finished run: digits, width 4, two iterations, with an EMA."""
    out = tmp_path_factory.mktemp("validation") / "run"
    argv = [
        "train",
        "--recipe",
        "digits-small",
        "--max-iters",
        "2",
        "--ema",
        "0.5",
        "--out",
        str(out),
        *TINY_RUN,
    ]
    assert main(argv) == 0
    return out


# --------------------------------------------------------------------------------------------
# values: every numeric key has its range


def _default(dotted: str):
    node = DEFAULTS
    for part in dotted.split("."):
        node = node[part]
    return node


INT_KEYS = {
    key
    for key in RULES
    if (isinstance(_default(key), int) and not isinstance(_default(key), bool))
    or key
    in (
        "data.image_size",
        "data.channels",
        "data.eval_resize",
        "data.train_subset",
        "data.val_subset",
        "train.max_iters",
    )
}


@st.composite
def out_of_range(draw) -> tuple[str, object]:
    """A key of :data:`RULES` and a value outside its range (of the key's type)."""
    key = draw(st.sampled_from(sorted(RULES)))
    low, low_in, high, high_in = RULES[key]
    below = low - 1 if low_in else low
    if key in INT_KEYS:
        values = st.integers(max_value=math.floor(below))
        if high != math.inf:
            values |= st.integers(min_value=math.ceil(high) + (0 if not high_in else 1))
    else:
        values = st.floats(max_value=below, allow_nan=False, allow_infinity=False)
        if low_in:
            values = st.floats(max_value=low, exclude_max=True, allow_nan=False)
        if high != math.inf:
            values |= st.floats(
                min_value=high, exclude_min=high_in, allow_nan=False, allow_infinity=False
            )
        values |= st.sampled_from([math.nan, math.inf, -math.inf])
    return key, draw(values)


@cli_settings
@given(case=out_of_range())
def test_out_of_range_values_name_the_key(capsys, case):
    key, value = case
    text = yaml.safe_dump(value).removesuffix("\n...\n").strip()
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(None, overrides=[f"{key}={text}"])
    _refused(["train", "--set", f"{key}={text}"], capsys, key)


@pytest.mark.parametrize(
    ("assignment", "key"),
    [
        ("optim.clip_grad_norm=-1", "optim.clip_grad_norm"),
        ("optim.clip_grad_norm=0", "optim.clip_grad_norm"),
        ("optim.min_lr=-1", "optim.min_lr"),
        ("optim.min_lr=0.5", "optim.min_lr"),  # above optim.lr
        ("data.channels=0", "data.channels"),
        ("train.eval_every_epochs=0", "train.eval_every_epochs"),
        ("train.max_iters=-5", "train.max_iters"),
        ("data.workers=-1", "data.workers"),
        ("data.train_subset=-10", "data.train_subset"),
        ("data.val_subset=0", "data.val_subset"),
        ("optim.momentum=-0.9", "optim.momentum"),
        ("optim.weight_decay=-1.0e-4", "optim.weight_decay"),
        ("optim.eps=-1.0e-8", "optim.eps"),
        ("optim.label_smoothing=1.0", "optim.label_smoothing"),
        ("optim.label_smoothing=-0.1", "optim.label_smoothing"),
        ("data.image_size=-8", "data.image_size"),
        ("data.crop_padding=-4", "data.crop_padding"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("optim.lr=.nan", "optim.lr"),
        ("optim.lr=null", "optim.lr"),
        ("data.image_size=8.5", "data.image_size"),
        ("data.dir=[a, b]", "data.dir"),
        ("model.kwargs.widht=8", "model.kwargs.widht"),
        ("model.name=no_such_net", "model.name"),
        ("model.convert={method: doconv, include: 3}", "model.convert.include"),
        ("loss.resource.budget=1.5", "loss.resource.budget"),
        ("name=../elsewhere", "name"),
        ("name=''", "name"),
    ],
)
def test_listed_bad_values_name_the_key(capsys, monkeypatch, assignment, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config("digits-small", overrides=[assignment])
    _refused(["train", "--recipe", "digits-small", "--set", assignment], capsys, key)


@cli_settings
@given(
    key=st.text(st.characters(categories=["Ll", "Lu"]), min_size=1, max_size=8).filter(
        lambda k: k not in ("width", "num_classes")
    ),
    value=st.integers(-3, 3),
)
def test_unknown_model_kwargs_are_refused_against_the_builder(capsys, key, value):
    with pytest.raises(ConfigError, match=rf"model\.kwargs\.{key}"):
        resolve_config("digits-small", overrides=[f"model.kwargs.{key}={value}"])
    _refused(["profile", "--recipe", "digits-small", "--set", f"model.kwargs.{key}=1"], capsys)


@pytest.mark.parametrize(
    ("method", "known"),
    [
        ("doconv", "D_mul"),
        ("condconv", "num_experts"),
        ("dgc", "heads"),
        ("dgconv", "sort"),
        ("lgc", "learned_groups"),
    ],
)
def test_unknown_convert_options_are_refused_against_the_layer(capsys, method, known):
    resolve_config(None, overrides=[f"model.convert.method={method}"])
    with pytest.raises(ConfigError, match=rf"model\.convert\.options\.{known}x.*{known}"):
        resolve_config(
            None, overrides=[f"model.convert.method={method}", f"model.convert.options.{known}x=2"]
        )
    argv = ["profile", "--recipe", "digits-small", "--convert", method]
    _refused([*argv, "--convert-opt", f"{known}x=2"], capsys, f"model.convert.options.{known}x")


def test_invalid_builder_and_option_values_are_config_errors(capsys):
    # the value is checked by the code that uses it: still one line naming the key
    argv = ["profile", "--recipe", "digits-small", "--convert", "doconv"]
    _refused([*argv, "--convert-opt", "D_mul=-3"], capsys, "model.convert.options")
    _refused(
        [
            "profile",
            "--model",
            "condensenet86",
            "--dataset",
            "cifar10",
            "--set",
            "model.kwargs.bogus=1",
        ],
        capsys,
        "model.kwargs",
    )


# --------------------------------------------------------------------------------------------
# train.eval_every_epochs


def test_eval_every_epochs_evaluates_every_n_and_the_last(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "train",
        "--recipe",
        "digits-small",
        "--epochs",
        "3",
        "--out",
        str(out),
        "--set",
        "train.eval_every_epochs=2",
        *TINY_RUN,
    ]
    assert main(argv) == 0
    capsys.readouterr()
    state = load_checkpoint(out / "last.pt")["state"]
    evaluated = [row["val_acc"] is not None for row in state["history"]]
    assert evaluated == [False, True, True]
    assert state["history"][0]["val_loss"] is None
    evaluated_iterations = [row["iteration"] for row in state["history"][1:]]
    assert state["best_iteration"] in evaluated_iterations
    assert load_checkpoint(out / "best.pt")["state"]["iteration"] == state["best_iteration"]
    from dynaconv.train.plots import plot_curves

    plot_curves(state["history"], out / "curves.png")  # epochs without validation are skipped
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "metrics.csv").read_text().splitlines()[1].split(",")[4:6] == ["", ""]


# --------------------------------------------------------------------------------------------
# files: checkpoints that do not fit, bad YAML, missing entries, folders without config.yaml


def _rewrite(run: Path, path: Path, change) -> Path:
    """``run``'s last.pt changed by ``change``, written with fresh tensor digests (a consistent
    file that lacks an entry; changed bytes are refused first: tests/test_trust_runs.py)."""
    payload = torch.load(run / "last.pt", weights_only=True)
    change(payload)
    atomic_save(payload, path)
    return path


def _without_line(text: str, start: str) -> str:
    lines = text.splitlines(keepends=True)
    assert any(line.startswith(start) for line in lines)
    return "".join(line for line in lines if not line.startswith(start))


def _commands(path: Path, out: Path) -> list[list[str]]:
    return [
        ["eval", str(path)],
        ["deploy", str(path), "--out", str(out / "deployed")],
        ["profile", str(path)],
        ["export", str(path), "--out", str(out / "exported")],
        ["train", "--resume", str(path), "--out", str(out / "resumed")],
    ]


def test_checkpoint_that_does_not_fit_the_model_on_resume(run, tmp_path, capsys):
    argv = ["train", "--resume", str(run / "last.pt"), "--out", str(tmp_path / "wider")]
    err = _refused([*argv, "--set", "model.kwargs.width=8"], capsys, "last.pt", "does not fit")
    assert "shape" in err
    _refused([*argv, "--convert", "doconv"], capsys, "last.pt", "does not fit")
    _refused([*argv, "--optimizer", "adamw"], capsys, "optim.name", "last.pt")


def test_bad_yaml_in_a_checkpoint_names_the_file(run, tmp_path, capsys):
    def corrupt(payload):
        payload["config"] = "model: {name: [unclosed\n"

    bad = _rewrite(run, tmp_path / "bad-yaml.pt", corrupt)
    for argv in _commands(bad, tmp_path):
        _refused(argv, capsys, "bad-yaml.pt", "not valid YAML")


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (lambda p: p.pop("model"), ("'model'",)),
        (lambda p: p.pop("config"), ("'config'",)),
        (lambda p: p.__setitem__("config", "[1, 2]"), ("not a mapping",)),
        (lambda p: p.__setitem__("config", _without_line(p["config"], "  lr:")), ("optim.lr",)),
    ],
)
def test_missing_entries_in_a_checkpoint_name_the_entry(run, tmp_path, capsys, change, names):
    bad = _rewrite(run, tmp_path / "partial.pt", change)
    for argv in _commands(bad, tmp_path):
        _refused(argv, capsys, "partial.pt", *names)


@pytest.mark.parametrize(
    ("change", "name"),
    [
        (lambda p: p.pop("optimizer"), "'optimizer'"),
        (lambda p: p.pop("rng"), "'rng'"),
        (lambda p: p["state"].pop("iteration"), "state.iteration"),
        (lambda p: p["rng"].pop("numpy_keys"), "rng.numpy_keys"),
        (lambda p: p.__setitem__("ema", None), "EMA"),
        (lambda p: p["model"].pop("classifier.bias"), "classifier.bias"),
        (lambda p: p.__setitem__("optimizer", {"state": {}, "param_groups": []}), "optimizer"),
    ],
)
def test_missing_resume_entries_name_the_entry(run, tmp_path, capsys, change, name):
    bad = _rewrite(run, tmp_path / "partial.pt", change)
    _refused(
        ["train", "--resume", str(bad), "--out", str(tmp_path / "out")], capsys, "partial.pt", name
    )
    assert not (tmp_path / "out" / "last.pt").exists()


def test_folders_without_config_yaml(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(["eval", str(empty)], capsys, "empty", "config.yaml")
    _refused(["eval", str(tmp_path / "missing")], capsys, "missing")
    # a run folder is not a deploy folder: its config.yaml is there, the deployed weights not
    _refused(["eval", str(run)], capsys, "run folder", "best.pt")
    partial = tmp_path / "partial-deploy"
    partial.mkdir()
    (partial / "config.yaml").write_text((run / "config.yaml").read_text())
    _refused(["eval", str(partial)], capsys, "weights.safetensors")


# --------------------------------------------------------------------------------------------
# data: labels out of range, images that cannot be read, images of different sizes


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_label_values_out_of_range_name_the_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 28, 28))
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(8) % 10)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4, 5, 6, 12]))
    config = resolve_config(None, overrides=["data.dataset=mnist", f"data.dir={tmp_path}"])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: label value 12"):
        build_datasets(config["data"], 0)
    argv = [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
    ]
    _refused(argv, capsys, "t10k-labels-idx1-ubyte.gz", "label value 12")


def _image_folder(root: Path, sizes: list[tuple[int, int]]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def test_image_folder_of_mixed_sizes_and_an_unreadable_image(tmp_path, capsys):
    _image_folder(tmp_path, [(40, 48), (20, 60), (33, 33), (50, 10)])
    config = resolve_config(
        None,
        overrides=["data.dataset=imagenet", f"data.dir={tmp_path}", "data.image_size=16"],
    )
    train, val, _ = build_datasets(config["data"], 0)
    assert {tuple(train[i][0].shape) for i in range(len(train))} == {(3, 16, 16)}
    assert {tuple(val[i][0].shape) for i in range(len(val))} == {(3, 16, 16)}
    (tmp_path / "train" / "cat" / "9.png").write_text("not an image")
    train, _, _ = build_datasets(config["data"], 0)
    broken = next(i for i, (path, _) in enumerate(train.base.samples) if path.endswith("9.png"))
    with pytest.raises(DataError, match=r"cat/9\.png"):
        train[broken]
    argv = [
        "train",
        "--model",
        "resnet18",
        "--dataset",
        "imagenet",
        "--data-dir",
        str(tmp_path),
        "--batch-size",
        "3",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "data.image_size=16",
        "--set",
        "train.plots=false",
        "--set",
        "train.tensorboard=false",
    ]
    _refused(argv, capsys, "9.png")


# --------------------------------------------------------------------------------------------
# every command with bad inputs


@pytest.fixture(scope="module")
def bad_inputs(run, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-inputs")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "text.pt").write_text("not a checkpoint")
    (folder / "notes.json").write_text("{}")
    save_file({"w": torch.ones(2)}, str(folder / "foreign.safetensors"))
    save_file(
        {"w": torch.ones(2)},
        str(folder / "wrong-format.safetensors"),
        metadata={"format": "dynaconv-train-weights", "config": "[1, 2]"},
    )
    torch.save({"weights": torch.ones(2)}, folder / "foreign.pt")
    (folder / "a-folder").mkdir()
    (folder / "truncated.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    return {
        "missing": folder / "missing.pt",
        "folder": folder / "a-folder",
        "empty": folder / "empty.pt",
        "empty safetensors": folder / "empty.safetensors",
        "text": folder / "text.pt",
        "json": folder / "notes.json",
        "foreign safetensors": folder / "foreign.safetensors",
        "wrong-format safetensors": folder / "wrong-format.safetensors",
        "foreign pt": folder / "foreign.pt",
        "truncated": folder / "truncated.pt",
    }


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "folder",
        "empty",
        "empty safetensors",
        "text",
        "json",
        "foreign safetensors",
        "wrong-format safetensors",
        "foreign pt",
        "truncated",
    ],
)
def test_every_command_with_bad_files(bad_inputs, tmp_path, capsys, kind):
    path = bad_inputs[kind]
    for argv in _commands(path, tmp_path):
        if argv[0] == "eval" and kind == "folder":
            _refused(argv, capsys, "config.yaml")
            continue
        _refused(argv, capsys, path.name)
    assert not (tmp_path / "resumed").exists() and not (tmp_path / "exported").exists()


def test_bad_arguments_of_the_commands(run, tmp_path, capsys):
    best = str(run / "best.pt")
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    _refused(["deploy", best, "--out", str(blocker)], capsys, "--out", "file")
    _refused(["export", best, "--out", str(blocker / "sub")], capsys, "--out")
    _refused(["export", best, "--out", str(tmp_path / "x"), "--opset", "5"], capsys, "--opset")
    _refused(["export", best, "--out", str(tmp_path / "x"), "--batch", "0"], capsys, "--batch")
    _refused(["eval", best, "--set", "data.eval_batch_size=0"], capsys, "data.eval_batch_size")
    _refused(["eval", best, "--set", "nope.key=1"], capsys, "nope")
    _refused(["eval", "--unsafe-load-pt2", best], capsys, ".pt2")
    _refused(["profile", best, "--set", "x=1"], capsys, "x")
    for argv in (
        ["profile", best, "--batch", "0"],
        ["profile", best, "--batch", "-2"],
        ["eval", best, "--device", "tpu"],
        ["train", "--epochs", "many"],
        ["profile", best, "--lr", "0.1"],  # a training flag: not one of profile's
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert "Traceback" not in capsys.readouterr().err
    _refused(["profile", best, "--model", "resnet18"], capsys, "--set")
    if not torch.cuda.is_available():
        _refused(["eval", best, "--device", "cuda"], capsys, "cuda")
        _refused(["train", "--set", "train.device=cuda"], capsys, "cuda")


def _dgc_config(**options) -> dict:
    config = resolve_config(
        "digits-small", {"model.convert": {"method": "dgc", "options": options or None}}
    )
    return yaml.safe_load(yaml.safe_dump(config))


@pytest.mark.parametrize(
    ("options", "expected"),
    [({}, "reference"), ({"saliency_mode": "neutral"}, "neutral"), ({"heads": 2}, "reference")],
)
def test_legacy_dgc_conversions_keep_the_saliency_they_were_trained_with(options, expected):
    """Configurations of the earlier version (they hold ``loss.resource.helper``) converted DGC
    layers with the reference saliency generator; they must build the same layers again."""
    from dynaconv.train.config import LEGACY_RESOURCE_HELPER, config_from_text
    from dynaconv.train.factory import build_model

    legacy = _dgc_config(**options)
    legacy["loss"]["resource"]["helper"] = LEGACY_RESOURCE_HELPER
    migrated = config_from_text(yaml.safe_dump(legacy), "old run")
    modes = {m.saliency_mode for m in build_model(migrated).modules() if hasattr(m, "heads")}
    assert modes == {expected}
    current = config_from_text(yaml.safe_dump(_dgc_config(**options)), "new run")
    assert (current["model"]["convert"]["options"] or {}) == options  # nothing migrated
    modes = {m.saliency_mode for m in build_model(current).modules() if hasattr(m, "heads")}
    assert modes == {options.get("saliency_mode", "neutral")}


def test_export_for_a_fixed_batch(run, tmp_path, capsys):
    out = tmp_path / "edge"
    assert main(["export", str(run / "best.pt"), "--out", str(out), "--batch", "1"]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["batch"] == 1 and summary["max_rel_error_onnxruntime"] < 1e-4


def test_export_for_a_fixed_batch_on_onnxruntimes_blocked_kernels(run, tmp_path, capsys):
    from dynaconv.onnxruntime_nchwc import nchwc_block_size

    if nchwc_block_size() == 0:
        pytest.skip("onnxruntime has no NCHWc kernels on this CPU")
    out = tmp_path / "edge"
    argv = ["export", str(run / "best.pt"), "--out", str(out), "--batch", "1"]
    assert main([*argv, "--onnxruntime-nchwc"]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert (out / "model.nchwc.onnx").is_file() and summary["nchwc_convs"] >= 0
    assert summary["max_rel_error_onnxruntime_nchwc"] < 1e-4
    pte = ["--format", "pte", "--onnxruntime-nchwc"]
    capsys.readouterr()  # the exporter's progress messages
    _refused([*argv[:2], "--out", str(tmp_path / "p"), *pte], capsys, "--onnxruntime-nchwc")


def test_export_to_executorch(run, tmp_path):
    pytest.importorskip("executorch")
    out = tmp_path / "pte"
    assert main(["export", str(run / "best.pt"), "--out", str(out), "--format", "pte"]) == 0
    summary = json.loads((out / "export.json").read_text())
    assert (out / "model.pte").is_file() and summary["batch"] == 1
    assert summary["max_rel_error_executorch"] < 1e-4
