"""Loading the model to train under ``torchrun``: by default each rank reads only its own shards' rows of
the safetensors files (sliced_load.py: no process ever holds the whole model); where that cannot be done
(an adapter folder to merge, ``.bin`` weights, checkpoint names transformers converts), rank 0 reads the
weights, the other ranks build the model on the ``meta`` device, and the weights reach every rank's FSDP
shards by broadcast from rank 0, as described below.

Without either, every rank would hold the whole fp32 model in CPU RAM before sharding (8 copies of a 70B
model on an 8-GPU node). With the broadcast, while loading:

* rank 0 holds the full model (as a plain single-process load would) plus its own shards;
* every other rank holds only its shards plus one tensor in flight (the one being broadcast).

The steps (:func:`load_for_sharding`, then :func:`shard_and_broadcast`):

1. rank 0: ``loading.load_model`` on CPU (an adapter folder: its base with the adapter merged in); other
   ranks: the same class from the same config.json, same dtype, on ``meta`` (no memory, no weights read).
   The ranks then compare every parameter's and buffer's (name, shape, dtype) with rank 0's and agree on
   success (``distributed.agree``: a failed load on one rank stops all of them with one line, never a hang).
2. the caller wraps it as usual (peft LoRA layers, gradient checkpointing, memory plan) on every rank;
3. rank 0 keeps references to its full state dict; ``distributed.shard_model`` (``fully_shard``) on every
   rank; the meta ranks allocate their (uninitialised) shards with ``to_empty``; then
   ``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`` copies rank 0's tensors,
   one at a time, into every rank's shards. Tied weights (e.g. ``lm_head.weight`` is
   ``embed_tokens.weight``) are one parameter on every rank and are filled once per name, with equal values.
4. buffers that are not in the state dict (non-persistent: rotary ``inv_freq``, ``original_inv_freq``)
   are copied from rank 0 as they are, bit for bit, rather than recomputed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gvpo_offline.model import distributed
from gvpo_offline.runtime.errors import GvpoError


def load_for_sharding(ctx: distributed.Dist, path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False,
                      sliced: bool = True):
    """The model at ``path`` in ``dtype``, eval mode: built without weights on every rank
    (:func:`sliced_load_model`), or else loaded on CPU on rank 0 and built on ``meta`` elsewhere.

    A collective: every rank calls it. Raises the same GvpoError on every rank (``distributed.agree``:
    "rank R: cannot load the model ...") when any rank failed, or when a meta-built model is not the
    architecture rank 0 loaded; one process: the error itself."""
    from gvpo_offline.model.loading import load_model

    model, error = None, None
    try:  # None: this model is loaded by rank 0 (``sliced=False``: always, as before sliced_load.py)
        model = sliced_load_model(path, dtype, trust_remote_code) if sliced else None
    except Exception as err:  # noqa: BLE001 - any failure: every rank stops with its one line
        error = GvpoError(f"cannot load the model {path}: {_one_line(err)}")
    distributed.agree(ctx, error)
    if model is not None:
        return model
    try:
        model = load_model(path, torch.device("cpu"), dtype, trust_remote_code) if ctx.is_main else \
            build_on_meta(path, dtype, trust_remote_code)
    except Exception as err:  # noqa: BLE001 - any failure: every rank stops with its one line
        error = GvpoError(f"cannot load the model {path}: {_one_line(err)}")
    distributed.agree(ctx, error)
    mine, rank0 = _layout(model), distributed.broadcast_object(ctx, _layout(model))
    if mine != rank0:
        diff = sorted(set(mine.items()) ^ set(rank0.items()))[0]
        error = GvpoError(f"{path}: the model built from its config.json is not the one rank 0 loaded "
                          f"(first difference: {diff}); this architecture cannot be loaded on rank 0 only")
    distributed.agree(ctx, error)
    return model


def sliced_load_model(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model at ``path`` as sliced_load.py builds it (no weight read yet: each rank reads its own
    shards' rows in :func:`shard_and_broadcast`), or None when the folder is not one it can load that way
    (an adapter folder, weights other than safetensors, checkpoint names that differ from the model's).
    Every rank decides alike: it reads the same files."""
    from gvpo_offline.model import loading, sliced_load

    folder = loading.model_folder(path)
    files = None if loading.is_adapter(folder) else sliced_load.WeightFiles.of(folder)
    if files is None:
        return None
    model = sliced_load.build_empty(folder, dtype, trust_remote_code)
    entries = sliced_load.weight_keys(model, files)
    if entries is None:
        return None
    model.gvpo_sliced_source = (entries, files)
    return model


def build_on_meta(path: str | Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model ``loading.load_model(path, ..., dtype)`` would give, without weights, on ``meta``.
    An adapter folder gives its base model's architecture (merging keeps the base's class and shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gvpo_offline.model import loading

    folder = loading.model_folder(path)
    if loading.is_adapter(folder):
        folder = loading.model_folder(loading.base_spec(folder))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def shard_and_broadcast(ctx: distributed.Dist, model, cpu_offload: bool = False, param_dtype: torch.dtype | None = None,
                        hsdp: bool = False):
    """``distributed.shard_model`` of a :func:`load_for_sharding` model (possibly wrapped since, e.g. by
    peft), then rank 0's weights and buffers copied into every rank's shards. Returns the sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from gvpo_offline.model import loading, sliced_load

    sliced = loading.unwrap_peft(model).__dict__.pop("gvpo_sliced_source", None)
    if sliced is not None:  # every rank reads its own shards' rows (sliced_load.py)
        return sliced_load.shard_and_fill(ctx, model, *sliced, cpu_offload=cpu_offload, param_dtype=param_dtype,
                                          hsdp=hsdp)
    full_state = model.state_dict() if ctx.is_main else {}  # references to rank 0's full tensors, no copy
    stateless = _stateless_buffers(model)
    model = distributed.shard_model(ctx, model, cpu_offload, param_dtype, hsdp)  # hsdp: distributed.device_mesh
    if not ctx.is_main:  # meta -> uninitialised memory for this rank's shards and the buffers
        model.to_empty(device="cpu" if cpu_offload else ctx.device)
        if cpu_offload:  # shards stay in CPU RAM; buffers live where rank 0's fully_shard put them
            for module, name, buffer in _buffers(model):
                module._buffers[name] = buffer.to(ctx.device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full_state
    _broadcast_buffers(ctx, model, stateless)
    return model


def _layout(model) -> dict[str, tuple]:
    """(shape, dtype) of every parameter and buffer by name (tied parameters once, by their first name)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {name: (tuple(t.shape), str(t.dtype)) for name, t in named}


def _buffers(model):
    """(owning module, attribute name, tensor) of every buffer."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                yield module, name, buffer


def _stateless_buffers(model) -> list[str]:
    """Names of the buffers that ``state_dict`` leaves out (registered with ``persistent=False``)."""
    in_state = set(model.state_dict().keys())
    return [name for name, _ in model.named_buffers() if name not in in_state]


def _broadcast_buffers(ctx: distributed.Dist, model, names: list[str]) -> None:
    """Rank 0's buffers ``names`` replace the other ranks' (same dtype and shape, bit for bit)."""
    import torch.distributed as dist

    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        buffer = owner._buffers[leaf]
        if not ctx.is_main:
            buffer = torch.empty_like(buffer)
        dist.broadcast(buffer, src=0)
        owner._buffers[leaf] = buffer


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())[:300]
    return text if isinstance(error, GvpoError) else f"{type(error).__name__}: {text}"
