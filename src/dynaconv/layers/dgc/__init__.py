"""DGC (dynamic group convolution): the whole family in one folder.

* layer.py: :class:`DynamicGroupConv2d`, its forms and the family registration;
* deployed.py: :class:`SparseDynamicGroupConv2d`, the deployed module (built from tensors and a spec);
* functional.py: the forms' tensor math;
* kernels.py: the Triton kernels.

The package re-exports the public names of its modules (what :mod:`dynaconv.layers` exports).
"""

from . import layer
from .layer import *  # noqa: F403

__all__ = [*layer.__all__]
