"""Reference layouts of CondenseNet (the paper's repository: ``CondenseNet``, ``DenseNet_LGC``
and their converted forms ``CondenseConv``/``CondenseLinear``).

Key mapping (reference -> native), training checkpoints:

* every ``LearnedGroupConv`` as the layer's loader maps it
  (:func:`dynaconv.layers.lgc.reference.lgc_state_from_reference`), its BN going to the
  network's BN before the LGC (``norm_1`` in a dense layer, ``norm`` in a light transition);
* ``conv_2.norm.*`` / ``conv_2.conv.weight`` -> ``norm_2.*`` / ``conv_2.weight``.

Converted checkpoints (``<lgc>.index`` buffers, classifier ``classifier.index`` and
``classifier.linear.*``) load into the deployed network: the gathered BN folds into the index
layer, the 3x3 conv's BN into its epilogue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.lgc.layer import (
    CondensedGroupConv2d,
    LearnedGroupConv2d,
    check_gather_index,
    fold_batchnorm,
)
from ..layers.lgc.reference import lgc_state_from_reference
from ..models.condensenet import CondensedCondenseNet, CondenseNet, deploy_condensenet
from ..reference import BATCHNORM_KEYS, register_reference_model

__all__ = ["condensenet_from_reference", "native_state_dict"]


def _network_from_config(config: Mapping[str, Any]) -> CondenseNet:
    data = config.get("data", "cifar10")
    compression = config.get("reduction") if config.get("model") == "densenet_LGC" else None
    return CondenseNet(
        list(config["stages"]),
        list(config["growth"]),
        num_classes=int(config.get("num_classes", 10)),
        data="cifar" if str(data).startswith("cifar") else "imagenet",
        bottleneck=int(config.get("bottleneck", 4)),
        group_1x1=int(config.get("group_1x1", 4)),
        group_3x3=int(config.get("group_3x3", 4)),
        condense_factor=config.get("condense_factor") or None,
        dropout=float(config.get("dropout_rate", 0.0)),
        compression=compression,
        reference_lasso=True,
    )


def native_state_dict(
    model: CondenseNet, state_dict: Mapping[str, Tensor], groups: int
) -> dict[str, Tensor]:
    """Reference training keys -> the native :class:`CondenseNet`'s keys."""
    state = dict(state_dict)
    out: dict[str, Tensor] = {}
    consumed: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LearnedGroupConv2d):
            continue
        prefix = f"{name}."
        parent = name.rpartition(".")[0]
        norm_target = f"{parent}.norm_1." if name.endswith("conv_1") else f"{parent}.norm."
        out.update(
            lgc_state_from_reference(
                prefix, prefix, norm_target, state, groups, module.condense_factor
            )
        )
        consumed.update(k for k in state if k.startswith(prefix))
    for key, value in state.items():
        if key in consumed:
            continue
        native = key.replace(".conv_2.norm.", ".norm_2.").replace(".conv_2.conv.", ".conv_2.")
        out[native] = value
    return out


def _load_converted(
    config: Mapping[str, Any], state: Mapping[str, Tensor], dtype: torch.dtype
) -> CondensedCondenseNet:
    model = _network_from_config(config).to(dtype)
    for module in model.modules():  # the converted sizes: fully condensed
        if isinstance(module, LearnedGroupConv2d):
            module.set_progress(1.0)
    deployed = deploy_condensenet(
        model, prune_classifier="classifier.index" in state, fold_shuffle=False
    )
    condensed = [
        (name, module)
        for name, module in deployed.named_modules()
        if isinstance(module, CondensedGroupConv2d)
    ]
    consumed: set[str] = set()
    try:
        for name, module in condensed:
            consumed |= _load_converted_lgc(name, module, state)
        plain = {
            key.replace(".conv_2.conv.", ".conv_2."): value
            for key, value in state.items()
            if key not in consumed
        }
        missing, unexpected = deployed.load_state_dict(plain, strict=False)
    except (KeyError, RuntimeError) as error:
        raise ValueError(
            f"converted checkpoint does not match the configuration: {error}"
        ) from error
    owned = tuple(f"{name}." for name, _ in condensed)
    missing = [k for k in missing if not k.startswith(owned)]
    if missing or unexpected:
        raise ValueError(
            f"converted checkpoint does not match the configuration: missing {missing}, "
            f"unexpected {unexpected}"
        )
    return deployed


def _bn_from(prefix: str, state: Mapping[str, Tensor]) -> tuple[nn.BatchNorm2d, set[str]]:
    weight = state[f"{prefix}weight"]
    norm = nn.BatchNorm2d(weight.numel(), dtype=weight.dtype)
    keys = {f"{prefix}{k}" for k in BATCHNORM_KEYS if f"{prefix}{k}" in state}
    norm.load_state_dict({k[len(prefix) :]: state[k] for k in keys})
    return norm.eval(), keys


def _load_converted_lgc(
    name: str, module: CondensedGroupConv2d, state: Mapping[str, Tensor]
) -> set[str]:
    """Load one reference ``CondenseConv`` (and the next BN, for a dense layer); the keys used."""
    prefix = f"{name}."
    norm, consumed = _bn_from(f"{prefix}norm.", state)
    consumed |= {f"{prefix}index", f"{prefix}conv.weight"}
    index = state[f"{prefix}index"]
    if index.shape != module.index.shape:
        raise ValueError(
            f"{prefix}index must hold {module.index.numel()} channels for this configuration, "
            f"got shape {tuple(index.shape)}"
        )
    check_gather_index(index, module.in_channels, f"{prefix}index")
    with torch.no_grad():
        module.index.copy_(state[f"{prefix}index"])
        module.weight.copy_(state[f"{prefix}conv.weight"])
        scale, shift = fold_batchnorm(norm)
        module.in_scale.copy_(scale)
        module.in_shift.copy_(shift)
        if name.endswith(".conv_1"):
            post, keys = _bn_from(name[: -len("conv_1")] + "conv_2.norm.", state)
            consumed |= keys
            scale, shift = fold_batchnorm(post)
            module.out_scale.copy_(scale)
            module.out_shift.copy_(shift)
    module.refresh()
    return consumed


@register_reference_model("condensenet")
def condensenet_from_reference(
    config: Mapping[str, Any], state_dict: Mapping[str, Tensor]
) -> nn.Module:
    """A native CondenseNet from the reference's arguments and checkpoint.

    ``config``: the reference's command-line arguments (``stages, growth, bottleneck,
    group_1x1, group_3x3, condense_factor, dropout_rate, data, num_classes``; ``model =
    "densenet_LGC"`` with ``reduction`` for CondenseNet-light). A training checkpoint gives a
    :class:`CondenseNet`; a converted one (``index`` buffers) the deployed
    :class:`~dynaconv.models.condensenet.CondensedCondenseNet` (shuffle kept, pruned classifier
    when the checkpoint has one).
    """
    state = dict(state_dict)
    dtype = next(v.dtype for k, v in state.items() if k.endswith("weight"))
    if any(k.endswith(".index") for k in state):
        return _load_converted(config, state, dtype)
    model = _network_from_config(config).to(dtype)
    groups = int(config.get("group_1x1", 4))
    model.load_state_dict(native_state_dict(model, state, groups))
    return model
