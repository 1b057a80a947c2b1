"""DO-Conv (depthwise over-parameterized convolution): the whole family in one folder.

* layer.py: :class:`DOConv2d`, the layer, its deployment (an ``nn.Conv2d``) and its family registration;
* reference.py: the loader of the paper's layer (registered for
  :func:`dynaconv.compat.layer_from_reference`).

The package re-exports the public names of its modules (what :mod:`dynaconv.layers` exports).
"""

from . import layer, reference  # noqa: F401 (reference: registers the paper's layer loader)
from .layer import *  # noqa: F403

__all__ = [*layer.__all__]
