"""Networks of the papers, built from dynaconv layers (one builder function per variant).

Every builder registers itself with :func:`register_model`; ``create_model(name, **kwargs)``
builds a registered network by name (used by the command line and the recipes),
:func:`list_models` lists the names and :data:`MODELS` maps them to the builders (read-only).
The builder functions are also importable directly.
"""

from __future__ import annotations

from ._registry import *  # noqa: F403
from .condensenet import *  # noqa: F403
from .digits import *  # noqa: F403
from .dydensenet import *  # noqa: F403
from .dyresnet import *  # noqa: F403
from .efficientnet_condconv import *  # noqa: F403
from .g_resnext import *  # noqa: F403
from .surgery import *  # noqa: F403
