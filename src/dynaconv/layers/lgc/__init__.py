"""LGC (CondenseNet's learned group convolution): the whole family in one folder.

* layer.py: :class:`LearnedGroupConv2d` and the family registration;
* deployed.py: :class:`CondensedGroupConv2d` and the folded pointwise convs, the deployed modules;
* kernels.py: the Triton gather kernels;
* reference.py: the loader of the paper's layer (registered for
  :func:`dynaconv.compat.layer_from_reference`).

The package re-exports the public names of its modules (what :mod:`dynaconv.layers` exports).
"""

from . import layer, reference  # noqa: F401 (reference: registers the paper's layer loader)
from .layer import *  # noqa: F403

__all__ = [*layer.__all__]
