"""Run configuration: defaults, recipes, command-line overrides, validation.

Every option is declared once, in the dataclasses of :class:`RunConfig` (one per section:
:class:`ModelConfig`, :class:`DataConfig`, :class:`OptimConfig`, :class:`LossConfig` with
:class:`ResourceConfig`, :class:`TrainConfig`): its type, default and meaning, and in its
field's metadata (:func:`option`) its command-line flag, allowed values, range and nullable
types. The tables the rest of the package reads are generated from them: :data:`DEFAULTS`,
:data:`FLAGS`, :data:`SWITCHES`, :data:`CHOICES`, :data:`RULES` and :data:`NULLABLE_TYPES`.

A configuration travels as the nested dict of :meth:`RunConfig.to_dict` (what YAML stores,
what ``--set`` edits and what :func:`validate_config` checks); ``RunConfig.from_dict(config)``
gives typed access to a validated one (``.optim.lr``). It is resolved in this order, each step
overriding the previous one:

1. :data:`DEFAULTS`;
2. the recipe (``--recipe NAME`` for a file shipped in ``dynaconv/train/recipes/``, or a path
   to any YAML file of the same shape);
3. flat flags (``--lr 0.05``, ``--epochs 3``, ... see :data:`FLAGS`);
4. ``--set SECTION.KEY=VALUE`` (repeatable; the value is parsed as YAML, so ``--set
   optim.lr=0.05``, ``--set data.augment=[random_crop,hflip]``, ``--set model.convert=null``).

The resolved configuration is written as ``config.yaml`` into the run folder and stored in
every checkpoint and training safetensors file. :func:`validate_config` checks every
configuration before it is used, whatever its origin (the steps above, or a file written by
training or ``deploy``: see :func:`config_from_text`); each error is a :class:`ConfigError`
naming the key (and the file) and the rule:

* **Keys**: unknown and missing keys are errors; ``null`` only where the default is ``null``.
* **Types and values**: every number has its range (:data:`RULES`: positive batch sizes, epochs
  and learning rates, non-negative weight decay, momentum and label smoothing in ``[0, 1)``,
  ``min_lr`` in ``[0, lr]``, ...) and must be finite; enumerations are checked against
  :data:`CHOICES`.
* **Names never become code by import**: ``model.name`` must name a model of a registry
  (:mod:`dynaconv.train.names`: dynaconv's, torchvision's or timm's); ``model.kwargs`` keys must
  be on that model's allowlist of architecture arguments (never one that loads weights);
  ``model.convert.options`` keys must be options of the family's ``from_conv``.
* **Bounded text**: every configuration's YAML (a recipe, a ``--set`` value, a run or deploy
  folder's ``config.yaml``, the text stored in a checkpoint or a safetensors file) is parsed by
  :func:`parse_yaml` within :data:`YAML_LIMITS` (bytes, nesting depth, aliases, expanded
  size), checked while parsing, before anything is expanded; error messages quote at most a
  short prefix of a value (:func:`short_repr`).
* **Legacy**: configurations written by earlier versions hold
  ``loss.resource.helper: dynaconv.layers.dgconv:ResourceConstraint``; exactly that value is
  accepted and dropped (the objective is always :class:`dynaconv.ResourceConstraint`),
  any other value is an error.
"""

from __future__ import annotations

import copy
import functools
import math
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError, short_repr, short_text
from .extras import yaml_module

__all__ = [
    "CHOICES",
    "DEFAULTS",
    "FLAGS",
    "RULES",
    "SWITCHES",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ResourceConfig",
    "RunConfig",
    "TrainConfig",
    "apply_override",
    "config_from_text",
    "dump_config",
    "list_recipes",
    "load_recipe",
    "parse_assignment",
    "parse_yaml",
    "resolve_config",
    "short_repr",
    "short_text",
    "validate_config",
]


_POSITIVE = (0.0, False, math.inf, True)  # (low, low included, high, high included)
_NON_NEGATIVE = (0.0, True, math.inf, True)
_UNIT = (0.0, True, 1.0, False)  # [0, 1)


