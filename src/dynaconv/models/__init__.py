"""Networks of the papers, built from dynaconv layers (builder function per variant)."""

from .condensenet import *  # noqa: F403
from .digits import *  # noqa: F403
from .dydensenet import *  # noqa: F403
from .dyresnet import *  # noqa: F403
from .efficientnet_condconv import *  # noqa: F403
from .g_resnext import *  # noqa: F403
