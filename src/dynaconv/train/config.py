"""Run configuration: defaults, recipes, command-line overrides, validation.

A configuration is a nested dict with the sections of :data:`DEFAULTS`. It is resolved in
this order, each step overriding the previous one:

1. :data:`DEFAULTS`;
2. the recipe (``--recipe NAME`` for a file shipped in ``dynaconv/train/recipes/``, or a path
   to any YAML file of the same shape);
3. flat flags (``--lr 0.05``, ``--epochs 3``, ... see :data:`FLAGS`);
4. ``--set SECTION.KEY=VALUE`` (repeatable; the value is parsed as YAML, so ``--set
   optim.lr=0.05``, ``--set data.augment=[random_crop,hflip]``, ``--set model.convert=null``).

Unknown keys and values of the wrong type are errors naming the key. The resolved
configuration is written as ``config.yaml`` into the run folder and stored in every checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CHOICES",
    "DEFAULTS",
    "FLAGS",
    "ConfigError",
    "apply_override",
    "dump_config",
    "list_recipes",
    "load_recipe",
    "parse_assignment",
    "resolve_config",
    "validate_config",
]


class ConfigError(ValueError):
    """An invalid configuration (unknown key, wrong type, bad value)."""


DEFAULTS: dict[str, Any] = {
    "name": "run",
    "model": {
        # A name of dynaconv.models.MODELS or of torchvision.models (e.g. resnet18).
        "name": "digits_cnn",
        # Keyword arguments of the builder; num_classes is filled in from the dataset.
        "kwargs": {},
        # null, or {method: doconv|condconv|dgc|dgconv|lgc, options: {...}, include, exclude}.
        "convert": None,
        "sync_bn": False,
        "channels_last": False,
        "compile": False,
    },
    "data": {
        "dataset": "digits",  # digits | mnist | fashion_mnist | cifar10 | cifar100 | imagenet
        "dir": None,
        "download": False,
        "batch_size": 64,  # global batch (split evenly over DDP processes)
        "eval_batch_size": 256,
        "workers": 0,
        "augment": [],  # random_crop, hflip, random_resized_crop, color_jitter, autoaugment
        "crop_padding": 4,
        "image_size": None,  # null: the dataset's native size (224 for ImageNet)
        "channels": None,  # null: the dataset's; 3 repeats a grey channel (for RGB models)
        "eval_resize": None,  # ImageNet: resize before the center crop (null: size / 0.875)
        "train_subset": None,  # use only the first N training examples
        "val_subset": None,
    },
    "optim": {
        "name": "sgd",  # sgd | adamw | rmsprop
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1e-4,
        "no_decay_norm_bias": False,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "alpha": 0.9,  # rmsprop smoothing
        "schedule": "cosine",  # cosine | constant
        "warmup_epochs": 0.0,
        "warmup_start": 0.0,  # learning-rate factor at the first warm-up iteration
        "min_lr": 0.0,
        "clip_grad_norm": None,
        "label_smoothing": 0.0,
    },
    "loss": {
        # Weight of dynaconv.aux_loss(model) (the sum of the layers' regularisers).
        "aux_weight": 0.0,
        # DGConv's resource-constrained objective (see dynaconv.train.engine.resource_objective).
        "resource": {
            "enabled": False,
            "budget": 0.5,  # fraction of the dense params (or MACs) of the DGConv layers
            "budget_type": "params",  # params | macs
            "exponent": 0.02,
            "helper": "dynaconv.layers.dgconv:ResourceConstraint",
        },
    },
    "train": {
        "epochs": 10,
        "max_iters": None,  # stop after this many iterations (the schedule still spans epochs)
        "device": "auto",  # auto | cpu | cuda
        "amp": "none",  # none | bf16 | fp16
        "ema_decay": 0.0,  # 0 disables the EMA
        "ema_every": 1,
        "seed": 0,
        "deterministic": False,
        "out_dir": None,  # null: runs/<name>
        "checkpoint_every_iters": 0,  # 0: only at the end of every epoch
        "eval_every_epochs": 1,
        "log_every_iters": 20,  # plain-line logging interval when stderr is not a terminal
        "tensorboard": True,
        "plots": True,
        "progress_bar": "auto",  # auto | tqdm | plain | none
    },
}

#: Values allowed for the enumerated fields.
CHOICES: dict[str, tuple[Any, ...]] = {
    "data.dataset": ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet"),
    "optim.name": ("sgd", "adamw", "rmsprop"),
    "optim.schedule": ("cosine", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("none", "bf16", "fp16"),
    "loss.resource.budget_type": ("params", "macs"),
    "train.progress_bar": ("auto", "tqdm", "plain", "none"),
}

AUGMENTATIONS = ("random_crop", "hflip", "random_resized_crop", "color_jitter", "autoaugment")

#: Flat command-line flags -> (dotted key, argparse type, help).
FLAGS: dict[str, tuple[str, Any, str]] = {
    "--model": ("model.name", str, "network name (dynaconv.models or torchvision.models)"),
    "--dataset": ("data.dataset", str, "dataset name"),
    "--data-dir": ("data.dir", str, "dataset folder"),
    "--batch-size": ("data.batch_size", int, "global batch size"),
    "--workers": ("data.workers", int, "data-loader worker processes"),
    "--epochs": ("train.epochs", int, "number of epochs"),
    "--max-iters": ("train.max_iters", int, "stop after this many iterations"),
    "--lr": ("optim.lr", float, "peak learning rate"),
    "--optimizer": ("optim.name", str, "sgd | adamw | rmsprop"),
    "--weight-decay": ("optim.weight_decay", float, "weight decay"),
    "--warmup-epochs": ("optim.warmup_epochs", float, "linear warm-up length in epochs"),
    "--aux-weight": ("loss.aux_weight", float, "weight of dynaconv.aux_loss"),
    "--amp": ("train.amp", str, "none | bf16 | fp16"),
    "--ema": ("train.ema_decay", float, "EMA decay (0: off)"),
    "--seed": ("train.seed", int, "random seed"),
    "--device": ("train.device", str, "auto | cpu | cuda"),
    "--out": ("train.out_dir", str, "run folder"),
    "--checkpoint-every": ("train.checkpoint_every_iters", int, "also checkpoint every N iters"),
    "--name": ("name", str, "run name (default folder runs/NAME)"),
}

#: Boolean switches -> dotted key (set to true).
SWITCHES: dict[str, tuple[str, str]] = {
    "--download": ("data.download", "download the dataset if absent (needs network)"),
    "--deterministic": ("train.deterministic", "deterministic algorithms (bitwise repeatable)"),
    "--channels-last": ("model.channels_last", "channels_last memory format"),
    "--compile": ("model.compile", "torch.compile the model"),
    "--sync-bn": ("model.sync_bn", "SyncBatchNorm under DDP"),
}


# --------------------------------------------------------------------------------------------
# recipes


def _recipe_dir() -> Any:
    return resources.files("dynaconv.train").joinpath("recipes")


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(
        entry.name[: -len(".yaml")]
        for entry in _recipe_dir().iterdir()
        if entry.name.endswith(".yaml")
    )


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by shipped name (see :func:`list_recipes`) or by path to a YAML file."""
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        text = path.read_text()
        origin = str(path)
    else:
        entry = _recipe_dir().joinpath(f"{name_or_path}.yaml")
        if not entry.is_file():
            raise ConfigError(
                f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(list_recipes())} "
                "(or give a path to a .yaml file)"
            )
        text = entry.read_text()
        origin = name_or_path
    try:
        recipe = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {origin} is not valid YAML: {error}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {origin} must be a mapping of sections, got {type(recipe)}")
    recipe.setdefault("name", Path(origin).stem)
    return recipe