def option(
    default: Any,
    help: str = "",
    *,
    flag: str | None = None,
    switch: str | None = None,
    choices: tuple[Any, ...] | None = None,
    range: tuple[float, bool, float, bool] | None = None,
    nullable: tuple[type, ...] | None = None,
) -> Any:
    """One configuration option: its default and the rules generated from it.

    ``help``: what it means (the flag's help text); ``flag``: a flat command-line flag taking a
    value (``--lr 0.05``); ``switch``: a flag that sets a boolean option to true;
    ``choices``: the allowed values; ``range``: ``(low, low included, high, high included)``
    for a number (null not checked); ``nullable``: the types allowed besides null for an option
    whose default is null (without it, any value is accepted there: free-form mappings).
    A mutable default (a list or a mapping) is copied for every configuration.
    """
    metadata = {
        "help": help,
        "flag": flag,
        "switch": switch,
        "choices": choices,
        "range": range,
        "nullable": nullable,
    }
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    """A section of options (a nested dataclass)."""
    return field(default_factory=cls, metadata={"section": True})


@dataclass
class ModelConfig:
    name: str = option(
        "digits_cnn",
        "network name: one of dynaconv.list_models(), a torchvision classification model "
        "(e.g. resnet18) or, when timm is installed, a timm model (e.g. efficientnet_b0)",
        flag="--model",
    )
    #: Keyword arguments of the builder (num_classes is filled in from the dataset); keys
    #: are checked against the model's allowlist (:mod:`dynaconv.train.names`).
    kwargs: dict[str, Any] = option({}, "keyword arguments of the network's builder")
    #: null, or {method: doconv|condconv|dgc|dgconv|lgc, options: {...}, include, exclude}.
    convert: dict[str, Any] | None = option(
        None, "convert the network's nn.Conv2d layers", nullable=(dict,)
    )
    sync_bn: bool = option(False, "SyncBatchNorm under DDP", switch="--sync-bn")
    channels_last: bool = option(False, "channels_last memory format", switch="--channels-last")
    compile: bool = option(False, "torch.compile the model", switch="--compile")


@dataclass
class DataConfig:
    dataset: str = option(
        "digits",
        "digits | mnist | fashion_mnist | cifar10 | cifar100 | imagenet",
        flag="--dataset",
        choices=("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet"),
    )
    dir: str | None = option(None, "dataset folder", flag="--data-dir", nullable=(str,))
    download: bool = option(
        False, "download the dataset if absent (needs network)", switch="--download"
    )
    batch_size: int = option(
        64,
        "global batch size (split evenly over DDP processes)",
        flag="--batch-size",
        range=_POSITIVE,
    )
    eval_batch_size: int = option(256, "validation batch size", range=_POSITIVE)
    workers: int = option(0, "data-loader worker processes", flag="--workers", range=_NON_NEGATIVE)
    #: Among :data:`AUGMENTATIONS`.
    augment: list[str] = option([], "training augmentations")
    crop_padding: int = option(4, "random_crop's padding", range=_NON_NEGATIVE)
    image_size: int | None = option(
        None,
        "null: the dataset's native size (224 for ImageNet)",
        range=_POSITIVE,
        nullable=(int,),
    )
    channels: int | None = option(
        None,
        "null: the dataset's; 3 repeats a grey channel (for RGB models)",
        range=_POSITIVE,
        nullable=(int,),
    )
    eval_resize: int | None = option(
        None,
        "ImageNet: resize before the center crop (null: size / 0.875)",
        range=_POSITIVE,
        nullable=(int,),
    )
    train_subset: int | None = option(
        None, "use only the first N training examples", range=_POSITIVE, nullable=(int,)
    )
    val_subset: int | None = option(
        None, "use only the first N validation examples", range=_POSITIVE, nullable=(int,)
    )


