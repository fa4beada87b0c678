"""``precompute-ref``: the reference log-prob cache. Its format and reading it: :mod:`.cache`;
computing it: :mod:`.compute` (imported on first use of its names, so that reading a cache, a cache
hit (:mod:`.hit`) and ``--help`` do not import torch)."""

from gvpo_offline.stages.reference.cache import (  # noqa: F401
    MANIFEST,
    REF_DIR,
    REF_SCHEMA,
    SPLITS,
    Manifest,
    SplitCounts,
    check_reward_range,
    describe_changes,
    load_split,
    parse_manifest,
    read_manifest,
    verify_shard,
)
from gvpo_offline.stages.reference.config import PrecomputeConfig  # noqa: F401

_COMPUTE = ("assign_split", "file_infos", "precompute", "precompute_extra", "split_value")


def __getattr__(name: str):
    if name in _COMPUTE:
        from gvpo_offline.stages.reference import compute

        return getattr(compute, name)
    raise AttributeError(f"module 'gvpo_offline.stages.reference' has no attribute {name!r}")
