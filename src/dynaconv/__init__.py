"""dynaconv: learned and dynamic convolutions for PyTorch.

Five method families behind one layer contract (see :mod:`dynaconv.layers._base`):
DO-Conv, CondConv, dynamic group convolution (DGC), groupable convolution (DGConv) and
CondenseNet's learned group convolution (LGC). Model-level lifecycle: :func:`convert`,
:func:`set_progress`, :func:`aux_loss`, :func:`deploy`, :func:`profile`; the papers'
checkpoints through :mod:`dynaconv.compat`; networks in :mod:`dynaconv.models`.
"""

from . import compat, layers, models
from .layers import *  # noqa: F403
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
from .models.surgery import fold_bottleneck  # noqa: F401 (moved out of layers.dgconv)
from .profile import Profile, profile

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ConversionReport",
    "DeployVerificationError",
    "Profile",
    "aux_loss",
    "compat",
    "convert",
    "deploy",
    "dynaconv_layers",
    "layer_class",
    "layers",
    "models",
    "profile",
    "set_progress",
    *layers.__all__,
]
