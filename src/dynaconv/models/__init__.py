"""Networks of the papers, built from dynaconv layers (one builder function per variant).

``create_model(name, **kwargs)`` builds any of :data:`MODELS` by name (used by the command
line and the recipes); the builder functions are also importable directly.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .condensenet import *  # noqa: F403
from .digits import *  # noqa: F403
from .dydensenet import *  # noqa: F403
from .dyresnet import *  # noqa: F403
from .efficientnet_condconv import *  # noqa: F403
from .g_resnext import *  # noqa: F403

#: Network name -> ``module:builder`` (relative to this package).
MODELS: dict[str, str] = {
    "digits_cnn": "digits:digits_cnn",
    **{f"condensenet{d}": f"condensenet:condensenet{d}" for d in (50, 74, 86, 98, 110, 122, 182)},
    "condensenet74_imagenet_g4": "condensenet:condensenet74_imagenet_g4",
    "condensenet74_imagenet_g8": "condensenet:condensenet74_imagenet_g8",
    "condensenet_light": "condensenet:condensenet_light",
    "dydensenet86": "dydensenet:dydensenet86",
    "dydensenet74_imagenet": "dydensenet:dydensenet74_imagenet",
    "dyresnet18": "dyresnet:dyresnet18",
    "g_resnext50": "g_resnext:g_resnext50",
    "g_resnext101": "g_resnext:g_resnext101",
    "efficientnet_b0_condconv4": "efficientnet_condconv:efficientnet_b0_condconv4",
    "efficientnet_b0_condconv8": "efficientnet_condconv:efficientnet_b0_condconv8",
    "efficientnet_b0_depth_condconv8": "efficientnet_condconv:efficientnet_b0_depth_condconv8",
}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the network ``name`` (one of :data:`MODELS`) with the builder's keyword arguments."""
    if name not in MODELS:
        raise ValueError(f"model name must be one of {sorted(MODELS)}, got {name!r}")
    module_name, builder_name = MODELS[name].split(":")
    builder = getattr(importlib.import_module(f"{__name__}.{module_name}"), builder_name, None)
    if builder is None:
        raise NotImplementedError(f"model {name!r} is not implemented yet")
    return builder(**kwargs)
