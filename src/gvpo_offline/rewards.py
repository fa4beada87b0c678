"""``gvpo_offline.rewards``, the public path of the built-in rewards (``--reward
gvpo_offline.rewards:gsm8k_correct``), is :mod:`gvpo_offline.data.rewards` itself."""

import sys

from gvpo_offline.data import rewards as _rewards

sys.modules[__name__] = _rewards
