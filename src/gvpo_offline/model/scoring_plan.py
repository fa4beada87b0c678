"""The memory plan of scoring (precompute-ref, eval: forward passes without gradients), whole or sharded.

Made from config.json (the model built on the ``meta`` device; no weight is read), for ``--dry-run``:

* **whole** (each process holds the model, data parallel): the weights in the weights dtype, plus one
  forward pass's activations;
* **sharded** (``--shard-model``, FSDP forward passes over N processes, sharded_scoring.py): 1/N of the
  weights, plus what FSDP gathers at a time (the root's parameters and two decoder layers, in the weights
  dtype), plus the same activations; while loading, rank 0 holds the whole model in CPU RAM when it reads
  it for the others (an adapter folder, .bin files: rank0_load.py), else each rank reads its own rows.

Activations of a pass without gradients (an estimate, 2 B/value on GPU, 4 B on CPU): nothing is kept for a
backward, so one decoder layer's working set for ``batch_tokens`` tokens, ``(9h + 4i)`` values per token as
memory_plan.activation_bytes counts it, plus the hidden states going in and out (2h), plus one LM-head chunk
of fp32 logits and their log-softmax (2 × 4 B × chunk × vocab)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gvpo_offline.model import memory_plan

GIB = 1 << 30
SHARD_WHEN = 0.8  # --shard-model auto shards when the weights take more than this share of one device


@dataclass(frozen=True)
class ScoringPlan:
    """Bytes per process of scoring the model whole and sharded over ``world_size`` processes."""

    params: int
    world_size: int
    weights_bytes: int  # the whole model in the weights dtype
    gathered_bytes: int  # sharded: the root's parameters and two decoder layers, unsharded at a time
    activation_bytes: int
    rank0_load_bytes: int  # sharded, rank 0 reading the whole model for the others (0: each reads its rows)
    capacity_bytes: int | None
    where: str

    @property
    def whole_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    @property
    def sharded_bytes(self) -> int:
        return -(-self.weights_bytes // self.world_size) + self.gathered_bytes + self.activation_bytes

    @property
    def auto_shards(self) -> bool:
        """What ``--shard-model auto`` chooses (sharded_scoring.should_shard): shard under a launch of several
        processes when the weights take more than 80% of one device."""
        return (self.world_size > 1 and self.capacity_bytes is not None
                and self.weights_bytes > SHARD_WHEN * self.capacity_bytes)

    def describe(self) -> list[str]:
        room = f" of {self.capacity_bytes / GIB:.1f} GiB ({self.where})" if self.capacity_bytes else \
            f" ({self.where or 'capacity unknown'})"
        lines = [(f"whole model per process: weights {self.weights_bytes / GIB:.2f} GiB + activations "
                  f"{self.activation_bytes / GIB:.2f} GiB = {self.whole_bytes / GIB:.2f} GiB{room}"
                  f"{self._fits(self.whole_bytes)}")]
        if self.world_size > 1:
            loading = (f"; while loading, rank 0 holds the whole model in CPU RAM ({self.rank0_load_bytes / GIB:.2f} GiB)"
                       if self.rank0_load_bytes else "; while loading, each rank reads only its own rows")
            lines.append(f"sharded over {self.world_size} processes: weights {self.weights_bytes / self.world_size / GIB:.2f}"
                         f" GiB + gathered by FSDP {self.gathered_bytes / GIB:.2f} GiB + activations "
                         f"{self.activation_bytes / GIB:.2f} GiB = {self.sharded_bytes / GIB:.2f} GiB per process"
                         f"{self._fits(self.sharded_bytes)}{loading}")
            share = (f"{self.weights_bytes / self.capacity_bytes:.0%} of a device; sharded above {SHARD_WHEN:.0%}"
                     if self.capacity_bytes else "an unknown share of a device")
            lines.append(f"--shard-model auto: {'sharded' if self.auto_shards else 'whole'} (the weights take {share})")
        return lines

    def _fits(self, need: int) -> str:
        if self.capacity_bytes is None:
            return ""
        return ": fits" if need <= self.capacity_bytes else ": does NOT fit"


def scoring_plan(path: str | Path, dtype: torch.dtype, run: memory_plan.RunShape, batch_tokens: int,
                 trust_remote_code: bool = False, capacity_bytes: int | None = None, where: str | None = None,
                 device: torch.device | None = None) -> ScoringPlan:
    """:class:`ScoringPlan` of the model at ``path`` (config.json only) in ``dtype`` on ``run.world_size``
    processes; capacity as :func:`memory_plan.plan_from_config` takes it (None: this machine's ``device``)."""
    from gvpo_offline.model import logprobs, rank0_load

    model = rank0_load.build_on_meta(path, dtype, trust_remote_code)
    shape = memory_plan.shape_of(model)
    width = dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    gathered = (shape.root_params + 2 * shape.layer_params) * width
    values = 2 if run.on_gpu else 4
    chunk = min(logprobs.logits_chunk_for(shape.vocab or 1), batch_tokens)
    activations = batch_tokens * (9 * shape.hidden + 4 * shape.intermediate + 2 * shape.hidden) * values \
        + 2 * 4 * chunk * shape.vocab
    training = memory_plan.plan_from_config(path, dtype, None, run, trust_remote_code, capacity_bytes, where, device)
    rank0_load = weights if training.rank0_load_bytes else 0  # the same loading as train's (rank0_load.py)
    return ScoringPlan(shape.params, run.world_size, weights, gathered, activations, rank0_load,
                       training.capacity_bytes, training.device)
