"""dynaconv's layers: one package per method family, all following the contract in ``_base``.

A family is one folder, ``dynaconv/layers/<family>/``: its layer (``layer.py``, which
registers the family with :func:`dynaconv.families.register_family`), and where it has them its
deployed module (``deployed.py``), tensor math (``functional.py``) and Triton kernels
(``kernels.py``). What every family shares sits below them: the contract
(:mod:`dynaconv.layers._base`), ``nn.Conv2d``'s arguments and the validators
(:mod:`dynaconv.spec`), the execution-form vocabulary and switches (:mod:`dynaconv.dispatch`).
The import line below is the order of the families in every table (the papers' order); adding
a family is adding a folder and its name here.
"""

# isort: off
from . import doconv, condconv, dgc, dgconv, lgc

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
]
