"""What `train` writes under WORKDIR: resumable checkpoints, ``metrics.jsonl`` and the final model.

- ``checkpoints/step-N/`` (:func:`save_checkpoint`; :func:`save_checkpoint_sharded` under torchrun):
  weights, optimizer, scheduler, RNG states and :class:`TrainState`, written atomically; only the newest
  ``keep_checkpoints`` stay. A resume checks the settings (:data:`TRAJECTORY_FIELDS`), the reference
  cache's key and the files before it loads one. A checkpoint resumes on any number of processes: the
  sharded layout is resharded by torch.distributed.checkpoint (DCP), the single-process one is broadcast from
  rank 0 into the shards (:func:`load_single_into_sharded`). A single-process run in bf16 (fp32 master
  weights, master.py) writes its master weights and AdamW state with DCP in the sharded layout
  (:func:`has_dcp_state`), so they reshard alike; its older checkpoints (``master_weights.pt``) are
  broadcast like an fp32 one's.
- ``metrics.jsonl``: one line per step (:func:`append_metrics`), cut back to the checkpoint on resume.
- ``model/`` (and ``model-merged/``): :func:`save_final`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gvpo_offline.model import adapters, distributed, modelcard
from gvpo_offline.runtime.errors import GvpoError
from gvpo_offline.runtime.files import OLD_PREFIX, append_durably, atomic_dir, atomic_write_bytes, atomic_write_json
from gvpo_offline.stages.train.master import MASTER_WEIGHTS, MasterWeights, copy_saved_masters

if TYPE_CHECKING:
    from gvpo_offline.stages.train.config import TrainConfig

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
FINAL_MODEL = "model"
MERGED_MODEL = "model-merged"  # --merge: the LoRA adapter folded into the base weights
STATE = "trainer_state.json"

# Fields that decide the trajectory: a resumed run must use the same values as the run it continues.
TRAJECTORY_FIELDS = (
    "beta", "init_model", "groups_per_step", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
    "epochs", "max_steps", "seed", "loss", "lora", "base_dtype", "load_in_4bit",
)


# ---- checkpoints -----------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where the run is: ``step`` optimizer steps done; the next step starts at ``position`` in epoch
    ``epoch``'s group order."""

    step: int = 0
    epoch: int = 0
    position: int = 0


