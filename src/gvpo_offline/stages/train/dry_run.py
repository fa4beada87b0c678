"""``train --dry-run``: the memory plan of a run, from config.json alone, printed before anything is loaded.

No weight is read, no tokenizer loaded, nothing written; the model is built on the ``meta`` device to count
its parameters (memory_plan.plan_from_config). The model is ``--init-model`` or, without it, the reference
model recorded in WORKDIR's manifest. ``processes`` plans for a torchrun launch of that many processes
(``processes_per_node`` of them sharing a node's RAM); ``gpu_memory_gib`` plans for GPUs with that much
free memory each instead of this machine's device (so a plan for 8 × 80 GB can be made on a laptop)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from gvpo_offline.model import adapters, distributed, memory_plan
from gvpo_offline.model.loading import resolve_device, resolve_dtype
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.stages.train.config import TrainConfig

GIB = 1 << 30


def dry_run(cfg: TrainConfig, log: Callable[[str], None] = print, processes: int | None = None,
            processes_per_node: int | None = None, gpu_memory_gib: float | None = None) -> memory_plan.MemoryPlan:
    """Print the plan of ``cfg`` on ``processes`` processes (default: this launch's) and whether it fits."""
    from gvpo_offline.stages import reference
    from gvpo_offline.stages.train.recipe import run_shape

    if cfg.init_model is not None:
        path = cfg.init_model
    elif (cfg.workdir / reference.MANIFEST).is_file():
        path = reference.read_manifest(cfg.workdir).model_path
    else:
        raise GvpoError(f"--dry-run: no model to plan for: pass --init-model (a folder with a config.json is "
                        f"enough), or a --workdir made by precompute-ref ({cfg.workdir} has no manifest)")
    for name, value in (("--plan-processes", processes), ("--plan-processes-per-node", processes_per_node),
                        ("--plan-gpu-memory", gpu_memory_gib)):
        if value is not None and not value > 0:
            raise GvpoError(f"{name} must be > 0, got {value}")
    ctx = distributed.Dist()  # a dry run starts no process group, even under a launcher
    world = processes or int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = gpu_memory_gib is not None
    device = torch.device("cuda") if on_gpu else resolve_device(cfg.device)
    micro_batch_tokens = cfg.micro_batch_tokens or (8192 if device.type == "cuda" else 2048)
    run = run_shape(cfg, ctx, device, micro_batch_tokens, world, processes_per_node or world)
    capacity = where = None
    if on_gpu:
        capacity, where = int(gpu_memory_gib * GIB), f"a GPU with {gpu_memory_gib:g} GiB free (--plan-gpu-memory)"
    # the weights dtype train would run (precompute-ref --dtype's): --base-dtype, else --dtype, else auto
    # (bf16 on a GPU, fp32 on CPU); sharded full fine-tuning keeps fp32 shards (FSDP gathers them in it)
    if cfg.base_dtype is not None:
        weights = adapters.base_dtype(cfg.base_dtype)
    elif cfg.dtype != "auto":
        weights = resolve_dtype(cfg.dtype, torch.device("cpu"))
    else:
        weights = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = torch.float32 if cfg.lora is None and world > 1 else weights
    plan = memory_plan.plan_from_config(path, dtype, cfg.lora, run, cfg.trust_remote_code, capacity, where, device)
    log(f"dry run: {path}, {'full fine-tuning' if cfg.lora is None else f'LoRA r={cfg.lora.r}'}, "
        f"{world} process(es), micro-batch {micro_batch_tokens:,} tokens"
        f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}; no weight read")
    log(plan.describe())
    if plan.capacity_bytes is None:
        log(f"needs {plan.peak_bytes / GIB:.2f} GiB per process (capacity unknown)")
    elif plan.peak_bytes > plan.capacity_bytes:
        log(memory_plan.does_not_fit(plan))
    else:
        log(f"fits: needs {plan.peak_bytes / GIB:.2f} GiB per process of {plan.capacity_bytes / GIB:.1f} GiB")
    return plan
