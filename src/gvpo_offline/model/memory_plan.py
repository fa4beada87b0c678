"""The memory plan: bytes per process of a training run, made from config.json before any weight is read
(:func:`plan_from_config`: the model built on the ``meta`` device), printed before training and used to
refuse a run that cannot fit (:func:`check_fits`) before minutes of loading. ``train --dry-run`` prints it.

Against what: on a GPU its free memory now (``torch.cuda.mem_get_info``); on CPU (or with --cpu-offload)
the RAM this process may still use: the lower of ``MemAvailable`` and its cgroup's limit minus the cgroup's
working set (capacity.py), split over the processes of the node."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gvpo_offline.model import lm_head
from gvpo_offline.model.capacity import available_ram_bytes  # noqa: F401 (tests patch it here)
from gvpo_offline.model.distributed import Dist, all_reduce_max, decoder_layers
from gvpo_offline.runtime.errors import GvpoError

GIB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: parameter counts and the sizes that set its activations."""

    params: int  # trainable parameters (fp32 master weights, gradients, AdamW state)
    frozen_bytes: int  # weights without gradients (a LoRA base), in their own dtype
    layer_params: int  # the largest decoder layer (gathered whole under FSDP)
    largest_tensor_bytes: int  # the largest single weight in its dtype (in flight while loading)
    root_params: int = 0  # parameters outside the decoder layers (embeddings, final norm, LM head)
    layer_trainable: int = 0  # trainable parameters of the largest decoder layer (its unsharded gradient)
    hidden: int = 0
    intermediate: int = 0
    layers: int = 0
    vocab: int = 0


def shape_of(model, one_process: bool = False) -> ModelShape:
    """:class:`ModelShape` of a transformers model (possibly peft-wrapped, possibly on ``meta``).
    ``one_process``: trainable weights that are not float32 (bf16 full fine-tuning) stay in the model beside
    the fp32 master copies AdamW steps (stages/train/master.py), counted with the frozen bytes."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                       if not p.requires_grad or (one_process and p.dtype != torch.float32))
    layers = _maybe_layers(model)
    sizes = [(sum(p.numel() for p in layer.parameters()), sum(p.numel() for p in layer.parameters() if p.requires_grad))
             for layer in layers]
    layer_params, layer_trainable = max(sizes, default=(0, 0))
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root_params = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    largest = max((p.numel() * (4 if p.requires_grad else p.element_size()) for p in model.parameters()), default=0)
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    return ModelShape(params, frozen_bytes, layer_params, largest, root_params, layer_trainable, hidden,
                      int(getattr(config, "intermediate_size", 0) or 4 * hidden),
                      int(getattr(config, "num_hidden_layers", 0) or 0), int(getattr(config, "vocab_size", 0) or 0))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank: fp32 master weights (4 B/param), fp32 gradients (4 B/param) and AdamW's two moments
    (8 B/param), divided over the ranks under FSDP, plus what FSDP gathers unsharded (``gathered_layer_bytes``:
    the root's parameters, kept through the pass, two decoder layers, the one computing and the one
    prefetched, bf16 on GPU, and one layer's fp32 gradient before its reduce-scatter), plus the activations of the largest micro-batch
    (:func:`activation_bytes`). ``rank0_load_bytes``: under FSDP, when rank 0 reads the whole model and
    broadcasts it (an adapter folder, .bin weights: rank0_load.py), the full model in rank 0's CPU RAM while
    loading; 0 when each rank reads only its own shards (sliced_load.py), where ``loading_bytes`` (one
    tensor in flight) is all loading adds."""

    params: int
    world_size: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    gathered_layer_bytes: int
    device: str
    capacity_bytes: int | None  # free GPU memory, or the RAM this process may use (CPU / --cpu-offload)
    rank0_load_bytes: int = 0  # the full weights in rank 0's CPU RAM while loading (0: sliced loading)
    activation_bytes: int = 0  # the largest micro-batch's activations (estimate)
    loading_bytes: int = 0  # one tensor in flight while loading (sliced loading)
    on_gpu: bool = False
    shard_size: int = 0  # the processes the state is sharded over: HSDP's processes per node; 0: all of them

    @property
    def per_rank_bytes(self) -> int:
        """Training state + what FSDP gathers + activations: the peak of a training step."""
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.gathered_layer_bytes
                + self.activation_bytes)

    @property
    def load_peak_bytes(self) -> int:
        """Rank 0 while it loads: its shards of the weights plus the whole model (rank-0 loading) or one
        tensor in flight (sliced loading). In CPU RAM; on CPU it counts against the same capacity."""
        return self.params_bytes + max(self.rank0_load_bytes, self.loading_bytes)

    @property
    def peak_bytes(self) -> int:
        """What a rank needs at its worst: a training step, or (on CPU) rank 0's loading."""
        return self.per_rank_bytes if self.on_gpu else max(self.per_rank_bytes, self.load_peak_bytes)

    def describe(self) -> str:
        where = f"{self.capacity_bytes / GIB:.1f} GiB available on {self.device}" if self.capacity_bytes else self.device
        if self.rank0_load_bytes:
            loading = (f"; while loading, rank 0 alone holds the full model in CPU RAM ({self.rank0_load_bytes / GIB:.2f} "
                       "GiB), the other ranks only their shards")
        elif self.world_size > 1:
            loading = (f"; while loading, each rank reads only its own shards (one tensor in flight, "
                       f"{self.loading_bytes / GIB:.2f} GiB)")
        else:
            loading = ""
        hsdp = (f" (HSDP: sharded over each node's {self.shard_size}, replicated across nodes)"
                if self.shard_size and self.shard_size != self.world_size else "")
        return (f"memory plan: {self.params / 1e6:,.1f}M trainable parameters on {self.world_size} process(es){hsdp}: per process "
                f"weights {self.params_bytes / GIB:.2f} GiB + gradients {self.grads_bytes / GIB:.2f} GiB + AdamW "
                f"state {self.optimizer_bytes / GIB:.2f} GiB + gathered by FSDP "
                f"{self.gathered_layer_bytes / GIB:.2f} GiB + activations {self.activation_bytes / GIB:.2f} GiB = "
                f"{self.per_rank_bytes / GIB:.2f} GiB ({where}){loading}")


