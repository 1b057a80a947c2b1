"""CondConv (conditionally parameterized convolutions): the whole family in one folder.

* layer.py: :class:`CondConv2d`, :class:`CondConvRouting`, the public :func:`condconv2d`, the declared execution forms and the family registration;
* functional.py: the forms' tensor math (tensors and a :class:`~dynaconv.spec.ConvSpec` in, no state);
* kernels.py: the fused Triton kernel;
* reference.py: the loader of the paper's layer (registered for
  :func:`dynaconv.compat.layer_from_reference`).

The package re-exports the public names of its modules (what :mod:`dynaconv.layers` exports).
"""

from . import layer, reference  # noqa: F401 (reference: registers the paper's layer loader)
from .layer import *  # noqa: F403

__all__ = [*layer.__all__]
