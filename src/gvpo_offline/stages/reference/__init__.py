"""``precompute-ref``: the reference log-prob cache. Its format and reading it: :mod:`.cache`;
computing it: :mod:`.compute`."""

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
from gvpo_offline.stages.reference.compute import (  # noqa: F401
    PrecomputeConfig,
    assign_split,
    file_infos,
    precompute,
    precompute_extra,
    split_value,
)