def activation_bytes(shape: ModelShape, micro_batch_tokens: int, logits_chunk_tokens: int, on_gpu: bool,
                     gradient_checkpointing: bool = False) -> int:
    """Estimated activation bytes of one forward+backward pass of ``micro_batch_tokens`` tokens (padded
    rows × longest row, the largest micro-batch train makes).

    Kept for the backward, per token and decoder layer (2 B/value under bf16 autocast on GPU, 4 B on CPU):
    the two RMSNorms' inputs and outputs (4h), q, k, v after rope and the attention output (4h, k/v counted
    as h), o_proj's input (h), the MLP's gate, up, activation and product (4i): ``(9h + 4i)``. With gradient
    checkpointing only each layer's input (h) is kept, plus one layer's whole set while it is recomputed.
    Plus the LM head: one chunk of ``logits_chunk_tokens`` × vocab fp32 logits, their log-softmax and its
    gradient (3 × 4 B), recomputed chunk by chunk (logprobs.response_logps), and the exp(z − max) chunks
    its forward keeps for backward: 4 B per position × vocab, up to ``lm_head.keep_bytes_for``."""
    width = 2 if on_gpu else 4
    per_layer = (9 * shape.hidden + 4 * shape.intermediate) * width
    if gradient_checkpointing:
        layers = shape.layers * shape.hidden * width + per_layer
    else:
        layers = shape.layers * per_layer
    embeddings = 2 * shape.hidden * width  # the embedding output and the final norm
    logits = 3 * 4 * min(logits_chunk_tokens, micro_batch_tokens) * shape.vocab
    logits += min(lm_head.keep_bytes_for("cuda" if on_gpu else "cpu"), 4 * micro_batch_tokens * shape.vocab)
    return micro_batch_tokens * (layers + embeddings) + logits


