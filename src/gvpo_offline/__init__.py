"""gvpo-offline: offline GVPO post-training for Hugging Face causal language models.

The math lives in :mod:`gvpo_offline.loss`; the pipeline stages are
``data`` -> ``tokenize`` -> ``reference`` -> ``train`` -> ``evaluate``; ``cli`` wires them up.
"""

from gvpo_offline.loss import gvpo_loss

__version__ = "0.1.0"
__all__ = ["gvpo_loss", "__version__"]
