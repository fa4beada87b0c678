"""``gvpo_offline.loss``, the public import path of the GVPO loss, is :mod:`gvpo_offline.math.loss` itself."""

import sys

from gvpo_offline.math import loss as _loss

sys.modules[__name__] = _loss