# --------------------------------------------------------------------------------------------
# merging, overrides, validation


def _merge(base: dict[str, Any], update: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(
                f"unknown configuration key {dotted!r}; valid keys here: {', '.join(sorted(base))}"
            )
        if isinstance(base[key], dict) and _is_section(dotted):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a mapping, got {value!r}")
            _merge(base[key], value, f"{dotted}.")
        else:
            base[key] = copy.deepcopy(value)
    return base


def _is_section(dotted: str) -> bool:
    """Sections have fixed keys; free-form mappings (kwargs, options) do not."""
    node: Any = DEFAULTS
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, dict) and bool(node)


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """``"a.b=VALUE"`` -> ``("a.b", VALUE parsed as YAML)``."""
    if "=" not in assignment:
        raise ConfigError(f"override must look like section.key=value, got {assignment!r}")
    dotted, _, raw = assignment.partition("=")
    dotted = dotted.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"value of {dotted} is not valid YAML: {error}") from None
    return dotted, value


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """Apply one ``SECTION.KEY=VALUE`` override (VALUE parsed as YAML) to ``config``."""
    set_path(config, *parse_assignment(assignment))


#: Free-form mappings: any key below them is accepted (builder kwargs, method options).
FREE_FORM = ("model.kwargs", "model.convert")