def checkpoint_dirs(workdir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first. Temp dirs (``.gvpo-tmp-*``) are never listed."""
    root = workdir / CHECKPOINTS
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        suffix = p.name[len("step-"):]
        if suffix.isdigit() and (p / STATE).is_file():
            found.append((int(suffix), p))
    return sorted(found)


def save_checkpoint(
    workdir: Path, model, optimizer, scheduler, state: TrainState, config: TrainConfig, cache_key: str,
    tokenizer=None, master: MasterWeights | None = None,
) -> Path:
    """WORKDIR/checkpoints/step-N/: weights (safetensors; a LoRA adapter with --lora-r), tokenizer and
    generation_config.json (the folder loads with from_pretrained like the final model), optimizer,
    scheduler, torch RNG states, position, and the reference cache's key (a resume on another cache would
    continue a different data order). ``master``: full fine-tuning in bf16 saves the fp32 master weights and
    AdamW's state by parameter name with torch.distributed.checkpoint instead of ``optimizer.pt``
    (:meth:`MasterWeights.save`: the layout of :func:`save_checkpoint_sharded`), so a resume continues them
    exactly, on any number of processes.

    Written into a temp dir, then renamed (atomic); only the newest ``config.keep_checkpoints`` stay.
    """
    final = workdir / CHECKPOINTS / f"step-{state.step}"
    with atomic_dir(final) as tmp:
        modelcard.write_model_folder(tmp, model, tokenizer)
        if master is None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        else:
            master.save(tmp, model, optimizer)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_states(), tmp / "rng.pt")
        layout = {DCP_STATE: True} if master is not None else {}
        atomic_write_json(tmp / STATE, {**asdict(state), "config": _portable(config), "cache_key": cache_key,
                                        **layout})
    for _, old in checkpoint_dirs(workdir)[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, optimizer, scheduler) -> TrainState:
    """Restore optimizer (unless None), scheduler and RNG states from ``path`` (the weights are loaded by the caller)."""
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return _load_schedule_and_position(distributed.Dist(), path, scheduler)


def load_master_checkpoint(path: Path, model, master: MasterWeights, optimizer, scheduler) -> TrainState:
    """One process with fp32 master weights: restore them and AdamW's state from a checkpoint that holds them by
    name (:func:`has_dcp_state`: a bf16 run's of one process, or a sharded run's of any number, whose shards are
    fp32 master weights too), round them into ``model``, and restore the scheduler, RNG and position."""
    master.load_saved(path, model, optimizer)
    return _load_schedule_and_position(distributed.Dist(), path, scheduler)


def _load_schedule_and_position(ctx: distributed.Dist, path: Path, scheduler) -> TrainState:
    """The scheduler, this rank's RNG (another world size: rank r takes rank (r mod old size)'s; training draws
    no random numbers, eval mode = no dropout, so this only matters to user code) and the position."""
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    written_by = saved_world_size(path)
    rng = torch.load(path / (f"rng-{ctx.rank % written_by}.pt" if written_by > 1 else "rng.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        if written_by > 1:  # every device's state, as rank r saw them: this rank's device's
            torch.cuda.set_rng_state(rng["cuda"][ctx.local_rank], ctx.device or "cuda")
        else:
            torch.cuda.set_rng_state_all(rng["cuda"])
    saved = json.loads((path / STATE).read_text())
    return TrainState(step=saved["step"], epoch=saved["epoch"], position=saved["position"])


def save_checkpoint_sharded(
    ctx: distributed.Dist, workdir: Path, model, optimizer, scheduler, state: TrainState, config: TrainConfig,
    cache_key: str,
) -> Path:
    """:func:`save_checkpoint` of a sharded run: the model + optimizer shards of every rank
    (torch.distributed.checkpoint), each rank's RNG, and rank 0's scheduler and state, in one folder that
    rank 0 swaps in once every rank has written (WORKDIR must be on storage shared by all nodes)."""
    final = workdir / CHECKPOINTS / f"step-{state.step}"
    with atomic_dir(final) if ctx.is_main else contextlib.nullcontext() as tmp:
        tmp = Path(distributed.broadcast_object(ctx, str(tmp) if ctx.is_main else None))
        distributed.save_sharded(tmp, model, optimizer)
        torch.save(_rng_states(), tmp / f"rng-{ctx.rank}.pt")
        distributed.barrier(ctx)
        with distributed.together(ctx):  # rank 0 finishes the folder; its GvpoError stops every rank
            if ctx.is_main:
                missing = [r for r in range(ctx.world_size) if not (tmp / f"rng-{r}.pt").is_file()]
                if missing:
                    raise GvpoError(f"{workdir}: ranks {missing} wrote their checkpoint shards elsewhere; with "
                                    "several nodes WORKDIR must be on storage shared by all of them")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                atomic_write_json(tmp / STATE, {**asdict(state), "config": _portable(config), "cache_key": cache_key,
                                                "world_size": ctx.world_size})
    if ctx.is_main:
        for _, old in checkpoint_dirs(workdir)[: -config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(ctx)
    return final


def load_checkpoint_sharded(ctx: distributed.Dist, path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore :func:`save_checkpoint_sharded`'s model, optimizer, scheduler and this rank's RNG, on any number
    of processes (torch.distributed.checkpoint reshards the model and optimizer state to this run's shards;
    with one process, ``model`` is a plain module and gets the whole tensors). Also a one-process bf16 run's
    checkpoint (:func:`has_dcp_state`): its master weights become this run's fp32 shards."""
    distributed.load_sharded(path, model, optimizer)
    return _load_schedule_and_position(ctx, path, scheduler)


def _portable(config: TrainConfig) -> dict:
    """The settings a checkpoint records, its workdir by name only (no local path in a loadable folder)."""
    return {**config.to_json(), "workdir": Path(config.workdir).name}