@dataclass
class OptimConfig:
    name: str = option(
        "sgd", "sgd | adamw | rmsprop", flag="--optimizer", choices=("sgd", "adamw", "rmsprop")
    )
    lr: float = option(0.1, "peak learning rate", flag="--lr", range=_POSITIVE)
    momentum: float = option(0.9, "SGD and RMSprop momentum", range=_UNIT)
    nesterov: bool = option(True, "Nesterov momentum (SGD)")
    weight_decay: float = option(1e-4, "weight decay", flag="--weight-decay", range=_NON_NEGATIVE)
    no_decay_norm_bias: bool = option(False, "no weight decay on norms and biases")
    #: Two numbers in [0, 1) (checked by :func:`validate_config`).
    betas: list[float] = option([0.9, 0.999], "AdamW's betas")
    eps: float = option(1e-8, "AdamW's and RMSprop's epsilon", range=_POSITIVE)
    alpha: float = option(0.9, "RMSprop smoothing", range=_UNIT)
    schedule: str = option("cosine", "cosine | constant", choices=("cosine", "constant"))
    warmup_epochs: float = option(
        0.0, "linear warm-up length in epochs", flag="--warmup-epochs", range=_NON_NEGATIVE
    )
    warmup_start: float = option(
        0.0,
        "learning-rate factor at the first warm-up iteration",
        range=(0.0, True, 1.0, True),
    )
    #: At most ``lr`` (checked by :func:`validate_config`).
    min_lr: float = option(0.0, "the cosine schedule's final learning rate", range=_NON_NEGATIVE)
    clip_grad_norm: float | None = option(
        None, "clip the gradients' norm to this", range=_POSITIVE, nullable=(int, float)
    )
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", range=_UNIT)


@dataclass
class ResourceConfig:
    """DGConv's resource-constrained objective (dynaconv.ResourceConstraint)."""

    enabled: bool = option(False, "use the resource objective")
    budget: float = option(
        0.5,
        "fraction of the dense params (or MACs) of the DGConv layers",
        range=(0.0, False, 1.0, True),
    )
    budget_type: str = option("params", "params | macs", choices=("params", "macs"))
    exponent: float = option(0.02, "the objective's exponent", range=_POSITIVE)


@dataclass
class LossConfig:
    aux_weight: float = option(
        0.0,
        "weight of dynaconv.aux_loss (the sum of the layers' regularisers)",
        flag="--aux-weight",
        range=_NON_NEGATIVE,
    )
    resource: ResourceConfig = section(ResourceConfig)


@dataclass
class TrainConfig:
    epochs: int = option(10, "number of epochs", flag="--epochs", range=_POSITIVE)
    #: null, or the run's length in iterations when shorter than epochs x iterations per
    #: epoch: the schedules (learning rate, layer progress) then span exactly max_iters (a
    #: short run is a complete run, compressed). Resuming with another value continues the
    #: schedules at iteration t of the new length (with a warning).
    max_iters: int | None = option(
        None,
        "stop after this many iterations",
        flag="--max-iters",
        range=_POSITIVE,
        nullable=(int,),
    )
    device: str = option(
        "auto", "auto | cpu | cuda", flag="--device", choices=("auto", "cpu", "cuda")
    )
    amp: str = option("none", "none | bf16 | fp16", flag="--amp", choices=("none", "bf16", "fp16"))
    ema_decay: float = option(0.0, "EMA decay (0: off)", flag="--ema", range=_UNIT)
    ema_every: int = option(1, "update the EMA every N iterations", range=_POSITIVE)
    seed: int = option(0, "random seed", flag="--seed")
    deterministic: bool = option(
        False, "deterministic algorithms (bitwise repeatable)", switch="--deterministic"
    )
    out_dir: str | None = option(
        None, "run folder (instead of runs/NAME)", flag="--out", nullable=(str,)
    )
    checkpoint_every_iters: int = option(
        0,
        "also checkpoint every N iters (0: only at the end of every epoch)",
        flag="--checkpoint-every",
        range=_NON_NEGATIVE,
    )
    eval_every_epochs: int = option(
        1,
        "validate every N epochs and at the last (best.pt: among those)",
        range=_POSITIVE,
    )
    log_every_iters: int = option(
        20, "plain-line logging interval when stderr is not a terminal", range=_POSITIVE
    )
    tensorboard: bool = option(True, "write TensorBoard logs")
    plots: bool = option(True, "draw curves and structure plots at the end")
    progress_bar: str = option(
        "auto", "auto | tqdm | plain | none", choices=("auto", "tqdm", "plain", "none")
    )


