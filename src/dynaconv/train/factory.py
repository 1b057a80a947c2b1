"""What a configuration builds: the network, the optimizer, the learning rate, the objective.

Every factory reads one section of a resolved configuration (:mod:`dynaconv.train.config`) and
reports what does not fit as a :class:`ConfigError` naming the key. The network is built from
``model.name`` through the model registries only (:func:`dynaconv.train.names.model_builder`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

import dynaconv
from dynaconv.lifecycle import ConversionReport

from .config import ConfigError, short_repr, short_text
from .data import DatasetInfo, dataset_info
from .names import model_builder

__all__ = [
    "build_model",
    "build_optimizer",
    "learning_rate",
    "param_groups",
    "resource_objective",
]


# --------------------------------------------------------------------------------------------
# the network


@overload
def build_model(
    config: dict[str, Any],
    info: DatasetInfo | None = ...,
    network: Callable[..., nn.Module] | None = ...,
    *,
    return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def build_model(
    config: dict[str, Any],
    info: DatasetInfo | None = ...,
    network: Callable[..., nn.Module] | None = ...,
    *,
    return_report: Literal[True],
) -> tuple[nn.Module, ConversionReport | None]: ...


def build_model(
    config: dict[str, Any],
    info: DatasetInfo | None = None,
    network: Callable[..., nn.Module] | None = None,
    *,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, ConversionReport | None]:
    """The configured network (``num_classes`` from the dataset), converted if asked.

    ``model.name`` resolves only through :func:`~dynaconv.train.names.model_builder`. A
    ``network`` builder given from Python is used instead, called as
    ``network(num_classes=...)`` (``model.name`` and ``model.kwargs`` are then not used); the
    result is converted as configured. Builder and conversion errors are
    :class:`ConfigError` naming ``model.kwargs`` / ``model.convert.options``.
    ``return_report``: also return the conversion's :class:`~dynaconv.ConversionReport`
    (None when ``model.convert`` is null).
    """
    model_config = config["model"]
    info = info or dataset_info(config["data"])
    if network is not None:
        model = network(num_classes=info.num_classes)
    else:
        model = _build_registered(model_config["name"], model_config["kwargs"], info)
    report = None
    if model_config["convert"]:
        model, report = _convert(model, model_config["name"], model_config["convert"])
    _check_input_channels(model, model_config["name"], info)
    return (model, report) if return_report else model


def _build_registered(name: str, kwargs: dict[str, Any], info: DatasetInfo) -> nn.Module:
    """The registered network ``name`` built with ``kwargs`` (``num_classes`` filled in when
    the builder takes it)."""
    builder = model_builder(name)
    kwargs = dict(kwargs)
    try:
        accepts = inspect.signature(builder).parameters
        takes_classes = "num_classes" in accepts or any(
            p.kind is p.VAR_KEYWORD for p in accepts.values()
        )
    except (TypeError, ValueError):
        takes_classes = True
    if takes_classes:
        kwargs.setdefault("num_classes", info.num_classes)
    classes = kwargs.get("num_classes", info.num_classes)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < info.num_classes:
        raise ConfigError(
            f"model.kwargs.num_classes must be an int of at least the dataset's "
            f"{info.num_classes} classes, got {short_repr(classes)} (leave it out: it is taken "
            "from the data)"
        )
    try:
        return builder(**kwargs)
    except Exception as error:  # any failure of a builder is its arguments' fault
        raise ConfigError(
            f"model.kwargs of {name}: {type(error).__name__}: {short_text(str(error))}"
        ) from None


def _convert(
    model: nn.Module, name: str, convert: dict[str, Any]
) -> tuple[nn.Module, ConversionReport]:
    """``model`` converted as the ``model.convert`` section says, and the conversion's report;
    a conversion that converts no layer is a :class:`ConfigError` saying why."""
    method = convert["method"]
    try:
        with _conversion_log_quiet():  # a conversion of no layer is the error below, alone
            model, report = dynaconv.convert(
                model,
                method,
                include=convert.get("include"),
                exclude=convert.get("exclude"),
                return_report=True,
                **(convert.get("options") or {}),
            )
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.convert.options ({method}): {short_text(str(error))}") from None
    if not report.converted:
        first = next(iter(report.skipped.items()), None)
        why = f"; e.g. {first[0]}: {first[1]}" if first else ""
        raise ConfigError(
            f"model.convert: no layer of {name} converted to {method} "
            f"({len(report.skipped)} skipped{why})"
        )
    return model, report


@contextlib.contextmanager
def _conversion_log_quiet() -> Any:
    """Silence ``dynaconv``'s warning that a conversion converted no layer (the caller
    reports it as a :class:`ConfigError`)."""
    logger = logging.getLogger("dynaconv")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_input_channels(model: nn.Module, name: str, info: DatasetInfo) -> None:
    """:class:`ConfigError` when the first conv does not take the data's channels."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != info.channels:
        raise ConfigError(
            f"{name} expects {first_conv.in_channels} input channels but the data has "
            f"{info.channels}; set data.channels={first_conv.in_channels} to repeat the grey "
            "channel, or use a model for this input"
        )


