"""Scoring with a model too big for one device: FSDP2 forward passes (no optimizer) over the launch's processes.

precompute-ref and eval score many (prompt, response) pairs without grad. By default each process holds the
whole model (data parallel, distributed.score_groups). With ``--shard-model on`` (or ``auto`` when the
model's weights (in the run's weights dtype) do not fit one device, :func:`should_shard`) the model is sharded instead:

* loading: rank 0 reads the weights, the others build the model on ``meta``, and the weights reach every
  rank's shards by broadcast (rank0_load.py, as train loads); no process ever holds more than its shards
  once loaded (rank 0 holds the whole model while it loads, as the plan says);
* scoring, **whole batches in lock-step**: each rank still scores its own token-balanced share of whole groups
  (distributed.score_groups) with its own batch plan, but every forward is now a collective (each layer is
  all-gathered), so the ranks agree on the number of forward passes (the maximum of their plans) and a rank
  whose plan is shorter runs padding passes on a one-token pair whose result is dropped. Every rank thus joins
  every forward, in the same order, and the values are those of the unsharded model to float rounding.

With one process there is nothing to shard: ``on`` loads the model whole (a note says so).
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import torch

from gvpo_offline.model import distributed, loading, rank0_load
from gvpo_offline.model.scoring_plan import SHARD_WHEN
from gvpo_offline.runtime.errors import GvpoError

SHARD_CHOICES = ("auto", "on", "off")


def check_choice(value: str) -> None:
    if value not in SHARD_CHOICES:
        raise GvpoError(f"--shard-model must be one of {', '.join(SHARD_CHOICES)}, got {value!r}")


def weights_bytes(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> int:
    """Bytes of the model's weights in ``dtype``, counted on the ``meta`` device from its config (no weight read)."""
    model = rank0_load.build_on_meta(path, dtype, trust_remote_code)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def device_capacity(device: torch.device) -> int | None:
    """Free memory of the GPU, or the node's available RAM over its processes (LOCAL_WORLD_SIZE) on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from gvpo_offline.model.memory_plan import available_ram_bytes

    ram = available_ram_bytes()
    return None if ram is None else ram // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def should_shard(mode: str, ctx: distributed.Dist, path: str | Path, device: torch.device,
                 trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> bool:
    """Whether to shard: ``on``/``off`` as said (only under a launcher); ``auto``: when the weights in ``dtype``
    take more than :data:`SHARD_WHEN` (80%) of one device (the rest is for activations and the LM head's
    logits; the dry run's plan, scoring_plan.py, applies the same rule). The ranks agree
    (the largest need wins), so that all of them shard or none."""
    check_choice(mode)
    if not ctx.enabled or mode == "off":
        return False
    if mode == "on":
        return True
    capacity = device_capacity(device)
    too_big = capacity is not None and weights_bytes(path, dtype, trust_remote_code) > SHARD_WHEN * capacity
    return bool(distributed.all_reduce_max(ctx, [int(too_big)])[0])


def load_for_scoring(ctx: distributed.Dist, path: str | Path, device: torch.device, mode: str,
                     dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, say=None):
    """The model at ``path`` for scoring, its weights loaded in ``dtype`` (the run's weights dtype): whole on
    ``device``, or FSDP-sharded over the launch's processes (:func:`should_shard`; the shards keep ``dtype``,
    so the forward runs in it as unsharded). Returns (model, sharded). ``say(message)``: where the choice is told."""
    if mode == "on" and not ctx.enabled and say is not None:
        say("note: --shard-model on: one process holds the whole model (launch with torchrun to shard it)")
    if not should_shard(mode, ctx, path, device, trust_remote_code, dtype):
        return loading.load_model(path, device, dtype, trust_remote_code), False
    model = rank0_load.load_for_sharding(ctx, path, dtype, trust_remote_code)
    model = rank0_load.shard_and_broadcast(ctx, model)
    from torch.distributed.fsdp import register_fsdp_forward_method

    from gvpo_offline.model import packing

    model.gvpo_rows_logps = types.MethodType(packing.rows_logps, model)  # packed rows (scoring.batched_logps)
    register_fsdp_forward_method(model, "gvpo_rows_logps")
    if say is not None:
        say(f"scoring with the model sharded over {ctx.world_size} processes (FSDP, forward only)")
    return model, True


def lockstep(ctx: distributed.Dist, sharded: bool):
    """The ``passes`` argument of scoring.batched_logps: None (each rank runs its own plan) unless the model
    is sharded; then ``passes(mine) -> the number of forwards every rank runs`` (the maximum over ranks)."""
    if not sharded:
        return None
    return lambda mine: distributed.all_reduce_max(ctx, [mine])[0]