def plan_for(params: int, layer_params: int, world_size: int, on_gpu: bool, device: str = "",
             capacity_bytes: int | None = None, frozen_bytes: int = 0, *, rank0_reads_all: bool = False,
             activations: int = 0, largest_tensor_bytes: int = 0, root_params: int = 0,
             layer_trainable: int | None = None, shard_size: int | None = None) -> MemoryPlan:
    """:class:`MemoryPlan` from parameter counts: fp32 weights + grads (4 + 4 B) and AdamW (8 B) per
    trainable parameter, each rank holding 1/world_size; under FSDP the root's ``root_params`` and two
    decoder layers are gathered at a time (bf16 on GPU, fp32 on CPU), and one layer's gradient
    (``layer_trainable`` parameters, default all of ``layer_params``) waits unsharded in fp32. ``frozen_bytes``: weights without gradients (a LoRA base), in the weights;
    FSDP shards them too (1/world_size each). ``rank0_reads_all``: rank 0 reads the whole model (fp32
    trainable weights + frozen ones) into CPU RAM before sharding (rank0_load.py); otherwise each rank reads
    its own rows, ``largest_tensor_bytes`` at a time. ``activations``: :func:`activation_bytes`.
    ``shard_size``: under HSDP the processes of one node, over which the state is sharded (each node holds a
    whole copy); default all ``world_size``."""
    shard = shard_size or world_size
    share = -(-params // shard)
    frozen_share = -(-frozen_bytes // shard)
    trainable = layer_params if layer_trainable is None else layer_trainable
    gathered = 0 if world_size == 1 else (root_params + 2 * layer_params) * (2 if on_gpu else 4) + 4 * trainable
    rank0_load = 4 * params + frozen_bytes if world_size > 1 and rank0_reads_all else 0
    in_flight = largest_tensor_bytes if world_size > 1 else 0
    return MemoryPlan(params, world_size, 4 * share + frozen_share, 4 * share, 8 * share, gathered, device,
                      capacity_bytes, rank0_load, activations, in_flight, on_gpu, shard)


def capacity(device: torch.device, cpu_offload: bool, local_world_size: int) -> tuple[int | None, str]:
    """(bytes this process may use, where): the GPU's free memory, or this node's available RAM (the lower
    of MemAvailable and the cgroup's room, capacity.py) split over its ``local_world_size`` processes."""
    if device.type == "cuda" and not cpu_offload:
        free, _total = torch.cuda.mem_get_info(device)
        return free, f"{device} (free now)"
    ram, where = available_ram_bytes(), "CPU RAM"
    if ram is not None and local_world_size > 1:
        ram, where = ram // local_world_size, f"CPU RAM / {local_world_size} processes on this node"
    return ram, where


def memory_plan(model, ctx: Dist, device: torch.device, cpu_offload: bool = False) -> MemoryPlan:
    """The training-state plan for a built ``model`` (unsharded) on ``ctx.world_size`` ranks (no
    activations: see :func:`plan_from_config` for the whole plan)."""
    shape = shape_of(model, ctx.world_size == 1)
    cap, where = capacity(device, cpu_offload, int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)))
    return plan_for(shape.params, shape.layer_params, ctx.world_size, device.type == "cuda", where, cap,
                    shape.frozen_bytes, largest_tensor_bytes=shape.largest_tensor_bytes, root_params=shape.root_params,
                    layer_trainable=shape.layer_trainable)


@dataclass(frozen=True)
class RunShape:
    """The settings of a run that the plan depends on, besides the model."""

    world_size: int = 1
    local_world_size: int = 1
    on_gpu: bool = False
    cpu_offload: bool = False
    micro_batch_tokens: int = 2048
    logits_chunk_tokens: int | None = None  # None: the run's own (lm_head.chunk_rows_for)
    gradient_checkpointing: bool = False
    hsdp: bool = False  # the state sharded over each node's local_world_size processes, not over all of them


def plan_from_config(path: str | Path, dtype: torch.dtype, lora, run: RunShape, trust_remote_code: bool = False,
                     capacity_bytes: int | None = None, where: str | None = None,
                     device: torch.device | None = None, check_adapter=None) -> MemoryPlan:
    """The whole plan for training the model at ``path`` (its config.json; no weight is read): the model
    is built on ``meta`` (rank0_load.build_on_meta) and wrapped with ``lora`` (adapters.LoraSettings, or
    None) to count its parameters. ``capacity_bytes``/``where``: what to plan against (None: the
    :func:`capacity` of ``device``, default this machine's GPU when ``run.on_gpu``, else its RAM).
    ``check_adapter(n)``: called with the adapter's parameter count (adapters.lora_param_count, from the
    layer shapes) before peft builds it, e.g. :func:`check_adapter_fits` (peft draws A on CPU first)."""
    from gvpo_offline.model import adapters, loading, rank0_load

    with torch.random.fork_rng(devices=[]):  # peft draws LoRA's A on CPU before moving it to meta: not from
        model = rank0_load.build_on_meta(path, dtype, trust_remote_code)  # the run's seeded RNG
        if lora is not None:
            if check_adapter is not None:
                check_adapter(adapters.lora_param_count(model, lora))
            model = adapters.add_lora(model, lora)
    shape = shape_of(model, run.world_size == 1)
    folder = loading.model_folder(path)
    # each rank reads its own rows, unless rank0_load must read the whole model on rank 0: an adapter folder
    # (merged on load), other weight files than safetensors, checkpoint names the model does not have. A
    # folder with a config.json only (a plan for a model not downloaded) is planned as safetensors.
    has_weights = any(p.suffix in loading.WEIGHT_SUFFIXES for p in folder.iterdir())
    sliced = run.world_size == 1 or (not loading.is_adapter(folder)
                                     and (not has_weights or _sliced_ok(folder, dtype, trust_remote_code)))
    if capacity_bytes is None and where is None:
        device = device or torch.device("cuda" if run.on_gpu else "cpu")
        capacity_bytes, where = capacity(device, run.cpu_offload, run.local_world_size)
    # the chunk the run will use: CUDA's on a GPU; on CPU the wide one of a stage that keeps freed blocks
    # (the larger: a plan that does not depend on what this process has set up)
    chunk = run.logits_chunk_tokens or lm_head.chunk_rows_for(shape.vocab or 1, "cuda" if run.on_gpu else "cpu",
                                                              heap_keeps_freed=True)
    activations = activation_bytes(shape, run.micro_batch_tokens, chunk, run.on_gpu, run.gradient_checkpointing)
    return plan_for(shape.params, shape.layer_params, run.world_size, run.on_gpu, where or "", capacity_bytes,
                    shape.frozen_bytes, rank0_reads_all=not sliced, activations=activations,
                    largest_tensor_bytes=shape.largest_tensor_bytes, root_params=shape.root_params,
                    layer_trainable=shape.layer_trainable,
                    shard_size=run.local_world_size if run.hsdp else run.world_size)


