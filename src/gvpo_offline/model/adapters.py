"""LoRA adapters (peft): the trainable policy, the adapter folder train writes, loading one back.

``train --lora-r R`` wraps the frozen model (the reference, or ``--init-model``) with peft LoRA layers.
The reference log-probs are already cached, so no second model and no adapter switching is needed.

- **ℓ = 0 at step 0**: peft initialises B = 0, so the wrapped model computes exactly the base model's
  function; the policy stays in eval mode, and the default ``lora_dropout = 0`` keeps it deterministic
  (a dropout > 0 would only act in training mode, but even there it would make ℓ random).
- **Precision**: the base weights are ``base_dtype`` (float32 by default, the reference's regime;
  bfloat16 halves their memory on a GPU, at the price of ℓ at step 0 being bf16 rounding, not 0); the
  adapter weights and their AdamW state are always float32 (peft's ``autocast_adapter_dtype``).
- **Folder**: ``save_pretrained`` of the peft model = ``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable with ``peft.AutoPeftModelForCausalLM.from_pretrained``;
  ``base_model_name_or_path`` is the base's hub id (with its commit in ``revision``) when it came from
  the hub, else its absolute folder. ``train_config.json`` beside it records the base model's content
  fingerprint, which :func:`load_merged` checks, so an adapter is never applied to another base.
- **Merged** (``train --merge``): peft's ``merge_and_unload`` folds B·A into the base weights, giving a
  plain transformers model (in the base's dtype); :func:`load_merged` does the same for eval and sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gvpo_offline.model.loading import ADAPTER_CONFIG, BASE_FINGERPRINT, TRAIN_CONFIG  # noqa: F401 (re-exported)
from gvpo_offline.runtime.errors import GvpoError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    """``train --lora-*``. alpha None = r (scale α/r = 1); target_modules: "all-linear" (every linear
    layer but the LM head) or comma-separated module names such as "q_proj,v_proj"."""

    r: int
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: str = "all-linear"

    def __post_init__(self):
        if self.r < 1:
            raise GvpoError(f"--lora-r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise GvpoError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.alpha is not None and not 0 < self.alpha < math.inf:
            raise GvpoError(f"--lora-alpha must be a finite number > 0, got {self.alpha}")
        if not self.target_modules.strip(" ,"):
            raise GvpoError("--lora-target-modules is empty")

    def peft_config(self):
        from peft import LoraConfig

        targets = self.target_modules.strip()
        modules = targets if targets == "all-linear" else [m.strip() for m in targets.split(",") if m.strip()]
        return LoraConfig(r=self.r, lora_alpha=self.alpha or self.r, lora_dropout=self.dropout,
                          target_modules=modules, bias="none", task_type="CAUSAL_LM")


def base_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise GvpoError(f"unknown --base-dtype {name!r}: use float32 or bfloat16")
    return table[name]


def add_lora(base, settings: LoraSettings, checkpoint: Path | None = None):
    """The peft model to train: fresh LoRA layers (B = 0: the base's function exactly) or, with
    ``checkpoint``, the adapter saved there (trainable, for --resume). Eval mode; adapter in float32."""
    from peft import PeftModel, get_peft_model

    try:
        if checkpoint is not None:
            model = PeftModel.from_pretrained(base, checkpoint, is_trainable=True)
        else:
            model = get_peft_model(base, settings.peft_config())
    except ValueError as err:  # e.g. target modules not found in the model
        raise GvpoError(f"LoRA: {str(err).splitlines()[0]}") from None
    return model.eval()


def set_base_name(model, name: str, revision: str | None) -> None:
    """What adapter_config.json will call the base model (a hub id and commit, or a folder)."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = name
        config.revision = revision