@dataclass
class RunConfig:
    """A run's configuration: the one declaration of every option (type, default, meaning,
    command-line flag, rules); :data:`DEFAULTS`, :data:`CHOICES`, :data:`RULES`,
    :data:`NULLABLE_TYPES`, :data:`FLAGS` and :data:`SWITCHES` are generated from it.

    :meth:`from_dict` gives typed access to a validated configuration
    (``RunConfig.from_dict(config).optim.lr``).
    """

    #: The run's name, its folder runs/NAME. null: MODEL[-METHOD]-YYYYmmdd-HHMMSS from the
    #: start time, numbered (-2, -3, ...) when that folder exists (runnames.claim_run_folder).
    name: str | None = option(
        None,
        "run name, the folder runs/NAME (default: the recipe's name, else "
        "MODEL-METHOD-YYYYmmdd-HHMMSS, numbered when taken)",
        flag="--name",
    )
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    optim: OptimConfig = section(OptimConfig)
    loss: LossConfig = section(LossConfig)
    train: TrainConfig = section(TrainConfig)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> RunConfig:
        """The typed view of ``config`` (validated with :func:`validate_config` first)."""
        validate_config(dict(config))
        return _from_dict(cls, config)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as the nested dict that is validated, dumped and stored."""
        return asdict(self)


def _from_dict(cls: type, values: Mapping[str, Any]) -> Any:
    kwargs = {}
    for item in fields(cls):
        value = values[item.name]
        if item.metadata.get("section"):
            value = _from_dict(_section_type(cls, item.name), value)
        kwargs[item.name] = copy.deepcopy(value)
    return cls(**kwargs)


def _section_type(cls: type, name: str) -> type:
    return typing.get_type_hints(cls)[name]


def _options(cls: type = RunConfig, prefix: str = "") -> Iterator[tuple[str, Field[Any]]]:
    """``(dotted key, field)`` of every option, in declaration order."""
    for item in fields(cls):
        if item.metadata.get("section"):
            yield from _options(_section_type(cls, item.name), f"{prefix}{item.name}.")
        else:
            yield f"{prefix}{item.name}", item


def _flag_type(item: Field[Any]) -> Any:
    nullable = item.metadata["nullable"]
    default = item.default if item.default is not MISSING else None
    if default is None:
        return nullable[-1] if nullable else str
    return type(default)


#: The configuration every run starts from (a nested dict: sections of options).
DEFAULTS: dict[str, Any] = RunConfig().to_dict()

#: Values allowed for the enumerated fields.
CHOICES: dict[str, tuple[Any, ...]] = {
    dotted: item.metadata["choices"]
    for dotted, item in _options()
    if item.metadata["choices"] is not None
}

AUGMENTATIONS = ("random_crop", "hflip", "random_resized_crop", "color_jitter", "autoaugment")

#: Flat command-line flags -> (dotted key, argparse type, help).
FLAGS: dict[str, tuple[str, Any, str]] = {
    item.metadata["flag"]: (dotted, _flag_type(item), item.metadata["help"])
    for dotted, item in _options()
    if item.metadata["flag"] is not None
}

#: Boolean switches -> dotted key (set to true).
SWITCHES: dict[str, tuple[str, str]] = {
    item.metadata["switch"]: (dotted, item.metadata["help"])
    for dotted, item in _options()
    if item.metadata["switch"] is not None
}


# --------------------------------------------------------------------------------------------
# bounded YAML

#: Limits on a configuration's YAML text, checked while it is parsed and before anything is
#: built from it (so an alias "bomb" or deep nesting costs neither memory nor a traceback):
#: its size in bytes, the nesting depth of its collections, the number of aliases (``*name``)
#: and the number of values it would expand to (aliases counted at their full size).
#: A real configuration is a few kilobytes, 5 levels deep and has about 100 values.
YAML_LIMITS = {"bytes": 256 * 1024, "depth": 32, "aliases": 64, "nodes": 20_000}


@functools.cache
def _bounded_loader() -> type:
    """A ``yaml.SafeLoader`` subclass that counts depth, aliases and expanded size while
    composing (made on first use: PyYAML is the ``train`` extra, imported only when needed)."""
    yaml = yaml_module()

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self._depth = 0
            self._aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > YAML_LIMITS["aliases"]:
                    raise ConfigError(f"more than {YAML_LIMITS['aliases']} YAML aliases")
                return super().compose_node(parent, index)
            self._depth += 1
            if self._depth > YAML_LIMITS["depth"]:
                raise ConfigError(f"nested deeper than {YAML_LIMITS['depth']} levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_document(self, node: Any) -> Any:
            _check_expanded_size(node)
            return super().construct_document(node)

    return BoundedLoader


def _check_expanded_size(root: Any) -> None:
    """:class:`ConfigError` when the node graph ``root`` expands to more than
    ``YAML_LIMITS["nodes"]`` values (each distinct node is sized once)."""
    yaml = yaml_module()
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        known = sizes.get(id(node))
        if known is not None:
            return known
        sizes[id(node)] = 1  # a cycle (a recursive alias) counts once
        if isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(key) + size(value) for key, value in node.value)
        else:
            total = 1
        total = min(total, YAML_LIMITS["nodes"] + 1)
        sizes[id(node)] = total
        return total

    if size(root) > YAML_LIMITS["nodes"]:
        raise ConfigError(f"expands to more than {YAML_LIMITS['nodes']} values")


def parse_yaml(text: str, what: str) -> Any:
    """``text`` parsed as YAML within :data:`YAML_LIMITS`, safe tags only.

    Errors are one :class:`ConfigError` line naming ``what`` (a file or a key) and the limit
    or the YAML problem, quoting at most a short prefix of the text.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > YAML_LIMITS["bytes"]:
        raise ConfigError(
            f"{what} is {size} bytes, more than a configuration may be "
            f"({YAML_LIMITS['bytes']}); it starts {short_repr(text[:40])}"
        )
    yaml = yaml_module()
    loader = _bounded_loader()(text)
    try:
        return loader.get_single_data()
    except ConfigError as error:
        raise ConfigError(f"{what} is refused: {error}") from None
    except yaml.YAMLError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(f"{what} is not valid YAML ({short_text(first)})") from None
    except RecursionError:
        raise ConfigError(f"{what} is refused: nested too deeply") from None
    finally:
        loader.dispose()