def _sliced_ok(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> bool:
    from gvpo_offline.model import rank0_load, sliced_load

    files = sliced_load.WeightFiles.of(folder)
    if files is None:
        return False
    return sliced_load.weight_keys(rank0_load.build_on_meta(folder, dtype, trust_remote_code), files) is not None


def _maybe_layers(model) -> list:
    try:
        return decoder_layers(model)
    except GvpoError:
        return []


def does_not_fit(plan: MemoryPlan) -> str:
    """The one-line refusal, with advice that exists on this device."""
    if plan.on_gpu:
        advice = ("use more GPUs (torchrun --nproc_per_node / --nnodes), --cpu-offload, --lora-r, "
                  "--gradient-checkpointing or a smaller --micro-batch-tokens (activations), or a smaller model")
    else:
        advice = ("on CPU all processes of a node share its RAM, so more processes on this machine do not help: use "
                  "--lora-r, --gradient-checkpointing or a smaller --micro-batch-tokens (activations), more machines "
                  "(torchrun --nnodes), a GPU, or a smaller model")
    need = f"needs {plan.peak_bytes / GIB:.2f} GiB per process"
    return f"does not fit: {plan.describe()}; {need}; {advice}"


def check_fits(ctx: Dist, plan: MemoryPlan) -> None:
    """Refuse a run whose peak (:attr:`MemoryPlan.peak_bytes`) exceeds its capacity (one-line error with
    the plan and advice for the device); the ranks decide together, so that none goes on alone."""
    too_big = plan.capacity_bytes is not None and plan.peak_bytes > plan.capacity_bytes
    if all_reduce_max(ctx, [int(too_big)])[0]:
        raise GvpoError(does_not_fit(plan))


def check_adapter_fits(ctx: Dist, adapter_params: int, device: torch.device, cpu_offload: bool = False,
                       shard_size: int | None = None) -> None:
    """Refuse, before peft allocates it, a LoRA adapter (``adapter_params``: adapters.lora_param_count)
    whose training state alone (fp32 weights, gradients and AdamW moments: 16 B per parameter, plus the
    full fp32 weights on rank 0 while they are broadcast) exceeds the memory free now, with the base model
    loaded: available RAM on CPU (or with --cpu-offload), the GPU's free memory on GPU. On CPU too: an
    oversized --lora-r would otherwise be killed by the kernel's OOM killer, with no message.
    ``shard_size``: under HSDP the processes of one node, over which the state is sharded (default all)."""
    on_gpu = device.type == "cuda" and not cpu_offload
    free = torch.cuda.mem_get_info(device)[0] if on_gpu else available_ram_bytes()
    plan = plan_for(adapter_params, 0, ctx.world_size, on_gpu, shard_size=shard_size)
    need = plan.per_rank_bytes + plan.rank0_load_bytes
    too_big = free is not None and need > free
    if all_reduce_max(ctx, [int(too_big)])[0]:
        raise GvpoError(f"does not fit: the LoRA adapter has {adapter_params / 1e6:,.1f}M trainable parameters, "
                        f"{need / GIB:.2f} GiB of training state per process, and "
                        f"{'the GPU' if on_gpu else 'CPU RAM'} has {(free or 0) / GIB:.2f} GiB free; "
                        "use a smaller --lora-r (or --lora-target)")
