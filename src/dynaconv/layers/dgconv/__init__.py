"""DGConv (groupable convolution with learned group structure): the whole family in one folder.

* layer.py: :class:`GroupableConv2d` and the family registration;
* deployed.py: :class:`PermutedGroupConv2d`, the deployed module;
* kernels.py: the Triton kernel;
* reference.py: the loader of the paper's layer (registered for
  :func:`dynaconv.compat.layer_from_reference`);
* resource_constraint.py: :class:`ResourceConstraint`, the budget regulariser over a model's DGConv layers.

The package re-exports the public names of its modules (what :mod:`dynaconv.layers` exports).
"""

from . import layer, reference, resource_constraint  # noqa: F401 (reference: registers the paper's layer loader)
from .layer import *  # noqa: F403
from .resource_constraint import *  # noqa: F403

__all__ = [*layer.__all__, *resource_constraint.__all__]
