"""``eval``: held-out metrics against the reference (:mod:`.heldout`), the generation eval
(:mod:`.generation`) and the terminal table (:mod:`.table`)."""

from gvpo_offline.stages.evaluate.generation import GenerationEvalConfig  # noqa: F401
from gvpo_offline.stages.evaluate.heldout import EvalConfig, EvalReport, evaluate, report_table  # noqa: F401
