"""``precompute-ref --dry-run`` and ``eval --dry-run``: the memory plan of scoring the model whole and sharded
(model/scoring_plan.py), from config.json alone, printed before anything is loaded; nothing is read but
config.json (and WORKDIR's manifest for eval's weights dtype), nothing written. The plan options are train
--dry-run's (stages/train/dry_run.py): ``processes`` plans for a torchrun launch of that many processes
(``processes_per_node`` of them sharing a node's RAM), ``gpu_memory_gib`` for GPUs with that much free memory
each instead of this machine's device."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from gvpo_offline.runtime.errors import GvpoError

# torch and the model code are imported once a plan is asked for (a precompute-ref cache hit imports neither)

GIB = 1 << 30


def planned(command: str, dry_run: bool, model, dtype: str, device: str, batch_tokens: int | None,
            processes: int | None, per_node: int | None, gpu_memory: float | None, trust_remote_code: bool) -> bool:
    """The CLI's ``--dry-run`` of ``command``: print the plan (:func:`dry_run_plan`, on stdout) and return True;
    without it return False, refusing the plan options (they need --dry-run)."""
    if not dry_run:
        if processes is not None or per_node is not None or gpu_memory is not None:
            raise GvpoError("--plan-processes, --plan-processes-per-node and --plan-gpu-memory need --dry-run")
        return False
    dry_run_plan(command, model, dtype, device, batch_tokens, processes, per_node, gpu_memory, trust_remote_code)
    return True


def dry_run_plan(command: str, model: str | Path, dtype: str, device: str = "auto", batch_tokens: int | None = None,
                 processes: int | None = None, processes_per_node: int | None = None,
                 gpu_memory_gib: float | None = None, trust_remote_code: bool = False,
                 log: Callable[[str], None] = print):
    """Print the scoring plan of ``model`` in ``dtype`` (float32, bfloat16, or auto: bf16 on a GPU, fp32 on
    CPU, as precompute-ref resolves it) for ``command`` on ``processes`` processes (default: this launch's)."""
    import torch

    from gvpo_offline.model import memory_plan, scoring_plan
    from gvpo_offline.model.loading import resolve_device

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    for name, value in (("--plan-processes", processes), ("--plan-processes-per-node", processes_per_node),
                        ("--plan-gpu-memory", gpu_memory_gib), ("--batch-tokens", batch_tokens)):
        if value is not None and not value > 0:
            raise GvpoError(f"{name} must be > 0, got {value}")
    if dtype != "auto" and dtype not in dtypes:
        raise GvpoError(f"unknown --dtype {dtype!r}: use auto, float32 or bfloat16")
    world = processes or int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = gpu_memory_gib is not None
    where = torch.device("cuda") if on_gpu else resolve_device(device)
    weights = dtypes.get(dtype) or (torch.bfloat16 if where.type == "cuda" else torch.float32)
    tokens = batch_tokens or (16384 if where.type == "cuda" else 2048)
    run = memory_plan.RunShape(world, processes_per_node or world, where.type == "cuda", micro_batch_tokens=tokens)
    capacity, room = (int(gpu_memory_gib * GIB), f"a GPU with {gpu_memory_gib:g} GiB free (--plan-gpu-memory)") \
        if on_gpu else (None, None)
    plan = scoring_plan.scoring_plan(model, weights, run, tokens, trust_remote_code, capacity, room, where)
    log(f"dry run ({command}): {model}, {plan.params / 1e6:,.1f}M parameters in {str(weights).removeprefix('torch.')}, "
        f"{world} process(es), batch {tokens:,} tokens; no weight read")
    for line in plan.describe():
        log(line)
    return plan


def eval_model_and_dtype(workdir: Path, model: str | None, dtype: str | None) -> tuple[Path, str]:
    """eval's model (``--model``, default WORKDIR/model) and weights dtype (``--dtype``, default the one of
    WORKDIR's cached reference log-probs), without loading anything."""
    from gvpo_offline.stages import reference

    path = Path(model) if model is not None else Path(workdir) / "model"
    if dtype is None:
        if not (Path(workdir) / reference.MANIFEST).is_file():
            raise GvpoError(f"--dry-run: {workdir} has no reference cache to take the weights dtype from; pass --dtype")
        dtype = str(reference.read_manifest(workdir).dtype).removeprefix("torch.")
    return path, dtype