def _free_form(dotted: str) -> bool:
    return any(dotted.startswith(f"{root}.") for root in FREE_FORM)


def set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``config[a][b][c] = value`` for ``dotted = "a.b.c"``.

    Keys must exist in the sections of :data:`DEFAULTS`; below the free-form mappings
    (:data:`FREE_FORM`) they are created as needed.
    """
    parts = dotted.split(".")
    node = config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[: depth + 1])
        if part not in node and not _free_form(prefix):
            raise ConfigError(
                f"unknown configuration key {prefix!r}; valid keys here: {', '.join(sorted(node))}"
            )
        if depth == len(parts) - 1:
            node[part] = value
            return
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"{prefix} is not a mapping (it is {node[part]!r})")
        node = node[part]


def resolve_config(
    recipe: str | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults (or ``base``), then the recipe, the flat flags and the ``--set`` overrides."""
    config = copy.deepcopy(dict(base) if base is not None else DEFAULTS)
    if recipe is not None:
        _merge(config, load_recipe(recipe))
    for dotted, value in (flags or {}).items():
        if value is not None:
            set_path(config, dotted, value)
    for assignment in overrides:
        apply_override(config, assignment)
    validate_config(config)
    return config


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_types(config: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str) -> None:
    for key, default in defaults.items():
        dotted = f"{prefix}{key}"
        value = config.get(key)
        if isinstance(default, dict) and _is_section(dotted):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a mapping, got {value!r}")
            _check_types(value, default, f"{dotted}.")
            continue
        if value is None or default is None:
            continue
        expected: tuple[type, ...]
        if isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, float):
            expected = (int, float)
        elif isinstance(default, int):
            expected = (int,)
        else:
            expected = (type(default),)
        if not isinstance(value, expected) or (
            isinstance(value, bool) and not isinstance(default, bool)
        ):
            raise ConfigError(f"{dotted} must be of type {type(default).__name__}, got {value!r}")


def validate_config(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the field for anything invalid."""
    _check_types(config, DEFAULTS, "")
    for dotted, allowed in CHOICES.items():
        if _get(config, dotted) not in allowed:
            raise ConfigError(
                f"{dotted} must be one of {', '.join(map(str, allowed))}, got {_get(config, dotted)!r}"
            )
    for aug in config["data"]["augment"]:
        if aug not in AUGMENTATIONS:
            raise ConfigError(
                f"data.augment entries must be among {', '.join(AUGMENTATIONS)}, got {aug!r}"
            )
    convert = config["model"]["convert"]
    if convert is not None:
        if not isinstance(convert, dict) or "method" not in convert:
            raise ConfigError("model.convert must be null or a mapping with a 'method' key")
        unknown = set(convert) - {"method", "options", "include", "exclude"}
        if unknown:
            raise ConfigError(
                f"model.convert has unknown keys {sorted(unknown)}; "
                "valid: method, options, include, exclude"
            )
        from dynaconv.lifecycle import METHODS

        if convert["method"] not in METHODS:
            raise ConfigError(
                f"model.convert.method must be one of {sorted(METHODS)}, got {convert['method']!r}"
            )
    for dotted in ("data.batch_size", "data.eval_batch_size", "train.epochs", "train.ema_every"):
        if _get(config, dotted) <= 0:
            raise ConfigError(f"{dotted} must be positive, got {_get(config, dotted)}")
    if config["optim"]["lr"] <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config['optim']['lr']}")
    if not 0.0 <= config["train"]["ema_decay"] < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {config['train']['ema_decay']}")
    if not isinstance(config["model"]["kwargs"], dict):
        raise ConfigError("model.kwargs must be a mapping")


def dump_config(config: Mapping[str, Any]) -> str:
    """The configuration as YAML text (what ``config.yaml`` and checkpoints store)."""
    return yaml.safe_dump(dict(config), sort_keys=False)
