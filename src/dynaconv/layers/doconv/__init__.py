"""DO-Conv (depthwise over-parameterized convolution): the whole family in one folder.

* layer.py: :class:`DOConv2d`, the layer, its deployment (an ``nn.Conv2d``) and its family registration.

The package re-exports the public names of its modules (what :mod:`dynaconv.layers` exports).
"""

from . import layer
from .layer import *  # noqa: F403

__all__ = [*layer.__all__]
