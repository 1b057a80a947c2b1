"""DGC (dynamic group convolution): the whole family in one folder.

* layer.py: :class:`DynamicGroupConv2d`, its forms and the family registration;
* deployed.py: :class:`SparseDynamicGroupConv2d`, the deployed module (built from tensors and a spec);
* functional.py: the forms' tensor math;
* kernels.py: the Triton kernels;
* reference.py: the loader of the paper's layer (registered for
  :func:`dynaconv.compat.layer_from_reference`).

The package re-exports the public names of its modules (what :mod:`dynaconv.layers` exports).
"""

from . import layer, reference  # noqa: F401 (reference: registers the paper's layer loader)
from .layer import *  # noqa: F403

__all__ = [*layer.__all__]