def load_single_into_sharded(ctx: distributed.Dist, path: Path, model, optimizer, scheduler, build_plain) -> TrainState:
    """Resume a sharded run from a single-process checkpoint (:func:`save_checkpoint`; 1 -> N processes).

    ``build_plain() -> model``: on rank 0, the run's model unsharded on CPU with the checkpoint's weights (or
    adapter; an older bf16 checkpoint's fp32 master weights, :data:`MASTER_WEIGHTS`, replace its bf16 ones).
    Rank 0 keys its trainable weights (all of its state, without a frozen base) and the checkpoint's
    AdamW state by parameter name, and every rank copies its shards out of them
    (``set_state_dict(full_state_dict=True, broadcast_from_rank0=True)``, one tensor at a time). Costs rank 0
    one more full copy of the trainable weights and their AdamW state in CPU RAM while it converts. The
    scheduler, RNG and position are the checkpoint's."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    frozen = distributed.has_frozen(model)
    model_sd, optim_sd = {}, {}
    if ctx.is_main:
        plain = build_plain()
        trainable = [name for name, p in plain.named_parameters() if p.requires_grad]  # AdamW's parameter order
        if (path / MASTER_WEIGHTS).is_file():  # an older bf16 checkpoint: its fp32 master weights, not its bf16 ones
            copy_saved_masters([p for p in plain.parameters() if p.requires_grad],
                               torch.load(path / MASTER_WEIGHTS, weights_only=True))
        model_sd = {name: t for name, t in plain.state_dict().items() if not frozen or name in trainable}
        saved = torch.load(path / "optimizer.pt", weights_only=True)
        optim_sd = {"state": {trainable[i]: state for i, state in saved["state"].items()},
                    "param_groups": [{**group, "params": [trainable[i] for i in group["params"]]}
                                     for group in saved["param_groups"]]}
        del plain
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, ignore_frozen_params=frozen,
                               strict=not frozen)
    # separately: set_state_dict skips the model on a rank whose model_state_dict is empty (all but rank 0)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
    return load_checkpoint(path, None, scheduler)


def _rng_states() -> dict:
    rng = {"torch": torch.get_rng_state()}  # tensors only: loads with weights_only=True
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def saved_world_size(path: Path) -> int:
    """The number of processes that wrote the checkpoint at ``path`` (1: the single-process format)."""
    return int(json.loads((path / STATE).read_text()).get("world_size", 1))


def is_sharded_checkpoint(path: Path) -> bool:
    """True for :func:`save_checkpoint_sharded`'s layout (DCP shards), False for :func:`save_checkpoint`'s."""
    return saved_world_size(path) > 1


DCP_STATE = "dcp_state"  # trainer_state.json of a one-process bf16 run: master weights + AdamW saved with DCP


def has_dcp_state(path: Path) -> bool:
    """Does ``path`` hold the trainable weights in fp32 and the optimizer state by name with DCP (a sharded
    run's checkpoint, or a one-process bf16 run's fp32 master weights), rather than ``optimizer.pt``?"""
    return is_sharded_checkpoint(path) or bool(json.loads((path / STATE).read_text()).get(DCP_STATE))


def _check_resume_config(path: Path, config: TrainConfig, cache_key: str) -> None:
    state = json.loads((path / STATE).read_text())
    if state.get("cache_key") != cache_key:
        raise GvpoError(f"--resume from {path}: the reference cache changed since this checkpoint (precompute-ref "
                        "was rerun on other inputs); start a new run (delete the checkpoints folder)")
    saved = {"loss": "gvpo", "load_in_4bit": False, **state["config"]}  # defaults of options added since
    now = config.to_json()
    if isinstance(saved.get("lora"), dict) and isinstance(now.get("lora"), dict):  # options added since: defaults
        saved["lora"] = {**json.loads(json.dumps(asdict(adapters.LoraSettings(r=1)))), **saved["lora"]}
    changed = [
        f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in TRAJECTORY_FIELDS if saved.get(k) != now[k]
    ]
    if changed:
        raise GvpoError(f"--resume from {path} with different settings: {', '.join(changed)}")


# ---- metrics.jsonl ---------------------------------------------------------------------------------


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """Keep only the complete lines with step <= keep_through_step (a resumed run redoes the rest)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_bytes().splitlines():
        try:
            if json.loads(line.decode("utf-8"))["step"] <= keep_through_step:
                kept.append(line + b"\n")
        except (ValueError, KeyError, TypeError, RecursionError):  # UnicodeDecodeError is a ValueError
            continue  # a line cut by a crash
    atomic_write_bytes(path, b"".join(kept))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        append_durably(f, json.dumps(record) + "\n")  # a full disk leaves no half line behind


# ---- the final model ---------------------------------------------------------------------------------


def save_final(workdir: Path, model, tokenizer, train_config: dict, state_dict: dict | None = None,
               name: str = FINAL_MODEL, dtype: torch.dtype | None = None) -> Path:
    """WORKDIR/model/ (or WORKDIR/``name``/): the model (or LoRA adapter), tokenizer,
    generation_config.json, train_config.json and README.md card (modelcard), swapped in by rename.
    ``state_dict``: the gathered full weights of a sharded model (distributed.full_state_dict), in
    ``dtype`` (recorded in config.json)."""
    final = workdir / name
    with atomic_dir(final) as tmp:
        modelcard.write_model_folder(tmp, model, tokenizer, train_config, state_dict)
        if state_dict is not None:
            distributed.fix_saved_architecture(tmp, dtype)
    return final


def written_by_train(folder: Path) -> bool:
    """Is ``folder`` a model folder that train wrote (a real folder whose train_config.json records the
    run's cache key)? Only such a folder is ever replaced or removed (--overwrite)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        return "cache_key" in json.loads((folder / "train_config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def remove_output(workdir: Path, name: str) -> None:
    """Remove WORKDIR/``name`` if train wrote it (renamed to a ``.gvpo-old-`` name first, so a crash never
    leaves half a folder under the real name); anything else is left alone."""
    folder = Path(workdir) / name
    if written_by_train(folder):
        old = folder.parent / f"{OLD_PREFIX}{name}-{os.getpid()}"
        os.rename(folder, old)
        shutil.rmtree(old, ignore_errors=True)


_CHECKPOINT_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", STATE)


def _check_checkpoint_files(path: Path) -> None:
    world_size = saved_world_size(path)
    if world_size > 1:  # save_checkpoint_sharded's layout
        names = [".metadata", "scheduler.pt", STATE, *(f"rng-{r}.pt" for r in range(world_size))]
        missing = [name for name in names if not (path / name).is_file()]
    else:
        files = [".metadata", *(f for f in _CHECKPOINT_FILES if f != "optimizer.pt")] if has_dcp_state(path) \
            else _CHECKPOINT_FILES
        missing = [name for name in files if not (path / name).is_file()]
        if not any((path / name).is_file() for name in ("config.json", adapters.ADAPTER_CONFIG)):
            missing.append("config.json (or adapter_config.json)")
        if not any(path.glob("*.safetensors")):
            missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")

