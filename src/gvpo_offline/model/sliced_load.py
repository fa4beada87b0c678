"""Loading the model to train under ``torchrun`` without any process holding it whole: every rank builds it
without weights, shards it, and reads from the safetensors files only the rows of its own shards.

Memory while loading, on every rank: its shards, plus one slice in flight (the rows of one tensor that
belong to this rank, in the file's dtype), plus the buffers (rotary tables) and, for LoRA, the small
adapter weights. No rank reads the whole model, and nothing is broadcast.

The steps (:func:`build_empty` on every rank, then :func:`shard_and_fill`):

1. the model class from config.json is built with its parameters on ``meta`` and its buffers real (computed
   by the modules' own ``__init__``, as a plain load computes them); each parameter is then replaced by a
   *placeholder*: a tensor of the right shape and dtype on CPU whose every element is one shared zero
   (``torch.zeros(()).expand(shape)``: one element of memory). peft sees CPU weights of the right dtype, so
   LoRA layers added now are real, on CPU, with exactly the values a plain load would give them (same
   seeded RNG draws). The parameters tied together (``lm_head`` = ``embed_tokens``) stay one object.
2. the caller wraps it (peft LoRA, gradient checkpointing) and makes its memory plan.
3. :func:`shard_and_fill`: the placeholders become ``meta`` parameters again, ``distributed.shard_model``
   (FSDP2's ``fully_shard``) shards the model, ``to_empty`` allocates this rank's shards, and each shard is
   filled: base weights from the files (``safe_open(...).get_slice(name)[rows]``: FSDP shards dim 0, so a
   rank's rows are one contiguous range of the file), the other parameters (LoRA) and the buffers from the
   real values kept from step 1, rank 0's (broadcast, so that a random LoRA A is the same on every rank). The cast to the parameter's dtype is the one ``from_pretrained`` does, so
   the weights are bit-identical to a plain load.

:func:`weight_keys` decides whether this applies: every parameter (or one of the names it is tied to) and
every persistent buffer must be a tensor of the same shape in the folder's ``*.safetensors`` files. A model
whose checkpoint names differ from its module names (transformers converts some on load), ``.bin`` weights
or an adapter folder (merged on load) are loaded the other way (rank0_load.py: rank 0 reads the whole model
and broadcasts it).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor

INDEX = "model.safetensors.index.json"


class WeightFiles:
    """The tensors of a model folder's safetensors files, by name; rows of one are read without the rest.

    Each read opens the file (memory-mapped by safetensors), copies the asked rows out and closes it, so
    no mapping (and no page of the file) outlives the read."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / INDEX
        if index.is_file():
            self.where = {key: folder / name for key, name in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            self.where = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(path, framework="pt") as handle:
                    self.where.update(dict.fromkeys(handle.keys(), path))

    @classmethod
    def of(cls, folder: Path) -> WeightFiles | None:
        """The folder's safetensors weights; None when it has other weight files (.bin, .pt) or none."""
        from gvpo_offline.model.loading import WEIGHT_SUFFIXES

        weights = [p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
        if not weights or any(p.suffix != ".safetensors" for p in weights):
            return None
        return cls(folder)

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self.where[key], framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def read(self, key: str, rows: slice) -> Tensor:
        """Rows ``rows`` (along dim 0) of tensor ``key``, in the file's dtype: a copy, the file closed."""
        from safetensors import safe_open

        with safe_open(self.where[key], framework="pt") as handle:
            return handle.get_slice(key)[rows].clone()


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created in the block live on ``meta`` (no memory, initialisers do nothing); buffers are
    real (what ``accelerate.init_empty_weights(include_buffers=False)`` does)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def build_empty(folder: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model class of ``folder``'s config.json in ``dtype``, eval mode, every parameter a placeholder
    (one shared zero of the right shape and dtype, see the module docstring) and its buffers real."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    placeholders: dict[int, torch.nn.Parameter] = {}  # by the meta parameter's id: tied ones stay one object
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in placeholders:
                    empty = torch.zeros((), dtype=param.dtype).expand(param.shape)
                    placeholders[id(param)] = torch.nn.Parameter(empty, requires_grad=param.requires_grad)
                module._parameters[name] = placeholders[id(param)]
    return model.eval()


def is_placeholder(t: Tensor) -> bool:
    return t.dim() > 0 and t.numel() > 1 and all(s == 0 for s in t.stride())


def weight_keys(model, files: WeightFiles) -> list[tuple[torch.nn.Module, str, str]] | None:
    """(module, attribute, key in ``files``) of every parameter and persistent buffer of ``model`` (a plain
    transformers model); tied parameters once, under a name the files have. None when one is missing from
    the files or has another shape there (then the model must be loaded by ``from_pretrained``)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    aliases: dict[str, set[str]] = {}
    for target, source in tied.items():
        aliases.setdefault(target, set()).add(source)
        aliases.setdefault(source, set()).add(target)
    names: dict[int, list[str]] = {}
    owner: dict[int, tuple[torch.nn.Module, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in [*module._parameters.items(),
                             *((a, b) for a, b in module._buffers.items() if a not in module._non_persistent_buffers_set)]:
            if tensor is None:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            names.setdefault(id(tensor), []).append(name)
            owner.setdefault(id(tensor), (module, attr))
    entries = []
    for ident, tensor_names in names.items():
        candidates = [*tensor_names, *(a for n in tensor_names for a in sorted(aliases.get(n, ())))]
        key = next((k for k in candidates if k in files.where), None)
        module, attr = owner[ident]
        tensor = getattr(module, attr)
        if key is None or files.shape(key) != tuple(tensor.shape):
            return None
        entries.append((module, attr, key))
    return entries


def _fill(param: Tensor, rows_of) -> None:
    """Copy ``rows_of(slice)`` (the full tensor's rows of this rank's shard) into ``param``'s local shard
    (a DTensor sharded on dim 0, FSDP2's layout; a plain tensor: all of it). ``copy_`` casts to its dtype."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        param.copy_(rows_of(slice(None)))
        return
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if local.numel() == 0:
        return
    if any(offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise NotImplementedError(f"a shard that is not whole rows: {tuple(shape)} at {tuple(offset)}")
    local.copy_(rows_of(slice(offset[0], offset[0] + shape[0])))


def _from_rank0(ctx, tensors: list[Tensor]) -> None:
    """Rank 0's values of ``tensors`` (small: LoRA weights, buffers) on every rank, bit for bit, one at a
    time through the communication device (a random LoRA A must be the same on every rank)."""
    import torch.distributed as dist

    if not ctx.enabled:
        return
    comm = ctx.device if ctx.device is not None and ctx.device.type == "cuda" else torch.device("cpu")
    with torch.no_grad():
        for t in tensors:
            moving = t.to(comm, copy=True).contiguous()
            dist.broadcast(moving, src=0)
            t.copy_(moving)


def shard_and_fill(ctx, model, entries, files: WeightFiles, cpu_offload: bool = False,
                   param_dtype: torch.dtype | None = None, hsdp: bool = False):
    """``distributed.shard_model`` of a :func:`build_empty` model (possibly wrapped since, e.g. by peft),
    each rank's shards then filled from ``files`` (``entries``: :func:`weight_keys` of the plain model) and
    from the real values the placeholders did not replace (LoRA weights, buffers). Returns the model."""
    from gvpo_offline.model import distributed

    real_params, buffers, metas = [], [], {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if is_placeholder(param):  # back to meta: FSDP allocates only this rank's shard of it
                if id(param) not in metas:
                    metas[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                                          requires_grad=param.requires_grad)
                module._parameters[name] = metas[id(param)]
            else:
                real_params.append((module, name, param.detach()))
        buffers += [(module, name, b) for name, b in module._buffers.items() if b is not None]
    _from_rank0(ctx, [full for *_, full in real_params] + [b for *_, b in buffers])
    model = distributed.shard_model(ctx, model, cpu_offload, param_dtype, hsdp)
    model.to_empty(device="cpu" if cpu_offload else ctx.device)  # uninitialised shards and buffers
    with torch.no_grad():
        for module, name, full in real_params:
            _fill(module._parameters[name], lambda rows, full=full: full[rows])
        for module, name, full in buffers:  # not sharded; with --cpu-offload they live on the GPU all the same
            module._buffers[name] = full.to(ctx.device, copy=True)
        for module, attr, key in entries:
            target = module._parameters.get(attr) if attr in module._parameters else None
            if target is not None:
                _fill(target, lambda rows, key=key: files.read(key, rows))
            else:  # a persistent buffer (whole on every rank)
                module._buffers[attr].copy_(files.read(key, slice(None)))
    return model