def read_config_file(path: Path, what: str) -> str:
    """The text of the configuration file ``path``; :class:`ConfigError` (naming ``what`` and
    the file) when it cannot be read or exceeds ``YAML_LIMITS["bytes"]`` (checked before
    reading)."""
    try:
        size = path.stat().st_size
        if size > YAML_LIMITS["bytes"]:
            raise ConfigError(
                f"{what} {path} is {size} bytes, more than a configuration may be "
                f"({YAML_LIMITS['bytes']})"
            )
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {what} {path}: {short_text(str(error))}") from None


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
        text = read_config_file(path, "recipe")
        origin = str(path)
    else:
        entry = _recipe_dir().joinpath(f"{name_or_path}.yaml")
        if not entry.is_file():
            raise ConfigError(
                f"unknown recipe {short_repr(name_or_path)}; shipped recipes: {', '.join(list_recipes())} "
                "(or give a path to a .yaml file)"
            )
        text = entry.read_text()
        origin = name_or_path
    recipe = parse_yaml(text, f"recipe {origin}") or {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"recipe {origin} must be a mapping of sections, got {type(recipe)}")
    recipe.setdefault("name", Path(origin).stem)
    try:
        return drop_legacy_keys(recipe)
    except ConfigError as error:
        raise ConfigError(f"recipe {origin}: {error}") from None


# --------------------------------------------------------------------------------------------
# merging, overrides, validation


def _merge(base: dict[str, Any], update: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(
                f"unknown configuration key {short_repr(dotted)}; valid keys here: {', '.join(sorted(base))}"
            )
        if isinstance(base[key], dict) and _is_section(dotted):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} must be a mapping, got {short_repr(value)}")
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
        raise ConfigError(
            f"override must look like section.key=value, got {short_repr(assignment)}"
        )
    dotted, _, raw = assignment.partition("=")
    dotted = dotted.strip()
    value = parse_yaml(raw, f"the value of {short_repr(dotted)}") if raw.strip() else None
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
                f"unknown configuration key {short_repr(prefix)}; valid keys here: {', '.join(sorted(node))}"
            )
        if depth == len(parts) - 1:
            node[part] = value
            return
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"{prefix} is not a mapping (it is {short_repr(node[part])})")
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


