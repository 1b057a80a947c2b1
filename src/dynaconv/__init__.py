"""dynaconv: learned and dynamic convolutions for PyTorch.

Five method families behind one layer contract (see :mod:`dynaconv.layers._base`):
DO-Conv, CondConv, dynamic group convolution (DGC), groupable convolution (DGConv) and
CondenseNet's learned group convolution (LGC). Model-level lifecycle: :func:`convert`,
:func:`set_progress`, :func:`aux_loss`, :func:`deploy`, :func:`profile` (in
:mod:`dynaconv.profiling`); the papers' checkpoints through :mod:`dynaconv.compat`; networks
in :mod:`dynaconv.models`; the registered families in :mod:`dynaconv.families`
(:func:`list_families`, :func:`register_family`).

``__all__`` names the user-facing API; the building blocks (deployed modules, kernels'
helpers, ``ConvSpec``...) stay importable from their modules.
"""

from . import compat, heap, layers, models
from .families import list_families, register_family
from .layers import *  # noqa: F403  (the other layer names stay reachable as before)
from .layers import (
    CondConv2d,
    CondConvRouting,
    ConversionSkipped,
    DOConv2d,
    DynaConv2d,
    DynamicGroupConv2d,
    GroupableConv2d,
    LearnedGroupConv2d,
    MacCount,
    ResourceConstraint,
    SameConv2d,
)
from .lifecycle import (
    METHODS,
    ConversionReport,
    DeployVerificationError,
    aux_loss,
    convert,
    deploy,
    dynaconv_layers,
    layer_class,
    set_progress,
)
from .models import create_model, list_models
from .models.surgery import fold_bottleneck  # noqa: F401 (moved out of layers.dgconv)
from .profiling import Profile, profile

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "CondConv2d",
    "CondConvRouting",
    "ConversionReport",
    "ConversionSkipped",
    "DOConv2d",
    "DeployVerificationError",
    "DynaConv2d",
    "DynamicGroupConv2d",
    "GroupableConv2d",
    "LearnedGroupConv2d",
    "MacCount",
    "Profile",
    "ResourceConstraint",
    "SameConv2d",
    "aux_loss",
    "compat",
    "convert",
    "create_model",
    "deploy",
    "dynaconv_layers",
    "heap",
    "layer_class",
    "layers",
    "list_families",
    "list_models",
    "models",
    "profile",
    "register_family",
    "set_progress",
]