# --------------------------------------------------------------------------------------------
# optimizer and schedule


def param_groups(model: nn.Module, optim: dict[str, Any]) -> list[dict[str, Any]]:
    """The trainable parameters; with ``optim.no_decay_norm_bias`` two groups, the second
    (normalisation weights and every bias) without weight decay."""
    if not optim["no_decay_norm_bias"]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(
                module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm
            )
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of the ``optim`` section (SGD, AdamW or RMSprop) over ``model``."""
    groups = param_groups(model, optim)
    if optim["name"] == "sgd":
        return torch.optim.SGD(
            groups,
            lr=optim["lr"],
            momentum=optim["momentum"],
            nesterov=optim["nesterov"] and optim["momentum"] > 0,
            weight_decay=optim["weight_decay"],
        )
    if optim["name"] == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=optim["lr"],
            betas=tuple(optim["betas"]),
            eps=optim["eps"],
            weight_decay=optim["weight_decay"],
        )
    return torch.optim.RMSprop(
        groups,
        lr=optim["lr"],
        alpha=optim["alpha"],
        eps=optim["eps"],
        momentum=optim["momentum"],
        weight_decay=optim["weight_decay"],
    )


def learning_rate(optim: dict[str, Any], iteration: int, total: int, per_epoch: int) -> float:
    """The learning rate of ``iteration`` (0-based) of ``total``: warm-up, then cosine."""
    peak, floor = optim["lr"], optim["min_lr"]
    warmup = min(round(optim["warmup_epochs"] * per_epoch), total)
    if iteration < warmup:
        start = optim["warmup_start"]
        return peak * (start + (1.0 - start) * iteration / warmup)
    if optim["schedule"] == "constant":
        return peak
    span = max(total - warmup, 1)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * (iteration - warmup) / span))


# --------------------------------------------------------------------------------------------
# the objective


def resource_objective(
    model: nn.Module, resource: dict[str, Any], input_shape: tuple[int, int, int]
) -> Callable[[Tensor], Tensor]:
    """DGConv's resource-constrained objective as a function ``loss -> loss``.

    :class:`dynaconv.layers.dgconv.resource_constraint.ResourceConstraint` built as
    ``ResourceConstraint(model, budget=, budget_type=, input_shape=, exponent=)`` from the
    ``loss.resource`` section: ``loss * (cost / budget) ** exponent`` while the DGConv layers'
    cost (parameters or MACs, ``budget_type``) exceeds ``budget`` x its dense value, else
    ``loss``. A model without DGConv layers is a :class:`ConfigError`.
    """
    from dynaconv.layers.dgconv.layer import GroupableConv2d
    from dynaconv.layers.dgconv.resource_constraint import ResourceConstraint

    if not any(isinstance(m, GroupableConv2d) for m in model.modules()):
        raise ConfigError("loss.resource.enabled needs DGConv layers in the model")
    try:
        return ResourceConstraint(
            model,
            budget=resource["budget"],
            budget_type=resource["budget_type"],
            input_shape=input_shape,
            exponent=resource["exponent"],
        )
    except ValueError as error:
        raise ConfigError(f"loss.resource: {error}") from None
