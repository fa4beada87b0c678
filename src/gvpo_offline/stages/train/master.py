"""fp32 master weights for full fine-tuning of a model held in bf16.

The cache's reference log-probs come from the weights in their loaded dtype W (``precompute-ref
--dtype``). Full fine-tuning in W = bfloat16 keeps the model itself in bf16, so its forward pass is the
reference's forward bit for bit (ℓ = 0 at step 0 to rounding), and gives AdamW float32 copies of the
trainable weights: each gradient is accumulated into its copy's ``.grad`` in fp32 (a hook, as soon as
a micro-batch's backward has produced it, so no bf16 gradient is summed or kept), AdamW steps the
copies, and :meth:`MasterWeights.to_model` rounds them into the model. Updates smaller than bf16's
resolution (lr 1e-6 on a weight of 1 is 1/8 of a bf16 step) accumulate in the copies instead of being
lost. Memory per trainable parameter: 2 (bf16 weight) + 4 (master) + 4 (fp32 gradient) + 8 (AdamW) bytes.

Checkpoints (:meth:`MasterWeights.save` / :meth:`MasterWeights.load_saved`): the copies and AdamW's state
keyed by parameter name with torch.distributed.checkpoint, in the layout a sharded run writes (its FSDP
shards are fp32 master weights as well, gathered in bf16 for the forward), so a one-process bf16 run
resumes on N processes and a sharded one on one process, DCP resharding either way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from gvpo_offline.model import distributed

MASTER_WEIGHTS = "master_weights.pt"  # older checkpoints: the fp32 copies as a list, in parameter order


class MasterWeights:
    """fp32 copies of ``params`` (a low-precision model's trainable parameters) for the optimizer."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.master = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
        self.hooks = [p.register_post_accumulate_grad_hook(self._accumulate_into(m)) for p, m in zip(params, self.master)]

    def remove(self) -> None:
        """Stop diverting the model's gradients into the copies."""
        for hook in self.hooks:
            hook.remove()

    @staticmethod
    def _accumulate_into(master: torch.nn.Parameter):
        def hook(param: Tensor) -> None:
            grad = param.grad.float()
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            param.grad = None

        return hook

    @torch.no_grad()
    def to_model(self) -> None:
        """Round the fp32 copies into the model's weights (after each optimizer step)."""
        for p, m in zip(self.params, self.master):
            p.copy_(m)

    def load(self, tensors: list[Tensor]) -> None:
        """The copies an older checkpoint saved (:meth:`state`, :data:`MASTER_WEIGHTS`), then rounded into the model."""
        copy_saved_masters(self.master, tensors)
        self.to_model()

    # ---- checkpoints keyed by name (torch.distributed.checkpoint) ------------------------------------

    def state_dicts(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """(model, optimizer) state dicts keyed by parameter name, as ``get_state_dict`` gives them for a
        sharded model whose shards are the master weights: ``model.state_dict()`` with the fp32 copy in place
        of each trainable weight (under every name of a tied weight), and ``optimizer.state_dict()`` (an
        optimizer over :attr:`master`, in its order) with each parameter's first name in place of its index.
        The tensors are the live ones (DCP loads into them in place)."""
        names = trainable_names(model, self.params)
        model_sd = dict(model.state_dict())
        for aliases, m in zip(names, self.master):
            for name in aliases:
                model_sd[name] = m.detach()
        first = [aliases[0] for aliases in names]
        saved = optimizer.state_dict()
        optim_sd = {"state": {first[i]: state for i, state in saved["state"].items()},
                    "param_groups": [{**group, "params": [first[i] for i in group["params"]]}
                                     for group in saved["param_groups"]]}
        return model_sd, optim_sd

    def save(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write :meth:`state_dicts` into ``folder`` ({"model": ..., "optimizer": ...}, distributed.save_sharded's
        layout) with torch.distributed.checkpoint, from this one process."""
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = self.state_dicts(model, optimizer)
        with distributed.checkpoint_errors():
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder), no_dist=True)

    @torch.no_grad()
    def load_saved(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load the master weights and the optimizer state of :meth:`save`, or of a sharded run's checkpoint
        (distributed.save_sharded, any number of processes), then round the copies into the model."""
        import torch.distributed.checkpoint as dcp

        _create_state(optimizer)  # tensors for DCP to load into
        model_sd, optim_sd = self.state_dicts(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        with distributed.checkpoint_errors():
            dcp.load(state, checkpoint_id=str(folder), no_dist=True)
        index = {aliases[0]: i for i, aliases in enumerate(trainable_names(model, self.params))}
        loaded = state["optimizer"]  # its state tensors were loaded in place, its param groups replaced
        optimizer.load_state_dict({"state": {index[name]: s for name, s in loaded["state"].items()},
                                   "param_groups": [{**group, "params": [index[n] for n in group["params"]]}
                                                    for group in loaded["param_groups"]]})
        self.to_model()


@torch.no_grad()
def copy_saved_masters(params: list[Tensor], tensors: list[Tensor]) -> None:
    """Copy an older checkpoint's master weights (:data:`MASTER_WEIGHTS`: a list in trainable-parameter order)
    into ``params``."""
    if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
        raise ValueError("the checkpoint's master weights do not match the model's trainable parameters")
    for p, t in zip(params, tensors):
        p.copy_(t)


def trainable_names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[list[str]]:
    """For each of ``params``, its names in ``model`` (a tied weight has several), first the one
    ``model.named_parameters()`` gives it."""
    names: dict[int, list[str]] = {id(p): [] for p in params}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in names:
            names[id(p)].append(name)
    if any(not aliases for aliases in names.values()):
        raise ValueError("a trainable parameter is not one of the model's")
    return [names[id(p)] for p in params]


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW makes its state tensors at its first step: take one with zero gradients and lr 0, which moves no
    weight (a checkpoint's state then replaces the step count and moments); what
    torch.distributed.checkpoint.state_dict does before it loads an optimizer."""
    if optimizer.state:
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
