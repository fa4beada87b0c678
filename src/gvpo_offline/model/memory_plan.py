"""The memory plan: bytes of training state per process, printed before training and used to refuse a
run that cannot fit (:func:`check_fits`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gvpo_offline.model.distributed import Dist, all_reduce_max, decoder_layers
from gvpo_offline.runtime.errors import GvpoError


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of training state per rank (activations not included): fp32 master weights (4 B/param),
    fp32 gradients (4 B/param) and AdamW's two moments (8 B/param), divided over the ranks under FSDP,
    plus the largest decoder layer gathered unsharded (bf16 on GPU) during its forward/backward.
    ``rank0_load_bytes``: under FSDP, the full model that rank 0 alone holds in CPU RAM while it loads the
    weights and broadcasts them into the shards (rank0_load.py); the other ranks never hold a full copy."""

    params: int
    world_size: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    gathered_layer_bytes: int
    device: str
    capacity_bytes: int | None  # device memory (GPU) or available RAM (CPU / --cpu-offload)
    rank0_load_bytes: int = 0  # the full weights in rank 0's CPU RAM while loading (0 with one process)

    @property
    def per_rank_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.gathered_layer_bytes

    def describe(self) -> str:
        gib = 1 << 30
        where = f"{self.capacity_bytes / gib:.1f} GiB available on {self.device}" if self.capacity_bytes else self.device
        loading = (f"; while loading, rank 0 alone holds the full model in CPU RAM ({self.rank0_load_bytes / gib:.2f} "
                   "GiB), the other ranks only their shards") if self.rank0_load_bytes else ""
        return (f"memory plan: {self.params / 1e6:,.1f}M trainable parameters on {self.world_size} process(es): per process "
                f"weights {self.params_bytes / gib:.2f} GiB + gradients {self.grads_bytes / gib:.2f} GiB + AdamW "
                f"state {self.optimizer_bytes / gib:.2f} GiB + one gathered layer "
                f"{self.gathered_layer_bytes / gib:.2f} GiB = {self.per_rank_bytes / gib:.2f} GiB before "
                f"activations ({where}){loading}")


def memory_plan(model, ctx: Dist, device: torch.device, cpu_offload: bool = False) -> MemoryPlan:
    """The plan for ``model`` (unsharded, before :func:`shard_model`) on ``ctx.world_size`` ranks, against
    the GPU's memory, or the node's available RAM (split over its processes) on CPU / with --cpu-offload."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # frozen weights (a LoRA run's base): in their own dtype, with no gradient and no optimizer state
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    if ctx.world_size == 1:  # trainable bf16 weights: the optimizer steps fp32 master copies (counted as the
        # trainable weights below) and the model keeps its bf16 ones beside them, without a gradient
        frozen_bytes += sum(p.numel() * p.element_size() for p in model.parameters()
                            if p.requires_grad and p.dtype != torch.float32)
    layer_params = max((sum(p.numel() for p in layer.parameters()) for layer in _maybe_layers(model)), default=0)
    if device.type == "cuda" and not cpu_offload:
        capacity, where = torch.cuda.get_device_properties(device).total_memory, str(device)
    else:
        capacity, where = available_ram_bytes(), "CPU RAM"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        if capacity is not None and local > 1:
            capacity, where = capacity // local, f"CPU RAM / {local} processes on this node"
    return plan_for(params, layer_params, ctx.world_size, device.type == "cuda", where, capacity, frozen_bytes)


def plan_for(params: int, layer_params: int, world_size: int, on_gpu: bool, device: str = "",
             capacity_bytes: int | None = None, frozen_bytes: int = 0) -> MemoryPlan:
    """:class:`MemoryPlan` from parameter counts: fp32 weights + grads (4 + 4 B) and AdamW (8 B) per
    trainable parameter, each rank holding 1/world_size; under FSDP one decoder layer is gathered at a time
    (bf16 on GPU, fp32 on CPU). ``frozen_bytes``: weights without gradients (a LoRA base), in the weights;
    FSDP shards them too (1/world_size each). Under FSDP only rank 0 reads the whole model (fp32 trainable
    weights + frozen ones) into CPU RAM before sharding; the other ranks build it without memory (meta)."""
    share = -(-params // world_size)
    frozen_share = -(-frozen_bytes // world_size)
    gathered = 0 if world_size == 1 else layer_params * (2 if on_gpu else 4)
    rank0_load = 0 if world_size == 1 else 4 * params + frozen_bytes
    return MemoryPlan(params, world_size, 4 * share + frozen_share, 4 * share, 8 * share, gathered, device,
                      capacity_bytes, rank0_load)


def _maybe_layers(model) -> list:
    try:
        return decoder_layers(model)
    except GvpoError:
        return []


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(ctx: Dist, plan: MemoryPlan) -> None:
    """Refuse a run whose training state alone exceeds the device (one-line error with the plan); the
    ranks decide together, so that none goes on alone."""
    too_big = plan.capacity_bytes is not None and plan.per_rank_bytes > plan.capacity_bytes
    if all_reduce_max(ctx, [int(too_big)])[0]:
        raise GvpoError(f"does not fit: {plan.describe()}; use more GPUs (torchrun --nproc_per_node / --nnodes), "
                        "--cpu-offload, or a smaller model")


def check_adapter_fits(ctx: Dist, adapter_params: int, device: torch.device, cpu_offload: bool = False) -> None:
    """Refuse, before peft allocates it, a LoRA adapter (``adapter_params``: adapters.lora_param_count)
    whose training state alone (fp32 weights, gradients and AdamW moments: 16 B per parameter, plus the
    full fp32 weights on rank 0 while they are broadcast) exceeds the memory free now, with the base model
    loaded: available RAM on CPU (or with --cpu-offload), the GPU's free memory on GPU. On CPU too: an
    oversized --lora-r would otherwise be killed by the kernel's OOM killer, with no message."""
    on_gpu = device.type == "cuda" and not cpu_offload
    free = torch.cuda.mem_get_info(device)[0] if on_gpu else available_ram_bytes()
    plan = plan_for(adapter_params, 0, ctx.world_size, on_gpu)
    need = plan.per_rank_bytes + plan.rank0_load_bytes
    too_big = free is not None and need > free
    if all_reduce_max(ctx, [int(too_big)])[0]:
        gib = 1 << 30
        raise GvpoError(f"does not fit: the LoRA adapter has {adapter_params / 1e6:,.1f}M trainable parameters, "
                        f"{need / gib:.2f} GiB of training state per process, and "
                        f"{'the GPU' if on_gpu else 'CPU RAM'} has {(free or 0) / gib:.2f} GiB free; "
                        "use a smaller --lora-r (or --lora-target-modules)")