#: The legacy ``loss.resource.helper`` value (the only one accepted, then dropped).
LEGACY_RESOURCE_HELPER = "dynaconv.layers.dgconv:ResourceConstraint"


def drop_legacy_keys(config: Any) -> Any:
    """Bring a configuration written by an earlier version to the current meaning.

    Such configurations are recognised by ``loss.resource.helper`` (every one of them has it):

    * the key is dropped when it holds the legacy value; any other value is refused;
    * a DGC conversion (``model.convert.method: dgc``) without ``saliency_mode`` gets
      ``saliency_mode: reference``: converted DGC layers were built with the reference
      saliency generator then, and the weights trained with it only compute the same outputs
      with it (conversions now default to ``"neutral"``).
    """
    resource = config.get("loss", {}).get("resource") if isinstance(config, dict) else None
    if isinstance(resource, dict) and "helper" in resource:
        if resource["helper"] != LEGACY_RESOURCE_HELPER:
            raise ConfigError(
                f"loss.resource.helper is no longer a setting (got {short_repr(resource['helper'])}); "
                "the resource objective is dynaconv.ResourceConstraint and names "
                "in a configuration are never imported: remove the key"
            )
        del resource["helper"]
        _keep_legacy_dgc_saliency(config)
    return config


def _keep_legacy_dgc_saliency(config: dict[str, Any]) -> None:
    model = config.get("model")
    convert = model.get("convert") if isinstance(model, dict) else None
    if not isinstance(convert, dict) or convert.get("method") != "dgc":
        return
    options = convert.get("options")
    if options is None:
        options = convert["options"] = {}
    if isinstance(options, dict):
        options.setdefault("saliency_mode", "reference")


