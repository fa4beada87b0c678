"""``train``: the recipe (:mod:`.recipe`, read it top to bottom), its settings (:mod:`.config`), one
step's exact gradient (:mod:`.step`) and what it writes (:mod:`.checkpoints`)."""

from gvpo_offline.stages.train.config import TrainConfig, TrainResult  # noqa: F401
from gvpo_offline.stages.train.recipe import train  # noqa: F401
