"""fp32 master weights for full fine-tuning of a model held in bf16.

The cache's reference log-probs come from the weights in their loaded dtype W (``precompute-ref
--dtype``). Full fine-tuning in W = bfloat16 keeps the model itself in bf16, so its forward pass is the
reference's forward bit for bit (ℓ = 0 at step 0 to rounding), and gives AdamW float32 copies of the
trainable weights: each gradient is accumulated into its copy's ``.grad`` in fp32 (a hook, as soon as
a micro-batch's backward has produced it, so no bf16 gradient is summed or kept), AdamW steps the
copies, and :meth:`MasterWeights.to_model` rounds them into the model. Updates smaller than bf16's
resolution (lr 1e-6 on a weight of 1 is 1/8 of a bf16 step) accumulate in the copies instead of being
lost. Memory per trainable parameter: 2 (bf16 weight) + 4 (master) + 4 (fp32 gradient) + 8 (AdamW) bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASTER_WEIGHTS = "master_weights.pt"  # in a checkpoint folder: the fp32 copies, in parameter order


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

    def state(self) -> list[Tensor]:
        return [m.detach().cpu() for m in self.master]

    @torch.no_grad()
    def load(self, tensors: list[Tensor]) -> None:
        """The copies a checkpoint saved (:meth:`state`), then rounded into the model."""
        if len(tensors) != len(self.master) or any(t.shape != m.shape for t, m in zip(tensors, self.master)):
            raise ValueError("the checkpoint's master weights do not match the model's trainable parameters")
        for m, t in zip(self.master, tensors):
            m.copy_(t)
        self.to_model()
