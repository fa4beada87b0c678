"""Running a stage under ``torchrun`` / ``accelerate launch``: process group, data split, FSDP2, DCP.

Everything multi-process lives here so the stages stay readable; with one process (a plain
``gvpo-offline ...``, WORLD_SIZE unset or 1) every function is a no-op or the identity and no process
group is created.

* :func:`context` initialises ``torch.distributed`` from the launcher's environment (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR/PORT): NCCL with device ``cuda:LOCAL_RANK`` on GPUs, gloo on CPU, always with a
  timeout (``GVPO_DIST_TIMEOUT_S``, default 1800 s).
* :func:`agree` (and :func:`together`, :func:`main_only`) where a GvpoError may come on some ranks only (one
  rank's groups give a non-finite loss, rank 0's locks are taken): every rank raises the lowest failing
  rank's error, naming that rank, instead of leaving the others blocked in their next collective.
* :func:`balanced_split` gives each rank a disjoint, token-balanced share of whole groups (inference
  and the groups of a train step).
* :func:`shard_model` applies FSDP2 (``fully_shard`` per decoder layer, then the root) with gradients
  summed over ranks, so a step's gradient is the single-process gradient of the same step. A peft LoRA
  model is sharded the same way: FSDP2 takes frozen base weights beside trainable adapters in one unit
  (only the trainable ones must share a dtype) and reduces only the adapters' gradients. Train loads the
  model it shards with rank0_load.py: rank 0 reads the weights, the others build it on ``meta``.
* :func:`save_sharded` / :func:`load_sharded`: model + optimizer with ``torch.distributed.checkpoint``
  (with a frozen base, the trainable parameters only); :func:`full_state_dict` gathers the weights (or
  the adapter) for the final save.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gvpo_offline.runtime import launcher
from gvpo_offline.runtime.errors import GvpoError

TIMEOUT_ENV = "GVPO_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class Dist:
    """This process's place in the launch. ``world_size == 1``: a plain run, no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # cuda:LOCAL_RANK under NCCL; None = let the stage choose

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT: Dist | None = None


def context(device: str = "auto") -> Dist:
    """The process's :class:`Dist`, initialising the process group on the first call under a launcher.

    ``device``: the stage's --device (auto, cpu, cuda, cuda:N); under a launcher, cuda means
    ``cuda:LOCAL_RANK`` (an explicit index is refused) and the backend is NCCL, cpu means gloo."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        _CONTEXT = Dist()
        return _CONTEXT
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    launcher.watch_parent(rank)  # the launcher's death ends this rank at once, without writing (launcher.py)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda:"):
        raise GvpoError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda")
    if use_cuda and not torch.cuda.is_available():
        raise GvpoError("--device cuda was asked for but CUDA is not available")
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=where)
    else:
        where = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    atexit.register(_shutdown)
    _CONTEXT = Dist(rank, world_size, local_rank, where)
    return _CONTEXT


def single_process_only(command: str) -> None:
    """Refuse a command that does not split its work over processes when it is started by a launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GvpoError(f"{command} runs in one process: run it without torchrun / accelerate launch")


