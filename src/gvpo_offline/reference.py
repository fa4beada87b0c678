"""``gvpo_offline.reference``, the public import path of the reference cache, is the package
:mod:`gvpo_offline.stages.reference` itself (the format in ``cache.py``, the stage in ``compute.py``)."""

import sys

from gvpo_offline.stages import reference as _reference

sys.modules[__name__] = _reference