def config_from_text(text: str, origin: str) -> dict[str, Any]:
    """The validated configuration stored as YAML ``text`` in ``origin`` (a file's name).

    Errors are :class:`ConfigError` naming ``origin``: invalid YAML, not a mapping, legacy keys
    with a non-legacy value, and everything :func:`validate_config` refuses.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{origin}: the stored configuration is not YAML text")
    config = parse_yaml(text, f"{origin}: the stored configuration")
    if not isinstance(config, dict):
        raise ConfigError(f"{origin}: the stored configuration is not a mapping of sections")
    try:
        drop_legacy_keys(config)
        validate_config(config)
    except ConfigError as error:
        raise ConfigError(f"{origin}: {error}") from None
    return config


#: Types allowed for the keys whose default is null (``None`` is always allowed there).
NULLABLE_TYPES: dict[str, tuple[type, ...]] = {
    dotted: item.metadata["nullable"]
    for dotted, item in _options()
    if item.metadata["nullable"] is not None
}

#: Ranges of the numeric keys: ``(low, low included, high, high included)``; a null value
#: (where allowed) is not checked.
RULES: dict[str, tuple[float, bool, float, bool]] = {
    dotted: item.metadata["range"]
    for dotted, item in _options()
    if item.metadata["range"] is not None
}


def _range_text(rule: tuple[float, bool, float, bool]) -> str:
    low, low_in, high, high_in = rule
    if high == math.inf:
        return "positive" if not low_in else "non-negative (>= 0)"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _type_name(types: tuple[type, ...]) -> str:
    return "float" if float in types else " or ".join(t.__name__ for t in types)


def _check_value_type(dotted: str, value: Any, default: Any) -> None:
    if value is None:
        if default is not None:
            raise ConfigError(f"{dotted} must not be null (default {short_repr(default)})")
        return
    if default is None:
        expected = NULLABLE_TYPES.get(dotted)
        if expected is None:
            return
    elif isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, float):
        expected = (int, float)
    elif isinstance(default, int):
        expected = (int,)
    else:
        expected = (type(default),)
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        raise ConfigError(
            f"{dotted} must be of type {_type_name(expected)}, got {short_repr(value)}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{dotted} must be a finite number, got {short_repr(value)}")


def _check_types(config: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str) -> None:
    unknown = sorted(set(config) - set(defaults), key=str)
    if unknown:
        raise ConfigError(
            f"unknown configuration key {prefix}{short_repr(unknown[0])}; valid keys here: "
            f"{', '.join(sorted(defaults))}"
        )
    for key, default in defaults.items():
        dotted = f"{prefix}{key}"
        if key not in config:
            raise ConfigError(f"configuration key {dotted} is missing")
        value = config[key]
        if isinstance(default, dict) and _is_section(dotted):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} must be a mapping, got {short_repr(value)}")
            _check_types(value, default, f"{dotted}.")
            continue
        _check_value_type(dotted, value, default)


def _check_ranges(config: Mapping[str, Any]) -> None:
    for dotted, rule in RULES.items():
        value = _get(config, dotted)
        if value is None:
            continue
        low, low_in, high, high_in = rule
        inside = (value >= low if low_in else value > low) and (
            value <= high if high_in else value < high
        )
        if not inside:
            raise ConfigError(f"{dotted} must be {_range_text(rule)}, got {short_repr(value)}")
    optim = config["optim"]
    if optim["min_lr"] > optim["lr"]:
        raise ConfigError(
            f"optim.min_lr must not exceed optim.lr ({optim['lr']}), got {optim['min_lr']}"
        )
    betas = optim["betas"]
    if len(betas) != 2 or not all(
        isinstance(b, int | float) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas
    ):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {short_repr(betas)}")


def _check_selector(dotted: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            f"{dotted} must be null, a glob pattern or a list of them, got {short_repr(value)}"
        )


def _check_model(model: dict[str, Any]) -> None:
    """``model.name`` through the registries; ``kwargs`` and ``convert`` against their code."""
    from .names import check_convert_options, check_model_kwargs

    check_model_kwargs(model["name"], model["kwargs"])
    convert = model["convert"]
    if convert is None:
        return
    if "method" not in convert:
        raise ConfigError("model.convert must be null or a mapping with a 'method' key")
    unknown = set(convert) - {"method", "options", "include", "exclude"}
    if unknown:
        raise ConfigError(
            f"model.convert.{sorted(unknown, key=str)[0]} is not a key of model.convert "
            "(valid: method, options, include, exclude)"
        )
    from dynaconv.lifecycle import METHODS

    if convert["method"] not in METHODS:
        raise ConfigError(
            f"model.convert.method must be one of {sorted(METHODS)}, got {short_repr(convert['method'])}"
        )
    options = convert.get("options")
    if options is not None and not isinstance(options, dict):
        raise ConfigError(f"model.convert.options must be a mapping, got {short_repr(options)}")
    check_convert_options(convert["method"], options or {})
    for key in ("include", "exclude"):
        _check_selector(f"model.convert.{key}", convert.get(key))


def validate_config(config: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the key for anything invalid (module docstring)."""
    if not isinstance(config, dict):
        raise ConfigError(
            f"a configuration must be a mapping of sections, got {short_repr(config)}"
        )
    _check_types(config, DEFAULTS, "")
    for dotted, allowed in CHOICES.items():
        if _get(config, dotted) not in allowed:
            raise ConfigError(
                f"{dotted} must be one of {', '.join(map(str, allowed))}, got {short_repr(_get(config, dotted))}"
            )
    for aug in config["data"]["augment"]:
        if aug not in AUGMENTATIONS:
            raise ConfigError(
                f"data.augment entries must be among {', '.join(AUGMENTATIONS)}, got {short_repr(aug)}"
            )
    if not isinstance(config["model"]["kwargs"], dict):
        raise ConfigError("model.kwargs must be a mapping")
    name = config["name"]
    if name is not None and (
        not name.strip() or "/" in name or "\\" in name or name in (".", "..")
    ):
        raise ConfigError(f"name must be a folder name (runs/NAME), got {short_repr(name)}")
    _check_ranges(config)
    _check_model(config["model"])


def dump_config(config: Mapping[str, Any]) -> str:
    """The configuration as YAML text (what ``config.yaml`` and checkpoints store)."""
    return yaml_module().safe_dump(dict(config), sort_keys=False)