def _shutdown() -> None:
    """At exit: free what still holds communication handles, then close the process group. FSDP modules
    live in reference cycles, so without the collection they (and gloo work objects holding tensors) would
    be freed during interpreter finalization, where a rank now and then aborted (SIGABRT)."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def finish() -> None:
    """The end of a command that succeeded under a launcher: wait for every rank (the process group is
    closed at exit, by _shutdown). Without the wait, a rank could tear its group down while rank 0 was
    still writing; now and then (3 of 17 launches of the tests' 2-process worker, once in a CI run) that
    rank aborted at exit ("terminate called without an active exception", SIGABRT) and torchrun reported
    a finished run as failed. Only on
    success: after an error the ranks need not all reach this point (errors that some ranks meet are
    agreed on before, see agree)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def stage_device(ctx: Dist, device: str) -> str:
    """The --device value a stage should resolve: the rank's own device under a launcher."""
    return str(ctx.device) if ctx.enabled else device


# ---- collectives (identity with one process) ---------------------------------------------------------


def barrier(ctx: Dist) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_gather_objects(ctx: Dist, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small per-rank results)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: Dist, obj):
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_max(ctx: Dist, values: list[int]) -> list[int]:
    """Elementwise maximum over ranks of a few integers (e.g. the passes each rank must join)."""
    if not ctx.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.long, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(ctx: Dist, t: Tensor) -> Tensor:
    """Σ over ranks of ``t`` (returned on ``t``'s device; ``t`` is not modified)."""
    if not ctx.enabled:
        return t
    import torch.distributed as dist

    out = t.detach().to(_comm_device(ctx), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def _comm_device(ctx: Dist) -> torch.device:
    return ctx.device if ctx.device is not None and ctx.device.type == "cuda" else torch.device("cpu")


# ---- stopping together ---------------------------------------------------------------------------------


def agree(ctx: Dist, error: GvpoError | None) -> None:
    """Every rank calls this where the ranks must agree before their next collective, with the GvpoError it
    met since the last such point (or None): all ranks raise the lowest failing rank's error as
    ``GvpoError("rank R: <its message>")``, or all return. One small all-reduce when no rank failed (a
    gather of the messages only when one did). One process: raise ``error`` itself, unchanged."""
    if not ctx.enabled:
        if error is not None:
            raise error
        return
    if not all_reduce_max(ctx, [int(error is not None)])[0]:
        return
    messages = all_gather_objects(ctx, None if error is None else str(error))
    first = next(rank for rank, message in enumerate(messages) if message is not None)
    raise GvpoError(f"rank {first}: {messages[first]}")


@contextlib.contextmanager
def together(ctx: Dist):
    """A block of rank-local work (no collective inside) whose GvpoError may come on some ranks only: at
    its end every rank raises the lowest failing rank's error (:func:`agree`), or all go on."""
    error = None
    try:
        yield
    except GvpoError as err:
        error = err
    agree(ctx, error)


@contextlib.contextmanager
def main_only(ctx: Dist, held: contextlib.AbstractContextManager):
    """Hold ``held`` (e.g. the workdir's locks) on rank 0 only for the block; when rank 0 cannot take it,
    every rank raises its GvpoError (:func:`agree`), so no rank goes on alone."""
    with contextlib.ExitStack() as stack:
        with together(ctx):
            if ctx.is_main:
                stack.enter_context(held)
        yield


# ---- the data split ------------------------------------------------------------------------------------


def balanced_split(tokens: list[int], world_size: int) -> list[list[int]]:
    """Split items (groups) into ``world_size`` disjoint shares of about equal tokens.

    Greedy longest-first: each item goes to the share with the fewest tokens so far (ties: the lowest
    rank); deterministic, so every rank computes the same split. Returns the item indices of each share,
    in increasing order. A share may be empty when there are fewer items than ranks."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += tokens[i]
    return [sorted(s) for s in shares]


def score_groups(ctx: Dist, group_ids: list, lengths: list[int], score) -> np.ndarray:
    """Data-parallel inference: ``score(rows) -> [len(rows)] float64`` on this rank's token-balanced share
    of whole groups, gathered into [N] (row order) on every rank. ``group_ids``: [N] the group of each
    row, rows of a group contiguous; ``lengths``: [N] tokens per row. One process: ``score(all rows)``.
    A sharded model (sharded_scoring.py): ``score`` runs its batches in lock-step with the other ranks'."""
    n = len(lengths)
    if not ctx.enabled:
        return score(list(range(n)))
    starts = [i for i in range(n) if i == 0 or group_ids[i] != group_ids[i - 1]] + [n]
    spans = [range(starts[g], starts[g + 1]) for g in range(len(starts) - 1)]
    share = balanced_split([sum(lengths[i] for i in span) for span in spans], ctx.world_size)[ctx.rank]
    mine = [i for g in share for i in spans[g]]
    values = np.asarray(score(mine), dtype=np.float64)
    out = np.zeros(n, dtype=np.float64)
    for rows, part in all_gather_objects(ctx, (mine, values)):
        out[rows] = part
    return out


@dataclass(frozen=True)
class StepShare:
    """This rank's part of a train step (see step.gvpo_backward): the step's groups it computes, and how
    to agree with the other ranks (the number of passes to join, the sum of per-row results)."""

    ctx: Dist
    groups: list[int]

    def passes_to_join(self, no_grad: int, with_grad: int) -> tuple[int, int]:
        """(no-grad forwards, forward+backward passes) every rank runs: the maximum over ranks. A rank
        with fewer runs zero-weight padding passes, because under FSDP every pass is a collective."""
        most = all_reduce_max(self.ctx, [no_grad, with_grad])
        return most[0], most[1]

    def sum(self, t: Tensor) -> Tensor:
        return all_reduce_sum(self.ctx, t)


def step_share(ctx: Dist, group_tokens: list[int]) -> StepShare | None:
    """This rank's groups of a step (token-balanced); None with one process."""
    if not ctx.enabled:
        return None
    return StepShare(ctx, balanced_split(group_tokens, ctx.world_size)[ctx.rank])


# ---- FSDP2 ---------------------------------------------------------------------------------------------


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated transformer blocks (HF ``_no_split_modules`` classes), in model order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise GvpoError(f"{type(model).__name__}: cannot find its decoder layers (no _no_split_modules); "
                        "FSDP training needs them")
    return layers


HSDP_CHOICES = ("auto", "on", "off")


def nodes(ctx: Dist) -> tuple[int, int]:
    """(nodes, processes per node) of the launch, from LOCAL_WORLD_SIZE (torchrun sets it per node)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    if local < 1 or ctx.world_size % local:
        return 1, ctx.world_size
    return ctx.world_size // local, local


def use_hsdp(ctx: Dist, mode: str) -> bool:
    """``--hsdp``: on, off, or auto = on when the job spans several nodes (LOCAL_WORLD_SIZE < WORLD_SIZE)."""
    return hsdp_for(mode, ctx.world_size if ctx.enabled else 1, nodes(ctx)[1])


def hsdp_for(mode: str, world_size: int, per_node: int) -> bool:
    """:func:`use_hsdp` for a launch of ``world_size`` processes, ``per_node`` on each node (also for a plan)."""
    if mode not in HSDP_CHOICES:
        raise GvpoError(f"--hsdp must be one of {', '.join(HSDP_CHOICES)}, got {mode!r}")
    if world_size <= 1 or mode == "off":
        return False
    if mode == "on" and world_size % per_node:
        raise GvpoError(f"--hsdp on: {world_size} processes are not whole nodes of LOCAL_WORLD_SIZE={per_node}")
    return mode == "on" or (world_size % per_node == 0 and world_size > per_node)


def device_mesh(ctx: Dist, hsdp: bool = False):
    """The FSDP mesh: 1-D over all ranks, or with ``hsdp`` 2-D (nodes, processes per node) named
    ("replicate", "shard"): each node holds one sharded copy of the model and the gradients are all-reduced
    across nodes, so a layer's all-gather stays inside a node (NVLink) instead of crossing the network."""
    from torch.distributed.device_mesh import init_device_mesh

    if not hsdp:
        return init_device_mesh(ctx.device.type, (ctx.world_size,))
    n_nodes, local = nodes(ctx)
    return init_device_mesh(ctx.device.type, (n_nodes, local), mesh_dim_names=("replicate", "shard"))


def shard_model(ctx: Dist, model, cpu_offload: bool = False, param_dtype: torch.dtype | None = None,
                hsdp: bool = False):
    """FSDP2: ``fully_shard`` each decoder layer, then the root, over all ranks (1-D mesh; with ``hsdp`` the
    2-D mesh of :func:`device_mesh`: sharded within a node, replicated across nodes). With a
    ``param_dtype`` below float32 (the cache's weights dtype, bf16) the parameters are all-gathered in it,
    so the forward runs in the reference's weights dtype, and gradients are reduced in fp32
    (``MixedPrecisionPolicy``); the master weights and the optimizer state stay fp32 shards. Gradients are **summed** over ranks
    (not averaged): each rank's loss already carries the step's global 1/G. ``cpu_offload`` keeps the
    shards, gradients and optimizer state in CPU memory. Returns the model (sharded in place)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    from gvpo_offline.model import loading, logprobs

    on_gpu = ctx.device is not None and ctx.device.type == "cuda"
    if cpu_offload and not on_gpu:  # before any collective: every rank refuses alike
        raise GvpoError("--cpu-offload needs GPUs (on CPU everything already lives in CPU memory)")
    kwargs = {"mesh": device_mesh(ctx, hsdp)}
    if param_dtype is not None and param_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():  # every FSDP unit (these setters are not recursive):
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean, over ranks ...
            module.set_force_sum_reduction_for_comms(True)  # ... with SUM collectives (gloo has no PREMUL_SUM)
    # logprobs.sequence_logps calls the base model and the LM head separately; run it as a forward of the
    # root so that FSDP gathers the root's parameters (embeddings, final norm, LM head) around it.
    from torch.distributed.fsdp import register_fsdp_forward_method

    from gvpo_offline.model import packing

    model.gvpo_sequence_logps = types.MethodType(logprobs.sequence_logps_unsharded, model)
    model.gvpo_packed_logps = types.MethodType(packing.packed_logps, model)
    model.gvpo_compute_device = loading.unwrap_peft(model).gvpo_compute_device = ctx.device  # (a peft model's too)
    register_fsdp_forward_method(model, "gvpo_sequence_logps")
    register_fsdp_forward_method(model, "gvpo_packed_logps")
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def has_frozen(model) -> bool:
    """A LoRA run (peft): the frozen base is not trained, so it is neither checkpointed nor gathered."""
    return any(not p.requires_grad for p in model.parameters())


def full_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, Tensor] | None:
    """The full (unsharded) state dict on CPU, gathered on every rank (a collective); None when the
    model is not sharded. With frozen parameters (a peft LoRA model) only the trainable ones: the
    adapter, which ``PeftModel.save_pretrained(state_dict=...)`` writes. ``dtype``: floating tensors
    cast to it (a bf16 run's shards are its fp32 master weights; its model folder is bf16)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=has_frozen(model))
    state = get_model_state_dict(model, options=options)
    for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if tied in state and source in state:  # gathered as two copies: one tensor again, saved once by HF
            state[tied] = state[source]
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
        for tied, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            if tied in state and source in state:
                state[tied] = state[source]
    return state


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor parameter; a plain tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def to_float(x) -> float:
    """A scalar tensor, possibly a DTensor (e.g. clip_grad_norm_'s total norm), as a Python float."""
    full = getattr(x, "full_tensor", None)
    return float(full() if full is not None else x)


# ---- sharded checkpoints (torch.distributed.checkpoint) ------------------------------------------------


def _checkpoint_options(model):
    """What a checkpoint holds: every parameter, or with a frozen base (LoRA) only the trainable ones
    (the base is loaded again from the model it came from)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = has_frozen(model)
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


@contextlib.contextmanager
def checkpoint_errors():
    """Around a torch.distributed.checkpoint call. DCP raises a rank's failure (a cut shard file, a full disk) as
    CheckpointException, a BaseException that ``except Exception`` lets through, so a damaged checkpoint ended in
    a traceback instead of a resume falling back to the one before it: raise the lowest failing rank's OSError
    as it is, any other failure as a RuntimeError naming it (DCP gathers the failures: every rank raises alike).
    In one process (no process group) DCP warns that it assumes one process: meant here, not printed."""
    import warnings

    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            yield
    except CheckpointException as err:
        rank = min(err.failures)
        failure = err.failures[rank][0]
        if isinstance(failure, OSError):
            raise failure from None
        detail = f": {str(failure).splitlines()[0][:200]}" if str(failure).strip() else ""  # (torch.load's run on)
        raise RuntimeError(f"torch.distributed.checkpoint failed on rank {rank}: {type(failure).__name__}{detail}") \
            from None


def save_sharded(folder: Path, model, optimizer) -> None:
    """Model + optimizer state, each rank writing its own shards into ``folder`` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_checkpoint_options(model))
    with checkpoint_errors():
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model, optimizer) -> None:
    """Load :func:`save_sharded`'s model + optimizer state into the (sharded) model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _checkpoint_options(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optimizer": optim_sd}
    with checkpoint_errors():
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)


def fix_saved_architecture(folder: Path, dtype: torch.dtype | None = None) -> None:
    """save_pretrained of an FSDP-wrapped model records its wrapper class (``FSDPLlamaForCausalLM``) as the
    architecture, and the dtype of its fp32 shards; put back the model's own class name (and ``dtype``,
    the weights' dtype) so the folder is an ordinary HF model."""
    import json

    path = Path(folder) / "config.json"
    if not path.is_file():  # a LoRA adapter folder: adapter_config.json names no architecture
        return
    config = json.loads(path.read_text())
    fixed = dict(config, architectures=[n.removeprefix("FSDP") for n in config.get("architectures") or []])
    for key in ("dtype", "torch_dtype") if dtype is not None else ():
        if key in config:
            fixed[key] = str(dtype).removeprefix("torch.")
    if fixed != config:
        path.write_text(json.dumps(fixed, indent=2, sort_keys=True) + "\n")
