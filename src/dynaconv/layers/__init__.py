"""dynaconv's layers: one module per method family, all following the contract in ``_base``.

Each family module registers its layer class (:func:`dynaconv.families.register_family`) when
imported; the order below is the order of the families in every table (the papers' order).
"""

# isort: off
from . import doconv, condconv, dgc, dgconv, lgc, resource_constraint

# isort: on
from ..padding import SameConv2d
from ..spec import ConvSpec
from ._base import (
    ChoosesForm,
    ConversionSkipped,
    Deployable,
    DynaConv2d,
    Form,
    FormCall,
    Forms,
    MacCount,
)
from .condconv import *  # noqa: F403
from .dgc import *  # noqa: F403
from .dgconv import *  # noqa: F403
from .doconv import *  # noqa: F403
from .lgc import *  # noqa: F403
from .resource_constraint import *  # noqa: F403

__all__ = [
    "ChoosesForm",
    "ConvSpec",
    "ConversionSkipped",
    "Deployable",
    "DynaConv2d",
    "Form",
    "FormCall",
    "Forms",
    "MacCount",
    "SameConv2d",
    *condconv.__all__,
    *dgc.__all__,
    *dgconv.__all__,
    *doconv.__all__,
    *lgc.__all__,
    *resource_constraint.__all__,
]
