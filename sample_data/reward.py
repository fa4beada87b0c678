"""A small, transparent reward for the sample data: "tell a kind, happy story".

    reward = (number of kind/happy words) − (number of sad/unkind words), clipped to [−5, 5]

Words are matched whole and case-insensitively in the response only (the prompt is ignored). The clip
keeps a response from scoring by repeating one word over and over. Use it as
``--reward sample_data/reward.py:kindness``.
"""

from __future__ import annotations

import re

POSITIVE = frozenset(
    "happy happily smile smiled smiles laugh laughed laughing kind kindly friend friends love loved "
    "loves hug hugged share shared sharing help helped helping fun nice thank thanks glad together "
    "proud gentle".split()
)
NEGATIVE = frozenset(
    "sad sadly cry cried crying angry scared hurt mean bad lost afraid upset broke broken mad fight "
    "alone scary sorry".split()
)
CLIP = 5.0


def kindness(prompt, response: str) -> float:
    """(kind/happy words) − (sad/unkind words) in ``response``, clipped to [−5, 5]."""
    words = re.findall(r"[a-z]+", response.lower())
    score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
    return float(max(-CLIP, min(CLIP, score)))
